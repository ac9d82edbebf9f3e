"""Demo stages 2 and 3 on the digits CNN: sparse training (dense vs static random-ERK vs SNIP vs
GMP at several sparsities) and dynamic sparse training (static ERK vs SET vs RigL at 90%, and 2:4
with SR-STE), each with its training FLOPs relative to dense."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sparsecraft.recipes.runner import Run
from sparsecraft.recipes.schema import Recipe, SparsitySection, TrainSection
from sparsecraft.utils import atomic_path

# (label, method, SparsitySection fields)
Method = tuple[str, str, dict[str, Any]]
METHODS: tuple[Method, ...] = (
    ("random-ERK (static)", "random", {"distribution": "erk"}),
    ("SNIP", "snip", {"distribution": "global"}),
    ("GMP", "gmp", {"distribution": "erk", "start": 0.1, "end": 0.6, "frequency": 10}),
)
#: Stage 3: sparse-to-sparse training at one sparsity (RigL/SET rewire every 10 steps, ~18 times), and N:M training.
DYNAMIC_METHODS: tuple[Method, ...] = (
    ("static ERK", "random", {"distribution": "erk"}),
    ("SET", "set", {"distribution": "erk", "update_interval": 10}),
    ("RigL", "rigl", {"distribution": "erk", "update_interval": 10}),
    ("2:4 SR-STE", "nm", {"pattern": "2:4", "nm_method": "srste", "keep_first_dense": True}),  # 1 input channel
)


@dataclass
class TrainingStageConfig:
    sparsities: tuple[float, ...] = (0.8, 0.9, 0.95)
    epochs: int = 8
    seeds: tuple[int, ...] = (0,)
    model: str = "cnn"
    methods: tuple[Method, ...] = field(default=METHODS)
    dense: bool = True  # a dense reference row

    @classmethod
    def full(cls) -> TrainingStageConfig:
        return cls(sparsities=(0.8, 0.9, 0.95, 0.98), epochs=25, seeds=(0, 1, 2))

    @classmethod
    def dynamic(cls, full: bool = False) -> TrainingStageConfig:
        """Stage 3: static ERK, SET, RigL at 90% and 2:4 SR-STE (its sparsity is fixed at 50%)."""
        return cls(sparsities=(0.9,), epochs=25 if full else 8, seeds=(0, 1, 2) if full else (0,), methods=DYNAMIC_METHODS,
                   dense=False)


@dataclass
class TrainingRow:
    method: str
    sparsity: float
    accuracy: float
    accuracy_std: float
    seconds: float
    train_flops_vs_dense: float = float("nan")


def _recipe(config: TrainingStageConfig, method: str, fields: dict[str, Any], sparsity: float | None, seed: int) -> Recipe:
    if ":" in fields.get("pattern", ""):
        sparsity = None  # N:M fixes it
    return Recipe(
        model=config.model, data="digits", seed=seed,
        train=TrainSection(epochs=config.epochs, batch_size=64, optimizer="adam", lr=3e-3),
        sparsity=SparsitySection(method=method, sparsity=sparsity, **fields),
    )


def run_training_stage(config: TrainingStageConfig, progress: bool = True, log: Callable[[str], None] = print) -> list[TrainingRow]:
    runs = [("dense", "dense", {}, None)] if config.dense else []
    runs += [(label, m, f, s) for s in config.sparsities for label, m, f in config.methods
             if s == config.sparsities[0] or ":" not in f.get("pattern", "")]  # N:M once: its sparsity is fixed
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, fields, sparsity in runs:
            results = [
                Run(_recipe(config, method, fields, sparsity, seed), os.path.join(tmp, f"{method}-{sparsity}-{seed}"),
                    progress=progress, log=lambda _: None).run()
                for seed in config.seeds
            ]
            accs = [r.accuracy for r in results]
            rows.append(TrainingRow(label, results[0].sparsity, statistics.fmean(accs),
                                    statistics.stdev(accs) if len(accs) > 1 else 0.0, statistics.fmean(r.seconds for r in results),
                                    statistics.fmean(r.train_flops_vs_dense for r in results)))
            log(f"{label:<20} sparsity {rows[-1].sparsity:.3f}: accuracy {rows[-1].accuracy:.4f}, "
                f"training FLOPs {rows[-1].train_flops_vs_dense:.2f}x dense")
    return rows


def training_table(rows: list[TrainingRow], seeds: int, title: str = "sparsecraft demo: sparse training of the digits CNN",
                   caption: str = "static masks are fixed at initialisation, GMP prunes during training"):
    from rich.table import Table

    table = Table(title=title)
    for col in ("method", "sparsity", "test accuracy", "training FLOPs vs dense", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        acc = f"{r.accuracy:.4f}" + (f" ± {r.accuracy_std:.4f}" if seeds > 1 else "")
        table.add_row(r.method, f"{r.sparsity:.3f}", acc, f"{r.train_flops_vs_dense:.3f}", f"{r.seconds:.1f}")
    table.caption = (f"mean of {seeds} seed(s); {caption}; FLOPs as a sparse kernel would count them "
                     "(forward + both backward products)")
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
    for label in dict.fromkeys(r.method for r in rows if r.method != "dense"):
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
