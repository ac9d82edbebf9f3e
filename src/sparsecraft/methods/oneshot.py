"""One-shot pruning of one layer from calibration statistics: the registry of layer solvers.

Each solver takes W (out, in), the statistics of the layer's inputs and a pattern, and returns the
new weight (zeros where pruned) and the boolean mask of kept weights. The maths lives in the
methods' own modules (magnitude, wanda, sparsegpt, dsnot); this module adds what they share: the
input statistics, the reconstruction error, and the optional DSnoT refinement on top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsecraft.core.patterns import NM
from sparsecraft.errors import PatternError, SparsecraftError, check_density
from sparsecraft.methods.dsnot import dsnot_refine
from sparsecraft.methods.magnitude import magnitude_mask
from sparsecraft.methods.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from sparsecraft.methods.wanda import per_row_mask, wanda_mask, wanda_scores
from sparsecraft.registry import Registry


class InputStats:
    """Running statistics of a layer's inputs X (tokens x features): sum, sum of squares, X^T X.

    Layers fed by the same tensor (q, k, v) share one object; ``add`` is then called once per batch.
    Sums and squares are kept in float64 (variances subtract two close numbers); X^T X in float32,
    over the first ``hessian_tokens`` tokens only when given (enough for a reconstruction error).
    """

    def __init__(self, features: int, device: torch.device, hessian: bool = True, hessian_tokens: int | None = None) -> None:
        self.features = features
        self.hessian_tokens = hessian_tokens
        self.xtx_tokens = 0
        self.tokens = 0
        self.samples = 0
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sq = torch.zeros(features, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        self.samples += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, self.features).float()
        self.tokens += x.shape[0]
        # per-batch sums in float32 (no float64 copy of the activations), accumulated in float64
        self.sum += x.sum(0)
        self.sq += torch.linalg.vector_norm(x, ord=2, dim=0).square()
        if self.xtx is not None and (self.hessian_tokens is None or self.xtx_tokens < self.hessian_tokens):
            self.xtx.addmm_(x.t(), x)
            self.xtx_tokens += x.shape[0]

    def _need(self) -> None:
        if self.tokens == 0:
            raise SparsecraftError("no calibration input reached this layer; check the calibration data")

    @property
    def norm(self) -> Tensor:
        """||X_j||_2 over all calibration tokens (Wanda's input norm)."""
        self._need()
        return self.sq.sqrt().float()

    @property
    def mean(self) -> Tensor:
        self._need()
        return (self.sum / self.tokens).float()

    @property
    def var(self) -> Tensor:
        self._need()
        mean = self.sum / self.tokens
        return (self.sq / self.tokens - mean.square()).clamp_min(0).float()

    @property
    def per_sample_sum(self) -> Tensor:
        """Sum of x_j over a sample's tokens, averaged over samples (DSnoT's scale)."""
        self._need()
        return (self.sum / max(1, self.samples)).float()

    @property
    def hessian(self) -> Tensor:
        """H = X^T X summed over tokens (the scale cancels in SparseGPT's dampening and errors)."""
        self._need()
        if self.xtx is None:
            raise SparsecraftError("this layer's statistics were collected without X^T X")
        return self.xtx


@dataclass(frozen=True)
class LayerPattern:
    """Unstructured at ``sparsity``, or exactly ``n`` of every ``m`` (then sparsity = 1 - n/m)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def nm(self) -> bool:
        return self.m > 0

    def check(self, shape: tuple[int, int], layer: str) -> None:
        if self.nm:
            if not 0 < self.n < self.m:
                raise PatternError(f"{layer}: pattern {self.n}:{self.m} needs 0 < N < M")
            if shape[1] % self.m:
                raise PatternError(
                    f"{layer}: pattern {self.n}:{self.m} needs the input dimension {shape[1]} to be a multiple of {self.m}; "
                    "exclude this layer or choose another M"
                )
        else:
            check_density(1.0 - self.sparsity, f"{layer}: 1 - sparsity")


@dataclass(frozen=True)
class DSnoTConfig:
    """DSnoT settings (defaults: the paper's LLaMA runs)."""

    max_cycles: int = 50
    threshold: float = 0.1
    var_power: float = 1.0


Solver = Callable[[Tensor, "InputStats | None", LayerPattern], tuple[Tensor, Tensor]]
ONE_SHOT: Registry[Solver] = Registry("one-shot method")
#: Methods whose solver needs X^T X (not only per-feature sums).
NEEDS_HESSIAN = {"sparsegpt"}
#: Methods that need no calibration statistics at all.
STATS_FREE = {"magnitude", "magnitude-row"}


@ONE_SHOT.register("magnitude", "|W| compared across the whole layer (Han et al. 2015)")
def _magnitude(W: Tensor, stats: InputStats | None, pattern: LayerPattern) -> tuple[Tensor, Tensor]:
    keep = magnitude_mask(W, pattern.sparsity, pattern.n, pattern.m)
    return W * keep, keep


@ONE_SHOT.register("magnitude-row", "|W| compared within each output row")
def _magnitude_row(W: Tensor, stats: InputStats | None, pattern: LayerPattern) -> tuple[Tensor, Tensor]:
    keep = magnitude_mask(W, pattern.sparsity, pattern.n, pattern.m, per_row=True)
    return W * keep, keep


@ONE_SHOT.register("wanda", "|W_ij| * ||X_j||, compared per output row (Sun et al. 2024)")
def _wanda(W: Tensor, stats: InputStats, pattern: LayerPattern) -> tuple[Tensor, Tensor]:
    keep = wanda_mask(W, stats.norm, pattern.sparsity, pattern.n, pattern.m)
    return W * keep, keep


@ONE_SHOT.register("sparsegpt", "OBS reconstruction with H = X X^T, blocks of 128 (Frantar & Alistarh 2023)")
def _sparsegpt(W: Tensor, stats: InputStats, pattern: LayerPattern) -> tuple[Tensor, Tensor]:
    return sparsegpt_prune(W, stats.hessian, pattern.sparsity, pattern.n, pattern.m)


def initial_score(method: str, W: Tensor, stats: InputStats) -> Tensor:
    """The saliency each method ranks by, used by DSnoT for N:M pruning choices."""
    if method == "wanda":
        return wanda_scores(W, stats.norm)
    if method == "sparsegpt":
        factor, _ = inverse_hessian_factor(stats.hessian)
        return W.square() / torch.diag(factor).square().unsqueeze(0)
    return W.abs()


def solve_layer(method: str, W: Tensor, stats: InputStats, pattern: LayerPattern, dsnot: DSnoTConfig | None = None) -> tuple[Tensor, Tensor]:
    """Prune W (out, in) with ``method``; with ``dsnot``, refine the mask by DSnoT.

    DSnoT is training-free: the refined mask keeps the original weights. So, as in the DSnoT
    paper and its reference code, "SparseGPT + DSnoT" starts from SparseGPT's saliency
    W_ij^2 / [H^-1]_jj^2 ranked per row (or per N:M group) without the OBS weight update: the mask
    SparseGPT itself picks is tuned to its updated weights and is worse on the original ones
    (measured on SmolLM2-135M at 50%: ppl 82.5 against 72.6 without DSnoT).
    """
    if dsnot is None:
        return ONE_SHOT.get(method)(W, stats, pattern)
    score = initial_score(method, W, stats)
    if method == "sparsegpt":
        keep = NM(pattern.n, pattern.m).mask(score, layer="sparsegpt") if pattern.nm else per_row_mask(score, pattern.sparsity)
    else:
        _, keep = ONE_SHOT.get(method)(W, stats, pattern)
    prune_score = score if pattern.nm else wanda_scores(W, stats.norm)
    keep = dsnot_refine(
        W, keep, stats.per_sample_sum, stats.var, prune_score, pattern.n, pattern.m,
        dsnot.max_cycles, dsnot.threshold, dsnot.var_power,
    )
    return W * keep, keep


def reconstruction_error(W: Tensor, new_W: Tensor, stats: InputStats) -> float:
    """||W X - W' X||_F / ||W X||_F over the calibration inputs, from X^T X (no second pass)."""
    H = stats.hessian
    D = (W - new_W).float()
    num = float(((D @ H) * D).sum())
    den = float(((W.float() @ H) * W.float()).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
