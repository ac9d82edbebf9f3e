"""Whole runs as validated YAML/TOML files: ``sparsecraft train --recipe FILE``."""

from sparsecraft.recipes.runner import Run, RunResult, run_recipe
from sparsecraft.recipes.schema import Recipe, RecipeError, load_recipe, parse_recipe

__all__ = ["Recipe", "RecipeError", "Run", "RunResult", "load_recipe", "parse_recipe", "run_recipe"]
