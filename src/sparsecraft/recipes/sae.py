"""SAE jobs: train on a model's activations over a text, evaluate, inspect a latent.

The text is cut into non-overlapping windows; the last ``eval_windows`` are held out for
evaluation (FVU, L0, dead latents, loss recovered), the rest feed training, through a shuffling
buffer, ``epochs`` times at most. Every check that can fail (hook name, k, text length, a saved
SAE's width) runs before the model does any work. Under torch.distributed (``torchrun``) each
rank trains on its own windows and rank 0 evaluates and writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sparsecraft.core.distributed import is_distributed
from sparsecraft.data.text import eval_windows, read_text, tokenize
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.sae import metrics
from sparsecraft.methods.sae.activations import (Harvest, ShuffleBuffer, check_enough_text, harvest, read_cache,
                                                  read_cache_meta, repeat, tokens_per_window, write_cache)
from sparsecraft.methods.sae.hooks import resolve
from sparsecraft.methods.sae.io import load_sae, save_sae
from sparsecraft.methods.sae.model import KINDS, SAEConfig, SparseAutoencoder
from sparsecraft.methods.sae.train import TrainConfig, TrainResult, train_sae


@dataclass
class SAETrainJob:
    model: str
    hook: str
    text: str
    kind: str = "topk"
    k: int = 32
    expansion: int = 8
    tokens: int = 200_000
    seqlen: int = 128
    batch_size: int = 4096
    lr: float | None = None
    l1_coefficient: float = 5.0
    transcoder: bool = False  # read blocks.L.mlp_in, reconstruct blocks.L.mlp_out (hook names the block's mlp_in)
    aux: str = "auto"
    outlier_factor: float = 10.0  # tokens with norm > factor x median are skipped (see activations.py)
    dead_tokens: int = 1_000_000
    epochs: int = 1  # passes over the training windows allowed to reach ``tokens``
    eval_windows: int = 8
    buffer_tokens: int = 131_072
    cache: str | None = None  # folder of cached activations (written on first use)
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise SparsecraftError(f"--kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if not Path(self.text).is_file():
            raise SparsecraftError(f"--text: no file at {self.text}")
        if self.expansion < 1:
            raise SparsecraftError(f"--expansion must be >= 1, got {self.expansion}")
        if self.epochs < 1 or self.seqlen < 2 or self.eval_windows < 1:
            raise SparsecraftError("--epochs and --eval-windows must be >= 1 and --seqlen >= 2")
        if self.transcoder and not self.hook.endswith(".mlp_in"):
            raise SparsecraftError(f"--hook: a transcoder reads an MLP's input; give blocks.L.mlp_in, not {self.hook}")


def target_hook_of(job: SAETrainJob) -> str | None:
    return job.hook.replace(".mlp_in", ".mlp_out") if job.transcoder else None


def _split(model: nn.Module, tokenizer: Any, job: SAETrainJob) -> tuple[Tensor, Tensor, str]:
    text = read_text(job.text, "text")
    windows = eval_windows(tokenize(tokenizer, text), job.seqlen, field="text")
    if len(windows) <= job.eval_windows:
        raise SparsecraftError(f"--text: {len(windows)} windows of {job.seqlen} tokens leave none for training after "
                               f"{job.eval_windows} held out; give a longer text or lower --eval-windows")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return windows[:-job.eval_windows], windows[-job.eval_windows:], digest


def _my_windows(windows: Tensor) -> Tensor:
    if not is_distributed():
        return windows
    return windows[torch.distributed.get_rank()::torch.distributed.get_world_size()]


@dataclass
class SAEOutcome:
    job: SAETrainJob
    train: TrainResult
    recon: metrics.Reconstruction
    loss: metrics.LossRecovered

    def summary(self) -> dict[str, Any]:
        job = asdict(self.job)
        return {"model": job.pop("model"), "hook": job.pop("hook"), "kind": job.pop("kind"), "k": job.pop("k"),
                "d_sae": self.recon.density.numel(), **self.recon.summary(), **self.loss.summary(),
                "train_tokens": self.train.tokens, "train_seconds": self.train.seconds,
                "tokens_per_second": self.train.tokens_per_second, "steps": self.train.steps, "job": job}


def _source(model: nn.Module, train_windows: Tensor, job: SAETrainJob, spec: Harvest, meta: dict,
            progress: bool) -> Callable[[], Any]:
    """A function giving one pass of (x, y) chunks: from the disk cache (written first if absent) or live."""
    if job.cache is None:
        return lambda: harvest(model, train_windows, spec)
    folder = Path(job.cache)
    if not (folder / "meta.json").exists():
        write_cache(harvest(model, train_windows, spec), folder, meta | {"n_tokens": len(train_windows) * tokens_per_window(job.seqlen, spec.skip_first)},
                    progress=progress)
    found = read_cache_meta(folder)
    differs = {key: (found.get(key), value) for key, value in meta.items() if found.get(key) != value}
    if differs:
        raise SparsecraftError(f"--cache: {folder} holds other activations ({differs}); use another folder or remove it")
    return lambda: read_cache(folder)


def run_sae_train(job: SAETrainJob, out: Path | None, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> SAEOutcome:
    """Train an SAE as ``job`` says, evaluate it on the held-out windows and save it to ``out``."""
    from sparsecraft.models.hf import load_causal_lm

    job.validate()
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise SparsecraftError(f"--out: {out} exists and is not empty; choose a new folder")
    say = log or (lambda _m: None)
    model, tokenizer = load_causal_lm(job.model)
    point = resolve(model, job.hook)  # unknown hooks fail here, listing the nearest names
    target = target_hook_of(job)
    d_in = model.config.hidden_size
    config = SAEConfig(kind=job.kind, d_in=d_in, d_sae=d_in * job.expansion, k=job.k, transcoder=job.transcoder,
                       l1_coefficient=job.l1_coefficient, hook=point.name, target_hook=target or "", model=job.model,
                       outlier_factor=job.outlier_factor)
    train_windows, held_out, digest = _split(model, tokenizer, job)
    spec = Harvest(job.hook, target, outlier_factor=job.outlier_factor)
    mine = _my_windows(train_windows)
    need = check_enough_text(len(mine) * job.epochs, job.seqlen, spec.skip_first, job.tokens // (torch.distributed.get_world_size() if is_distributed() else 1))
    say(f"{job.kind} SAE at {job.hook}: {config.d_sae} latents, {job.tokens:,} tokens "
        f"({need} windows of {job.seqlen}; {len(held_out)} held out)")
    meta = {"model": job.model, "hook": job.hook, "target_hook": target, "seqlen": job.seqlen, "text_sha256": digest,
            "skip_first": spec.skip_first, "outlier_factor": spec.outlier_factor, "d_in": d_in, "rank": torch.distributed.get_rank() if is_distributed() else 0}
    one_pass = _source(model, mine, job, spec, meta, progress)
    world = torch.distributed.get_world_size() if is_distributed() else 1
    train_config = TrainConfig(tokens=job.tokens // world, batch_size=job.batch_size, lr=job.lr, aux=job.aux,
                               dead_tokens=job.dead_tokens, seed=job.seed)
    batches = ShuffleBuffer(repeat(one_pass, job.tokens // world), max(job.buffer_tokens, 2 * job.batch_size),
                            job.batch_size, seed=job.seed)
    sae = SparseAutoencoder(config).to(next(model.parameters()).device)
    result = train_sae(sae, batches, train_config, progress=progress)
    say(f"trained in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)")
    outcome = evaluate(model, sae, held_out, job, result)
    if out is not None and (not is_distributed() or torch.distributed.get_rank() == 0):
        save_sae(sae, Path(out), extra={"summary": _jsonable(outcome.summary()), "history": result.history})
        metrics.plot_density(outcome.recon, Path(out) / "density.png", f"{job.kind} SAE at {job.hook}")
    return outcome


def _jsonable(summary: dict) -> dict:
    return json.loads(json.dumps(summary, default=str))


def evaluate(model: nn.Module, sae: SparseAutoencoder, windows: Tensor, job: SAETrainJob,
             result: TrainResult) -> SAEOutcome:
    stats: dict = {}
    recon = metrics.reconstruction(sae, metrics.activations_for(model, sae, windows, stats))
    recon.outlier_fraction = stats.get("dropped", 0) / max(1, stats.get("tokens", 1))
    loss = metrics.loss_recovered(model, sae, windows)
    return SAEOutcome(job, result, recon, loss)


def check_sae_matches(model: nn.Module, sae: SparseAutoencoder) -> None:
    """A saved SAE must read a hook of this model with the same width: a clear error otherwise."""
    resolve(model, sae.config.hook)
    if sae.config.d_in != model.config.hidden_size:
        raise SparsecraftError(f"sae: it reads {sae.config.d_in}-wide activations, but this model's {sae.config.hook} "
                               f"is {model.config.hidden_size} wide; was it trained on another model?")


def held_out_windows(tokenizer: Any, text: str, seqlen: int, n: int) -> Tensor:
    windows = eval_windows(tokenize(tokenizer, read_text(text, "text")), seqlen, field="text")
    return windows[-n:]


def open_for_eval(model_source: str, sae_folder: str) -> tuple[nn.Module, Any, SparseAutoencoder]:
    from sparsecraft.models.hf import load_causal_lm

    sae = load_sae(Path(sae_folder))  # bad folders fail before the model loads
    model, tokenizer = load_causal_lm(model_source)
    check_sae_matches(model, sae)
    return model, tokenizer, sae.to(next(model.parameters()).device)
