"""Sparsity patterns: each turns a score tensor and a density into an exact mask.

Every pattern keeps whole *units* (a weight, a block, a row, an input channel, or N of every M
weights). The number kept is exactly ``units_to_keep(density, n_units)``; among equal scores the
lower flat index wins, so masks are deterministic on every device.

Weights are seen as matrices ``(out, ..., in)``: for convolutions the input-channel dimension is
moved last (``(out, kh, kw, in)``), so N:M groups run along input channels, as in NVIDIA's ASP
(Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021) and Zhou et al. (SR-STE, 2021).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsecraft.errors import PatternError, check_density
from sparsecraft.registry import PATTERNS


def units_to_keep(density: float, n_units: int) -> int:
    """Round half up, and never prune a layer away entirely (density > 0 keeps >= 1 unit)."""
    return min(n_units, max(1, math.floor(density * n_units + 0.5)))


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor; ties go to the lower index.

    O(n) with kthvalue instead of a full sort; deterministic where ``torch.topk`` is not.
    """
    n = scores.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if torch.isnan(scores).any():
        raise PatternError("scores contain NaN; check the weights or the score function")
    threshold = torch.kthvalue(scores, n - k + 1).values
    above = scores > threshold
    tied = scores == threshold
    need = k - int(above.sum())
    return above | (tied & (torch.cumsum(tied, 0) <= need))


def to_matrix(t: Tensor) -> Tensor:
    """``(out, in, *kernel)`` -> ``(out, prod(kernel) * in)`` with input channels innermost."""
    return t.movedim(1, -1).reshape(t.shape[0], -1) if t.dim() > 2 else t


def from_matrix(m: Tensor, shape: tuple[int, ...]) -> Tensor:
    if len(shape) <= 2:
        return m.reshape(shape)
    moved = (shape[0], *shape[2:], shape[1])
    return m.reshape(moved).movedim(-1, 1)


class Pattern(ABC):
    """A rule for which weights may be kept together."""

    name: str
    #: Density the pattern fixes by itself (N/M for N:M), or None when the density is free.
    fixed_density: float | None = None

    def check(self, shape: tuple[int, ...], layer: str) -> None:
        """Raise PatternError (naming the layer and the fix) if this pattern cannot apply."""
        if len(shape) < 2:
            raise PatternError(f"{layer}: pattern {self.name} needs a weight with >= 2 dimensions, got shape {shape}")

    @abstractmethod
    def n_units(self, shape: tuple[int, ...]) -> int: ...

    @abstractmethod
    def unit_scores(self, scores: Tensor) -> Tensor:
        """One score per unit (1-D), in a fixed order."""

    @abstractmethod
    def expand(self, keep: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Turn a boolean per-unit keep vector into a full mask of ``shape``."""

    def unit_size(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) // self.n_units(shape)

    def mask(self, scores: Tensor, density: float, layer: str = "weight") -> Tensor:
        """Exact mask keeping ``units_to_keep(density, n_units)`` units with the highest scores."""
        shape = tuple(scores.shape)
        self.check(shape, layer)
        check_density(density, f"{layer}: density")
        k = units_to_keep(density, self.n_units(shape))
        return self.expand(topk_mask(self.unit_scores(scores.float()), k), shape)

    def kept(self, shape: tuple[int, ...], density: float) -> int:
        """How many weights ``mask`` keeps for this shape and density."""
        return units_to_keep(density, self.n_units(shape)) * self.unit_size(shape)

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


@dataclass(frozen=True, eq=False)
class Unstructured(Pattern):
    """Any weight may be kept or removed on its own."""

    name: str = "unstructured"

    def check(self, shape: tuple[int, ...], layer: str) -> None:
        pass  # applies to tensors of any rank

    def n_units(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape)

    def unit_scores(self, scores: Tensor) -> Tensor:
        return scores.reshape(-1)

    def expand(self, keep: Tensor, shape: tuple[int, ...]) -> Tensor:
        return keep.reshape(shape)


@dataclass(frozen=True, eq=False)
class NM(Pattern):
    """Exactly N weights kept in every group of M consecutive weights along the input dimension."""

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise PatternError(f"N:M pattern {self.n}:{self.m} needs 0 < N < M (e.g. 2:4, 1:8)")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.n}:{self.m}"

    @property
    def fixed_density(self) -> float:  # type: ignore[override]
        return self.n / self.m

    def check(self, shape: tuple[int, ...], layer: str) -> None:
        super().check(shape, layer)
        if shape[1] % self.m:
            raise PatternError(
                f"{layer}: input dimension {shape[1]} (shape {shape}) is not divisible by M={self.m} "
                f"for pattern {self.name}; exclude this layer or choose an M that divides {shape[1]}"
            )

    def n_units(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) // self.m  # groups of M

    def unit_scores(self, scores: Tensor) -> Tensor:
        return to_matrix(scores).reshape(-1)

    def expand(self, keep: Tensor, shape: tuple[int, ...]) -> Tensor:
        return from_matrix(keep, shape)

    def mask(self, scores: Tensor, density: float | None = None, layer: str = "weight") -> Tensor:
        shape = tuple(scores.shape)
        self.check(shape, layer)
        if density is not None and abs(density - self.fixed_density) > 1e-9:
            raise PatternError(
                f"{layer}: pattern {self.name} fixes the density at {self.fixed_density:g}, but density {density:g} "
                "was asked; use the uniform distribution or choose another N:M"
            )
        groups = to_matrix(scores.float()).reshape(-1, self.m)
        if torch.isnan(groups).any():
            raise PatternError(f"{layer}: scores contain NaN; check the weights or the score function")
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, : self.n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
        return from_matrix(keep.reshape(shape[0], -1), shape)

    def kept(self, shape: tuple[int, ...], density: float | None = None) -> int:
        return math.prod(shape) // self.m * self.n

    def is_valid(self, mask: Tensor) -> bool:
        """True when every group of M along the input dimension keeps exactly N (or fewer, if already sparser)."""
        if mask.dim() < 2 or mask.shape[1] % self.m:
            return False
        counts = to_matrix(mask).reshape(-1, self.m).sum(1)
        return bool((counts == self.n).all())


@dataclass(frozen=True, eq=False)
class Block(Pattern):
    """Blocks of bh x bw weights on the ``(out, ..., in)`` matrix view, kept or removed whole."""

    bh: int = 4
    bw: int = 4

    def __post_init__(self) -> None:
        if self.bh < 1 or self.bw < 1:
            raise PatternError(f"block {self.bh}x{self.bw}: both sides must be >= 1")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"block{self.bh}x{self.bw}"

    def check(self, shape: tuple[int, ...], layer: str) -> None:
        super().check(shape, layer)
        rows, cols = shape[0], math.prod(shape[1:])
        if rows % self.bh or cols % self.bw:
            raise PatternError(
                f"{layer}: matrix view {rows}x{cols} (shape {shape}) is not divisible into {self.bh}x{self.bw} blocks; "
                "exclude this layer or choose a block size that divides both sides"
            )

    def n_units(self, shape: tuple[int, ...]) -> int:
        return (shape[0] // self.bh) * (math.prod(shape[1:]) // self.bw)

    def _blocks(self, m: Tensor) -> Tensor:
        rows, cols = m.shape
        return m.reshape(rows // self.bh, self.bh, cols // self.bw, self.bw).transpose(1, 2)

    def unit_scores(self, scores: Tensor) -> Tensor:
        return self._blocks(to_matrix(scores)).sum(dim=(2, 3)).reshape(-1)

    def expand(self, keep: Tensor, shape: tuple[int, ...]) -> Tensor:
        rows, cols = shape[0], math.prod(shape[1:])
        grid = keep.reshape(rows // self.bh, cols // self.bw)
        full = grid.repeat_interleave(self.bh, 0).repeat_interleave(self.bw, 1)
        return from_matrix(full, shape)


@dataclass(frozen=True, eq=False)
class OutChannels(Pattern):
    """Whole output channels (rows of a Linear, filters of a conv) kept or removed."""

    name: str = "out_channels"

    def n_units(self, shape: tuple[int, ...]) -> int:
        return shape[0]

    def unit_scores(self, scores: Tensor) -> Tensor:
        return scores.reshape(scores.shape[0], -1).sum(1)

    def expand(self, keep: Tensor, shape: tuple[int, ...]) -> Tensor:
        return keep.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


@dataclass(frozen=True, eq=False)
class InChannels(Pattern):
    """Whole input channels (columns of a Linear, input planes of a conv) kept or removed."""

    name: str = "in_channels"

    def n_units(self, shape: tuple[int, ...]) -> int:
        return shape[1]

    def unit_scores(self, scores: Tensor) -> Tensor:
        return scores.transpose(0, 1).reshape(scores.shape[1], -1).sum(1)

    def expand(self, keep: Tensor, shape: tuple[int, ...]) -> Tensor:
        return keep.reshape(1, -1, *([1] * (len(shape) - 2))).expand(shape).clone()


# Each family registers a parser: text -> Pattern or None. parse_pattern tries them in turn.
def _parse_fixed(pattern: Pattern, *aliases: str):
    names = {pattern.name, *aliases}
    return lambda text: pattern if text in names else None


def _parse_nm(text: str) -> Pattern | None:
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    return NM(int(m[1]), int(m[2])) if m else None


def _parse_block(text: str) -> Pattern | None:
    m = re.fullmatch(r"(?:block)?[\s_-]*(\d+)\s*x\s*(\d+)", text)
    return Block(int(m[1]), int(m[2])) if m else None


PATTERNS.register("unstructured", "any weight on its own")(_parse_fixed(Unstructured(), "element", "elementwise"))
PATTERNS.register("n:m", "N kept in every M along the input dim, e.g. 2:4, 1:8")(_parse_nm)
PATTERNS.register("block", "bh x bw blocks, e.g. block4x4 or 8x1")(_parse_block)
PATTERNS.register("out_channels", "whole output channels (rows / filters)")(
    _parse_fixed(OutChannels(), "rows", "filters", "out-channels")
)
PATTERNS.register("in_channels", "whole input channels (columns)")(
    _parse_fixed(InChannels(), "columns", "cols", "in-channels")
)

PATTERN_GRAMMAR = "unstructured | N:M (e.g. 2:4, 1:8) | blockHxW (e.g. block4x4) | out_channels | in_channels"


def parse_pattern(spec: str | Pattern) -> Pattern:
    """``"2:4"`` -> NM(2, 4); ``"block4x4"`` -> Block(4, 4); errors list the grammar."""
    if isinstance(spec, Pattern):
        return spec
    text = str(spec).strip().lower()
    for family in PATTERNS.names():
        pattern = PATTERNS.get(family)(text)
        if pattern is not None:
            return pattern
    raise PatternError(f"pattern {spec!r} does not parse; use {PATTERN_GRAMMAR}")


def infer_pattern(mask: Tensor) -> str:
    """Name the pattern a 0/1 tensor follows: ``dense``, ``N:M`` (M in 4, 8, 16, 32), or ``unstructured``.

    Reports use it for models whose pattern was not recorded (plain checkpoints with zeros).
    """
    keep = mask.bool()
    if bool(keep.all()):
        return "dense"
    if keep.dim() >= 2:
        for m in (4, 8, 16, 32):
            if keep.shape[1] % m == 0:
                counts = to_matrix(keep).reshape(-1, m).sum(1)
                n = int(counts[0])
                if 0 < n < m and bool((counts == n).all()):
                    return f"{n}:{m}"
    return "unstructured"
