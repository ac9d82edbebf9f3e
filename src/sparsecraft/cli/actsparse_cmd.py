"""``sparsecraft actsparse``: training-free activation sparsity (threshold, CHESS, WINA) for a causal LM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from sparsecraft.cli.common import console, fail
from sparsecraft.errors import SparsecraftError


def actsparse_command(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder, .gguf file or hub id")],
    method: Annotated[str, typer.Option(help="threshold (TEAL), chess or wina")] = "threshold",
    sparsity: Annotated[float, typer.Option(help="fraction of activations dropped, in [0, 1)")] = 0.5,
    calib: Annotated[Optional[Path], typer.Option(help="calibration text (threshold, chess)")] = None,
    nsamples: Annotated[int, typer.Option(help="calibration windows")] = 16,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 512,
    eval_text: Annotated[Optional[Path], typer.Option("--eval", help="text for perplexity, dense vs sparse")] = None,
    eval_windows: Annotated[Optional[int], typer.Option(help="evaluate only the first N windows")] = 16,
    mode: Annotated[str, typer.Option(help="decode: sparsify one-token calls only (prefill exact); all: every call")] = "decode",
    speed: Annotated[int, typer.Option(help="also time greedy decoding of N new tokens, dense vs sparse (0: no)")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="folder for the model and its activation-sparsity files")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Calibrate activation thresholds on text, swap in activation-sparse layers, evaluate
    perplexity dense vs sparse (every position sparsified), time decoding, save."""
    from sparsecraft.recipes.actsparse import ActSparseJob, run_actsparse

    job = ActSparseJob(model=model, method=method, sparsity=sparsity, calib=str(calib) if calib else None, nsamples=nsamples,
                       seqlen=seqlen, eval=str(eval_text) if eval_text else None, eval_windows=eval_windows, mode=mode,
                       speed_tokens=speed)
    try:
        outcome = run_actsparse(job, out, progress=not json_out, log=None if json_out else console.print)
    except SparsecraftError as e:
        fail(str(e))
    summary = outcome.summary()
    if json_out:
        typer.echo(json.dumps(summary | {"out": str(out) if out else None}, indent=2))
        return
    table = Table(title=f"{method} at {sparsity:.0%} activation sparsity: dropped fraction per layer (calibration text)")
    table.add_column("layer")
    table.add_column("dropped", justify="right")
    for name, value in outcome.layers.items():
        table.add_row(name, f"{value:.1%}")
    console.print(table)
    for key, value in summary.items():
        if isinstance(value, float):
            console.print(f"{key}: {value:.4g}")
    console.print(f"written to {out}" if out else "[yellow]nothing written: pass --out DIR to keep the result[/]")
