"""The demo: train a small CNN on 8x8 digits, prune it one shot, fine-tune, compare side by side.

Embedded defaults finish in well under a minute on two CPU cores; ``full=True`` trains longer and
averages three seeds.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from sparsecraft.analysis.report import report
from sparsecraft.core.prune import prune
from sparsecraft.data import digits
from sparsecraft.models import create
from sparsecraft.train import evaluate, fit, make_optimizer, recalibrate_batchnorm


@dataclass
class DemoRow:
    distribution: str
    target_sparsity: float
    sparsity: float
    kept_weights: int
    accuracy_one_shot: float
    accuracy_fine_tuned: float
    accuracy_std: float
    flops: int
    flops_ratio: float


@dataclass
class DemoConfig:
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9)
    distributions: tuple[str, ...] = ("uniform", "erk")
    epochs: int = 15
    fine_tune_epochs: int = 4
    seeds: tuple[int, ...] = (0,)
    model: str = "cnn"

    @classmethod
    def full(cls) -> DemoConfig:
        return cls(sparsities=(0.5, 0.8, 0.9, 0.95), epochs=40, fine_tune_epochs=15, seeds=(0, 1, 2))


def run_demo(config: DemoConfig, progress: bool = True, log: Callable[[str], None] = print) -> list[DemoRow]:
    split = digits()
    per_seed: dict[tuple[str, float], list[DemoRow]] = {}
    for seed in config.seeds:
        torch.manual_seed(seed)
        dense = create(config.model)
        fit(dense, split.x_train, split.y_train, make_optimizer(dense), config.epochs, seed=seed, progress=progress, description=f"dense (seed {seed})")
        dense_report = report(dense)
        dense_acc = evaluate(dense, split.x_test, split.y_test)
        log(f"seed {seed}: dense accuracy {dense_acc:.4f}")
        per_seed.setdefault(("dense", 0.0), []).append(
            DemoRow("dense", 0.0, 0.0, dense_report.kept, dense_acc, dense_acc, 0.0, dense_report.dense_flops or 0, 1.0)
        )
        for distribution in config.distributions:
            for sparsity in config.sparsities:
                model = copy.deepcopy(dense)
                prune(model, sparsity=sparsity, distribution=distribution)
                recalibrate_batchnorm(model, split.x_train)
                one_shot = evaluate(model, split.x_test, split.y_test)
                optimizer = make_optimizer(model, lr=1e-3)
                fit(model, split.x_train, split.y_train, optimizer, config.fine_tune_epochs, seed=seed, progress=progress,
                    description=f"fine-tune {distribution} {sparsity:.0%}")
                r = report(model)
                per_seed.setdefault((distribution, sparsity), []).append(
                    DemoRow(distribution, sparsity, 1 - r.density, r.kept, one_shot, evaluate(model, split.x_test, split.y_test),
                            0.0, r.sparse_flops or 0, (r.sparse_flops or 0) / max(r.dense_flops or 1, 1))
                )
    return [_average(rows) for rows in per_seed.values()]


def _average(rows: list[DemoRow]) -> DemoRow:
    first = asdict(rows[0])
    tuned = [r.accuracy_fine_tuned for r in rows]
    first["accuracy_one_shot"] = statistics.fmean(r.accuracy_one_shot for r in rows)
    first["accuracy_fine_tuned"] = statistics.fmean(tuned)
    first["accuracy_std"] = statistics.stdev(tuned) if len(tuned) > 1 else 0.0
    return DemoRow(**first)


def demo_table(rows: list[DemoRow], seeds: int):
    from rich.table import Table

    table = Table(title="sparsecraft demo: CNN on 8x8 digits, one-shot magnitude pruning, then fine-tuning")
    for col in ("layers", "target", "sparsity", "kept", "acc one-shot", "acc tuned", "MFLOPs", "vs dense"):
        table.add_column(col, justify="left" if col == "layers" else "right")
    for r in rows:
        tuned = f"{r.accuracy_fine_tuned:.4f}" + (f" ± {r.accuracy_std:.4f}" if seeds > 1 else "")
        table.add_row(r.distribution, f"{r.target_sparsity:.0%}", f"{r.sparsity:.4f}", f"{r.kept_weights:,}",
                      f"{r.accuracy_one_shot:.4f}", tuned, f"{r.flops / 1e6:.3f}", f"{r.flops_ratio:.3f}")
    table.caption = (
        f"test accuracy on 360 held-out digits, mean of {seeds} seed(s); one-shot = after pruning and BatchNorm re-estimation, before fine-tuning; kept = weights of conv/linear layers; "
        "MFLOPs per image (1 multiply-add = 2 FLOPs)"
    )
    return table
