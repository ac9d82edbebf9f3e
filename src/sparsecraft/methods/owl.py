"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL):
A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024).

A block's *outlier ratio* is the fraction of its weights whose Wanda score |W_ij| * ||X_j|| exceeds
M times the block's mean score. Blocks with more outliers are kept denser: the ratios are rescaled
linearly to [0, 2 * lambda], shifted so that their mean density equals 1 - target sparsity, and
block i is pruned to sparsity 1 - density_i (M = 5, lambda = 0.08 in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsecraft.errors import SparsecraftError, check_density


def outlier_ratio(scores: Sequence[Tensor], M: float = 5.0) -> float:
    """Fraction of all entries of ``scores`` (one tensor per layer of a block) above M x their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > M * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities whose mean is ``sparsity``; blocks with higher outlier ratio get less."""
    check_density(1.0 - sparsity, "1 - sparsity")
    if not ratios:
        return []
    if not 0.0 <= lam < 0.5:
        raise SparsecraftError(f"owl lambda must lie in [0, 0.5), got {lam}")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(r.max() - r.min())
    scaled = (r - r.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1.0 - sparsity)
    if density.max() > 1.0 or density.min() <= 0.0:
        raise SparsecraftError(
            f"owl: lambda {lam} moves some block outside (0, 1] density at sparsity {sparsity}; use a smaller lambda"
        )
    return [float(1.0 - d) for d in density]
