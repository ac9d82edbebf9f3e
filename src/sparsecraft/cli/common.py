"""Option parsing shared by the verbs."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()
if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    console = Console(width=160)
err_console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 160)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,32,32"`` -> (1, 3, 32, 32)."""
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a shape; write it like 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise typer.BadParameter(f"{text!r}: every dimension must be a positive integer")
    return shape


def split_list(values: list[str] | None) -> list[str]:
    """Accept repeated options and comma-separated lists alike."""
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)
