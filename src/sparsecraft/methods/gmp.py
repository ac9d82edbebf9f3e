"""Gradual magnitude pruning (Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
pruning for model compression", 2017).

Sparsity follows the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3,   t = t0, t0 + dt, ..., t0 + n * dt

pruning by magnitude every ``dt`` steps, fast at first and slowly near the end. Works with every
pattern: for N:M the schedule walks N down from M (dense) towards the target N, one group size at
a time, as the cubic density crosses each N/M.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparsecraft.core.patterns import NM
from sparsecraft.core.sparsifier import Sparsifier
from sparsecraft.errors import DensityError


def cubic_sparsity(step: int, initial: float, final: float, start: int, frequency: int, n_prunes: int) -> float:
    """Target sparsity at ``step``: 0 before ``start``, the cubic ramp, then ``final``."""
    if step < start:
        return 0.0
    end = start + n_prunes * frequency
    progress = min(1.0, (step - start) / (n_prunes * frequency)) if end > start else 1.0
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualMagnitudePruning(Sparsifier):
    """GMP as a Sparsifier: call ``step()`` after each ``optimizer.step()``.

    Args:
        final_sparsity: s_f. For N:M patterns it must equal 1 - N/M (or be left out).
        initial_sparsity: s_i at the first pruning step t0.
        start_step: t0, the first step that prunes.
        frequency: dt, steps between pruning events.
        n_prunes: n, pruning events after t0 (the last one lands at t0 + n * dt).
        total_steps: when given, a schedule that ends after training ends is refused.
        distribution: ``uniform`` (per layer) or ``global`` (one threshold), or any other.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        final_sparsity: float | None = None,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        frequency: int = 100,
        n_prunes: int = 10,
        total_steps: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, optimizer, **options)
        if isinstance(self.pattern, NM):
            implied = 1.0 - self.pattern.n / self.pattern.m
            if final_sparsity is not None and abs(final_sparsity - implied) > 1e-9:
                raise DensityError(f"final_sparsity={final_sparsity} differs from {implied:g} fixed by pattern {self.pattern}")
            final_sparsity = implied
        if final_sparsity is None:
            raise DensityError("GMP needs final_sparsity=")
        if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
            raise DensityError(
                f"GMP needs 0 <= initial_sparsity ({initial_sparsity}) <= final_sparsity ({final_sparsity}) < 1"
            )
        if frequency < 1 or n_prunes < 0 or start_step < 0:
            raise DensityError(f"GMP needs frequency >= 1, n_prunes >= 0, start_step >= 0 (got {frequency}, {n_prunes}, {start_step})")
        self.end_step = start_step + n_prunes * frequency
        if total_steps is not None and self.end_step > total_steps:
            raise DensityError(
                f"GMP schedule ends at step {self.end_step} (start {start_step} + {n_prunes} x {frequency}) "
                f"but training has {total_steps} steps; start earlier, prune more often or fewer times"
            )
        self.final_sparsity = final_sparsity
        self.initial_sparsity = initial_sparsity
        self.start_step = start_step
        self.frequency = frequency
        self.n_prunes = n_prunes

    def target(self, step: int) -> float:
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.frequency, self.n_prunes)

    def is_pruning_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (step - self.start_step) % self.frequency == 0

    def update(self, step: int) -> None:
        if not self.is_pruning_step(step):
            return
        sparsity = self.target(step)
        if sparsity <= 0.0:
            return
        if isinstance(self.pattern, NM):
            m = self.pattern.m
            n = max(self.pattern.n, min(m, math.ceil(m * (1.0 - sparsity) - 1e-9)))
            if n < m:
                self.prune_to(sparsity, pattern=NM(n, m))
            return
        self.prune_to(sparsity)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "final_sparsity": self.final_sparsity}
