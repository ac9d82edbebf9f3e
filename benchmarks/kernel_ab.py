"""A/B of two builds of the C++ kernels in one process: a git revision's source against the working tree's.

Both libraries are compiled with the same flags and loaded side by side; each cell (shape, T,
setting, format) packs the weight once per copy (enough copies to exceed ``--cold-mib``, so the
weights stream from memory as inside a model, or one copy with ``--hot``) and times the two builds
in alternating rounds (A, B, A, B, ...; ``--rounds``), a median of ``--reps`` calls per round, so a
swing in the VM's bandwidth hits both. Printed per cell: the medians and B's speedup over A (the
median of the per-round ratios, with their range). Both builds must have the same ABI. The
outputs of both are checked against the dense product.

    python benchmarks/kernel_ab.py --base HEAD --shapes 4096x4096 --tokens 64,256 --settings 0.9 --formats csr16
    python benchmarks/kernel_ab.py --base HEAD~3 --settings 4x4@0.9 --formats block --results ab.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import torch

import sparsecraft.kernels as K
from sparsecraft.kernels import build, ops
from sparsecraft.kernels.formats import SparseWeight

from sparse_kernels import MIB, make_weight, parse_setting, rel_error

REPO = Path(__file__).resolve().parents[1]


def build_revision(rev: str | None, root: Path) -> Path:
    """The kernel library of git revision ``rev`` (None: the working tree), compiled under ``root``."""
    sources = []
    for src in build.SOURCES:
        if rev is None:
            sources.append(src)
            continue
        rel = src.relative_to(REPO)
        text = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        path = root / rev.replace("/", "_") / src.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        sources.append(path)
    target = root / f"lib-{rev or 'worktree'}.so".replace("/", "_")
    compiler = build.find_compiler()
    if compiler is None:
        raise SystemExit("no C++ compiler")
    build.compile_library(compiler, target, sources)
    return target


def bound(lib, sw: SparseWeight) -> SparseWeight:
    """A copy of sw whose products call ``lib`` (ops reads the library through its module global)."""
    copy = SparseWeight(sw.fmt, sw.shape, {k: v.clone() for k, v in sw.tensors.items()}, sw.n, sw.m, sw.block)
    with_library(lib, lambda: ops._plan(copy))
    return copy


def with_library(lib, fn):
    saved = ops.library
    ops.library = lambda: lib
    try:
        return fn()
    finally:
        ops.library = saved


def time_round(lib, copies: list[SparseWeight], x: torch.Tensor, reps: int) -> float:
    def run() -> float:
        times = []
        for i in range(reps):
            sw = copies[i % len(copies)]
            start = time.perf_counter()
            ops._kernel(x, sw, None)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return with_library(lib, run)


def cell(libs: dict[str, object], shape: tuple[int, int], tokens: int, label: str, fmt: str, args) -> dict:
    s = parse_setting(label)
    w = make_weight(shape, s)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(zlib.crc32(f"{shape}|{tokens}".encode())))
    ref = x.double() @ w.double().t()
    packed = K.pack(w, fmt, n=s.n, m=s.m, block=s.block)
    count = 1 if args.hot else max(2, -(-args.cold_mib * MIB // packed.nbytes))
    copies = {name: [bound(lib, packed) for _ in range(count)] for name, lib in libs.items()}
    for name, lib in libs.items():
        error = rel_error(with_library(lib, lambda: ops._kernel(x, copies[name][0], None)), ref)
        if error > 1e-4:
            raise SystemExit(f"build {name}: {fmt} {label} T={tokens}: relative error {error:.1e}")
        time_round(lib, copies[name], x, len(copies[name]))  # warm-up: page faults, thread pool
    samples: dict[str, list[float]] = {name: [] for name in libs}
    for _ in range(args.rounds):
        for name, lib in libs.items():
            samples[name].append(time_round(lib, copies[name], x, args.reps))
    a, b = samples["A"], samples["B"]
    ratios = [ai / bi for ai, bi in zip(a, b)]
    return {"shape": f"{shape[0]}x{shape[1]}", "T": tokens, "setting": label, "format": fmt, "copies": count,
            "A_us": statistics.median(a) * 1e6, "B_us": statistics.median(b) * 1e6, "speedup": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)], "rounds": args.rounds, "reps": args.reps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git revision of build A (B is the working tree)")
    p.add_argument("--shapes", default="4096x4096")
    p.add_argument("--tokens", default="1,64,256")
    p.add_argument("--settings", default="0.9")
    p.add_argument("--formats", default="csr16")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--cold-mib", type=int, default=64)
    p.add_argument("--hot", action="store_true", help="one copy of the weights (cache-resident when it fits)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", help="append one JSON line per cell")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kernel-ab-") as tmp:
        libs = {"A": build.load(build_revision(args.base, Path(tmp))), "B": build.load(build_revision(None, Path(tmp)))}
        meta = {"base": args.base, "head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                                            text=True).stdout.strip(), "threads": args.threads,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "hot": args.hot}
        print(f"# A = {args.base}, B = working tree; {args.threads} threads; {'hot' if args.hot else 'cold'}", flush=True)
        for shape in args.shapes.split(","):
            for tokens in map(int, args.tokens.split(",")):
                for label in args.settings.split(","):
                    for fmt in args.formats.split(","):
                        row = {**meta, **cell(libs, tuple(map(int, shape.split("x"))), tokens, label, fmt, args)}
                        lo, hi = row["speedup_range"]
                        print(f"{shape} T={tokens} {label} {fmt}: A {row['A_us']:.0f} us, B {row['B_us']:.0f} us, "
                              f"B/A speedup {row['speedup']:.2f}x [{lo:.2f}-{hi:.2f}]", flush=True)
                        if args.results:
                            with open(args.results, "a") as f:
                                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
