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

import torch
from torch import Tensor


def _keep(values: Tensor, dim: int | None, count: int) -> Tensor:
    """``values`` with only the ``count`` largest entries (along ``dim``, or over all) kept."""
    if dim is None:
        flat = values.flatten()
        top = flat.topk(count, sorted=False)
        return torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(values)
    top = values.topk(count, dim=dim, sorted=False)
    return torch.zeros_like(values).scatter_(dim, top.indices, top.values)


def _check(count: int, limit: int, what: str) -> None:
    if not 0 < count <= limit:
        raise ValueError(f"{what} must be in [1, {limit}], got {count}")


def relu(pre: Tensor) -> Tensor:
    return torch.relu(pre)


def topk(pre: Tensor, k: int) -> Tensor:
    """Exactly ``k`` selected features per token (row); negative selected values become 0."""
    _check(k, pre.shape[-1], "k")
    return _keep(torch.relu(pre), -1, k)


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """The ``k * tokens`` largest entries of the batch, wherever they fall."""
    _check(k, pre.shape[-1], "k")
    return _keep(torch.relu(pre), None, k * pre.shape[0])


def mutual_choice(pre: Tensor, budget: int) -> Tensor:
    """A total of ``budget`` non-zeros allocated freely over tokens x features (the largest entries)."""
    _check(budget, pre.numel(), "budget")
    return _keep(torch.relu(pre), None, budget)


def feature_choice(pre: Tensor, m: int) -> Tensor:
    """Each feature (column) keeps its ``m`` largest tokens of the batch: at most m tokens per feature."""
    _check(m, pre.shape[0], "m")
    return _keep(torch.relu(pre), 0, m)


def feature_capacity(k: float, tokens: int, features: int) -> int:
    """Tokens per feature for a Feature Choice batch whose total budget is ``k * tokens``
    (the same average L0 as TopK with ``k``), at least 1."""
    return max(1, min(tokens, round(k * tokens / features)))
