"""One search job end to end: run the method, summarise, write the output folder.

The folder holds ``architecture.json`` (rebuilds the found network: ``build_architecture``),
``result.json`` (every trained network, the search cost, the summary), ``log.jsonl`` (one line per
scored candidate or search epoch) and ``curves.png`` (test accuracy per epoch, mean over seeds).
Everything is written to a temporary folder first and renamed at the end.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from sparsecraft.data.images import Split
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.search.result import SearchResult, TrainedRow
from sparsecraft.recipes.search import SearchRecipe
from sparsecraft.utils import atomic_folder


def search(recipe: SearchRecipe, split: Split, progress: bool = True, log: Callable[[str], None] = print) -> SearchResult:
    """Run the recipe's method (``random`` or ``dass``) on ``split``."""
    if recipe.method == "random":
        from sparsecraft.methods.search.random_search import run_random_search

        return run_random_search(recipe, split, progress=progress, log=log)
    from sparsecraft.methods.search.dass.search import run_dass

    return run_dass(recipe, split, progress=progress, log=log)


def build_architecture(arch: dict[str, Any] | str | Path) -> nn.Module:
    """The network an ``architecture.json`` (or its dict) describes, untrained."""
    if not isinstance(arch, dict):
        path = Path(arch)
        try:
            arch = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SparsecraftError(f"{path}: not a readable architecture file ({e})") from None
    method = arch.get("method") if isinstance(arch, dict) else None
    if method == "random":
        from sparsecraft.methods.search.random_search import build_random_architecture

        return build_random_architecture(arch)
    if method == "dass":
        from sparsecraft.methods.search.dass.search import build_dass_architecture

        return build_dass_architecture(arch)
    raise SparsecraftError(f"architecture 'method' is {method!r}; expected 'random' or 'dass' (a file written by sparsecraft search)")


def epochs_to(curve: list[float], level: float) -> int | None:
    """First epoch (1-based) whose test accuracy reaches ``level``; None if none does."""
    return next((i + 1 for i, acc in enumerate(curve) if acc >= level), None)


@dataclass
class ArchSummary:
    arch: str
    runs: int
    accuracy_mean: float
    accuracy_std: float
    sparsity: float
    params: float
    flops: float
    epochs_to_level: float | None  # mean over runs that reached the level (see summarise)
    reached: int  # runs that reached it
    train_seconds: float


def summarise(rows: list[TrainedRow], level_fraction: float = 0.95) -> tuple[list[ArchSummary], float]:
    """Per-architecture mean and spread, and convergence: epochs to reach ``level_fraction`` of the
    best architecture's mean final accuracy (the same level for every architecture)."""
    by_arch: dict[str, list[TrainedRow]] = {}
    for row in rows:
        by_arch.setdefault(row.arch, []).append(row)
    best = max(statistics.fmean(r.accuracy for r in group) for group in by_arch.values())
    level = level_fraction * best
    out = []
    for arch, group in by_arch.items():
        accs = [r.accuracy for r in group]
        hits = [e for e in (epochs_to(r.curve, level) for r in group) if e is not None]
        out.append(ArchSummary(
            arch=arch, runs=len(group), accuracy_mean=statistics.fmean(accs),
            accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
            sparsity=statistics.fmean(r.sparsity for r in group), params=statistics.fmean(r.params for r in group),
            flops=statistics.fmean(r.flops for r in group), epochs_to_level=statistics.fmean(hits) if hits else None,
            reached=len(hits), train_seconds=statistics.fmean(r.train_seconds for r in group),
        ))
    return out, level


def summary_table(result: SearchResult, title: str = "") -> Table:
    summaries, level = summarise(result.rows)
    table = Table(title=title or f"{result.method} search at sparsity {result.sparsity:g}")
    for col in ("network", "runs", "test accuracy", "sparsity", "kept weights", "FLOPs / example", f"epochs to {level:.3f}", "train s"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for s in summaries:
        reach = "-" if s.epochs_to_level is None else f"{s.epochs_to_level:.1f} ({s.reached}/{s.runs})"
        table.add_row(s.arch, str(s.runs), f"{s.accuracy_mean:.4f} ± {s.accuracy_std:.4f}", f"{s.sparsity:.3f}",
                      f"{s.params:,.0f}", f"{s.flops:,.0f}", reach, f"{s.train_seconds:.1f}")
    return table


def cost_lines(result: SearchResult) -> list[str]:
    return [f"search cost ({name}): {c.seconds:.1f} s, {c.flops:.3g} training FLOPs, {c.evaluated} "
            f"{'candidates scored' if name == 'random' else 'search epochs'}" for name, c in result.cost.items()]


def plot_curves(result: SearchResult, path: Path) -> None:
    """Mean test accuracy per epoch of each compared architecture (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_arch: dict[str, list[list[float]]] = {}
    for row in result.rows:
        by_arch.setdefault(row.arch, []).append(row.curve)
    for arch, curves in by_arch.items():
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, marker="o", markersize=3, label=f"{arch} ({len(curves)} runs)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{result.method} search, sparsity {result.sparsity:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_json(result: SearchResult, recipe: SearchRecipe) -> dict[str, Any]:
    summaries, level = summarise(result.rows)
    return {
        "method": result.method, "sparsity": result.sparsity, "recipe": asdict(recipe),
        "rows": [asdict(r) for r in result.rows], "cost": {k: asdict(v) for k, v in result.cost.items()},
        "summary": [asdict(s) for s in summaries], "convergence_level": level,
    }


def write_output(result: SearchResult, recipe: SearchRecipe, folder: str | Path) -> Path:
    """Write the output folder atomically; returns its path."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / "architecture.json").write_text(json.dumps(result.architecture, indent=2))
        (tmp / "result.json").write_text(json.dumps(result_json(result, recipe), indent=2))
        (tmp / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in result.log))
        plot_curves(result, tmp / "curves.png")
    return folder
