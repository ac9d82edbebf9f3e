"""Magnitude pruning of one weight matrix (Han et al., "Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS 2015), compared across the whole layer or within each output
row (the per-output comparison group that Wanda showed matters for LLMs), or within N:M groups.
"""

from __future__ import annotations

from torch import Tensor

from sparsecraft.core.patterns import NM, topk_mask, units_to_keep
from sparsecraft.errors import check_density
from sparsecraft.methods.wanda import per_row_mask


def magnitude_mask(W: Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0, per_row: bool = False) -> Tensor:
    """Boolean mask of kept weights of W (out, in) by |W|."""
    scores = W.detach().abs().float()
    if n or m:
        return NM(n, m).mask(scores, layer="magnitude")
    if per_row:
        return per_row_mask(scores, sparsity)
    check_density(1.0 - sparsity, "1 - sparsity")
    kept = units_to_keep(1.0 - sparsity, scores.numel())
    return topk_mask(scores.reshape(-1), kept).reshape(scores.shape)
