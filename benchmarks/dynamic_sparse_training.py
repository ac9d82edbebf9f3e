"""Sparse training II: dynamic sparse training, N:M training and Sparse-IFT, on the digits CNN and the
tiny Transformer (sorting 8 tokens), over seeds.

- unstructured at 80/90/95%: dense, static ERK, SET (ERK), RigL (uniform and ERK), GraNet (dense-to-sparse and
  sparse-to-sparse from 50%);
- N:M 2:4, 1:4, 1:8, 1:16 with STE, SR-STE, mask-decayed (MDGF) and structure-decayed (SDGF) gradient flow;
- Sparse-IFT Sparse Wide at 50/75/90% trained with RigL, against the dense model of equal FLOPs.

Every run goes through the recipe runner (as `sparsecraft train`). Reported: test accuracy (mean ± std
over seeds; the Transformer's is per answer token), training FLOPs relative to a dense run (as a sparse
kernel would count them, see sparsecraft.analysis.training_flops) and wall-clock relative to dense
(PyTorch computes masked products densely, so this is the overhead of the method's bookkeeping).
Points are appended to a JSONL file as they finish; a re-run skips what is there.

    python benchmarks/dynamic_sparse_training.py                    # everything (~30 min on 2 cores)
    python benchmarks/dynamic_sparse_training.py --models cnn --groups unstructured --seeds 0
    python benchmarks/dynamic_sparse_training.py --table            # markdown tables of what is recorded
    python benchmarks/dynamic_sparse_training.py --seeds 0 --sparsities 0.9 --patterns 2:4 1:16 --sift 0.75 \
        --results benchmarks/results/dynamic_sparse_training_timing.jsonl   # a quiet pass for wall-clock only
    python benchmarks/dynamic_sparse_training.py --table --timing benchmarks/results/dynamic_sparse_training_timing.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sparsecraft.recipes.runner import Run
from sparsecraft.recipes.schema import Recipe, SparsitySection, TrainSection

HERE = Path(__file__).resolve().parent

# model: (recipe model, model_args, data, data_args, epochs, RigL/SET update interval, N:M layers to keep dense)
MODELS: dict[str, tuple[str, dict, str, dict, int, int, dict]] = {
    "cnn": ("cnn", {}, "digits", {}, 10, 10, {"keep_first_dense": True}),  # first conv: 1 input channel
    "transformer": ("transformer", {"vocab": 17, "context": 16, "dim": 64, "depth": 2, "heads": 4}, "sort",
                    {"length": 8, "values": 16}, 10, 25, {}),
}

UNSTRUCTURED: dict[str, dict[str, Any]] = {
    "static ERK": {"method": "random", "distribution": "erk"},
    "SET (ERK)": {"method": "set", "distribution": "erk"},
    "RigL (uniform)": {"method": "rigl", "distribution": "uniform"},
    "RigL (ERK)": {"method": "rigl", "distribution": "erk"},
    "GraNet": {"method": "granet", "distribution": "erk"},  # dense-to-sparse
    "GraNet (from 50%)": {"method": "granet", "distribution": "erk", "initial_sparsity": 0.5},  # sparse-to-sparse
}
NM_VARIANTS: dict[str, dict[str, Any]] = {
    "STE": {"nm_method": "ste"},
    "SR-STE": {"nm_method": "srste"},
    "MDGF (mask decay)": {"nm_method": "mask_decay", "decay": "linear", "finetune_fraction": 0.2},
    "SDGF (structure decay)": {"nm_method": "srste", "structure_decay": "sparsify"},
}


def jobs(model: str, groups: list[str], sparsities: list[float], patterns: list[str], sift: list[float]) -> list[tuple[str, str, dict]]:
    """(group, label, SparsitySection fields) for one model."""
    interval, nm_extra = MODELS[model][5], MODELS[model][6]
    out: list[tuple[str, str, dict]] = [("dense", "dense", {"method": "dense"})]
    if "unstructured" in groups:
        for s in sparsities:
            out += [("unstructured", label, {**fields, "sparsity": s, "update_interval": interval})
                    for label, fields in UNSTRUCTURED.items()]
    if "nm" in groups:
        for p in patterns:
            out += [("nm", label, {"method": "nm", "pattern": p, **fields, **nm_extra}) for label, fields in NM_VARIANTS.items()]
    if "sift" in groups:
        out += [("sift", "Sparse Wide + RigL", {"method": "rigl", "sparsity": s, "sift": "wide", "update_interval": interval})
                for s in sift]
    return out


def key_of(model: str, label: str, fields: dict, seed: int) -> str:
    return f"{model}|{label}|{fields.get('sparsity')}|{fields.get('pattern', '')}|{seed}"


def run_one(model: str, fields: dict, seed: int, epochs: int | None = None) -> dict[str, float]:
    name, args, data, data_args, default_epochs, _, _ = MODELS[model]
    epochs = epochs or default_epochs
    recipe = Recipe(model=name, model_args=args, data=data, data_args=data_args, seed=seed,
                    train=TrainSection(epochs=epochs, batch_size=64, optimizer="adam", lr=3e-3),
                    sparsity=SparsitySection(**fields))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = Run(recipe, tmp, progress=False, log=lambda _: None).run()
        seconds = time.perf_counter() - start
    return {"accuracy": result.accuracy, "sparsity": result.sparsity, "seconds": seconds,
            "train_flops_vs_dense": result.train_flops_vs_dense}


def table(rows: list[dict], timing: list[dict] | None = None) -> None:
    """Markdown tables; wall-clock ratios from ``timing`` (a quiet-machine pass) when given."""
    timing = timing or rows
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        dense = [r for r in mine if r["label"] == "dense"]
        clock: dict[tuple, list[float]] = {}
        for r in timing:
            if r["model"] == model:
                clock.setdefault((r["label"], r.get("target")), []).append(r["seconds"])
        dense_seconds = statistics.median(clock.get(("dense", None), [float("nan")]))
        print(f"\n### {model} (dense: {statistics.fmean(r['accuracy'] for r in dense):.4f}, "
              f"{dense_seconds:.1f} s per run; seeds {sorted({r['seed'] for r in mine})})\n")
        print("| group | method | setting | sparsity | accuracy | train FLOPs vs dense | wall-clock vs dense |")
        print("|---|---|---|---:|---:|---:|---:|")
        groups: dict[tuple, list[dict]] = {}
        for r in mine:
            groups.setdefault((r["group"], r["label"], r.get("target")), []).append(r)
        for (group, label, target), rs in groups.items():
            accs = [r["accuracy"] for r in rs]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            seconds = clock.get((label, target))
            ratio = f"{statistics.median(seconds) / dense_seconds:.2f}" if seconds else "-"
            print(f"| {group} | {label} | {target if target is not None else '-'} | "
                  f"{statistics.fmean(r['sparsity'] for r in rs):.3f} | {statistics.fmean(accs):.4f} ± {std:.4f} | "
                  f"{statistics.fmean(r['train_flops_vs_dense'] for r in rs):.3f} | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--groups", nargs="+", default=["unstructured", "nm", "sift"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    p.add_argument("--patterns", nargs="+", default=["2:4", "1:4", "1:8", "1:16"])
    p.add_argument("--sift", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="override the models' epochs (smoke tests)")
    p.add_argument("--results", type=Path, default=HERE / "results" / "dynamic_sparse_training.jsonl")
    p.add_argument("--table", action="store_true")
    p.add_argument("--timing", type=Path, default=None, help="with --table: wall-clock ratios from this (quiet) results file")
    args = p.parse_args()
    if args.table:
        timing = [json.loads(line) for line in args.timing.read_text().splitlines()] if args.timing else None
        table([json.loads(line) for line in args.results.read_text().splitlines()], timing)
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in args.results.read_text().splitlines()} if args.results.exists() else set()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for model in args.models:
        run_one(model, {"method": "dense"}, 0, 1)  # warm-up: first-call costs
        for group, label, fields in jobs(model, args.groups, args.sparsities, args.patterns, args.sift):
            for seed in args.seeds:
                key = key_of(model, label, fields, seed)
                if key in done:
                    continue
                row = {"key": key, "model": model, "group": group, "label": label, "seed": seed,
                       "target": fields.get("pattern") or fields.get("sparsity"), **run_one(model, fields, seed, args.epochs),
                       "date": time.strftime("%Y-%m-%d %H:%M")}
                with args.results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.add(key)
                print(f"{model} {label} {row['target']} seed {seed}: {row['accuracy']:.4f} "
                      f"({row['seconds']:.1f} s, {row['train_flops_vs_dense']:.3f}x FLOPs)", flush=True)
    table([json.loads(line) for line in args.results.read_text().splitlines()])


if __name__ == "__main__":
    main()
