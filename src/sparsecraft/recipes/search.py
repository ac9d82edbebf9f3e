"""A sparse architecture search as one validated file: ``sparsecraft search --recipe FILE``.

Example (YAML)::

    method: random            # random | dass
    data: digits              # built-in name or package.module:callable returning a Split
    sparsity: 0.9
    seeds: [0, 1, 2]
    train: {epochs: 20, batch_size: 64, optimizer: adam, lr: 0.003}
    random: {model: mlp, candidates: 16, budget_epochs: 2, random_configs: 3}
    dass: {channels: 8, cells: 3, nodes: 3, search_epochs: 10, final_method: gmp}
    output: runs/search

Every field is checked (file, line, dotted name) before any search starts, with the same rules as
training recipes (``recipes/schema.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from sparsecraft.recipes.schema import RecipeError, TrainSection, parse_validated

SEARCH_METHODS = ("random", "dass")
FINAL_METHODS = ("gmp", "static", "rigl")
MASK_MODES = ("scores", "magnitude")


@dataclass
class RandomSearchSection:
    """Random Search over the node space of an over-parameterised parent (Farahani et al. 2024)."""

    model: str = "mlp"  # a built-in chain model (mlp, cnn, cnn32) or package.module:callable
    model_args: dict[str, Any] = field(default_factory=dict)
    candidates: int = 16  # sub-networks sampled and scored
    budget_epochs: int = 2  # short training that scores each candidate (held-out accuracy)
    random_configs: int = 3  # random configurations per seed, trained fully beside the winner
    per_layer: bool = False  # the same node sparsity in every layer (else an exact global count)


@dataclass
class DassSection:
    """DASS (Mousavi et al. 2022) against plain DARTS (Liu et al. 2019) on a small cell space."""

    channels: int = 8  # initial channels C
    cells: int = 3  # cells in the network; reduction cells at 1/3 and 2/3 of the depth
    nodes: int = 3  # intermediate nodes per cell
    ops: Optional[list[str]] = None  # candidate operations (default: DARTS's and, for DASS, the sparse ones)
    mask: str = "scores"  # sparse ops' mask: learned importance scores (top-k) or weight magnitude
    search_epochs: int = 10
    arch_lr: float = 3e-4  # Adam on the architecture weights, as DARTS
    arch_weight_decay: float = 1e-3
    order: int = 1  # DARTS's approximation: 1 (weights fixed in the alpha step) or 2 (one unrolled weight step)
    final_method: str = "gmp"  # how both derived networks are trained sparse: gmp | static | rigl
    baseline: bool = True  # also search with plain DARTS and prune its network (the paper's comparison)


@dataclass
class SearchRecipe:
    method: str = "random"
    data: str = "digits"
    data_args: dict[str, Any] = field(default_factory=dict)
    sparsity: float = 0.9
    seeds: list[int] = field(default_factory=lambda: [0])
    val_fraction: float = 0.5  # part of the training split held out to score / to update the architecture
    train: TrainSection = field(default_factory=TrainSection)  # the full training of every compared network
    random: RandomSearchSection = field(default_factory=RandomSearchSection)
    dass: DassSection = field(default_factory=DassSection)
    output: Optional[str] = None


def check_search_recipe(recipe: SearchRecipe, where) -> None:
    """Refuse values no search can run with; ``where(path)`` names the file and line of a field."""
    def bad(path: list[str], message: str) -> None:
        raise RecipeError(f"{where(path)}: {'.'.join(path)}: {message}")

    if recipe.method not in SEARCH_METHODS:
        bad(["method"], f"{recipe.method!r} is not one of {', '.join(SEARCH_METHODS)}")
    if not 0.0 < recipe.sparsity < 1.0:
        bad(["sparsity"], f"{recipe.sparsity} must lie in (0, 1): the fraction removed")
    if not recipe.seeds:
        bad(["seeds"], "give at least one seed")
    if not 0.0 < recipe.val_fraction < 1.0:
        bad(["val_fraction"], f"{recipe.val_fraction} must lie in (0, 1)")
    if recipe.train.epochs < 1:
        bad(["train", "epochs"], "the full training needs at least one epoch")
    r, d = recipe.random, recipe.dass
    positive = [(["random", "candidates"], r.candidates), (["random", "budget_epochs"], r.budget_epochs),
                (["dass", "search_epochs"], d.search_epochs), (["dass", "channels"], d.channels),
                (["dass", "cells"], d.cells), (["dass", "nodes"], d.nodes)]
    for path, value in positive:
        if value < 1:
            bad(path, f"{value} is a budget of zero; it must be >= 1")
    if r.random_configs < 0:
        bad(["random", "random_configs"], "must be >= 0")
    if d.order not in (1, 2):
        bad(["dass", "order"], f"{d.order}: DARTS's approximation is first (1) or second (2) order")
    if d.mask not in MASK_MODES:
        bad(["dass", "mask"], f"{d.mask!r} is not one of {', '.join(MASK_MODES)}")
    if d.final_method not in FINAL_METHODS:
        bad(["dass", "final_method"], f"{d.final_method!r} is not one of {', '.join(FINAL_METHODS)}")


def parse_search_recipe(text: str, source: str = "<recipe>", suffix: str = ".yaml") -> SearchRecipe:
    """Validate a search recipe given as text; errors name ``source``, the line and the field."""
    return parse_validated(SearchRecipe, text, source, suffix, check_search_recipe)


def load_search_recipe(path: str | Path) -> SearchRecipe:
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe {p} does not exist")
    return parse_search_recipe(p.read_text(), str(p), p.suffix.lower())
