"""Sparse architecture search: the Random Search baseline (Farahani et al. 2024) and DASS
(Mousavi et al. 2022) against their baselines, on the 8x8 digits and the synthetic 32x32 task.

- random: over the hidden units (MLP) or channels (CNN) of an over-parameterised parent, the
  winner of N scored candidates vs fresh random configurations of the same node sparsity vs the
  dense parent, every network trained the same way; the paper's claim: the searched networks
  neither beat nor converge faster than random ones.
- dass: the DASS-searched cell (sparse operations, sparse objective) vs the plain-DARTS cell, both
  trained with gradual magnitude pruning to the same sparsity; the paper's claim: the DASS
  architecture is more accurate at equal sparsity.

Each (method, task, sparsity) point runs through the same code as ``sparsecraft search`` and is
appended to a JSONL file; a re-run skips what is there.

    python benchmarks/arch_search.py                          # every point (about 30 min on 2 cores)
    python benchmarks/arch_search.py --methods random --tasks digits-mlp --sparsities 0.9
    python benchmarks/arch_search.py --table                  # markdown of what is recorded
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from sparsecraft.methods.search.run import cost_lines, result_json, search, summarise
from sparsecraft.recipes.runner import load_data
from sparsecraft.recipes.schema import TrainSection
from sparsecraft.recipes.search import DassSection, RandomSearchSection, SearchRecipe

HERE = Path(__file__).resolve().parent

# task: (method, data, data_args, recipe overrides)
TASKS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "digits-mlp": ("random", "digits", {}, {
        "val_fraction": 0.2, "train": TrainSection(epochs=30),
        "random": RandomSearchSection(model="mlp", model_args={"hidden": [512, 256]}, candidates=16, budget_epochs=2, random_configs=3)}),
    "digits-cnn": ("random", "digits", {}, {
        "val_fraction": 0.2, "train": TrainSection(epochs=15),
        "random": RandomSearchSection(model="cnn", model_args={"width": 64}, candidates=8, budget_epochs=2, random_configs=2)}),
    "synthetic32-cnn": ("random", "synthetic32", {"n_train": 1000, "n_test": 500}, {
        "val_fraction": 0.2, "train": TrainSection(epochs=8),
        "random": RandomSearchSection(model="cnn32", model_args={"width": 32}, candidates=6, budget_epochs=1, random_configs=2)}),
    "digits-dass": ("dass", "digits", {}, {
        "val_fraction": 0.5, "train": TrainSection(epochs=30),
        "dass": DassSection(channels=8, cells=3, nodes=3, search_epochs=10, final_method="gmp")}),
    # 16x the pixels of digits: one search epoch takes minutes on 2 cores, so a smaller budget
    "synthetic32-dass": ("dass", "synthetic32", {"n_train": 600, "n_test": 500}, {
        "val_fraction": 0.5, "train": TrainSection(epochs=8),
        "dass": DassSection(channels=8, cells=3, nodes=3, search_epochs=2, final_method="gmp")}),
}


def key(task: str, sparsity: float, seeds: list[int]) -> str:
    return f"{task}|{sparsity:g}|seeds{','.join(map(str, seeds))}"


def run_point(task: str, sparsity: float, seeds: list[int], threads: int) -> dict[str, Any]:
    method, data, data_args, overrides = TASKS[task]
    torch.set_num_threads(threads)
    recipe = SearchRecipe(method=method, data=data, data_args=data_args, sparsity=sparsity, seeds=seeds, **overrides)
    split = load_data(data, **data_args)
    start = time.perf_counter()
    result = search(recipe, split, progress=False, log=print)
    out = result_json(result, recipe)
    out.update(task=task, key=key(task, sparsity, seeds), wall_seconds=time.perf_counter() - start,
               architecture=result.architecture, threads=threads, loadavg_5min=os.getloadavg()[1],
               started=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - (time.perf_counter() - start))))
    for line in cost_lines(result):
        print(line)
    return out


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    lines = ["| task | sparsity | network | runs | test accuracy (mean ± std) | weight sparsity | kept weights | FLOPs / example "
             "| epochs to level | level | search s | search FLOPs |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        costs = r["cost"]
        for s in r["summary"]:
            cost_key = {"searched": "random", "dass": "dass", "darts-pruned": "darts"}.get(s["arch"])
            c = costs.get(cost_key) if cost_key else None
            reach = "-" if s["epochs_to_level"] is None else f"{s['epochs_to_level']:.1f} ({s['reached']}/{s['runs']})"
            lines.append(
                f"| {r['task']} | {r['sparsity']:g} | {s['arch']} | {s['runs']} | {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} "
                f"| {s['sparsity']:.3f} | {s['params']:,.0f} | {s['flops']:,.0f} | {reach} | {r['convergence_level']:.3f} "
                f"| {c['seconds']:.0f} | {c['flops']:.3g} |" if c else
                f"| {r['task']} | {r['sparsity']:g} | {s['arch']} | {s['runs']} | {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} "
                f"| {s['sparsity']:.3f} | {s['params']:,.0f} | {s['flops']:,.0f} | {reach} | {r['convergence_level']:.3f} | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default="random,dass")
    p.add_argument("--sparsities", default="0.8,0.9")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", default=str(HERE / "results" / "arch_search.jsonl"))
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    results = Path(args.results)
    if args.table:
        print(table(results))
        return
    done = {json.loads(line)["key"] for line in results.read_text().splitlines() if line.strip()} if results.exists() else set()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    for task in args.tasks.split(","):
        if TASKS[task][0] not in methods:
            continue
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            if key(task, sparsity, seeds) in done:
                continue
            print(f"== {task} at {sparsity:g}, seeds {seeds}", flush=True)
            row = run_point(task, sparsity, seeds, args.threads)
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(table_row_summary(row), flush=True)


def table_row_summary(row: dict[str, Any]) -> str:
    return "; ".join(f"{s['arch']} {s['accuracy_mean']:.4f}±{s['accuracy_std']:.4f}" for s in row["summary"])


if __name__ == "__main__":
    main()
