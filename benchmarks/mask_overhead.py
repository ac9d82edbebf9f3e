"""Training-step time with sparsecraft masks vs the same dense model, in the same run.

For each model, three copies train side by side on the same batch:
- ``dense``: the original weights;
- ``masked``: pruned to 90% (unstructured, magnitude) with sparsecraft's masks in force;
- ``zeros``: the masked copy's weights, zeros included, with the masks removed (``finalize``).
``masked`` vs ``zeros`` isolates the cost of keeping masks (hooks, gradient masking, optimizer
guards) from data effects of having zeros in the weights; ``masked`` vs ``dense`` is what a user
sees. Steps are interleaved in short rounds so drift on the machine hits all copies alike; the
median step time of each is reported.

    python benchmarks/mask_overhead.py [--steps 5 --rounds 40 --threads N --json out.json]
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
    masked = copy.deepcopy(base)
    sc.prune(masked, sparsity=0.9)
    models = {"dense": copy.deepcopy(base), "masked": masked, "zeros": sc.finalize(copy.deepcopy(masked))}
    variants = {}
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
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
        "overhead_vs_zeros": round(med["masked"] / med["zeros"] - 1, 4),
        "overhead_vs_dense": round(med["masked"] / med["dense"] - 1, 4),
        "steps_timed_each": steps * rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "cases": {}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<42} {'dense ms':>9} {'zeros ms':>9} {'masked ms':>10} {'vs zeros':>9} {'vs dense':>9}")
    for label, (spec, kwargs, batch) in CASES.items():
        r = run_case(spec, kwargs, batch, args.steps, args.rounds)
        results["cases"][label] = r
        m = r["median_step_ms"]
        print(f"{label:<42} {m['dense']:>9.3f} {m['zeros']:>9.3f} {m['masked']:>10.3f} "
              f"{r['overhead_vs_zeros']:>+9.1%} {r['overhead_vs_dense']:>+9.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
