"""Training-step time with sparsecraft masks vs the same dense model, in the same run.

For each model: a dense copy, a masked copy (90% unstructured, optimizer not bound: gradient masking
only) and a masked copy with the optimizer bound (masks re-applied after each step as well). Steps
are interleaved in rounds so drift on the machine hits all three alike; the median step time of each
is reported, with the overhead ratio against dense.

    python benchmarks/mask_overhead.py [--steps 30 --rounds 10 --threads N --json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import sparsecraft as sc
from sparsecraft.models import create

CASES = {
    # name: (model spec, kwargs, batch size)
    "cnn-digits (8x8, batch 128)": ("cnn", {}, 128),
    "resnet (32x32, batch 64)": ("resnet", {}, 64),
    "mlp-digits (64-256-128-10, batch 128)": ("mlp", {}, 128),
    "mlp-wide (784-1024-1024-10, batch 128)": ("mlp", {"in_features": 784, "hidden": (1024, 1024), "image_shape": (1, 28, 28)}, 128),
}


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def time_steps(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def run_case(spec: str, kwargs: dict, batch: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    base = create(spec, **kwargs)
    x = base.example_input(batch)
    y = torch.randint(0, 10, (batch,))
    variants = {}
    for name in ("dense", "masked", "masked+bound"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if name != "dense":
            sc.prune(model, sparsity=0.9, optimizer=opt if name == "masked+bound" else None)
        variants[name] = make_step(model, opt, x, y)
    for step in variants.values():  # warm-up
        time_steps(step, 5)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            times[name] += time_steps(step, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_step_ms": {k: round(v * 1e3, 4) for k, v in med.items()},
        "overhead": {k: round(med[k] / med["dense"] - 1, 4) for k in med if k != "dense"},
        "steps_timed_each": steps * rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "cases": {}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<42} {'dense ms':>9} {'masked ms':>10} {'+bound ms':>10} {'overhead':>9} {'+bound':>8}")
    for label, (spec, kwargs, batch) in CASES.items():
        r = run_case(spec, kwargs, batch, args.steps, args.rounds)
        results["cases"][label] = r
        m, o = r["median_step_ms"], r["overhead"]
        print(f"{label:<42} {m['dense']:>9.3f} {m['masked']:>10.3f} {m['masked+bound']:>10.3f} "
              f"{o['masked']:>+9.1%} {o['masked+bound']:>+8.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
