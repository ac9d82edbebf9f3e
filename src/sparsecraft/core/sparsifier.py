"""The training-time interface: a Sparsifier is used like an optimizer, ``step()`` in the loop.

    sparsifier = GradualMagnitudePruning(model, optimizer, final_sparsity=0.9, ...)
    for batch in data:
        loss(model, batch).backward()
        optimizer.step()
        sparsifier.step()          # the only line added to the user's loop

Subclasses implement :meth:`update`, called with the step count after each ``step()``. The
sparsifier's own state (step count, method state) is in :meth:`state_dict`; masks travel with the
model's ``state_dict`` as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparsecraft.core.masking import finalize
from sparsecraft.core.patterns import parse_pattern
from sparsecraft.core.prune import PrunePlan, prune, selection_sparsity
from sparsecraft.core.selection import DEFAULT_TYPES, Selection, select


class Sparsifier:
    """Base class: what to sparsify (selection, pattern, distribution, score) and the step counter."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        pattern: str = "unstructured",
        distribution: str = "uniform",
        score: Any = "magnitude",
        types: Sequence[str] = DEFAULT_TYPES,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        keep_first_dense: bool = False,
        keep_last_dense: bool = False,
        seed: int = 0,
        **distribution_options: Any,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.pattern = parse_pattern(pattern)
        self.distribution = distribution
        self.score = score
        self.seed = seed
        self.distribution_options = distribution_options
        self.selection: Selection = select(model, types, include, exclude, keep_first_dense, keep_last_dense)
        self.step_count = 0
        self.last_plan: PrunePlan | None = None

    def prune_to(self, sparsity: float, **overrides: Any) -> PrunePlan:
        """Prune the selection to ``sparsity`` now (masks only tighten: pruned weights stay pruned)."""
        options = {
            "pattern": self.pattern,
            "distribution": self.distribution,
            "score": self.score,
            "seed": self.seed,
            "selection": self.selection,
            **self.distribution_options,
            **overrides,
        }
        if self.pattern.fixed_density is None:
            options["sparsity"] = sparsity
        self.last_plan = prune(self.model, optimizer=self.optimizer, **options)
        return self.last_plan

    @property
    def sparsity(self) -> float:
        """Fraction of the selected weights currently pruned."""
        return selection_sparsity(self.model, self.selection)

    def step(self) -> None:
        self.step_count += 1
        self.update(self.step_count)

    def update(self, step: int) -> None:  # pragma: no cover - subclasses override
        """Called after every ``step()`` with the 1-based step count."""

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])

    def finalize(self) -> nn.Module:
        """Bake the zeros in and remove every hook: a plain ``nn.Module``."""
        return finalize(self.model)
