"""torch.distributed helpers: data-dependent mask decisions see the data of every rank, so all
ranks take the same decision and masks stay bitwise identical (no broadcast needed afterwards)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def sum_over_ranks(tensors: Iterable[Tensor]) -> None:
    """In place: each tensor becomes the sum of its values on every rank (no-op on one process)."""
    if not is_distributed():
        return
    for t in tensors:
        torch.distributed.all_reduce(t)


def mean_over_ranks(tensors: Iterable[Tensor]) -> None:
    """In place: each tensor becomes the mean of its values on every rank (no-op on one process)."""
    if not is_distributed():
        return
    world = torch.distributed.get_world_size()
    for t in tensors:
        torch.distributed.all_reduce(t)
        t /= world
