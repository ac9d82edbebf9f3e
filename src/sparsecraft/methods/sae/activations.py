"""Activations for SAE training: harvested from a model over text, shuffled through a buffer,
optionally cached to disk as safetensors shards for repeated runs.

A *source* yields chunks of rows: ``x`` [n, d_in] (and ``y`` [n, d_out] for transcoders). The
harvester runs the model on windows of token ids and stops each forward after the deepest hook
point it needs; the first position of every window is dropped by default, because the residual
stream at a sequence's start carries huge outlier norms (an attention sink) that no dictionary
should spend latents on. The same "massive activations" (Sun et al. 2024, "Massive Activations in
Large Language Models") appear at a few delimiter tokens mid-text: on SmolLM2-135M's residual
stream 0.03% of the tokens have norms up to 170x the median and hold three quarters of the total
variance, so FVU and the batch-level allocations would be about them alone. Tokens whose norm
exceeds ``outlier_factor`` x the median of their chunk are therefore dropped too (0 keeps all),
and left unreplaced when the SAE is spliced into the model (metrics.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.sae.hooks import run_captured
from sparsecraft.utils import atomic_folder

Chunk = tuple[Tensor, Tensor | None]  # (x, y or None)
CACHE_FORMAT = "sparsecraft-activations"


@dataclass
class Harvest:
    """What to read from a model: the input hook (and the transcoder target hook)."""

    hook: str
    target_hook: str | None = None
    skip_first: bool = True
    batch_size: int = 8  # windows per forward
    outlier_factor: float = 10.0  # drop tokens with norm > factor x the chunk's median (0: keep all)


def outliers(t: Tensor, factor: float) -> Tensor:
    """True where a row's norm exceeds ``factor`` x the median row norm (along the last dim)."""
    if factor <= 0 or t.numel() == 0:
        return torch.zeros(t.shape[:-1], dtype=torch.bool, device=t.device)
    norms = t.norm(dim=-1)
    return norms > factor * norms.flatten().median()


def drop_outliers(chunks: Iterable[Chunk], factor: float, stats: dict | None = None) -> Iterator[Chunk]:
    """``chunks`` without their outlier rows (judged on x and on y); counts go to ``stats``."""
    for x, y in chunks:
        bad = outliers(x, factor)
        if y is not None:
            bad |= outliers(y, factor)
        if stats is not None:
            stats["tokens"] = stats.get("tokens", 0) + len(x)
            stats["dropped"] = stats.get("dropped", 0) + int(bad.sum())
        keep = ~bad
        yield x[keep], (y[keep] if y is not None else None)


def harvest(model: nn.Module, windows: Tensor, spec: Harvest, stats: dict | None = None) -> Iterator[Chunk]:
    """Activations at ``spec.hook`` (and ``spec.target_hook``) for each batch of windows, in text
    order, without outlier tokens (counted in ``stats``)."""
    yield from drop_outliers(_harvest_all(model, windows, spec), spec.outlier_factor, stats)


def _harvest_all(model: nn.Module, windows: Tensor, spec: Harvest) -> Iterator[Chunk]:
    names = [spec.hook] + ([spec.target_hook] if spec.target_hook else [])
    device = next(model.parameters()).device
    start = 1 if spec.skip_first else 0
    for i in range(0, len(windows), spec.batch_size):
        with torch.no_grad():  # not around the yield: grad mode is global, and the consumer trains
            found = run_captured(model, windows[i:i + spec.batch_size].to(device), names)
        x = found[spec.hook][:, start:].reshape(-1, found[spec.hook].shape[-1]).float().cpu()
        y = None
        if spec.target_hook:
            t = found[spec.target_hook]
            y = t[:, start:].reshape(-1, t.shape[-1]).float().cpu()
        yield x, y


def tokens_per_window(seqlen: int, skip_first: bool) -> int:
    return seqlen - 1 if skip_first else seqlen


def check_enough_text(available_windows: int, seqlen: int, skip_first: bool, tokens: int, field: str = "text") -> int:
    """Windows needed for ``tokens`` activations; a clear error before any work when the text is too short."""
    per = tokens_per_window(seqlen, skip_first)
    need = -(-tokens // per)
    if need > available_windows:
        raise SparsecraftError(
            f"{field}: {tokens:,} tokens need {need} windows of {seqlen}, but the text gives only {available_windows} "
            f"({available_windows * per:,} tokens); give a longer text, lower --tokens, or use --epochs to reuse it")
    return need


# -- the shuffling buffer ------------------------------------------------------------------------


class ShuffleBuffer:
    """Mixes rows from a stream of chunks: holds ``capacity`` rows, and each time it is full
    emits a random half in batches, so consecutive batches mix many windows (and documents)
    without holding the whole set in memory."""

    def __init__(self, chunks: Iterable[Chunk], capacity: int, batch_size: int, seed: int = 0) -> None:
        if capacity < 2 * batch_size:
            raise SparsecraftError(f"buffer: capacity {capacity} must hold at least two batches of {batch_size}")
        self.chunks, self.capacity, self.batch_size = chunks, capacity, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Chunk]:
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        held = 0
        for x, y in self.chunks:
            xs.append(x)
            if y is not None:
                ys.append(y)
            held += len(x)
            if held >= self.capacity:
                x_all, y_all = torch.cat(xs), (torch.cat(ys) if ys else None)
                order = torch.randperm(len(x_all), generator=self.generator)
                emit = order[: len(x_all) // 2 // self.batch_size * self.batch_size]
                yield from self._batches(x_all, y_all, emit)
                keep = order[len(emit):]
                xs, ys = [x_all[keep]], ([y_all[keep]] if y_all is not None else [])
                held = len(keep)
        if held:
            x_all, y_all = torch.cat(xs), (torch.cat(ys) if ys else None)
            yield from self._batches(x_all, y_all, torch.randperm(len(x_all), generator=self.generator))

    def _batches(self, x: Tensor, y: Tensor | None, order: Tensor) -> Iterator[Chunk]:
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield x[idx], (y[idx] if y is not None else None)


# -- the disk cache ------------------------------------------------------------------------------


def write_cache(chunks: Iterable[Chunk], out: Path, meta: dict, shard_rows: int = 65536,
                progress: bool = True) -> dict:
    """Write ``chunks`` as safetensors shards (``x``, and ``y`` for transcoders) plus meta.json,
    into a temporary folder renamed to ``out`` at the end: an interrupted run leaves no cache
    that looks complete. Each shard's sha256 is recorded and checked on reading."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[dict] = []
    total = 0
    bar = tqdm(total=meta.get("n_tokens"), unit="tok", desc="caching activations", disable=not progress)
    with atomic_folder(out) as tmp:
        pending_x: list[Tensor] = []
        pending_y: list[Tensor] = []

        def flush() -> None:
            x = torch.cat(pending_x)
            tensors = {"x": x.contiguous()}
            if pending_y:
                tensors["y"] = torch.cat(pending_y).contiguous()
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(tensors, str(tmp / name))
            shards.append({"file": name, "rows": len(x), "sha256": _sha256(tmp / name)})
            pending_x.clear()
            pending_y.clear()

        for x, y in chunks:
            pending_x.append(x)
            if y is not None:
                pending_y.append(y)
            total += len(x)
            bar.update(len(x))
            if sum(len(p) for p in pending_x) >= shard_rows:
                flush()
        if pending_x:
            flush()
        full = {"format": CACHE_FORMAT, "version": 1, **meta, "n_tokens": total, "shards": shards}
        (tmp / "meta.json").write_text(json.dumps(full, indent=2))
    bar.close()
    return full


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_cache_meta(folder: Path) -> dict:
    meta_path = Path(folder) / "meta.json"
    if not meta_path.exists():
        raise SparsecraftError(f"activation cache: {meta_path} is missing; `sparsecraft sae train --cache DIR` writes it on first use")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise SparsecraftError(f"activation cache: {meta_path} is not a sparsecraft activation cache")
    return meta


def read_cache(folder: Path, verify: bool = True) -> Iterator[Chunk]:
    """The cached chunks, shard by shard, in text order (checksums verified)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_cache_meta(folder)
    for shard in meta["shards"]:
        path = folder / shard["file"]
        if not path.exists():
            raise SparsecraftError(f"activation cache: shard {path} is missing; rebuild the cache")
        if verify and _sha256(path) != shard["sha256"]:
            raise SparsecraftError(f"activation cache: shard {path} is corrupted (checksum mismatch); rebuild the cache")
        tensors = load_file(str(path))
        yield tensors["x"], tensors.get("y")


def repeat(make: callable, tokens: int) -> Iterator[Chunk]:  # type: ignore[valid-type]
    """Chunks from ``make()`` again and again until ``tokens`` rows have been given (the last chunk cut)."""
    given = 0
    while given < tokens:
        before = given
        for x, y in make():
            take = min(len(x), tokens - given)
            yield x[:take], (y[:take] if y is not None else None)
            given += take
            if given >= tokens:
                return
        if given == before:
            raise SparsecraftError("activations: the source gave no rows")
