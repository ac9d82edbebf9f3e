"""The layer-wise sequential engine of SparseGPT and Wanda, over a Hugging Face decoder.

1. Run the calibration samples through the model up to decoder block 0 and keep what enters it
   (hidden states and the keyword arguments the model passes: masks, rotary embeddings ...).
2. For each block: run it once with hooks that accumulate statistics of every projection's input,
   prune each projection from those statistics, then run the *pruned* block to produce the next
   block's inputs, so later blocks are calibrated on what the pruned model really computes.

Only one block's statistics live at a time; the activations of the calibration set (samples x
seqlen x hidden, twice: inputs and outputs) are the rest of the working set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.oneshot import (
    NEEDS_HESSIAN,
    ONE_SHOT,
    STATS_FREE,
    DSnoTConfig,
    InputStats,
    LayerPattern,
    reconstruction_error,
    solve_layer,
)
from sparsecraft.methods.owl import outlier_ratio, owl_sparsities
from sparsecraft.methods.wanda import wanda_scores
from sparsecraft.models.hf import LinearView, block_linears, block_prefix, decoder_blocks
from sparsecraft.utils import progress_bar


#: Calibration tokens whose X^T X gives the reconstruction error of methods that need no Hessian.
ERROR_TOKENS = 8192


@dataclass(frozen=True)
class OWLConfig:
    """OWL's outlier threshold M and spread lambda (paper defaults)."""

    M: float = 5.0
    lam: float = 0.08


@dataclass
class BlockCall:
    """What the model passed to a decoder block for one calibration batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: Tensor) -> BlockCall:
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall((), {**self.kwargs, "hidden_states": hidden})

    def run(self, block: nn.Module) -> Tensor:
        out = block(*self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def propagate(block: nn.Module, calls: Sequence[BlockCall]) -> list[BlockCall]:
    """The next block's calls: each call's hidden states run through ``block``."""
    return [c.with_hidden(c.run(block)) for c in calls]


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, samples: Tensor, batch_size: int) -> list[BlockCall]:
    """Run ``samples`` (n, seqlen) up to block 0 and return what block 0 was called with, per batch."""
    calls: list[BlockCall] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(BlockCall(args, dict(kwargs)))
        raise _Captured

    device = next(model.parameters()).device
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in range(0, samples.shape[0], batch_size):
            try:
                model(input_ids=samples[s : s + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def collect_input_stats(
    block: nn.Module, calls: Sequence[BlockCall], views: Sequence[LinearView], hessian: bool, hessian_tokens: int | None = None
) -> dict[str, InputStats]:
    """Run ``block`` on every call with hooks; projections fed by the same tensor share statistics.

    Each run stops as soon as every projection has seen its input: the rest of the block (in a
    Llama block the down projection, an eighth of the block's work) is not needed for statistics.
    """
    stats: dict[str, InputStats] = {}
    seen: dict[int, tuple[InputStats, Tensor]] = {}  # holds the tensor so its id is not reused
    fired: set[str] = set()

    def make_hook(view: LinearView):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            fired.add(view.name)
            shared = seen.get(id(x))
            if shared is not None:
                stats.setdefault(view.name, shared[0])
            else:
                st = stats.get(view.name)
                if st is None:
                    st = stats[view.name] = InputStats(view.shape[1], x.device, hessian, hessian_tokens)
                st.add(x)
                seen[id(x)] = (st, x)
            if len(fired) == len(views):
                raise _Captured

        return hook

    handles = [v.module.register_forward_pre_hook(make_hook(v)) for v in views]
    try:
        for call in calls:
            seen.clear()
            fired.clear()
            try:
                call.run(block)
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return stats


@dataclass
class LayerOutcome:
    name: str
    shape: tuple[int, int]
    target: float
    sparsity: float
    error: float
    seconds: float


@dataclass
class OneShotResult:
    """What one-shot pruning did, layer by layer."""

    method: str
    pattern: str
    target: float
    dsnot: bool
    owl: bool
    layers: list[LayerOutcome] = field(default_factory=list)
    seconds: float = 0.0
    block_sparsities: list[float] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Measured sparsity over all pruned layers (weights equal to zero)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    @property
    def mean_error(self) -> float:
        return sum(r.error for r in self.layers) / len(self.layers) if self.layers else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sparsity"] = self.sparsity
        out["layers"] = [{**asdict(r), "shape": list(r.shape)} for r in self.layers]
        return out

    def table(self, title: str | None = None) -> Any:
        from rich.table import Table

        label = self.method + (" + DSnoT" if self.dsnot else "") + (" + OWL" if self.owl else "")
        table = Table(title=title or f"{label}, {self.pattern}: sparsity {self.sparsity:.2%} in {self.seconds:.1f} s")
        for col in ("layer", "shape", "target", "sparsity", "rel. error ||WX-W'X||/||WX||", "s"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for r in self.layers:
            table.add_row(r.name, f"{r.shape[0]}x{r.shape[1]}", f"{r.target:.3f}", f"{r.sparsity:.3f}", f"{r.error:.4f}", f"{r.seconds:.2f}")
        return table


def _zero_fraction(view: LinearView) -> float:
    w = view.module.weight
    return float((w == 0).sum()) / w.numel()


def _owl_block_sparsities(
    blocks: nn.ModuleList, calls: list[BlockCall], views_per_block: list[list[LinearView]], sparsity: float, owl: OWLConfig, progress: bool
) -> list[float]:
    """OWL's pre-pass: outlier ratios of the Wanda scores of each *dense* block."""
    ratios = []
    for block, views in progress_bar(list(zip(blocks, views_per_block)), "OWL outlier ratios", enabled=progress):
        stats = collect_input_stats(block, calls, views, hessian=False)
        ratios.append(outlier_ratio([wanda_scores(v.weight(), stats[v.name].norm) for v in views], owl.M) if views else 0.0)
        calls = propagate(block, calls)
    return owl_sparsities(ratios, sparsity, owl.lam)


def _prune_layer(
    view: LinearView, method: str, stats: InputStats | None, pattern: LayerPattern, dsnot: DSnoTConfig | None, errors: bool
) -> LayerOutcome:
    """Solve one projection, refuse NaN/Inf before writing, measure what was done."""
    start = time.perf_counter()
    W = view.weight()
    try:
        new_W, _ = solve_layer(method, W, stats, pattern, dsnot)
    except SparsecraftError as e:
        raise type(e)(f"{view.name}: {e}") from e
    if not torch.isfinite(new_W).all():
        raise SparsecraftError(f"{view.name}: NaN or Inf in the weights after {method} pruning; nothing was saved")
    view.set_weight(new_W)
    seconds = time.perf_counter() - start
    error = reconstruction_error(W, new_W, stats) if errors and stats is not None else float("nan")
    return LayerOutcome(view.name, view.shape, pattern.sparsity, _zero_fraction(view), error, seconds)


@torch.no_grad()
def prune_decoder(
    model: nn.Module,
    samples: Tensor | None,
    method: str = "wanda",
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    dsnot: DSnoTConfig | None = None,
    owl: OWLConfig | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    errors: bool = True,
) -> OneShotResult:
    """Prune the projections of every decoder block of ``model`` in place, block by block.

    ``samples``: (nsamples, seqlen) calibration token ids (None: magnitude, without errors).
    N:M when ``m`` > 0 (sparsity 1 - n/m). Every layer is checked against the pattern before anything changes. ``errors`` computes each
    layer's reconstruction error (needs X^T X per layer, which SparseGPT needs anyway).
    """
    ONE_SHOT.get(method)
    if m:
        if owl is not None:
            raise SparsecraftError("OWL sets a sparsity per block; it does not combine with N:M, which fixes it at 1 - N/M")
        sparsity = 1.0 - n / m
    pattern_name = f"{n}:{m}" if m else "unstructured"
    start = time.perf_counter()
    blocks = decoder_blocks(model)
    views_per_block = [block_linears(b, block_prefix(model, i), include, exclude) for i, b in enumerate(blocks)]
    if not any(views_per_block):
        raise SparsecraftError(f"no projection inside the decoder blocks matches include={include} exclude={exclude}")
    for views in views_per_block:
        for v in views:
            LayerPattern(sparsity, n, m).check(v.shape, v.name)

    if samples is None:
        if method not in STATS_FREE or dsnot is not None or owl is not None:
            raise SparsecraftError(f"{method}{' with DSnoT/OWL' if dsnot or owl else ''} needs calibration samples")
        errors = False
    calls = capture_block_inputs(model, blocks, samples, batch_size) if samples is not None else []
    block_sparsity = [sparsity] * len(blocks)
    if owl is not None:
        block_sparsity = _owl_block_sparsities(blocks, calls, views_per_block, sparsity, owl, progress)
    result = OneShotResult(method, pattern_name, sparsity, dsnot is not None, owl is not None, block_sparsities=block_sparsity)
    hessian = errors or method in NEEDS_HESSIAN
    # a reconstruction error needs far fewer tokens than SparseGPT's solve: cap X^T X for the others
    hessian_tokens = None if method in NEEDS_HESSIAN else ERROR_TOKENS
    for i, block in enumerate(progress_bar(blocks, f"{method} {pattern_name}", enabled=progress)):
        stats = collect_input_stats(block, calls, views_per_block[i], hessian, hessian_tokens) if calls else {}
        pattern = LayerPattern(block_sparsity[i], n, m)
        result.layers += [_prune_layer(view, method, stats.get(view.name), pattern, dsnot, errors) for view in views_per_block[i]]
        del stats
        calls = propagate(block, calls)
        if not all(torch.isfinite(c.hidden).all() for c in calls):
            raise SparsecraftError(f"block {i}: NaN or Inf in its outputs after pruning; nothing was saved")
    result.seconds = time.perf_counter() - start
    return result


def nm_from_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); ``"unstructured"`` -> (0, 0)."""
    if pattern in ("", "unstructured"):
        return 0, 0
    try:
        n_text, m_text = pattern.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise SparsecraftError(f"pattern {pattern!r}: write unstructured or N:M such as 2:4") from None
    if not 0 < n < m:
        raise SparsecraftError(f"pattern {pattern!r}: N:M needs 0 < N < M")
    return n, m

