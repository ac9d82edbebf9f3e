"""``sparsecraft list``: every registered pattern, score, distribution, model and dataset."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

import sparsecraft.core.distributions  # noqa: F401  (registration)
import sparsecraft.core.patterns  # noqa: F401
import sparsecraft.core.scores  # noqa: F401
import sparsecraft.data  # noqa: F401
import sparsecraft.models  # noqa: F401
from sparsecraft.cli.common import console, fail
from sparsecraft.registry import ALL


def list_command(
    kind: Annotated[Optional[str], typer.Argument(help=f"one of: {', '.join(ALL)} (default: all)")] = None,
) -> None:
    """List what can be chosen by name."""
    if kind is not None and kind not in ALL:
        fail(f"unknown kind {kind!r}; choose one of: {', '.join(ALL)}")
    for name, registry in ALL.items():
        if kind is not None and name != kind:
            continue
        table = Table(title=name)
        table.add_column("name")
        table.add_column("what it is")
        for item in registry.names():
            table.add_row(item, registry.summary(item))
        console.print(table)
