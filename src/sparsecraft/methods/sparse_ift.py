"""Sparse Iso-FLOP Transformations (Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP
Transformations for Maximizing Training Efficiency", ICML 2024).

Each family replaces a dense ``Linear(d_in, d_out)`` or ``Conv2d(d_in, d_out, kernel K = kh x kw)``
(FLOPs per output position proportional to d_in K d_out) by a larger sparse module whose *sparse*
FLOPs equal the dense layer's at sparsity s (density d = 1 - s):

- Sparse Wide (on a Linear/Conv -> act -> Linear/Conv block with fixed outer sizes): the hidden
  width grows k = 1/d times and both layers keep density d. For a whole network whose every layer
  widens on both sides (:func:`sparse_wide_model` on a model with a ``width`` argument) the paper's
  k = sqrt(1/d): inner layers at density 1/k^2, the first and last (one side widened) at 1/k.
- Sparse Parallel: k = round(1/d) parallel copies of the layer, each at density 1/k, summed.
- Sparse Factorized: W = U V, V the layer's own shape (kernel K) into r channels, U a 1x1 map to
  d_out, r = d_in K d_out / (d (d_in K + d_out)), U and V at density d.
- Sparse Doped: W = U V + S, a dense low-rank product of rank r = s d_in K d_out / (d_in K + d_out)
  plus a full-size sparse S at density d.

``sift_densities(model)`` maps every sparse part to its density, for any method here:
``prune(model, distribution="mapping", densities=sift_densities(model))``, or
``RigL(model, opt, ..., distribution="mapping", densities=sift_densities(model))``. Dense parts
(Sparse Doped's U and V) are excluded from the sparse selection by listing density 1.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError, check_density
from sparsecraft.utils import replace_module

FAMILIES = ("wide", "parallel", "factorized", "doped")


def _density(sparsity: float) -> float:
    check_density(1.0 - sparsity, "Sparse-IFT: 1 - sparsity")
    if sparsity <= 0:
        raise SparsecraftError("Sparse-IFT needs sparsity > 0 (at 0 the transformation is the dense layer)")
    return 1.0 - sparsity


class _SIFT(nn.Module, ABC):
    """Base: remembers which sub-layers are sparse and at which density."""

    @abstractmethod
    def part_densities(self) -> dict[str, float]:
        """Sub-layer name (relative) -> density; 1.0 marks a dense part."""


Layer = nn.Linear | nn.Conv2d


def _like(template: Layer | None, d_in: int, d_out: int, bias: bool, pointwise: bool = False) -> Layer:
    """A layer of ``template``'s kind and geometry with other channel counts (1x1 when ``pointwise``)."""
    if template is None or isinstance(template, nn.Linear):
        return nn.Linear(d_in, d_out, bias=bias)
    if pointwise:
        return nn.Conv2d(d_in, d_out, 1, bias=bias)
    return nn.Conv2d(d_in, d_out, template.kernel_size, template.stride, template.padding, template.dilation,
                     bias=bias, padding_mode=template.padding_mode)


def _kernel(template: Layer | None) -> int:
    return 1 if template is None or isinstance(template, nn.Linear) else math.prod(template.kernel_size)


class SparseWide(_SIFT):
    """Linear(d_in, k h) -> act -> Linear(k h, d_out), k = 1/(1 - sparsity), both at density 1 - sparsity.

    ``first`` / ``second``: Conv2d templates for a convolutional block (their kernels, strides, padding).
    """

    def __init__(self, d_in: int, hidden: int, d_out: int, sparsity: float, activation: nn.Module | None = None,
                 first: Layer | None = None, second: Layer | None = None) -> None:
        super().__init__()
        self.density = _density(sparsity)
        self.hidden = max(1, round(hidden / self.density))
        self.fc1 = _like(first, d_in, self.hidden, bias=first is None or first.bias is not None)
        self.act = activation if activation is not None else nn.ReLU()
        self.fc2 = _like(second, self.hidden, d_out, bias=second is None or second.bias is not None)

    @classmethod
    def from_block(cls, first: Layer, activation: nn.Module, second: Layer, sparsity: float) -> SparseWide:
        d_in, hidden = _channels(first)
        _, d_out = _channels(second)
        return cls(d_in, hidden, d_out, sparsity, activation, first, second)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def part_densities(self) -> dict[str, float]:
        return {"fc1": self.density, "fc2": self.density}


class SparseParallel(_SIFT):
    """k = round(1/(1 - sparsity)) parallel Linear(d_in, d_out) branches at density 1/k, outputs summed."""

    def __init__(self, d_in: int, d_out: int, sparsity: float, bias: bool = True, like: Layer | None = None) -> None:
        super().__init__()
        self.k = max(1, round(1.0 / _density(sparsity)))
        self.branches = nn.ModuleList(_like(like, d_in, d_out, bias=bias and i == 0) for i in range(self.k))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([b(x) for b in self.branches]).sum(0)

    def part_densities(self) -> dict[str, float]:
        return {f"branches.{i}": 1.0 / self.k for i in range(self.k)}


class SparseFactorized(_SIFT):
    """W = U V: V (d_in -> r, the layer's kernel) then U (r -> d_out, 1x1), r = d_in K d_out / (d (d_in K + d_out)), both at density d."""

    def __init__(self, d_in: int, d_out: int, sparsity: float, bias: bool = True, like: Layer | None = None) -> None:
        super().__init__()
        self.density = _density(sparsity)
        k = _kernel(like)
        self.rank = max(1, round(d_in * k * d_out / (self.density * (d_in * k + d_out))))
        self.v = _like(like, d_in, self.rank, bias=False)
        self.u = _like(like, self.rank, d_out, bias=bias, pointwise=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.u(self.v(x))

    def part_densities(self) -> dict[str, float]:
        return {"v": self.density, "u": self.density}


class SparseDoped(_SIFT):
    """W = U V + S: dense rank-r product, r = s d_in K d_out / (d_in K + d_out), plus S at density d."""

    def __init__(self, d_in: int, d_out: int, sparsity: float, bias: bool = True, like: Layer | None = None) -> None:
        super().__init__()
        self.density = _density(sparsity)
        k = _kernel(like)
        self.rank = math.floor(sparsity * d_in * k * d_out / (d_in * k + d_out))
        if self.rank < 1:
            raise SparsecraftError(f"Sparse Doped: rank {self.rank} < 1 for {d_in}x{d_out} at sparsity {sparsity}; use a larger layer")
        # S takes whatever the whole rank leaves of the dense FLOPs, so rounding r down costs nothing
        self.density = 1.0 - self.rank * (d_in * k + d_out) / (d_in * k * d_out)
        self.v = _like(like, d_in, self.rank, bias=False)
        self.u = _like(like, self.rank, d_out, bias=False, pointwise=True)
        self.s = _like(like, d_in, d_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.u(self.v(x)) + self.s(x)

    def part_densities(self) -> dict[str, float]:
        return {"v": 1.0, "u": 1.0, "s": self.density}


def _channels(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise SparsecraftError(f"Sparse-IFT: grouped convolutions (groups={layer.groups}) are not supported")
        return layer.in_channels, layer.out_channels
    raise SparsecraftError(f"Sparse-IFT replaces nn.Linear and nn.Conv2d layers, got {type(layer).__name__}")


def sparse_ift(layer: Layer, family: str, sparsity: float) -> _SIFT:
    """The iso-FLOP replacement of ``layer`` (Parallel, Factorized, Doped; Wide needs a block: SparseWide)."""
    d_in, d_out = _channels(layer)
    builders = {"parallel": SparseParallel, "factorized": SparseFactorized, "doped": SparseDoped}
    if family not in builders:
        raise SparsecraftError(f"Sparse-IFT family {family!r}: choose {', '.join(builders)} (wide: SparseWide on a block)")
    return builders[family](d_in, d_out, sparsity, bias=layer.bias is not None, like=layer)


def _is_wide_block(seq: nn.Module) -> bool:
    parts = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    # layer, parameter-free activation, layer of the same kind
    return len(parts) == 3 and isinstance(parts[0], (nn.Linear, nn.Conv2d)) and type(parts[0]) is type(parts[2]) \
        and not list(parts[1].parameters())


def sparse_wide_blocks(model: nn.Module, sparsity: float) -> int:
    """Replace every ``nn.Sequential(Linear|Conv, activation, Linear|Conv)`` in ``model`` (a
    Transformer's MLP, for one) by its Sparse Wide version in place; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if _is_wide_block(module):
            first, act, second = module.children()
            replace_module(model, name, SparseWide.from_block(first, act, second, sparsity))
            replaced += 1
    return replaced


def iso_flop_densities(dense: nn.Module, wide: nn.Module, example: Tensor) -> dict[str, float]:
    """Per-layer density making each layer of ``wide`` cost the sparse FLOPs of the same-named layer
    of ``dense`` (a widened copy of the same architecture): dense FLOPs / wide FLOPs."""
    from sparsecraft.analysis.flops import count_flops

    small, _, _ = count_flops(dense, example)
    large, _, _ = count_flops(wide, example)
    missing = sorted(set(small) ^ set(large))
    if missing:
        raise SparsecraftError(f"iso_flop_densities: the two models differ in layers {missing[:4]}; widen the same architecture")
    return {name: min(1.0, small[name].dense / large[name].dense) for name in small if large[name].dense}


def sift_densities(model: nn.Module) -> dict[str, float]:
    """``{module name: density}`` of every sub-layer of every Sparse-IFT module in ``model``."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, _SIFT):
            for part, density in module.part_densities().items():
                out[f"{name}.{part}" if name else part] = density
    return out


def sift_exclude(model: nn.Module) -> list[str]:
    """Module names of the dense parts (density 1), to leave out of a sparse selection."""
    return [name for name, density in sift_densities(model).items() if density >= 1.0]


def sparse_wide_model(name: str, model_args: dict[str, Any], sparsity: float, example: Tensor) -> tuple[nn.Module, dict[str, float]]:
    """Sparse Wide for a whole built-in model, with the density of each sparse layer (the others stay dense).

    Models with Linear-act-Linear blocks (the Transformer's MLPs) get :class:`SparseWide` blocks;
    otherwise a model with a ``width`` argument is rebuilt k = sqrt(1/d) times wider, each layer at
    the density that keeps its FLOPs (1/k^2 inside, 1/k where one side is fixed).
    """
    import inspect

    from sparsecraft.models import create
    from sparsecraft.registry import MODELS

    density = _density(sparsity)
    model = create(name, **model_args)
    if sparse_wide_blocks(model, sparsity):
        return model, {k: v for k, v in sift_densities(model).items() if v < 1.0}
    params = inspect.signature(MODELS.get(name)).parameters
    if "width" not in params:
        raise SparsecraftError(f"Sparse Wide: model {name!r} has neither Linear-act-Linear blocks nor a width argument")
    width = int(model_args.get("width", params["width"].default))
    wide = create(name, **{**model_args, "width": round(width / math.sqrt(density))})
    return wide, {k: v for k, v in iso_flop_densities(model, wide, example).items() if v < 1.0}
