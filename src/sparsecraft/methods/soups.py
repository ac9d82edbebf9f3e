"""Sparse Model Soups (Zimmer et al., "Sparse Model Soups: A Recipe for Improved Pruning via Model
Averaging", ICLR 2024), and SPDF's mask release (Thangarasa et al., "SPDF: Sparse Pre-training and
Dense Fine-tuning for Large Language Models", UAI 2023).

In each prune-retrain phase, m copies of the same pruned model are retrained with different
seeds (batch orders, weight decay, ...); because they share one mask, their average has exactly that
mask, and the next phase starts from the soup. Uniform soups average all members; greedy soups add
members in order of held-out accuracy and keep each only if the soup improves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sparsecraft.core.masking import enforce_masks, masks_of, remove_masks
from sparsecraft.core.prune import prune
from sparsecraft.errors import MaskMismatchError, SparsecraftError


def check_same_masks(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """The shared masks of the models; an error naming the first layer where they differ."""
    if not models:
        raise SparsecraftError("a soup needs at least one model")
    reference = masks_of(models[0])
    for i, model in enumerate(models[1:], start=1):
        masks = masks_of(model)
        if masks.keys() != reference.keys():
            raise MaskMismatchError(f"soup member {i} masks other layers ({sorted(masks.keys() ^ reference.keys())[:3]} ...)")
        for name, mask in masks.items():
            if not torch.equal(mask, reference[name]):
                raise MaskMismatchError(
                    f"soup member {i} has a different mask for {name}; soups average models pruned from the same parent"
                )
    return reference


@torch.no_grad()
def uniform_soup(models: Sequence[nn.Module]) -> nn.Module:
    """The average of models that share one mask (the soup keeps that mask exactly).

    Floating-point parameters and buffers are averaged (BatchNorm statistics included); integer
    buffers (``num_batches_tracked``) come from the first member.
    """
    check_same_masks(models)
    soup = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged = {}
    for key, value in soup.state_dict().items():
        if value.is_floating_point() and not key.endswith("_mask"):
            merged[key] = torch.stack([s[key].to(value.dtype) for s in states]).mean(0)
        else:
            merged[key] = value
    soup.load_state_dict(merged)
    enforce_masks(soup)
    return soup


def greedy_soup(models: Sequence[nn.Module], evaluate: Callable[[nn.Module], float]) -> tuple[nn.Module, list[int]]:
    """Add members in decreasing held-out score; keep one only if the soup's score does not drop.

    Returns the soup and the indices of the members in it (Wortsman et al.'s greedy recipe, as
    used by Zimmer et al.).
    """
    check_same_masks(models)
    order = sorted(range(len(models)), key=lambda i: evaluate(models[i]), reverse=True)
    chosen = [order[0]]
    best = evaluate(models[order[0]])
    for i in order[1:]:
        candidate = uniform_soup([models[j] for j in chosen + [i]])
        score = evaluate(candidate)
        if score >= best:
            chosen.append(i)
            best = score
    return uniform_soup([models[j] for j in chosen]), chosen


def sparse_model_soups(
    model: nn.Module,
    retrain: Callable[[nn.Module, int], None],
    evaluate: Callable[[nn.Module], float] | None,
    final_sparsity: float,
    phases: int = 3,
    members: int = 3,
    greedy: bool = False,
    on_phase: Callable[[int, float, list[float]], None] | None = None,
    **prune_options: Any,
) -> nn.Module:
    """SMS: for each phase, prune (magnitude) to that phase's sparsity, retrain ``members`` copies
    with ``retrain(copy, member_index)`` (vary seed / batch order / weight decay there), soup them.

    Phase sparsities follow IMP's geometric schedule, 1 - (1 - s)^(k / phases). ``evaluate`` is
    the held-out score for greedy soups (and the per-member log).
    """
    from sparsecraft.methods.imp import round_sparsity

    if greedy and evaluate is None:
        raise SparsecraftError("greedy soups need evaluate= (held-out accuracy)")
    current = model
    for phase in range(1, phases + 1):
        target = round_sparsity(final_sparsity, phases, phase)
        prune(current, sparsity=target, **prune_options)
        copies = []
        for k in range(members):
            member = copy.deepcopy(current)
            retrain(member, k)
            copies.append(member)
        scores = [evaluate(m) for m in copies] if evaluate is not None else []
        current = greedy_soup(copies, evaluate)[0] if greedy else uniform_soup(copies)  # type: ignore[arg-type]
        if on_phase is not None:
            on_phase(phase, target, scores)
    return current


def release_masks(model: nn.Module) -> nn.Module:
    """SPDF: after sparse pre-training, drop the masks; pruned weights restart from exactly zero
    and train densely from here on."""
    return remove_masks(model)
