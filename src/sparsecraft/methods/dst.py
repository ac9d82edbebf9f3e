"""Dynamic sparse training: SET, RigL and GraNet. The density of every layer stays constant; every
``update_interval`` steps each layer drops some of its kept weights and regrows as many elsewhere.

- SET (Mocanu et al., "Scalable training of artificial neural networks with adaptive sparse
  connectivity inspired by network science", Nature Communications 2018): drop the
  smallest-magnitude fraction zeta of the kept weights, regrow as many at random positions.
- RigL (Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020): drop by
  magnitude, regrow where the *dense* gradient magnitude is largest. The dense gradient is kept
  only for the backward pass just before an update step (no extra backward otherwise); the drop
  fraction decays as alpha/2 * (1 + cos(pi t / T_end)) and updates stop at T_end (75% of training
  by default). Regrown weights start at zero with zero optimizer state.

Masks start random with the chosen distribution (ERK by default, as in RigL). Under
torch.distributed the dense gradients are averaged over ranks and random regrowth uses a seed
shared by all ranks, so masks stay identical everywhere.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.core.distributed import mean_over_ranks
from sparsecraft.core.masking import apply_masks, find_enforcer, iter_masked, masks_of, patterns_of
from sparsecraft.core.optimizers import reset_state_at
from sparsecraft.core.patterns import topk_mask
from sparsecraft.core.sparsifier import Sparsifier
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.gmp import cubic_sparsity


def cosine_drop_fraction(step: int, alpha: float, end: int) -> float:
    """alpha/2 * (1 + cos(pi * step / end)) before ``end``, 0 from then on (RigL, eq. 1)."""
    if step >= end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * step / end))


def drop_and_grow(weight: Tensor, mask: Tensor, n: int, grow_scores: Tensor) -> Tensor:
    """New bool mask: drop the ``n`` smallest-|w| kept weights, grow the ``n`` highest ``grow_scores``
    among the positions not kept after the drop (a just-dropped weight may come back). Ties: lower index."""
    mask = mask.bool().reshape(-1)
    kept = int(mask.sum())
    n = max(0, min(n, kept, mask.numel() - kept))
    if n == 0:
        return mask.reshape(weight.shape)
    magnitude = weight.detach().abs().reshape(-1).float().masked_fill(~mask, -1.0)
    survivors = topk_mask(magnitude, kept - n)
    scores = grow_scores.detach().reshape(-1).float().masked_fill(survivors, -math.inf)
    grown = topk_mask(scores, n) & ~survivors
    return (survivors | grown).reshape(weight.shape)


class DynamicSparseTraining(Sparsifier, ABC):
    """Shared schedule of SET and RigL; subclasses give the regrowth scores."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float,
        total_steps: int,
        update_interval: int = 100,
        drop_fraction: float = 0.3,
        end: float | int = 0.75,
        decay: str = "cosine",
        distribution: str = "erk",
        **options: Any,
    ) -> None:
        if not 0.0 <= drop_fraction < 1.0:
            raise SparsecraftError(f"drop_fraction={drop_fraction} must lie in [0, 1)")
        if update_interval < 1:
            raise SparsecraftError(f"update_interval={update_interval} must be >= 1 step")
        if total_steps < 1:
            raise SparsecraftError(f"total_steps={total_steps} must be >= 1")
        end_step = round(end * total_steps) if isinstance(end, float) else int(end)
        if not 0 < end_step <= total_steps:
            raise SparsecraftError(f"end={end} gives step {end_step}, outside training (1..{total_steps}); use a fraction in (0, 1]")
        if decay not in ("cosine", "constant"):
            raise SparsecraftError(f"decay={decay!r}: choose cosine or constant")
        options.setdefault("score", "random")
        super().__init__(model, optimizer, distribution=distribution, **options)
        if self.pattern.fixed_density is not None:
            raise SparsecraftError("SET/RigL move single weights: use an unstructured pattern (N:M training is separate)")
        self.target_sparsity = sparsity
        self.total_steps = total_steps
        self.update_interval = update_interval
        self.drop_fraction = drop_fraction
        self.end_step = end_step
        self.decay = decay
        self.history: list[dict[str, Any]] = []
        self._initial_masks()
        self._arm(1)

    def _initial_masks(self) -> None:
        self.prune_to(self.target_sparsity)

    def fraction_at(self, step: int) -> float:
        if step >= self.end_step:
            return 0.0
        return cosine_drop_fraction(step, self.drop_fraction, self.end_step) if self.decay == "cosine" else self.drop_fraction

    def is_update_step(self, step: int) -> bool:
        return step % self.update_interval == 0 and step < self.end_step

    def _arm(self, next_step: int) -> None:
        """Hook for methods that need something from the backward before an update step."""

    @abstractmethod
    def grow_scores(self, name: str, weight: Tensor, step: int) -> Tensor:
        """Regrowth scores of one layer (highest regrow first): random for SET, |dense gradient| for RigL."""

    def update(self, step: int) -> None:
        if self.is_update_step(step):
            self.rewire(step)
        self._arm(step + 1)

    @torch.no_grad()
    def rewire(self, step: int) -> dict[str, int]:
        """Drop and regrow in every masked layer now; returns the number moved per layer."""
        fraction = self.fraction_at(step)
        params = dict(self.model.named_parameters())
        old = masks_of(self.model)
        new, moved = {}, {}
        for name, mask in old.items():
            n = round(fraction * int(mask.sum()))
            new[name] = drop_and_grow(params[name], mask, n, self.grow_scores(name, params[name], step))
            moved[name] = int((new[name] & ~mask).sum())
        apply_masks(self.model, new, patterns_of(self.model), self.optimizer)
        if self.optimizer is not None:
            for name in new:
                reset_state_at(self.optimizer, params[name], new[name] & ~old[name])
        self.history.append({"step": step, "fraction": fraction, "moved": sum(moved.values())})
        return moved

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = list(state.get("history", []))
        self._arm(self.step_count + 1)


class SET(DynamicSparseTraining):
    """Magnitude drop, random regrowth (a constant fraction zeta = 0.3 by default, as in the paper)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, decay: str = "constant", **kw: Any) -> None:
        super().__init__(model, optimizer, decay=decay, **kw)

    def grow_scores(self, name: str, weight: Tensor, step: int) -> Tensor:
        # the same on every rank: seeded by (seed, step, layer name), never by process state
        seed = (self.seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())) % 2**63
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(weight.shape, generator=generator).to(weight.device)


class RigL(DynamicSparseTraining):
    """Magnitude drop, regrowth where |dense gradient| is largest (alpha = 0.3, cosine decay, T_end = 75%)."""

    def _enforcers(self):
        seen = {}
        for _, module, _ in iter_masked(self.model):
            enforcer = find_enforcer(module)
            if enforcer is not None:
                seen[id(enforcer)] = enforcer
        return list(seen.values())

    def _arm(self, next_step: int) -> None:
        armed = self.is_update_step(next_step)
        for enforcer in self._enforcers():
            enforcer.keep_dense_grads = armed
            if not armed:
                enforcer.dense_grads.clear()

    def grow_scores(self, name: str, weight: Tensor, step: int) -> Tensor:
        module_name, _, param_name = name.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        enforcer = find_enforcer(module)
        grad = enforcer.dense_grads.get(param_name) if enforcer is not None else None
        if grad is None:
            raise SparsecraftError(
                f"RigL: no dense gradient for {name} at step {step}; call sparsifier.step() after every optimizer.step() "
                "(the backward before an update step keeps the dense gradient)"
            )
        mean_over_ranks([grad])  # DDP: regrow from the gradient of every rank's data, identically everywhere
        return grad.abs()


class GraNet(RigL):
    """GraNet (Liu et al., "Sparse Training via Boosting Pruning Plasticity with Neuroregeneration",
    NeurIPS 2021): gradual magnitude pruning on the cubic schedule of Zhu & Gupta (one global
    threshold by default), and at every pruning step a zero-cost neuroregeneration: drop the
    smallest kept weights and regrow as many where the gradient is largest (RigL's rule, cosine
    decaying fraction, 0.5 at first). ``initial_sparsity=0`` is the dense-to-sparse variant; above
    0 the run starts from random masks with ``distribution`` (sparse-to-sparse)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float,
        total_steps: int,
        initial_sparsity: float = 0.0,
        drop_fraction: float = 0.5,
        prune_distribution: str = "global",
        **options: Any,
    ) -> None:
        if not 0.0 <= initial_sparsity <= sparsity < 1.0:
            raise SparsecraftError(f"GraNet needs 0 <= initial_sparsity ({initial_sparsity}) <= sparsity ({sparsity}) < 1")
        self.initial_sparsity = initial_sparsity
        self.prune_distribution = prune_distribution
        super().__init__(model, optimizer, sparsity=sparsity, total_steps=total_steps, drop_fraction=drop_fraction, **options)
        if self.update_interval >= self.end_step and initial_sparsity < sparsity:
            raise SparsecraftError(
                f"GraNet: update_interval={self.update_interval} leaves no pruning step before T_end (step {self.end_step}); "
                "use a smaller interval"
            )
        # pruning events at update steps interval, 2 interval, ... up to the last one before T_end
        self.n_prunes = max(0, (self.end_step - 1) // self.update_interval - 1)

    def _initial_masks(self) -> None:
        # every selected weight gets a mask now (all ones where dense), so that the gradient hooks
        # that keep RigL's dense gradients exist before the first pruning step masks a layer
        present = masks_of(self.model)
        ones = {t.name: torch.ones_like(t.param, dtype=torch.bool) for t in self.selection if t.name not in present}
        if ones:
            apply_masks(self.model, ones, optimizer=self.optimizer)
        if self.initial_sparsity > 0:
            self.prune_to(self.initial_sparsity)

    def schedule(self, step: int) -> float:
        """The cubic target sparsity at ``step`` (``sparsity`` from the last pruning step on)."""
        return cubic_sparsity(step, self.initial_sparsity, self.target_sparsity, self.update_interval,
                              self.update_interval, self.n_prunes)

    def update(self, step: int) -> None:
        if self.is_update_step(step):
            target = self.schedule(step)
            if target > self.sparsity + 1e-12:
                self.prune_to(target, distribution=self.prune_distribution, score="magnitude")
            self.rewire(step)
        self._arm(step + 1)
