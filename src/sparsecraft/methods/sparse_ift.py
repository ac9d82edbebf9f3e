"""Sparse Iso-FLOP Transformations (Thangarasa et al., "Sparse-IFT: Sparse Iso-FLOP
Transformations for Maximizing Training Efficiency", ICML 2024).

Each family replaces a dense ``Linear(d_in, d_out)`` (FLOPs proportional to d_in * d_out) by a
larger sparse module whose *sparse* FLOPs equal the dense layer's at sparsity s (density d = 1 - s):

- Sparse Wide (on a Linear -> act -> Linear block with fixed outer sizes): the hidden width grows
  k = 1/d times and both layers keep density d: d * k * (d_in h + h d_out) = d_in h + h d_out.
- Sparse Parallel: k = round(1/d) parallel copies of the layer, each at density 1/k, summed.
- Sparse Factorized: W = U V with inner width r = d_in d_out / (d (d_in + d_out)), U and V at density d.
- Sparse Doped: W = U V + S, a dense low-rank product of rank r = s d_in d_out / (d_in + d_out)
  plus a full-size sparse S at density d.

``sift_densities(model)`` maps every sparse part to its density, for any method here:
``prune(model, distribution="mapping", densities=sift_densities(model))``, or
``RigL(model, opt, ..., distribution="mapping", densities=sift_densities(model))``. Dense parts
(Sparse Doped's U and V) are excluded from the sparse selection by listing density 1.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError, check_density

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


class SparseWide(_SIFT):
    """Linear(d_in, k h) -> act -> Linear(k h, d_out), k = 1/(1 - sparsity), both at density 1 - sparsity."""

    def __init__(self, d_in: int, hidden: int, d_out: int, sparsity: float, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.density = _density(sparsity)
        self.hidden = max(1, round(hidden / self.density))
        self.fc1 = nn.Linear(d_in, self.hidden)
        self.act = activation if activation is not None else nn.ReLU()
        self.fc2 = nn.Linear(self.hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def part_densities(self) -> dict[str, float]:
        return {"fc1": self.density, "fc2": self.density}


class SparseParallel(_SIFT):
    """k = round(1/(1 - sparsity)) parallel Linear(d_in, d_out) branches at density 1/k, outputs summed."""

    def __init__(self, d_in: int, d_out: int, sparsity: float, bias: bool = True) -> None:
        super().__init__()
        self.k = max(1, round(1.0 / _density(sparsity)))
        self.branches = nn.ModuleList(nn.Linear(d_in, d_out, bias=bias and i == 0) for i in range(self.k))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([b(x) for b in self.branches]).sum(0)

    def part_densities(self) -> dict[str, float]:
        return {f"branches.{i}": 1.0 / self.k for i in range(self.k)}


class SparseFactorized(_SIFT):
    """W = U V: Linear(d_in, r) then Linear(r, d_out), r = d_in d_out / (d (d_in + d_out)), both at density d."""

    def __init__(self, d_in: int, d_out: int, sparsity: float, bias: bool = True) -> None:
        super().__init__()
        self.density = _density(sparsity)
        self.rank = max(1, round(d_in * d_out / (self.density * (d_in + d_out))))
        self.v = nn.Linear(d_in, self.rank, bias=False)
        self.u = nn.Linear(self.rank, d_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.u(self.v(x))

    def part_densities(self) -> dict[str, float]:
        return {"v": self.density, "u": self.density}


class SparseDoped(_SIFT):
    """W = U V + S: dense rank-r product, r = s d_in d_out / (d_in + d_out), plus S at density d."""

    def __init__(self, d_in: int, d_out: int, sparsity: float, bias: bool = True) -> None:
        super().__init__()
        self.density = _density(sparsity)
        self.rank = math.floor(sparsity * d_in * d_out / (d_in + d_out))
        if self.rank < 1:
            raise SparsecraftError(f"Sparse Doped: rank {self.rank} < 1 for {d_in}x{d_out} at sparsity {sparsity}; use a larger layer")
        self.v = nn.Linear(d_in, self.rank, bias=False)
        self.u = nn.Linear(self.rank, d_out, bias=False)
        self.s = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.u(self.v(x)) + self.s(x)

    def part_densities(self) -> dict[str, float]:
        return {"v": 1.0, "u": 1.0, "s": self.density}


def sparse_ift(layer: nn.Linear, family: str, sparsity: float) -> _SIFT:
    """The iso-FLOP replacement of ``layer`` (Parallel, Factorized, Doped; Wide needs a block: SparseWide)."""
    if not isinstance(layer, nn.Linear):
        raise SparsecraftError(f"Sparse-IFT replaces nn.Linear layers, got {type(layer).__name__}")
    builders = {"parallel": SparseParallel, "factorized": SparseFactorized, "doped": SparseDoped}
    if family not in builders:
        raise SparsecraftError(f"Sparse-IFT family {family!r}: choose {', '.join(builders)} (wide: SparseWide on a block)")
    return builders[family](layer.in_features, layer.out_features, sparsity, bias=layer.bias is not None)


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
