"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024),
as pure functions on tensors.

The score of weight W_ij is |W_ij| * ||X_j||_2, the weight's magnitude times the norm of its input
feature over the calibration tokens; weights are compared within each output row (each row keeps
the same number), or within each group of M for N:M.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecraft.core.patterns import NM
from sparsecraft.errors import PatternError, check_density


def wanda_scores(W: Tensor, input_norm: Tensor) -> Tensor:
    """|W| * ||X_j||_2 broadcast over rows; ``input_norm`` has one entry per input column."""
    if input_norm.shape != (W.shape[1],):
        raise PatternError(f"Wanda: input_norm has shape {tuple(input_norm.shape)}, expected ({W.shape[1]},)")
    return W.detach().abs().float() * input_norm.float().unsqueeze(0)


def per_row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the round((1 - sparsity) * cols) highest scores of every row (ties: lower column first).

    O(cols) per row with kthvalue, not a sort: this runs on every projection of an LLM.
    """
    check_density(1.0 - sparsity, "1 - sparsity")
    cols = scores.shape[1]
    kept = max(1, round((1.0 - sparsity) * cols))
    if kept >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    if torch.isnan(scores).any():
        raise PatternError("Wanda: scores contain NaN; check the weights and the calibration inputs")
    threshold = torch.kthvalue(scores, cols - kept + 1, dim=1, keepdim=True).values
    above = scores > threshold
    tied = scores == threshold
    need = kept - above.sum(1, keepdim=True)
    return above | (tied & (torch.cumsum(tied, 1) <= need))


def wanda_mask(W: Tensor, input_norm: Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0) -> Tensor:
    """Boolean mask of kept weights: per-row unstructured, or N:M when ``n`` and ``m`` are given."""
    scores = wanda_scores(W, input_norm)
    if n or m:
        return NM(n, m).mask(scores, layer="wanda")
    return per_row_mask(scores, sparsity)
