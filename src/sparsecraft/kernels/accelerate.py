"""accelerate(model): swap each pruned Linear for a SparseLinear when, and only when, it is faster.

"Faster" is measured, not assumed: for each layer the dense product and every format that
applies are timed on this machine at the token count the layer will see (from an example input,
or given), in interleaved rounds, with the weights cold (as in a model, where the other layers
evict them) by cycling through copies larger than the cache, and the result is cached per (format, shape, density, tokens,
threads, value dtype). A layer is swapped only when its best format beats dense by
``min_speedup``; every other layer is left as it was and the report says why.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.kernels import formats, ops
from sparsecraft.kernels.build import SOURCES, available
from sparsecraft.kernels.formats import FORMATS, SparseWeight, pack
from sparsecraft.kernels.modules import SparseLinear, dense_weight, is_conv1d
from sparsecraft.kernels.timing import TimingCache, interleaved_medians
from sparsecraft.utils import progress_bar, replace_module

#: N:M patterns recognised automatically (the nm format is then used instead of the bitmask).
KNOWN_NM = ((2, 4), (4, 8), (1, 4), (2, 8), (1, 2))


@dataclass
class LayerDecision:
    name: str
    shape: tuple[int, int]
    density: float
    tokens: int
    format: str | None = None  # None: kept dense
    dense_ms: float | None = None
    sparse_ms: float | None = None
    reason: str = ""
    candidates_ms: dict[str, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.sparse_ms if self.dense_ms and self.sparse_ms else None


@dataclass
class AccelerationReport:
    layers: list[LayerDecision]

    @property
    def swapped(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.format]

    def to_dict(self) -> dict:
        return {"swapped": len(self.swapped), "layers": [asdict(d) | {"speedup": d.speedup} for d in self.layers]}

    def table(self, title: str = "accelerate: layers swapped for sparse kernels"):
        from rich.table import Table

        table = Table(title=title)
        for col in ("layer", "shape", "density", "T", "format", "dense ms", "sparse ms", "speedup", "note"):
            table.add_column(col, justify="right" if col in ("density", "T", "dense ms", "sparse ms", "speedup") else "left")
        for d in self.layers:
            table.add_row(d.name, f"{d.shape[0]}x{d.shape[1]}", f"{d.density:.3f}", str(d.tokens), d.format or "dense",
                          f"{d.dense_ms:.3f}" if d.dense_ms else "-", f"{d.sparse_ms:.3f}" if d.sparse_ms else "-",
                          f"{d.speedup:.2f}x" if d.speedup else "-", d.reason)
        return table


#: Token counts from which the panels format is timed by default (it is built for many tokens; at one
#: token its per-(row, panel) partial sums make it slower than csr16). At 8 tokens it already ran 1.2x
#: csr16 at 70% on 768x3072 and 4096x4096 (0.5-0.95x elsewhere; peer_ab.py grid, 2026-12-06): timed, it
#: is picked only where it wins.
PANELS_MIN_TOKENS = 8


def candidate_formats(W: Tensor, formats: Iterable[str] | None, block: tuple[int, int] | None,
                      tokens: int = 1) -> list[tuple[str, dict]]:
    """The formats worth timing for this weight at ``tokens`` tokens, with their pack arguments."""
    wanted = list(formats) if formats else ["csr16", "bitmask", "nm"] + (["block"] if block else [])
    if not formats and tokens >= PANELS_MIN_TOKENS:
        wanted.append("panels")
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise SparsecraftError(f"unknown sparse format(s) {unknown}; choose from {', '.join(FORMATS)}")
    out, inp = W.shape
    nonzero = W != 0
    options: list[tuple[str, dict]] = []
    density = float(nonzero.float().mean())
    # an N:M weight keeps about N/M; a much sparser one fits N:M only by chance and is reported as unstructured
    nm = next(((n, m) for n, m in KNOWN_NM if inp % m == 0 and density >= 0.9 * n / m
               and int(nonzero.reshape(out, -1, m).sum(-1).max()) <= n), None)
    for fmt in wanted:
        if fmt == "csr16" and inp <= 2**16:
            options.append(("csr16", {}))
        elif fmt == "nm" and nm:
            options.append(("nm", {"n": nm[0], "m": nm[1]}))
        elif fmt == "bitmask" and not (nm and "nm" in wanted):  # same kernel as nm: time it once
            options.append(("bitmask", {}))
        elif fmt == "block" and block and out % block[0] == 0 and inp % block[1] == 0:
            options.append(("block", {"block": block}))
        elif fmt == "panels":
            options.append(("panels", {}))
    return options


def layer_tokens(model: nn.Module, example_input: Tensor | dict, names: list[str]) -> dict[str, int]:
    """How many tokens (rows of x) each named layer sees in one forward pass of the example."""
    seen: dict[str, int] = {}
    modules = dict(model.named_modules())
    hooks = []
    def record(name: str, features: int):
        def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:  # returns None: the output is unchanged
            seen.setdefault(name, args[0].numel() // features)
        return hook

    for name in names:
        hooks.append(modules[name].register_forward_hook(record(name, dense_weight(modules[name]).shape[1])))
    try:
        with torch.no_grad():
            model(**example_input) if isinstance(example_input, dict) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


@lru_cache(maxsize=1)
def _build_id() -> str:
    """Hash of the kernels, their dispatch and the formats' layouts: when any changes, cached timings no longer apply."""
    return hashlib.sha256(SOURCES[0].read_bytes() + Path(ops.__file__).read_bytes()
                          + Path(formats.__file__).read_bytes()).hexdigest()[:8]


def _key(kind: str, shape: tuple[int, int], density: float, tokens: int, dtype: torch.dtype) -> str:
    return f"{_build_id()}|cold|{kind}|{shape[0]}x{shape[1]}|d{density:.2f}|T{tokens}|th{torch.get_num_threads()}|{str(dtype).split('.')[-1]}"


#: Bytes the timing copies of a layer span (twice the 32 MiB L3 of the machines here) and a cap on copies.
COLD_BYTES = 64 << 20
MAX_COPIES = 128


def _clone(sw: SparseWeight) -> SparseWeight:
    return SparseWeight(sw.fmt, sw.shape, {k: v.clone() for k, v in sw.tensors.items()}, sw.n, sw.m, sw.block)


def _decide(name: str, W: Tensor, density: float, bias: Tensor | None, tokens: int, options: list[tuple[str, dict]],
            dtype: torch.dtype, min_speedup: float, cache: TimingCache | None) -> tuple[LayerDecision, SparseWeight | None]:
    decision = LayerDecision(name, tuple(W.shape), density, tokens)
    packed = {fmt: pack(W, fmt, dtype=dtype, layer=name, **kw) for fmt, kw in options}
    x = torch.randn(tokens, W.shape[1])
    Wd = W.detach().float().contiguous()
    keys = {"dense": _key("dense", decision.shape, density, tokens, torch.float32)}
    keys |= {fmt: _key(fmt, decision.shape, density, tokens, dtype) for fmt in packed}
    times = {k: cache.get(v) for k, v in keys.items()} if cache else {k: None for k in keys}
    missing = {k for k, v in times.items() if v is None}
    if missing:
        # In a model every layer's weights are evicted by the others' before it runs again: time each
        # candidate cycling through enough copies to overflow the last-level cache, not hot in it.
        copies = max(1, min(MAX_COPIES, -(-COLD_BYTES // (Wd.numel() * 4))))
        dense_copies = itertools.cycle([Wd.clone() for _ in range(copies)])
        fns = {"dense": lambda: F.linear(x, next(dense_copies), bias)}
        for fmt, sw in packed.items():
            sparse_copies = itertools.cycle([sw] + [_clone(sw) for _ in range(copies - 1)])
            fns[fmt] = lambda c=sparse_copies: next(c).linear(x, bias)
        with torch.no_grad():
            measured = interleaved_medians({k: fns[k] for k in keys if k in missing or k == "dense"})
        for k, seconds in measured.items():
            if k in missing:
                times[k] = seconds
                if cache:
                    cache.put(keys[k], seconds)
    decision.dense_ms = times["dense"] * 1e3
    decision.candidates_ms = {fmt: times[fmt] * 1e3 for fmt in packed}
    best = min(packed, key=lambda fmt: times[fmt])
    decision.sparse_ms = times[best] * 1e3
    if decision.speedup < min_speedup:
        decision.reason = f"best format {best} is {decision.speedup:.2f}x dense (< {min_speedup}x): kept dense"
        return decision, None
    decision.format = best
    return decision, packed[best]


def accelerate(
    model: nn.Module,
    example_input: Tensor | dict | None = None,
    tokens: int | None = None,
    formats: Iterable[str] | None = None,
    block: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    min_speedup: float = 1.1,
    max_density: float = 0.75,
    names: Iterable[str] | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> AccelerationReport:
    """Swap the pruned Linear/Conv1D layers of ``model`` (in place) for faster sparse ones.

    The token count each layer is tuned for comes from one forward pass of ``example_input``
    (a tensor, or a dict of keyword inputs for Hugging Face models) or from ``tokens``
    (1 = one-token decoding; default 1). Layers denser than ``max_density`` are not tried.
    """
    if tokens is not None and tokens < 1:
        raise SparsecraftError(f"tokens={tokens}: give the number of tokens per forward (1 for decoding)")
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) or is_conv1d(m)]
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in modules]
        if missing:
            raise SparsecraftError(f"no module named {missing[0]!r} in the model; see model.named_modules()")
        linears = [n for n in linears if n in names]
    per_layer = layer_tokens(model, example_input, linears) if example_input is not None else {}
    kernels = available()
    busy = _busy()
    if busy:
        warnings.warn(f"accelerate: the machine is busy (1-minute load {busy:.1f} on {os.cpu_count()} cores); the timings "
                      "that decide each layer are unreliable and are not cached; run it again on a quiet machine", stacklevel=2)
    cache = TimingCache() if use_cache and not busy else None
    decisions: list[LayerDecision] = []
    for name in progress_bar(linears, "accelerate", enabled=progress):
        module = modules[name]
        W = dense_weight(module).detach()
        layer_t = per_layer.get(name, tokens or 1)
        density = float((W != 0).float().mean())
        if W.device.type != "cpu" or not kernels:
            why = "the compiled kernels are not available" if not kernels else f"on {W.device.type}: the CPU kernels do not apply"
            decisions.append(LayerDecision(name, tuple(W.shape), density, layer_t, reason=why + ": kept dense"))
            continue
        if density > max_density:
            decisions.append(LayerDecision(name, tuple(W.shape), density, layer_t,
                                           reason=f"density {density:.2f} > {max_density}: not sparse enough to gain, kept dense"))
            continue
        options = candidate_formats(W, formats, block, layer_t)
        if not options:
            decisions.append(LayerDecision(name, tuple(W.shape), density, layer_t, reason="no requested format fits this layer"))
            continue
        decision, sparse = _decide(name, W, density, module.bias, layer_t, options, dtype, min_speedup, cache)
        decisions.append(decision)
        if sparse is not None:
            replace_module(model, name, SparseLinear(sparse, module.bias))
    if cache:
        cache.save()
    return AccelerationReport(decisions)


def _busy() -> float:
    """The 1-minute load average when other work competes for the cores (0.0 when quiet)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return load if load > (os.cpu_count() or 1) + 0.5 else 0.0
