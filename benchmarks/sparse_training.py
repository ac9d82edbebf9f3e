"""Sparse-training baselines on the digits CNN and MLP: accuracy and training time vs dense.

Methods: dense, random-uniform, random-ERK, SNIP, GraSP, SynFlow, GMP, IMP (3 rounds, rewind to
init), SMS (3 phases x 3 soup members), at 80/90/95% sparsity, over seeds. Every run goes through
the same recipe runner as `sparsecraft train`. Prints a markdown table (mean ± std of test accuracy,
training time relative to dense of the same model) and writes all points as JSON.

    python benchmarks/sparse_training.py [--models cnn mlp] [--seeds 0 1 2] [--epochs 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsecraft.recipes.runner import Run
from sparsecraft.recipes.schema import Recipe, SparsitySection, TrainSection

# label: (method, distribution, extra SparsitySection fields)
METHODS = {
    "random-uniform": ("random", "uniform", {}),
    "random-ERK": ("random", "erk", {}),
    "SNIP": ("snip", "global", {}),
    "GraSP": ("grasp", "global", {}),
    "SynFlow": ("synflow", "global", {"rounds": 100}),
    "GMP": ("gmp", "erk", {"start": 0.1, "end": 0.6, "frequency": 10}),
    "IMP (3 rounds)": ("imp", "global", {"rounds": 3}),
    "SMS (3x3)": ("sms", "global", {"rounds": 3, "members": 3}),
}


def run_one(model: str, method: str, distribution: str, extra: dict, sparsity: float | None, seed: int, epochs: int) -> tuple[float, float, float]:
    recipe = Recipe(
        model=model, data="digits", seed=seed,
        train=TrainSection(epochs=epochs, batch_size=64, optimizer="adam", lr=3e-3),
        sparsity=SparsitySection(method=method, sparsity=sparsity, distribution=distribution, **extra),
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = Run(recipe, tmp, progress=False, log=lambda _: None).run()
        return result.accuracy, result.sparsity, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    points = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs per training run")
    for model in args.models:
        run_one(model, "dense", "uniform", {}, None, 0, 1)  # warm-up: data loading, first-call costs
        dense = [run_one(model, "dense", "uniform", {}, None, s, args.epochs) for s in args.seeds]
        dense_time = statistics.fmean(t for _, _, t in dense)
        rows = [("dense", 0.0, [a for a, _, _ in dense], 1.0)]
        for label in args.methods:
            method, distribution, extra = METHODS[label]
            for sparsity in args.sparsities:
                runs = [run_one(model, method, distribution, extra, sparsity, s, args.epochs) for s in args.seeds]
                rows.append((label, sparsity, [a for a, _, _ in runs], statistics.fmean(t for _, _, t in runs) / dense_time))
                points.append({"model": model, "method": label, "sparsity": sparsity, "accuracies": [a for a, _, _ in runs],
                               "achieved_sparsity": [s for _, s, _ in runs], "time_vs_dense": rows[-1][3]})
                print(f"  {model} {label:<16} {sparsity:.2f}: {statistics.fmean(rows[-1][2]):.4f}", flush=True)
        points.append({"model": model, "method": "dense", "sparsity": 0.0, "accuracies": rows[0][2], "seconds": dense_time})
        print(f"\n### {model} (test accuracy, mean ± std over seeds {args.seeds}; time relative to dense = {dense_time:.1f} s)\n")
        print("| method | sparsity | accuracy | time vs dense |")
        print("|---|---|---|---|")
        for label, sparsity, accs, rel in rows:
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {label} | {sparsity:.2f} | {statistics.fmean(accs):.4f} ± {std:.4f} | {rel:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(points, indent=2))


if __name__ == "__main__":
    main()
