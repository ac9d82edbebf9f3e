"""``sparsecraft report``: per-layer sparsity and FLOPs of a built-in model or a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sparsecraft.analysis.report import report
from sparsecraft.cli.common import console, fail, parse_shape
from sparsecraft.core.io import load_masks
from sparsecraft.errors import SparsecraftError
from sparsecraft.models.checkpoint import load_any


def report_command(
    model: Annotated[str, typer.Argument(help="checkpoint (.safetensors from `prune --out`, or a pickled .pt), built-in model name, or package.module:callable")],
    input_shape: Annotated[Optional[str], typer.Option(help="input shape for FLOPs, e.g. 1,3,32,32 (built-in models know theirs)")] = None,
    masks: Annotated[Optional[Path], typer.Option(help="apply a masks file (from `prune --masks`) first")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="write a per-layer density bar chart (PNG) here")] = None,
) -> None:
    """Per layer: shape, pattern, density, kept weights, dense and sparse FLOPs per sample; totals."""
    try:
        net, _ = load_any(model)
        if masks is not None:
            load_masks(net, masks)
        result = report(net, input_shape=parse_shape(input_shape))
    except SparsecraftError as e:
        fail(str(e))
    if json_out:
        typer.echo(result.to_json())
    else:
        console.print(result.table(title=f"Sparsity report: {model}"))
    if plot is not None:
        result.plot(plot)
        if not json_out:
            console.print(f"density plot written to {plot}")
