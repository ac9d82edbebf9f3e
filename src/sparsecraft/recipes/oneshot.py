"""One-shot pruning of a causal language model as one repeatable job.

``OneShotJob`` is what the CLI flags (or a YAML file) describe; ``run_one_shot`` loads the model
and texts, measures perplexity before, prunes block by block, measures after, and writes the
pruned model in Hugging Face format with the job (``oneshot.yaml``) and the per-layer report
(``sparsity_report.json``) beside it, atomically. Example::

    model: ../models/smollm2-135m
    method: wanda            # magnitude, magnitude-row, wanda, sparsegpt
    sparsity: 0.5            # or pattern: "2:4"
    dsnot: {max_cycles: 50, threshold: 0.1, var_power: 1.0}   # optional
    owl: {M: 5, lam: 0.08}   # optional, unstructured only
    calib: ../shared/data/tinyshakespeare.txt
    nsamples: 128
    seqlen: 512
    eval: ../shared/data/wikitext2-test.txt
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from torch import nn

from sparsecraft.analysis.perplexity import perplexity
from sparsecraft.data.text import calibration_samples, eval_windows, read_text, tokenize
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.oneshot import ONE_SHOT, STATS_FREE, DSnoTConfig
from sparsecraft.methods.sequential import OneShotResult, OWLConfig, nm_from_pattern, prune_decoder
from sparsecraft.models.hf import load_causal_lm, save_pretrained_atomic
from sparsecraft.recipes.schema import RecipeError, _build, _line_finder
from sparsecraft.utils import peak_rss_bytes


@dataclass
class DSnoTSection:
    max_cycles: int = 50
    threshold: float = 0.1
    var_power: float = 1.0


@dataclass
class OWLSection:
    M: float = 5.0
    lam: float = 0.08


@dataclass
class OneShotJob:
    model: str = ""
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    dsnot: Optional[DSnoTSection] = None
    owl: Optional[OWLSection] = None
    calib: Optional[str] = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval: Optional[str] = None
    eval_seqlen: Optional[int] = None
    eval_windows: Optional[int] = None
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None
    batch_size: int = 8

    def validate(self) -> None:
        """Raise a SparsecraftError naming the field, before anything is loaded."""
        ONE_SHOT.get(self.method)
        n, m = nm_from_pattern(self.pattern)
        if not m and not 0.0 <= self.sparsity < 1.0:
            raise SparsecraftError(f"sparsity={self.sparsity} must lie in [0, 1)")
        if m and self.owl is not None:
            raise SparsecraftError("owl sets a sparsity per block and does not combine with an N:M pattern")
        if self.calib is None and (self.method not in STATS_FREE or self.dsnot is not None or self.owl is not None):
            raise SparsecraftError(f"method {self.method!r} (with DSnoT or OWL) needs calibration text: pass --calib FILE")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise SparsecraftError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def target_sparsity(self) -> float:
        n, m = nm_from_pattern(self.pattern)
        return 1.0 - n / m if m else self.sparsity

    def to_yaml(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != {}}
        return yaml.safe_dump(data, sort_keys=False)


def parse_job(text: str, source: str = "<job>") -> OneShotJob:
    """A job from YAML text; unknown or mistyped fields name the line."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: does not parse: {e}") from None
    find = _line_finder(text, ".yaml")

    def where(path: list[str]) -> str:
        line = find(path) if path else None
        return f"{source}:{line}" if line else source

    return _build(OneShotJob, data, [], where)


@dataclass
class OneShotOutcome:
    job: OneShotJob
    result: OneShotResult
    ppl_before: float | None
    ppl_after: float | None
    prune_seconds: float
    peak_rss_bytes: int
    output: Path | None

    def summary(self) -> dict[str, Any]:
        """The fields ``--json`` prints."""
        return {
            "model": self.job.model,
            "method": self.job.method,
            "dsnot": self.job.dsnot is not None,
            "owl": self.job.owl is not None,
            "pattern": self.result.pattern,
            "target_sparsity": self.job.target_sparsity,
            "sparsity": self.result.sparsity,
            "ppl_before": self.ppl_before,
            "ppl_after": self.ppl_after,
            "prune_seconds": self.prune_seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
            "mean_reconstruction_error": self.result.mean_error,
            "calibration_tokens": self.job.nsamples * self.job.seqlen if self.job.calib else 0,
            "output": str(self.output) if self.output else None,
        }


def evaluate_text(model: nn.Module, tokenizer: Any, path: str, seqlen: int, max_windows: int | None, progress: bool) -> tuple[float, int]:
    """(perplexity, tokens evaluated) on the non-overlapping windows of a text file."""
    windows = eval_windows(tokenize(tokenizer, read_text(path, "eval")), seqlen, max_windows)
    return perplexity(model, windows, batch_size=1, progress=progress), windows.numel()


def run_one_shot(
    job: OneShotJob,
    output: Path | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    log: Any = None,
) -> OneShotOutcome:
    """Load, (evaluate), prune, (evaluate), save. Nothing is written unless all of it succeeds."""
    job.validate()
    say = log or (lambda _msg: None)
    if output is not None and output.exists() and any(output.iterdir()):
        raise SparsecraftError(f"output folder {output} exists and is not empty; choose a new --out or remove it")
    if model is None:
        say(f"loading {job.model}")
        model, tokenizer = load_causal_lm(job.model)
    n, m = nm_from_pattern(job.pattern)
    samples = None
    if job.calib is not None:
        samples = calibration_samples(tokenize(tokenizer, read_text(job.calib, "calib")), job.nsamples, job.seqlen, job.seed, "calib")
    eval_seqlen = job.eval_seqlen or job.seqlen
    ppl_before = None
    if job.eval is not None:
        ppl_before, _ = evaluate_text(model, tokenizer, job.eval, eval_seqlen, job.eval_windows, progress)
        say(f"perplexity before: {ppl_before:.3f}")
    start = time.perf_counter()
    dsnot = DSnoTConfig(**dataclasses.asdict(job.dsnot)) if job.dsnot is not None else None
    owl = OWLConfig(**dataclasses.asdict(job.owl)) if job.owl is not None else None
    result = prune_decoder(model, samples, job.method, job.sparsity, n, m, dsnot, owl, job.include, job.exclude,
                           job.batch_size, progress)
    prune_seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    ppl_after = None
    if job.eval is not None:
        ppl_after, _ = evaluate_text(model, tokenizer, job.eval, eval_seqlen, job.eval_windows, progress)
        say(f"perplexity after: {ppl_after:.3f}")
    outcome = OneShotOutcome(job, result, ppl_before, ppl_after, prune_seconds, peak, output)
    if output is not None:
        report = {"summary": outcome.summary(), **result.to_dict()}
        save_pretrained_atomic(model, tokenizer, output, {
            "oneshot.yaml": job.to_yaml(),
            "sparsity_report.json": json.dumps(report, indent=2),
        })
    return outcome


def dense_perplexity(model_source: str, text: str, seqlen: int, max_windows: int | None, progress: bool = True) -> tuple[float, int]:
    """(perplexity, tokens evaluated) of a model folder / GGUF / hub id on a text file."""
    model, tokenizer = load_causal_lm(model_source)
    return evaluate_text(model, tokenizer, text, seqlen, max_windows, progress)
