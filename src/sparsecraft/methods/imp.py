"""Iterative magnitude pruning with rewinding: lottery tickets.

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks"
(ICLR 2019) rewinds to initialisation; Frankle et al., "Linear Mode Connectivity and the Lottery
Ticket Hypothesis" (ICML 2020) rewinds to an early iteration k, weights and learning-rate schedule
(and optimizer state) together. Each round removes the same fraction of the remaining weights,
1 - (1 - s)^(1/rounds), so ``rounds`` rounds reach sparsity s exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsecraft.core.masking import enforce_masks
from sparsecraft.core.prune import prune
from sparsecraft.core.selection import DEFAULT_TYPES, SELECTION_KEYS, select_from_options
from sparsecraft.errors import DensityError


def per_round_rate(final_sparsity: float, rounds: int) -> float:
    """Fraction of the remaining weights removed in each round."""
    return 1.0 - (1.0 - final_sparsity) ** (1.0 / rounds)


def round_sparsity(final_sparsity: float, rounds: int, r: int) -> float:
    """Overall sparsity after round r (1-based)."""
    return 1.0 - (1.0 - per_round_rate(final_sparsity, rounds)) ** r


@dataclass
class RewindPoint:
    """What is restored at each round: weights, optimizer state, LR-scheduler state, step."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls, step: int, model: nn.Module, optimizer=None, scheduler=None) -> RewindPoint:
        return cls(
            step,
            copy.deepcopy(model.state_dict()),
            copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
            copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
        )

    def restore(self, model: nn.Module, optimizer=None, scheduler=None) -> None:
        """Load the saved weights but keep the current masks (the ticket), then re-apply them."""
        masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
        state = {k: v for k, v in self.model.items() if not k.endswith("_mask")}
        model.load_state_dict({**state, **masks}, strict=False)
        enforce_masks(model)
        if optimizer is not None and self.optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        if scheduler is not None and self.scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(self.scheduler))


# train(model, optimizer, scheduler, start_step, on_step) runs one full training from start_step;
# on_step(step) is called after every optimizer step (IMP captures the rewind point there).
TrainFn = Callable[[nn.Module, Any, Any, int, Callable[[int], None]], None]


def iterative_magnitude_pruning(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], tuple[Any, Any]],
    train: TrainFn,
    final_sparsity: float,
    rounds: int = 3,
    rewind_step: int = 0,
    total_steps: int | None = None,
    distribution: str = "global",
    types=DEFAULT_TYPES,
    on_round: Callable[[int, float], None] | None = None,
    **prune_options: Any,
) -> nn.Module:
    """Train, prune the smallest weights, rewind to step ``rewind_step``, repeat ``rounds`` times,
    then train the final ticket. Returns the model (masked, trained)."""
    if not 0.0 < final_sparsity < 1.0:
        raise DensityError(f"IMP needs 0 < final_sparsity < 1, got {final_sparsity}")
    if rounds < 1:
        raise DensityError(f"IMP needs rounds >= 1, got {rounds}")
    if total_steps is not None and rewind_step > total_steps:
        raise DensityError(f"rewind step {rewind_step} lies beyond the run ({total_steps} steps); rewind earlier")
    selection = select_from_options(model, {**prune_options, "types": types})
    prune_options = {k: v for k, v in prune_options.items() if k not in SELECTION_KEYS}
    optimizer, scheduler = make_optimizer(model)
    rewind: list[RewindPoint] = []
    if rewind_step == 0:
        rewind.append(RewindPoint.capture(0, model, optimizer, scheduler))

    def capture(step: int) -> None:
        if step == rewind_step and not rewind:
            rewind.append(RewindPoint.capture(step, model, optimizer, scheduler))

    train(model, optimizer, scheduler, 0, capture)
    if not rewind:
        raise DensityError(f"training never reached the rewind step {rewind_step}")
    point = rewind[0]
    for r in range(1, rounds + 1):
        target = round_sparsity(final_sparsity, rounds, r)
        prune(model, sparsity=target, distribution=distribution, selection=selection, **prune_options)
        point.restore(model, optimizer, scheduler)
        if on_round is not None:
            on_round(r, target)
        train(model, optimizer, scheduler, point.step, lambda step: None)
    return model
