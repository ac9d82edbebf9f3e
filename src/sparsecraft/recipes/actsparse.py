"""Training-free activation sparsity for a causal LM as one job: calibrate, evaluate, time, save.

``run_actsparse`` loads the model, calibrates ``method`` at ``sparsity`` on the calibration text,
evaluates perplexity dense and activation-sparse (every position sparsified, as token-by-token
decoding would), optionally measures one-token decode speed of the dense and the sparse model in
the same process, and writes the result folder (see ``methods/activation/io.py``).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sparsecraft.analysis.perplexity import perplexity
from sparsecraft.data.text import calibration_samples, eval_windows, read_text, tokenize
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.activation.calibrate import METHODS, measured_sparsity, sparsify_activations
from sparsecraft.methods.activation.io import save_activation_sparse
from sparsecraft.methods.activation.modules import MODES, sparsify_everywhere
from sparsecraft.methods.activation.thresholds import check_sparsity
from sparsecraft.models.hf import load_causal_lm


@dataclass
class ActSparseJob:
    model: str
    method: str = "threshold"
    sparsity: float = 0.5
    calib: str | None = None
    nsamples: int = 16
    seqlen: int = 512
    eval: str | None = None
    eval_windows: int | None = 16
    mode: str = "decode"
    speed_tokens: int = 0  # >0: time decoding this many new tokens, dense vs sparse
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SparsecraftError(f"--method: {self.method!r} is not one of {', '.join(METHODS)}")
        check_sparsity(self.sparsity, "--sparsity")
        if self.mode not in MODES:
            raise SparsecraftError(f"--mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.method != "wina" and not self.calib:
            raise SparsecraftError(f"--calib: {self.method} calibrates thresholds on text; give a calibration text file")
        for option, path in (("--calib", self.calib), ("--eval", self.eval)):
            if path and not Path(path).is_file():
                raise SparsecraftError(f"{option}: no file at {path}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise SparsecraftError("--nsamples must be >= 1 and --seqlen >= 2")


@dataclass
class ActSparseOutcome:
    job: ActSparseJob
    layers: dict[str, float] = field(default_factory=dict)  # measured dropped fraction per layer (calibration text)
    ppl_dense: float | None = None
    ppl_sparse: float | None = None
    decode_tps_dense: float | None = None
    decode_tps_sparse: float | None = None
    calibrate_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        measured = statistics.fmean(self.layers.values()) if self.layers else None
        speedup = (self.decode_tps_sparse / self.decode_tps_dense) if self.decode_tps_dense and self.decode_tps_sparse else None
        return {"model": self.job.model, "method": self.job.method, "target_sparsity": self.job.sparsity,
                "measured_sparsity": measured, "mode": self.job.mode, "layers": len(self.layers),
                "ppl_dense": self.ppl_dense, "ppl_sparse": self.ppl_sparse,
                "decode_tokens_per_second_dense": self.decode_tps_dense, "decode_tokens_per_second_sparse": self.decode_tps_sparse,
                "decode_speedup": speedup, "calibrate_seconds": self.calibrate_seconds}


def decode_speed(dense: Any, sparse: Any, prompt: Any, new_tokens: int, rounds: int = 3) -> tuple[float, float]:
    """Median tokens/s of greedy one-token decoding, dense and sparse alternated in one process."""
    from sparsecraft.kernels.speed import decode_tokens_per_second

    rates: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(rounds):
        for name, model in (("dense", dense), ("sparse", sparse)):
            rates[name].append(decode_tokens_per_second(model, prompt, new_tokens, reps=1))
    return statistics.median(rates["dense"]), statistics.median(rates["sparse"])


def run_actsparse(job: ActSparseJob, out: Path | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> ActSparseOutcome:
    job.validate()
    say = log or (lambda _msg: None)
    model, tokenizer = load_causal_lm(job.model)
    outcome = ActSparseOutcome(job)
    windows = None
    if job.calib:
        windows = calibration_samples(tokenize(tokenizer, read_text(job.calib, "calib")), job.nsamples, job.seqlen, job.seed)
    evaluation = eval_windows(tokenize(tokenizer, read_text(job.eval, "eval")), job.seqlen, job.eval_windows) if job.eval else None
    if evaluation is not None:
        outcome.ppl_dense = perplexity(model, evaluation, batch_size=1, progress=progress)
        say(f"perplexity dense: {outcome.ppl_dense:.3f}")
    dense = copy.deepcopy(model) if job.speed_tokens else None  # the untouched model, for the speed comparison
    start = time.perf_counter()
    plan = sparsify_activations(model, windows, job.method, job.sparsity, job.mode, progress=progress)
    outcome.calibrate_seconds = time.perf_counter() - start
    if windows is not None:
        outcome.layers = measured_sparsity(model, windows[: min(len(windows), 4)])
    if evaluation is not None:
        with sparsify_everywhere(model):
            outcome.ppl_sparse = perplexity(model, evaluation, batch_size=1, progress=progress)
        say(f"perplexity with {job.method} at {job.sparsity:.0%} activation sparsity: {outcome.ppl_sparse:.3f}")
    if job.speed_tokens:
        prompt = (windows if windows is not None else evaluation)
        if prompt is None:
            raise SparsecraftError("--speed needs a calibration or evaluation text for the prompt")
        outcome.decode_tps_dense, outcome.decode_tps_sparse = decode_speed(dense, model, prompt[:1, :32], job.speed_tokens)
        say(f"decode tokens/s: dense {outcome.decode_tps_dense:.1f}, sparse {outcome.decode_tps_sparse:.1f}")
    if out is not None:
        save_activation_sparse(model, tokenizer, plan, out, extra={"summary": outcome.summary(), "measured": outcome.layers})
    return outcome
