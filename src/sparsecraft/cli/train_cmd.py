"""``sparsecraft train --recipe FILE``: a whole sparse-training run from one validated file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sparsecraft.cli.common import console, fail
from sparsecraft.errors import SparsecraftError
from sparsecraft.recipes import Run, load_recipe
from sparsecraft.registry import UnknownNameError


def train_command(
    recipe: Annotated[Path, typer.Option(help="YAML or TOML recipe (see recipes/ for examples)")],
    output: Annotated[Optional[Path], typer.Option(help="output folder (default: the recipe's output)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the output folder's checkpoint")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Train with the recipe's sparsity method; writes metrics.jsonl, checkpoint.pt and result.json."""
    try:
        parsed = load_recipe(recipe)
        run = Run(parsed, output, progress=not quiet and console.is_terminal, log=console.print)
        result = run.run(resume=resume)
    except (SparsecraftError, UnknownNameError) as e:
        fail(str(e))
    console.print(result.report.table(title=f"Final model: {parsed.model}, {parsed.sparsity.method}"))
    console.print(
        f"test accuracy {result.accuracy:.4f}, sparsity of the selected layers {result.sparsity:.4f}, "
        f"{result.seconds:.1f} s; training FLOPs {result.train_flops:.3g} ({result.train_flops_vs_dense:.2f}x a dense run, "
        f"as a sparse kernel would count them); logs in {run.output}"
    )
