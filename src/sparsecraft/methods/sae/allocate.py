"""Sparsifying activations of SAEs as token-feature allocations (Ayonrinde 2024, arXiv 2411.02124).

Each function takes pre-activations ``pre`` [tokens, features] and returns the latent codes:
the kept entries with ReLU applied, zeros elsewhere. They differ in the constraint on the
allocation of non-zeros:

- :func:`topk` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): exactly k per token;
- :func:`batch_topk` (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"): k x tokens in total,
  taken as the largest entries of the whole batch;
- :func:`mutual_choice` (Ayonrinde): the same unrestricted allocation of a total budget over the
  token x feature matrix; it is a separate name because the Mutual Choice SAE trains it with
  aux_zipf_loss (losses.py) where BatchTopK uses AuxK;
- :func:`feature_choice` (Ayonrinde): each feature takes its top m tokens of the batch.

ReLU before selection equals TopK-then-ReLU (Gao's order) since ReLU is monotone: the kept set of
non-zeros is the same. Ties are broken by ``torch.topk``, so the counts are exact.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Selection(NamedTuple):
    """The kept entries of a [tokens, features] allocation, ordered by token: training decodes
    from these directly (no dense [tokens, features] code matrix to fill, scan and multiply)."""

    rows: Tensor  # token of each kept entry, ascending
    cols: Tensor  # feature
    values: Tensor  # ReLU(pre-activation); 0 where a selected pre-activation was negative


def _check(count: int, limit: int, what: str) -> None:
    if not 0 < count <= limit:
        raise ValueError(f"{what} must be in [1, {limit}], got {count}")


def _from_flat(flat: Tensor, values: Tensor, features: int) -> Selection:
    order = flat.argsort()
    flat = flat[order]
    return Selection(flat // features, flat % features, values[order])


def select_relu(pre: Tensor) -> Selection:
    codes = torch.relu(pre)
    rows, cols = codes.nonzero(as_tuple=True)
    return Selection(rows, cols, codes[rows, cols])


def select_topk(pre: Tensor, k: int) -> Selection:
    """Exactly ``k`` features per token (row of ``pre`` [tokens, features])."""
    _check(k, pre.shape[-1], "k")
    top = torch.relu(pre).topk(k, dim=-1, sorted=False)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return Selection(rows, top.indices.flatten(), top.values.flatten())


def select_budget(pre: Tensor, budget: int) -> Selection:
    """The ``budget`` largest entries of the whole matrix (BatchTopK with budget k x tokens, Mutual Choice)."""
    _check(budget, pre.numel(), "budget")
    top = torch.relu(pre).flatten().topk(budget, sorted=False)
    return _from_flat(top.indices, top.values, pre.shape[-1])


def select_feature_choice(pre: Tensor, m: int) -> Selection:
    """Each feature (column) takes its ``m`` largest tokens."""
    _check(m, pre.shape[0], "m")
    top = torch.relu(pre).topk(m, dim=0, sorted=False)  # [m, features]
    flat = top.indices * pre.shape[-1] + torch.arange(pre.shape[-1], device=pre.device)
    return _from_flat(flat.flatten(), top.values.flatten(), pre.shape[-1])


def dense(selection: Selection, like: Tensor) -> Tensor:
    """The selection as a code matrix shaped like ``like`` (zeros elsewhere; differentiable)."""
    return torch.zeros_like(like).index_put((selection.rows, selection.cols), selection.values)


def decode(selection: Selection, W_dec: Tensor, tokens: int) -> Tensor:
    """codes @ W_dec reading only the kept entries' decoder rows (``F.embedding_bag``), [tokens, d]."""
    offsets = torch.zeros(tokens, dtype=torch.long, device=W_dec.device)
    if tokens > 1:
        offsets[1:] = torch.bincount(selection.rows, minlength=tokens).cumsum(0)[:-1]
    return F.embedding_bag(selection.cols, W_dec, offsets, mode="sum", per_sample_weights=selection.values)


def relu(pre: Tensor) -> Tensor:
    return torch.relu(pre)


def topk(pre: Tensor, k: int) -> Tensor:
    """Exactly ``k`` selected features per token (row); negative selected values become 0."""
    flat = pre.reshape(-1, pre.shape[-1])
    return dense(select_topk(flat, k), flat).view_as(pre)


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """The ``k * tokens`` largest entries of the batch, wherever they fall."""
    _check(k, pre.shape[-1], "k")
    return mutual_choice(pre, k * pre.shape[0])


def mutual_choice(pre: Tensor, budget: int) -> Tensor:
    """A total of ``budget`` non-zeros allocated freely over tokens x features (the largest entries)."""
    return dense(select_budget(pre, budget), pre)


def feature_choice(pre: Tensor, m: int) -> Tensor:
    """Each feature (column) keeps its ``m`` largest tokens of the batch: at most m tokens per feature."""
    return dense(select_feature_choice(pre, m), pre)


def feature_capacity(k: float, tokens: int, features: int) -> int:
    """Tokens per feature for a Feature Choice batch whose total budget is ``k * tokens``
    (the same average L0 as TopK with ``k``), at least 1."""
    return max(1, min(tokens, round(k * tokens / features)))
