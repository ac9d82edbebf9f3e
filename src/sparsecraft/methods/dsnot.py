"""DSnoT: Dynamic Sparse No Training (Zhang et al., "Dynamic Sparse No Training: Training-Free
Fine-tuning for Sparse LLMs", ICLR 2024), as a pure function refining a mask.

For output row r the expected reconstruction error of the pruned layer is
``e_r = sum over pruned j of W_rj * E[x_j]`` (here E[x_j] summed over a calibration sample's tokens
and averaged over samples, as in the reference, so ``threshold`` keeps the paper's meaning). Each
cycle swaps one pruned and one kept weight per row:

- **grow** the pruned weight that moves e_r towards zero the most, ranked by
  ``W_rj * E[x_j] / Var(x_j)^var_power`` (the variance term prefers stable inputs): the largest
  when e_r > 0, the smallest when e_r < 0;
- **prune** a kept weight whose contribution has the sign opposite to e_r, the one with the lowest
  pruning score (the Wanda score for unstructured masks); for N:M, the kept weight with the lowest
  pruning score in the grown weight's group, so every group still keeps N.

A row stops when |e_r| <= threshold, when the swap would flip the sign of e_r, or after
``max_cycles``. We also require that the swap strictly reduces |e_r| (the reference's sign test
alone allows a growth when the candidates run out); so the error never increases.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecraft.errors import PatternError


def expected_row_error(W: Tensor, keep: Tensor, feature_sum: Tensor) -> Tensor:
    """e_r = sum over pruned j of W_rj * feature_sum_j, per row."""
    return ((W.float() * feature_sum.float().unsqueeze(0)) * (~keep)).sum(1)


def _ranks(scores: Tensor) -> Tensor:
    """Rank of each entry within its row (0 = lowest), ties by column."""
    order = torch.argsort(scores, dim=1, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))


def dsnot_refine(
    W: Tensor,
    keep: Tensor,
    feature_sum: Tensor,
    feature_var: Tensor,
    prune_score: Tensor,
    n: int = 0,
    m: int = 0,
    max_cycles: int = 50,
    threshold: float = 0.1,
    var_power: float = 1.0,
) -> Tensor:
    """Refined boolean mask of kept weights; the number kept per row (and per N:M group) is unchanged."""
    rows, cols = W.shape
    if keep.shape != W.shape or prune_score.shape != W.shape or feature_sum.shape != (cols,) or feature_var.shape != (cols,):
        raise PatternError("DSnoT: W, keep and prune_score must share a shape, feature_sum/var have one entry per column")
    if (n or m) and (not 0 < n < m or cols % m):
        raise PatternError(f"DSnoT N:M needs 0 < N < M and M dividing {cols} columns")
    W = W.float()
    initial = keep.clone()
    keep = keep.clone()
    rows_idx = torch.arange(rows, device=W.device)
    contrib = W * feature_sum.float().unsqueeze(0)
    error = (contrib * (~keep)).sum(1)
    sign0 = torch.sign(error)

    grow_key = contrib / feature_var.float().clamp_min(1e-12).pow(var_power).unsqueeze(0) if var_power else contrib.clone()
    grow_order = torch.argsort(grow_key.masked_fill(keep, 0.0), dim=1, stable=True)
    grow_lo = torch.zeros(rows, dtype=torch.long, device=W.device)
    grow_hi = torch.full((rows,), cols - 1, dtype=torch.long, device=W.device)

    if not m:
        # kept weights with contribution <= 0 first by ascending score, then > 0 by descending score
        rank = _ranks(prune_score.float()).float()
        key = torch.where(contrib <= 0, rank, 3.0 * cols - rank).masked_fill(~keep, 1.5 * cols)
        prune_order = torch.argsort(key, dim=1, stable=True)
        prune_lo = torch.zeros(rows, dtype=torch.long, device=W.device)
        prune_hi = torch.full((rows,), cols - 1, dtype=torch.long, device=W.device)
    else:
        offsets = torch.arange(m, device=W.device)

    active = error.abs() > threshold
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        positive = error > 0
        g = grow_order[rows_idx, torch.where(positive, grow_hi, grow_lo).clamp(0, cols - 1)]
        grow_hi -= positive.long()
        grow_lo += (~positive).long()
        if m:
            group = (g // m * m).unsqueeze(1) + offsets
            candidates = prune_score.float().gather(1, group).masked_fill(~(keep & initial).gather(1, group), float("inf"))
            p = group.gather(1, candidates.argmin(1, keepdim=True)).squeeze(1)
            valid = (keep & initial)[rows_idx, p]
        else:
            negative = error < 0
            p = prune_order[rows_idx, torch.where(negative, prune_hi, prune_lo).clamp(0, cols - 1)]
            prune_hi -= negative.long()
            prune_lo += (~negative).long()
            side = torch.where(negative, contrib[rows_idx, p] > 0, contrib[rows_idx, p] <= 0)
            valid = keep[rows_idx, p] & initial[rows_idx, p] & side
        valid &= ~keep[rows_idx, g]
        after = error + contrib[rows_idx, p] - contrib[rows_idx, g]
        update = active & valid & (error.abs() > threshold) & (torch.sign(after) == sign0) & (after.abs() < error.abs())
        keep[rows_idx[update], g[update]] = True
        keep[rows_idx[update], p[update]] = False
        error = torch.where(update, after, error)
        active = update
    return keep
