"""Importance scores: one tensor per weight, higher = more worth keeping.

Scores are registered by name so that later methods plug in the same way::

    @register_score("wanda", needs_gradients=False)
    def wanda(target, *, seed): ...

Gradient-based scores read ``param.grad``; fill it first with :func:`accumulate_gradients`
(a few batches of the user's loss) or with any backward pass of their own.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.core.masking import dense_gradients
from sparsecraft.core.selection import Target
from sparsecraft.errors import SparsecraftError
from sparsecraft.registry import SCORES

ScoreCallable = Callable[..., Tensor]


@dataclass(frozen=True)
class Score:
    """A named score function and what it needs before it can run."""

    name: str
    fn: ScoreCallable
    needs_gradients: bool = False

    def __call__(self, target: Target, *, seed: int = 0) -> Tensor:
        if self.needs_gradients and target.param.grad is None:
            raise SparsecraftError(
                f"{target.name}: score {self.name!r} needs gradients, but .grad is empty; run a backward pass "
                "first, e.g. sparsecraft.core.scores.accumulate_gradients(model, loss_fn, batches)"
            )
        scores = self.fn(target, seed=seed)
        if scores.shape != target.param.shape:
            raise SparsecraftError(
                f"{target.name}: score {self.name!r} returned shape {tuple(scores.shape)}, expected {tuple(target.param.shape)}"
            )
        return scores.detach()


def register_score(name: str, needs_gradients: bool = False, summary: str = "") -> Callable[[ScoreCallable], ScoreCallable]:
    """Register ``fn(target, *, seed) -> Tensor`` under ``name``."""

    def add(fn: ScoreCallable) -> ScoreCallable:
        SCORES.register(name, summary)(Score(name, fn, needs_gradients))
        return fn

    return add


def get_score(score: str | Score | ScoreCallable) -> Score:
    """A registered name, a Score, or any callable ``fn(target, *, seed)``."""
    if isinstance(score, Score):
        return score
    if callable(score):
        return Score(getattr(score, "__name__", "custom"), score)
    return SCORES.get(score)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on Python's salted hash()."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@register_score("magnitude", summary="|W| (Han et al., 2015)")
def magnitude(target: Target, *, seed: int = 0) -> Tensor:
    return target.param.detach().abs()


@register_score("random", summary="uniform random, seeded per layer (Liu et al., 2022)")
def random_score(target: Target, *, seed: int = 0) -> Tensor:
    p = target.param
    gen = torch.Generator(device="cpu").manual_seed(layer_seed(seed, target.name))
    return torch.rand(p.shape, generator=gen).to(p.device)


@register_score("gradient", needs_gradients=True, summary="|dL/dW| from the accumulated .grad")
def gradient_magnitude(target: Target, *, seed: int = 0) -> Tensor:
    return target.param.grad.detach().abs()  # type: ignore[union-attr]


@register_score("taylor", needs_gradients=True, summary="|W * dL/dW|, first-order Taylor (Molchanov et al., 2019)")
def taylor(target: Target, *, seed: int = 0) -> Tensor:
    return (target.param.detach() * target.param.grad.detach()).abs()  # type: ignore[union-attr]


def compute_scores(targets: Iterable[Target], score: str | Score | ScoreCallable, seed: int = 0) -> dict[str, Tensor]:
    """Scores for every target, by parameter name."""
    scorer = get_score(score)
    return {t.name: scorer(t, seed=seed) for t in targets}


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable[Any],
    zero_first: bool = True,
) -> int:
    """Run ``loss_fn(model, batch).backward()`` over the batches; returns how many ran.

    Gradients of masked weights are left dense here on purpose: gradient scores look at them.
    """
    if zero_first:
        model.zero_grad(set_to_none=True)
    n = 0
    with dense_gradients(model):
        for batch in batches:
            loss_fn(model, batch).backward()
            n += 1
    if n == 0:
        raise SparsecraftError("accumulate_gradients got no batches; pass at least one")
    return n


def existing_masks_last(scores: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weights already pruned rank below every kept one, so pruning again never revives them."""
    out = dict(scores)
    for name, mask in masks.items():
        if name in out:
            out[name] = out[name].float().masked_fill(~mask.to(out[name].device), float("-inf"))
    return out
