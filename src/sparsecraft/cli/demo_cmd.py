"""``sparsecraft demo``: the main job on embedded defaults."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from sparsecraft.cli.common import console
from sparsecraft.demo import DemoConfig, demo_table, run_demo
from sparsecraft.utils import write_text_atomic


def demo_command(
    full: Annotated[bool, typer.Option(help="train longer, add 95% sparsity, average 3 seeds (a few minutes)")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results as JSON here")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Train a small CNN on 8x8 digits, prune it at 50/80/90% (uniform, ERK), fine-tune, compare."""
    config = DemoConfig.full() if full else DemoConfig()
    start = time.perf_counter()
    rows = run_demo(config, progress=not quiet and console.is_terminal, log=console.print)
    console.print(demo_table(rows, len(config.seeds)))
    console.print(f"demo finished in {time.perf_counter() - start:.1f} s")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps([asdict(r) for r in rows], indent=2))
