"""One-shot pruning: select -> score -> distribute densities -> masks -> apply (all or nothing).

:func:`compute_masks` is pure (the model is not changed) so callers can show the plan first;
:func:`prune` applies it. Every check runs before any mask is applied.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparsecraft.core.distributions import needs_scores
from sparsecraft.core.masking import apply_masks, masks_of
from sparsecraft.core.patterns import Pattern, parse_pattern
from sparsecraft.core.scores import Score, ScoreCallable, compute_scores, existing_masks_last
from sparsecraft.core.selection import DEFAULT_TYPES, Selection, Target, select
from sparsecraft.errors import DensityError, PatternError, SparsecraftError, check_density, density_from
from sparsecraft.registry import DISTRIBUTIONS


@dataclass
class PrunePlan:
    """What pruning will do (or did): per-layer pattern, density and mask."""

    selection: Selection
    patterns: dict[str, Pattern]
    densities: dict[str, float]
    masks: dict[str, Tensor] = field(repr=False)

    @property
    def kept(self) -> int:
        return sum(int(self.masks[n].sum()) if n in self.masks else t.numel for n, t in self.selection.by_name().items())

    @property
    def density(self) -> float:
        return self.kept / self.selection.numel

    def table(self, title: str = "Pruning plan"):
        from rich.table import Table

        table = Table(title=title)
        for col in ("parameter", "shape", "pattern", "density", "kept"):
            table.add_column(col, justify="right" if col in ("density", "kept") else "left")
        for t in self.selection:
            kept = int(self.masks[t.name].sum()) if t.name in self.masks else t.numel
            table.add_row(t.name, "x".join(map(str, t.shape)), str(self.patterns[t.name]), f"{kept / t.numel:.4f}", f"{kept:,}")
        table.caption = f"selected weights kept: {self.kept:,} / {self.selection.numel:,} (density {self.density:.4f})"
        return table


def selection_sparsity(model: nn.Module, selection: Selection) -> float:
    """Fraction of the selected weights currently pruned (unmasked layers count as dense)."""
    masks = masks_of(model)
    kept = sum(int(masks[t.name].sum()) if t.name in masks else t.numel for t in selection)
    return 1.0 - kept / selection.numel


def _pattern_for(target: Target, default: Pattern, overrides: Mapping[str, str | Pattern]) -> Pattern:
    for glob, spec in overrides.items():
        if fnmatch.fnmatchcase(target.module_name, glob) or fnmatch.fnmatchcase(target.name, glob):
            return parse_pattern(spec)
    return default


def compute_masks(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    density: float | None = None,
    pattern: str | Pattern = "unstructured",
    distribution: str = "uniform",
    score: str | Score | ScoreCallable = "magnitude",
    seed: int = 0,
    types: Sequence[str] = DEFAULT_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
    layer_patterns: Mapping[str, str | Pattern] | None = None,
    densities: Mapping[str, float] | None = None,
    selection: Selection | None = None,
    **distribution_options: object,
) -> PrunePlan:
    """Plan a one-shot pruning without changing the model. See :func:`prune` for the arguments."""
    selection = selection or select(model, types, include, exclude, keep_first_dense, keep_last_dense)
    default = parse_pattern(pattern)
    patterns = {t.name: _pattern_for(t, default, layer_patterns or {}) for t in selection}

    problems = []
    for t in selection:
        try:
            patterns[t.name].check(t.shape, t.name)
        except PatternError as e:
            problems.append(str(e))
    if problems:
        raise PatternError("pattern cannot apply (nothing was changed):\n  " + "\n  ".join(problems))

    fixed = [t for t in selection if patterns[t.name].fixed_density is not None]
    free = [t for t in selection if patterns[t.name].fixed_density is None]
    if densities is not None and distribution == "uniform":
        distribution = "mapping"
    requested = None if (sparsity, density) == (None, None) else density_from(sparsity, density)
    if free and requested is None and distribution != "mapping":
        raise DensityError("give sparsity= (fraction removed) or density= (fraction kept)")
    for t in fixed:
        fixed_density = patterns[t.name].fixed_density
        if not free and requested is not None and abs(requested - fixed_density) > 1e-9:  # type: ignore[operator]
            raise DensityError(
                f"{t.name}: pattern {patterns[t.name]} fixes the density at {fixed_density:g} "
                f"(sparsity {1 - fixed_density:g}), but density {requested:g} was asked; "  # type: ignore[operator]
                "drop sparsity/density or choose another N:M"
            )
    if fixed and not free and distribution not in ("uniform", "mapping"):
        raise DensityError(f"N:M patterns fix each layer's density; distribution {distribution!r} cannot apply, use uniform")

    raw_scores = compute_scores(selection, score, seed)
    existing = masks_of(model)
    scores = existing_masks_last(raw_scores, existing)
    layer_density: dict[str, float] = {t.name: patterns[t.name].fixed_density for t in fixed}  # type: ignore[misc]
    if free:
        dist = DISTRIBUTIONS.get(distribution)
        options = dict(distribution_options)
        if needs_scores(distribution):
            options.update(patterns=patterns, scores=scores)
        if densities is not None:
            options["densities"] = densities
        layer_density.update(dist(free, requested, **options))
    for name, d in layer_density.items():
        check_density(d, f"{name}: density")

    masks: dict[str, Tensor] = {}
    for t in selection:
        d = layer_density[t.name]
        if d >= 1.0 and t.name not in existing:
            continue  # stays dense: no mask, no hook
        masks[t.name] = patterns[t.name].mask(scores[t.name], d if patterns[t.name].fixed_density is None else None, t.name)
    return PrunePlan(selection, patterns, layer_density, masks)


def prune(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    density: float | None = None,
    pattern: str | Pattern = "unstructured",
    distribution: str = "uniform",
    score: str | Score | ScoreCallable = "magnitude",
    optimizer: torch.optim.Optimizer | None = None,
    verbose: bool = False,
    **options: object,
) -> PrunePlan:
    """Prune ``model`` in one shot and keep it pruned.

    Args:
        sparsity / density: fraction removed / kept overall (exactly one; N:M patterns fix it).
        pattern: ``unstructured``, ``N:M`` (``2:4``), ``blockHxW``, ``out_channels``, ``in_channels``.
        distribution: ``uniform``, ``uniform+``, ``global``, ``er``, ``erk``, ``mapping`` (see
            ``sparsecraft list distributions``); extra options (``dense=``, ``power_scale=``,
            ``densities=``) pass through.
        score: a registered score name or ``fn(target, *, seed) -> Tensor``.
        optimizer: bound so its state of pruned weights is zeroed and masks re-applied after steps.
        verbose: print the selection and the plan (rich tables) before applying.
        options: selection (``types``, ``include``, ``exclude``, ``keep_first_dense``,
            ``keep_last_dense``), ``layer_patterns={glob: pattern}``, ``seed``.

    Returns the plan that was applied. On any bad input nothing in the model changes.
    """
    plan = compute_masks(
        model, sparsity=sparsity, density=density, pattern=pattern, distribution=distribution, score=score, **options  # type: ignore[arg-type]
    )
    if verbose:
        from rich.console import Console

        Console().print(plan.selection.table(), plan.table())
    if not plan.masks:
        raise SparsecraftError("this plan keeps every selected layer dense; nothing to prune")
    apply_masks(model, plan.masks, {n: str(p) for n, p in plan.patterns.items()}, optimizer=optimizer)
    return plan
