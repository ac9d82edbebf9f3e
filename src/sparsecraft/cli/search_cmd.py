"""``sparsecraft search --method random|dass --recipe FILE``: sparse architecture search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sparsecraft.cli.common import console, fail
from sparsecraft.errors import SparsecraftError
from sparsecraft.registry import UnknownNameError


def search_command(
    recipe: Annotated[Optional[Path], typer.Option(help="YAML or TOML search recipe (see recipes/search-*.yaml)")] = None,
    method: Annotated[Optional[str], typer.Option(help="random | dass (overrides the recipe's method)")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="target sparsity (overrides the recipe)")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="comma-separated seeds (overrides the recipe)")] = None,
    output: Annotated[Optional[Path], typer.Option(help="output folder (default: the recipe's output)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Search a sparse architecture (Random Search baseline or DASS vs DARTS), train the found
    networks and their baselines, and compare them: table, result.json, architecture.json, curves.png."""
    from sparsecraft.methods.search.run import cost_lines, result_json, search, summary_table, write_output
    from sparsecraft.recipes.runner import load_data
    from sparsecraft.recipes.search import SearchRecipe, check_search_recipe, load_search_recipe

    try:
        parsed = load_search_recipe(recipe) if recipe is not None else SearchRecipe()
        if method is not None:
            parsed.method = method
        if sparsity is not None:
            parsed.sparsity = sparsity
        if seeds is not None:
            try:
                parsed.seeds = [int(s) for s in seeds.split(",") if s.strip()]
            except ValueError:
                fail(f"--seeds {seeds!r}: give integers separated by commas, like 0,1,2")
        check_search_recipe(parsed, lambda path: "--option" if recipe is None else str(recipe))
        out = output or (Path(parsed.output) if parsed.output else None)
        if out is not None and out.exists() and any(out.iterdir()):
            fail(f"output folder {out} exists and is not empty; choose a new folder or remove it")
        split = load_data(parsed.data, **parsed.data_args)
        result = search(parsed, split, progress=not quiet and not json_out and console.is_terminal,
                        log=(lambda *_: None) if json_out else console.print)
        if out is not None:
            write_output(result, parsed, out)
    except (SparsecraftError, UnknownNameError) as e:
        fail(str(e))
    if json_out:
        typer.echo(json.dumps(result_json(result, parsed) | {"architecture": result.architecture}, indent=2))
        return
    console.print(summary_table(result))
    for line in cost_lines(result):
        console.print(line)
    console.print(f"found architecture: {json.dumps(result.architecture)[:300]}")
    console.print(f"written to {out} (architecture.json rebuilds the network)" if out else
                  "[yellow]nothing written: pass --output DIR to keep the architecture and the log[/]")

