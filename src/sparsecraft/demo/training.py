"""Demo stage 2: sparse training on the digits CNN: dense vs static random-ERK vs SNIP vs GMP."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from sparsecraft.recipes.runner import Run
from sparsecraft.recipes.schema import Recipe, SparsitySection, TrainSection
from sparsecraft.utils import atomic_path

# (label, method, distribution)
METHODS: tuple[tuple[str, str, str], ...] = (
    ("random-ERK (static)", "random", "erk"),
    ("SNIP", "snip", "global"),
    ("GMP", "gmp", "erk"),
)


@dataclass
class TrainingStageConfig:
    sparsities: tuple[float, ...] = (0.8, 0.9, 0.95)
    epochs: int = 8
    seeds: tuple[int, ...] = (0,)
    model: str = "cnn"

    @classmethod
    def full(cls) -> TrainingStageConfig:
        return cls(sparsities=(0.8, 0.9, 0.95, 0.98), epochs=25, seeds=(0, 1, 2))


@dataclass
class TrainingRow:
    method: str
    sparsity: float
    accuracy: float
    accuracy_std: float
    seconds: float


def _recipe(config: TrainingStageConfig, method: str, distribution: str, sparsity: float | None, seed: int) -> Recipe:
    return Recipe(
        model=config.model, data="digits", seed=seed,
        train=TrainSection(epochs=config.epochs, batch_size=64, optimizer="adam", lr=3e-3),
        sparsity=SparsitySection(method=method, sparsity=sparsity, distribution=distribution, start=0.1, end=0.6, frequency=10),
    )


def run_training_stage(config: TrainingStageConfig, progress: bool = True, log: Callable[[str], None] = print) -> list[TrainingRow]:
    runs = [("dense", "dense", "uniform", None)] + [(label, m, d, s) for s in config.sparsities for label, m, d in METHODS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, distribution, sparsity in runs:
            results = [
                Run(_recipe(config, method, distribution, sparsity, seed), os.path.join(tmp, f"{method}-{sparsity}-{seed}"),
                    progress=progress, log=lambda _: None).run()
                for seed in config.seeds
            ]
            accs = [r.accuracy for r in results]
            rows.append(TrainingRow(label, results[0].sparsity, statistics.fmean(accs),
                                    statistics.stdev(accs) if len(accs) > 1 else 0.0, statistics.fmean(r.seconds for r in results)))
            log(f"{label:<20} sparsity {rows[-1].sparsity:.3f}: accuracy {rows[-1].accuracy:.4f}")
    return rows


def training_table(rows: list[TrainingRow], seeds: int):
    from rich.table import Table

    table = Table(title="sparsecraft demo: sparse training of the digits CNN")
    for col in ("method", "sparsity", "test accuracy", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        acc = f"{r.accuracy:.4f}" + (f" ± {r.accuracy_std:.4f}" if seeds > 1 else "")
        table.add_row(r.method, f"{r.sparsity:.3f}", acc, f"{r.seconds:.1f}")
    table.caption = f"mean of {seeds} seed(s); static masks are fixed at initialisation, GMP prunes during training"
    return table


def plot_training_stage(rows: list[TrainingRow], path: str | os.PathLike[str]) -> None:
    """Accuracy against sparsity, one line per method, the dense accuracy as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    dense = next((r for r in rows if r.method == "dense"), None)
    if dense is not None:
        ax.axhline(dense.accuracy, color="black", linestyle="--", label=f"dense {dense.accuracy:.3f}")
    for label, _, _ in METHODS:
        points = sorted((r.sparsity, r.accuracy, r.accuracy_std) for r in rows if r.method == label)
        if points:
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.set_xlabel("sparsity (fraction of conv/linear weights removed)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Digits CNN: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
