"""Head-to-head against DeepSparse and dense ONNX Runtime, interleaved round by round.

``sparse_kernels.py`` times the peers of a shape in one subprocess and ours afterwards, minutes
apart; on a VM whose memory bandwidth moves by a third between minutes, a 10% lead in one cell can
flip from run to run. Here the peers' engines live in one persistent worker
(``peers/onnx_linear.py --serve``, in the DeepSparse venv) and each round times every tool once
(ORT dense, DeepSparse, each of our formats; the order rotates each round), all with cold weights
(copies exceeding ``--cold-mib``). Reported per cell: the median time of each tool, our best format's
speedup over DeepSparse (median of the per-round ratios, their range and the rounds won) and over
ORT dense.

    python benchmarks/peer_ab.py --shapes 3072x768 --tokens 64,256 --settings 0.9,0.95 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

import sparsecraft.kernels as K

from sparse_kernels import MAX_REL_ERROR, MIB, PEER_PYTHON, PEER_SCRIPT, make_weight, parse_setting, parse_shape, rel_error


class PeerWorker:
    """onnx_linear.py --serve: builds ORT/DeepSparse engines once, times them on request."""

    def __init__(self, threads: int) -> None:
        if not PEER_PYTHON.exists():
            raise SystemExit(f"no peer venv at {PEER_PYTHON}: run bash benchmarks/peers/setup_deepsparse.sh")
        self.proc = subprocess.Popen([str(PEER_PYTHON), str(PEER_SCRIPT), "--serve", "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the peer worker stopped on {request} (its error is above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


def copies(nbytes: int, args: argparse.Namespace) -> int:
    return max(2, math.ceil(args.cold_mib * MIB / max(nbytes, 1)))


def our_timer(w: torch.Tensor, fmt: str, setting, x: torch.Tensor, ref: torch.Tensor, args):
    """time(reps) -> median seconds of one call cycling cold copies of our format fmt."""
    first = K.pack(w, fmt, n=setting.n, m=setting.m, block=setting.block)
    packed = [first] + [K.pack(w, fmt, n=setting.n, m=setting.m, block=setting.block) for _ in range(copies(first.nbytes, args) - 1)]
    error = max(rel_error(p.linear(x), ref) for p in packed)
    if error > MAX_REL_ERROR:
        raise SystemExit(f"ours:{fmt}: max relative error {error:.2e} > {MAX_REL_ERROR:g}")
    for p in packed * 2:
        p.linear(x)

    def run(reps: int) -> float:
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            packed[i % len(packed)].linear(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return run


def cell(worker: PeerWorker, shape_text: str, label: str, tokens: int, root: Path, args) -> dict:
    shape, setting = parse_shape(shape_text), parse_setting(label)
    dense, w = make_weight(shape, parse_setting("dense")), make_weight(shape, setting)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(zlib.crc32(f"{shape_text}|{tokens}".encode())))
    ref = x.double() @ w.double().t()
    tag = f"{shape_text}_{label.replace(':', '-')}_{tokens}"
    for name, array in (("dense", dense), ("w", w), ("x", x)):
        np.save(root / f"{tag}_{name}.npy", array.numpy())
    timers = {}
    for tool, weight, nbytes in (("ort", "dense", dense.numel() * 4), ("deepsparse", "w", int(w.count_nonzero()) * 4)):
        worker.ask(cmd="build", id=f"{tool}_{tag}", tool=tool, weight=str(root / f"{tag}_{weight}.npy"),
                   x=str(root / f"{tag}_x.npy"), copies=copies(nbytes, args))
        timers[tool] = lambda reps, i=f"{tool}_{tag}": worker.ask(cmd="time", id=i, reps=reps)["seconds"]
    for fmt in args.formats.split(","):
        timers[f"ours:{fmt}"] = our_timer(w, fmt, setting, x, ref, args)
    reps = {tool: max(5, math.ceil(args.round_seconds / max(fn(5), 1e-7))) for tool, fn in timers.items()}
    names = list(timers)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rounds[name].append(timers[name](reps[name]))
    ours = [min(rounds[n][r] for n in names if n.startswith("ours:")) for r in range(args.rounds)]
    vs_ds = [d / o for d, o in zip(rounds["deepsparse"], ours)]
    row = {"shape": shape_text, "setting": label, "T": tokens, "threads": args.threads, "rounds": args.rounds,
           "median_seconds": {n: statistics.median(v) for n, v in rounds.items()},
           "ours_vs_deepsparse": statistics.median(vs_ds), "ours_vs_deepsparse_range": [min(vs_ds), max(vs_ds)],
           "rounds_won": sum(v > 1 for v in vs_ds),
           "ours_vs_ort": statistics.median([o / b for o, b in zip(rounds["ort"], ours)]),
           "deepsparse_vs_ort": statistics.median([o / d for o, d in zip(rounds["ort"], rounds["deepsparse"])]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for tool in ("ort", "deepsparse"):  # the cell's engines and their copies are not needed again
        worker.ask(cmd="drop", id=f"{tool}_{tag}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="3072x768")
    p.add_argument("--settings", default="0.9,0.95")
    p.add_argument("--tokens", default="64,256")
    p.add_argument("--formats", default="csr16,panels", help="our formats; each round counts our fastest")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--round-seconds", type=float, default=0.15, help="time per tool per round")
    p.add_argument("--cold-mib", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    worker = PeerWorker(args.threads)
    versions = worker.ask(cmd="versions")
    print(f"# threads {args.threads}, {args.rounds} rounds; peers {versions}", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="peer-ab-") as tmp:
            for shape in args.shapes.split(","):
                for label in args.settings.split(","):
                    for tokens in map(int, args.tokens.split(",")):
                        row = cell(worker, shape, label, tokens, Path(tmp), args) | {"versions": versions}
                        lo, hi = row["ours_vs_deepsparse_range"]
                        times = "  ".join(f"{n}={s * 1e6:.0f}us" for n, s in row["median_seconds"].items())
                        print(f"{shape} {label} T={tokens}: {times}  ours/DS {row['ours_vs_deepsparse']:.2f}x "
                              f"({lo:.2f}-{hi:.2f}, won {row['rounds_won']}/{args.rounds})  ours {row['ours_vs_ort']:.2f}x "
                              f"DS {row['deepsparse_vs_ort']:.2f}x ORT dense", flush=True)
                        if args.results:
                            with args.results.open("a") as f:
                                f.write(json.dumps(row) + "\n")
    finally:
        worker.close()


if __name__ == "__main__":
    main()
