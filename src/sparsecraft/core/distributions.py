"""Layer-wise density distributions: how a total density is shared among the selected layers.

Each distribution returns ``{parameter name: density}``. Where the total is defined in weights
(global, ER, ERK), per-layer counts are rounded by largest remainder so the total kept equals
``round(density * total)`` exactly (for unstructured patterns).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from sparsecraft.core.patterns import Pattern, topk_mask
from sparsecraft.core.selection import Target
from sparsecraft.errors import DensityError, check_density
from sparsecraft.registry import DISTRIBUTIONS

Distribution = Callable[..., dict[str, float]]


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def allocate_exact(ideal: Mapping[str, float], sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Integer counts near ``ideal`` (each in [1, size]) that add up to ``total`` (largest remainder)."""
    counts = {k: min(sizes[k], max(1, math.floor(v))) for k, v in ideal.items()}
    remainder = total - sum(counts.values())
    # Hand the missing units to the largest fractional parts (then to the largest room), or take back.
    order = sorted(ideal, key=lambda k: (-(ideal[k] - math.floor(ideal[k])), -(sizes[k] - counts[k]), k))
    step = 1 if remainder > 0 else -1
    while remainder:
        moved = False
        for k in order if step > 0 else reversed(order):
            if remainder == 0:
                break
            if (step > 0 and counts[k] < sizes[k]) or (step < 0 and counts[k] > 1):
                counts[k] += step
                remainder -= step
                moved = True
        if not moved:
            break  # the caps make the total unreachable; return the closest
    return counts


@DISTRIBUTIONS.register("uniform", "the same density in every layer (dense= globs keep layers dense)")
def uniform(targets: Sequence[Target], density: float, *, dense: Sequence[str] = (), **_: object) -> dict[str, float]:
    return {
        t.name: 1.0 if any(fnmatch.fnmatchcase(t.module_name, p) for p in dense) else density for t in targets
    }


@DISTRIBUTIONS.register("uniform+", "uniform, first layer dense, last layer at most 80% sparse (Gale et al., 2019)")
def uniform_plus(targets: Sequence[Target], density: float, **_: object) -> dict[str, float]:
    out = {t.name: density for t in targets}
    if len(targets) > 1:
        out[targets[0].name] = 1.0
        out[targets[-1].name] = max(density, 0.2)
    return out


def _erdos_renyi(targets: Sequence[Target], density: float, raw: Mapping[str, float]) -> dict[str, float]:
    """Solve density_l = eps * raw_l so the total matches; layers that would exceed 1 become dense.

    As in Evci et al. (2020), RigL's ``get_sparsities_erdos_renyi``: each round marks the layers with
    the largest raw probability dense and solves eps again.
    """
    sizes = {t.name: t.numel for t in targets}
    total_kept = _round_half_up(density * sum(sizes.values()))
    dense: set[str] = set()
    while True:
        budget = total_kept - sum(sizes[n] for n in dense)
        free = [n for n in sizes if n not in dense]
        if not free:
            break
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        top = max(raw[n] for n in free)
        if eps * top <= 1.0:
            break
        dense |= {n for n in free if raw[n] == top}
    ideal = {n: float(sizes[n]) if n in dense else eps * raw[n] * sizes[n] for n in sizes}
    counts = allocate_exact(ideal, sizes, total_kept)
    return {n: counts[n] / sizes[n] for n in sizes}


@DISTRIBUTIONS.register("erk", "Erdos-Renyi-Kernel: density ~ sum(dims)/prod(dims) (Evci et al., 2020)")
def erk(targets: Sequence[Target], density: float, *, power_scale: float = 1.0, **_: object) -> dict[str, float]:
    raw = {t.name: (sum(t.shape) / math.prod(t.shape)) ** power_scale for t in targets}
    return _erdos_renyi(targets, density, raw)


@DISTRIBUTIONS.register("er", "Erdos-Renyi: density ~ (n_in + n_out)/(n_in * n_out) (Mocanu et al., 2018)")
def er(targets: Sequence[Target], density: float, **_: object) -> dict[str, float]:
    raw = {t.name: (t.shape[0] + t.shape[1]) / (t.shape[0] * t.shape[1]) for t in targets}
    return _erdos_renyi(targets, density, raw)


@DISTRIBUTIONS.register("global", "one score threshold across all selected layers")
def global_threshold(
    targets: Sequence[Target],
    density: float,
    *,
    patterns: Mapping[str, Pattern],
    scores: Mapping[str, Tensor],
    **_: object,
) -> dict[str, float]:
    """Keep the highest-scoring units of all layers together; ties go to the earlier layer.

    Every layer keeps at least one unit (a layer pruned away would cut the network).
    """
    unit_scores = [patterns[t.name].unit_scores(scores[t.name].float()).cpu() for t in targets]
    unit_sizes = [patterns[t.name].unit_size(t.shape) for t in targets]
    n_units = [u.numel() for u in unit_scores]
    flat = torch.cat(unit_scores)
    target_weights = density * sum(t.numel for t in targets)
    if len(set(unit_sizes)) == 1:
        # Each layer's best unit ranks first, so no layer is cut and the total stays exact.
        best = torch.tensor([int(u.argmax()) for u in unit_scores]) + torch.tensor([0, *n_units[:-1]]).cumsum(0)
        flat = flat.clone()
        flat[best] = float("inf")
        keep = topk_mask(flat, max(len(targets), _round_half_up(target_weights / unit_sizes[0])))
    else:  # units of different sizes: take the best until the weight budget is met
        sizes = torch.cat([torch.full((n,), s, dtype=torch.float64) for n, s in zip(n_units, unit_sizes)])
        order = torch.sort(flat, descending=True, stable=True).indices
        taken = int(torch.searchsorted(torch.cumsum(sizes[order], 0), target_weights - 0.5)) + 1
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:taken]] = True
    kept_per_layer = [int(part.sum()) for part in torch.split(keep, n_units)]
    return {t.name: max(1, k) / n for t, k, n in zip(targets, kept_per_layer, n_units)}


@DISTRIBUTIONS.register("mapping", "an explicit {layer glob: density} mapping")
def mapping(
    targets: Sequence[Target], density: float | None = None, *, densities: Mapping[str, float], **_: object
) -> dict[str, float]:
    """Each layer takes the density of the first glob matching its module or parameter name.

    Layers no glob matches take ``density`` when given; otherwise that is an error.
    """
    out: dict[str, float] = {}
    for t in targets:
        hit = next((p for p in densities if fnmatch.fnmatchcase(t.module_name, p) or fnmatch.fnmatchcase(t.name, p)), None)
        if hit is not None:
            out[t.name] = check_density(densities[hit], f"densities[{hit!r}]")
        elif density is not None:
            out[t.name] = density
        else:
            raise DensityError(f"{t.name}: no entry of the density mapping matches it; add one, or exclude the layer")
    return out


def needs_scores(name: str) -> bool:
    return name.lower() == "global"
