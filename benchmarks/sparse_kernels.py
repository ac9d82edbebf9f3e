"""Sparse inference kernels: y = x @ W^T with sparsecraft.kernels against dense and sparse peers.

For every cell (shape out x in, T tokens, sparsity setting) the same run times, hot and cold:
dense ``torch.nn.functional.linear``, ONNX Runtime (dense MatMul), ``torch.sparse`` CSR (and BSR
for square blocks), each of our formats that applies (``ours:<fmt>``: csr16, bitmask and panels always,
nm for N:M, block for blocks) and DeepSparse. A measurement is the median of many single forwards
(adaptive: about ``--target-seconds`` of them, at least ``--min-reps``). "hot" runs one copy of the
weights again and again; "cold" cycles through enough copies (each tool's own bytes) to exceed
``--cold-mib`` (64 MiB: twice the 32 MiB L3 of the project's machines), so they stream from memory.
Speedups are against the best dense (min of torch and ORT, same cache state, same run); errors are
max |y - ref| / max |ref| against a float64 product. The machine's read bandwidth (summing a
512 MiB tensor) gives, for T=1, each format's memory-bound ideal: dense bytes / format bytes, and
format bytes / bandwidth seconds.

Weights are random normal with per-row magnitude masks: unstructured ("0.9": keep the largest
|w| of each row), N:M ("2:4": the n largest of every m along the input), blocks ("4x4@0.9": the
largest-norm blocks of each block row). Results are appended to a JSONL file as they come; a re-run
skips cells already there (a skipped format's row counts as done: delete it to retry).

    python benchmarks/sparse_kernels.py                          # the whole grid (quiet machine!)
    python benchmarks/sparse_kernels.py --shapes 4096x4096 --tokens 1 --settings 0.9,2:4
    python benchmarks/sparse_kernels.py --quick                  # smoke test (own results file)
    python benchmarks/sparse_kernels.py --table [--plot speedup.png]
    touch benchmarks/results/PAUSE-sparse_kernels              # hold this grid between cells

ONNX Runtime and DeepSparse live in benchmarks/.venvs/deepsparse (made by
peers/setup_deepsparse.sh) and run in one subprocess per shape (peers/onnx_linear.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".venvs" / "deepsparse" / "bin" / "python"
PEER_SCRIPT = HERE / "peers" / "onnx_linear.py"
#: While this file exists the driver starts no new cell (touch it before timing anything else).
PAUSE = HERE / "results" / "PAUSE-sparse_kernels"  # one file per driver
MAX_REL_ERROR = 1e-3
MIB = 1 << 20
DEFAULTS = {"shapes": "768x3072,3072x768,4096x4096", "tokens": "1,8,64,256",
            "settings": "0.5,0.7,0.8,0.9,0.95,2:4,4:8,4x4@0.9,1x8@0.9,8x1@0.9"}
QUICK = {"shapes": "256x512", "tokens": "1,8", "settings": "0.9,2:4"}
DENSE_TOOLS = ("dense", "ort")
TOOL_ORDER = ["dense", "ort", "torch_csr", "torch_bsr", "ours:csr16", "ours:bitmask", "ours:nm", "ours:block", "ours:panels", "deepsparse"]


@dataclass(frozen=True)
class Setting:
    label: str
    kind: str  # "dense", "unstructured", "nm" or "block"
    sparsity: float
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (1, 1)


def parse_setting(label: str) -> Setting:
    if label == "dense":
        return Setting(label, "dense", 0.0)
    if ":" in label:
        n, m = map(int, label.split(":"))
        return Setting(label, "nm", 1 - n / m, n, m)
    if "@" in label:
        block, sparsity = label.split("@")
        bh, bw = map(int, block.split("x"))
        return Setting(label, "block", float(sparsity), block=(bh, bw))
    return Setting(label, "unstructured", float(label))


def parse_shape(text: str) -> tuple[int, int]:
    out_features, in_features = map(int, text.split("x"))
    return out_features, in_features


# ---------------------------------------------------------------- weights

def make_weight(shape: tuple[int, int], setting: Setting) -> torch.Tensor:
    """Random normal (out, in) weight, seeded by shape and setting, zeros where the mask prunes."""
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(f"{shape}|{setting.label}".encode()))
    w = torch.randn(shape, generator=g)
    if setting.kind == "dense":
        return w
    return w * keep_mask(w, setting)


def keep_mask(w: torch.Tensor, s: Setting) -> torch.Tensor:
    import torch

    out_features, in_features = w.shape
    if s.kind == "nm":
        groups = w.abs().reshape(out_features, in_features // s.m, s.m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(s.n, dim=2).indices, True)
        return keep.reshape(w.shape)
    if s.kind == "block":
        bh, bw = s.block
        norms = w.reshape(out_features // bh, bh, in_features // bw, bw).pow(2).sum((1, 3))
        keep = top_per_row(norms, s.sparsity)
        return keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return top_per_row(w.abs(), s.sparsity)


def top_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    import torch

    k = max(1, round((1 - sparsity) * scores.shape[1]))
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


# ---------------------------------------------------------------- timing

Forward = Callable[["torch.Tensor"], "torch.Tensor"]


def time_cycle(fns: list[Forward], x: torch.Tensor, cfg: dict) -> tuple[float, int]:
    """Median seconds of one call, fns[i % K] at step i, after two warm-up cycles; adaptive count."""
    warm = fns * max(1, math.ceil(3 / len(fns)))
    for fn in warm:  # first calls allocate, fault pages in, build plans: not timed
        fn(x)
    start = time.perf_counter()
    for fn in warm:
        fn(x)
    per_call = (time.perf_counter() - start) / len(warm)
    reps = min(cfg["max_reps"], max(cfg["min_reps"], len(fns), math.ceil(cfg["target_seconds"] / max(per_call, 1e-7))))
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fns[i % len(fns)](x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), reps


def copies_for(nbytes: int, cfg: dict) -> int:
    """How many copies of the weights a cold cycle needs to exceed --cold-mib (at least 2)."""
    return min(cfg["max_copies"], max(2, math.ceil(cfg["cold_bytes"] / max(nbytes, 1))))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def bandwidth(mib: int) -> dict:
    """Read (sum) and copy bandwidth of a tensor far larger than the caches, GB/s (1e9 bytes)."""
    import torch

    src = torch.ones(mib * MIB // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    reads, copies = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        src.sum()
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    return {"read_gbs": nbytes / statistics.median(reads) / 1e9, "copy_gbs": 2 * nbytes / statistics.median(copies) / 1e9,
            "mib": mib}


# ---------------------------------------------------------------- tools in this process

@dataclass
class Tool:
    """One way to compute the product: make() returns a fresh copy (its own memory) as a forward."""
    name: str
    make: Callable[[], Forward]
    nbytes: int
    variant: str = ""


def dense_tool(w: torch.Tensor) -> Tool:
    import torch.nn.functional as F

    def make() -> Forward:
        copy = w.clone()
        return lambda x: F.linear(x, copy)

    return Tool("dense", make, w.numel() * w.element_size())


def csr_tool(w: torch.Tensor, x: torch.Tensor, cfg: dict) -> Tool:
    """torch CSR through F.linear and through torch.sparse.mm; the faster (hot) one is kept."""
    import torch
    import torch.nn.functional as F

    calls: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "F.linear": lambda x, c: F.linear(x, c), "sparse.mm": lambda x, c: torch.sparse.mm(c, x.t()).t()}
    nbytes = sparse_nbytes(w.to_sparse_csr())
    tools = [Tool("torch_csr", (lambda call=call: bind(call, w.to_sparse_csr())), nbytes, name) for name, call in calls.items()]
    return min(tools, key=lambda t: time_cycle([t.make()], x, {**cfg, "target_seconds": cfg["target_seconds"] / 3})[0])


def bsr_tool(w: torch.Tensor, block: tuple[int, int]) -> Tool:
    import torch.nn.functional as F

    return Tool("torch_bsr", lambda: bind(lambda x, b: F.linear(x, b), w.to_sparse_bsr(block)),
                sparse_nbytes(w.to_sparse_bsr(block)), "F.linear")


def bind(call: Callable, weight: Any) -> Forward:
    return lambda x: call(x, weight)


def sparse_nbytes(t: torch.Tensor) -> int:
    parts = (t.crow_indices(), t.col_indices(), t.values())
    return sum(p.numel() * p.element_size() for p in parts)


def our_formats(s: Setting, wanted: list[str] | None) -> list[str]:
    fmts = ["csr16", "bitmask", "panels"] + {"nm": ["nm"], "block": ["block"]}.get(s.kind, [])
    return [f for f in fmts if wanted is None or f in wanted]


def our_tool(K: Any, w: torch.Tensor, fmt: str, s: Setting) -> Tool:
    def make() -> Forward:
        packed = K.pack(w, fmt, n=s.n, m=s.m, block=s.block)
        return lambda x: packed.linear(x)

    return Tool(f"ours:{fmt}", make, int(K.pack(w, fmt, n=s.n, m=s.m, block=s.block).nbytes))


# ---------------------------------------------------------------- peers (another venv)

def peer_rows(shape: tuple[int, int], weights: dict[str, torch.Tensor], inputs: dict[int, torch.Tensor],
              wanted: list[tuple[int, str, str]], cfg: dict) -> dict[tuple[int, str, str, str], dict]:
    """Runs peers/onnx_linear.py once for all (T, setting, tool) of a shape; rows keyed by (T, setting, tool, cache)."""
    import numpy as np

    if not wanted:
        return {}
    with tempfile.TemporaryDirectory(prefix="sparse-kernels-peer-") as tmp:
        root = Path(tmp)
        for label in {label for _, label, _ in wanted}:
            np.save(root / f"w_{safe(label)}.npy", weights[label].numpy())
        for tokens, x in inputs.items():
            np.save(root / f"x_{tokens}.npy", x.numpy())
        cases = [peer_case(shape, tokens, label, tool, weights[label], cfg) for tokens, label, tool in wanted]
        spec = {k: cfg[k] for k in ("target_seconds", "min_reps", "max_reps")}
        (root / "cases.json").write_text(json.dumps({**spec, "cases": cases}))
        cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), tmp, "--threads", str(cfg["threads"]), "--out", str(root / "out.json")]
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed (its error is above)")
        out = json.loads((root / "out.json").read_text())
    names = {"ort": "onnxruntime", "deepsparse": "deepsparse"}
    return {(r["T"], r["setting"], r["tool"], r["cache"]): {**r, "version": out["versions"].get(names[r["tool"]])}
            for r in out["rows"]}


def peer_case(shape: tuple[int, int], tokens: int, label: str, tool: str, w: torch.Tensor, cfg: dict) -> dict:
    # ORT runs the dense matrix; DeepSparse keeps some form of the nonzeros: their values alone
    # (4 bytes each) are a lower bound on its bytes, so the copies surely exceed the cache.
    nbytes = w.numel() * 4 if tool == "ort" else int(w.count_nonzero()) * 4
    return {"id": f"{tool}_{tokens}_{safe(label)}", "weight": f"w_{safe(label)}.npy", "x": f"x_{tokens}.npy",
            "shape": list(shape), "setting": label, "T": tokens, "tools": [tool],
            "cold_copies": {tool: copies_for(nbytes, cfg)}}


def safe(label: str) -> str:
    return label.replace(":", "-").replace("@", "_")


# ---------------------------------------------------------------- the grid

def key(shape: str, tokens: int, setting: str, tool: str, cache: str, threads: int) -> str:
    return f"{shape}|{tokens}|{setting}|{tool}|{cache}|{threads}"


def expected_tools(s: Setting, ours: Any, peers: bool, wanted_formats: list[str] | None) -> list[str]:
    if s.kind == "dense":
        return ["dense"] + (["ort", "deepsparse"] if peers else [])
    tools = ["torch_csr"] + (["torch_bsr"] if s.kind == "block" and s.block[0] == s.block[1] else [])
    tools += [f"ours:{f}" for f in our_formats(s, wanted_formats)] if ours is not None else []
    return tools + (["deepsparse"] if peers else [])


def run_shape(shape_text: str, args: argparse.Namespace, cfg: dict, ours: Any, done: set[str], out: Path) -> None:
    import torch

    shape = parse_shape(shape_text)
    peers = PEER_PYTHON.exists()
    settings = [parse_setting(s) for s in ["dense"] + args.settings.split(",")]
    todo = {(t, s.label): [tool for tool in expected_tools(s, ours, peers, args.formats)
                           if any(key(shape_text, t, s.label, tool, c, args.threads) not in done for c in ("hot", "cold"))]
            for t in args.tokens for s in settings}
    # A (shape, T) with anything to do re-times its dense references, so every speedup is of one run.
    todo = {(t, label): tools for (t, label), tools in todo.items() if any(todo[(t, s.label)] for s in settings)}
    for (t, label), tools in list(todo.items()):
        if label == "dense":
            todo[(t, label)] = expected_tools(settings[0], ours, peers, args.formats)
    if not any(todo.values()):
        return
    if "bandwidth" not in cfg:  # once per run, and only in a run with something to time
        machine_row(cfg, out)
    weights = {s.label: make_weight(shape, s) for s in settings if any(todo.get((t, s.label)) for t in args.tokens)}
    inputs = {t: torch.randn(t, shape[1], generator=torch.Generator().manual_seed(zlib.crc32(f"{shape_text}|{t}".encode())))
              for t in args.tokens if (t, "dense") in todo}
    wanted_peers = [(t, label, tool) for (t, label), tools in todo.items() for tool in tools if tool in ("ort", "deepsparse")]
    wait_while_paused()
    print(f"# {shape_text}: peers for {len(wanted_peers)} cells", flush=True)
    peer = peer_rows(shape, weights, inputs, wanted_peers, cfg)
    for t in sorted(inputs):
        run_tokens(shape_text, t, settings, weights, inputs[t], todo, peer, cfg, ours, out)


def run_tokens(shape_text: str, tokens: int, settings: list[Setting], weights: dict[str, torch.Tensor], x: torch.Tensor,
               todo: dict, peer: dict, cfg: dict, ours: Any, out: Path) -> None:
    wait_while_paused()
    dense_w = weights["dense"]
    dense_bytes = dense_w.numel() * 4
    ref = x.double() @ dense_w.double().t()
    dense = {c: measure(dense_tool(dense_w), c, x, ref, cfg, f"{shape_text} T={tokens}") for c in ("hot", "cold")}
    ort = {c: peer[(tokens, "dense", "ort", c)]["seconds"] for c in dense if (tokens, "dense", "ort", c) in peer}
    best = {c: min(dense[c]["seconds"], ort.get(c, math.inf)) for c in dense}
    base = {"shape": shape_text, "T": tokens, "threads": cfg["threads"]}
    for cache, row in dense.items():
        write(out, {**base, "setting": "dense", **row}, best, dense_bytes, cfg)
    for tool in ("ort", "deepsparse"):
        for cache in ("hot", "cold"):
            if (tokens, "dense", tool, cache) in peer:
                write(out, {**base, "setting": "dense", **peer_row(peer[(tokens, "dense", tool, cache)])}, best, dense_bytes, cfg)
    for s in settings[1:]:
        tools = todo.get((tokens, s.label), [])
        if not tools:
            continue
        wait_while_paused()
        w = weights[s.label]
        ref = x.double() @ w.double().t()
        for row in cell_rows(w, s, x, ref, tools, peer, tokens, cfg, ours):
            write(out, {**base, "setting": s.label, **row}, best, dense_bytes, cfg)


def cell_rows(w: torch.Tensor, s: Setting, x: torch.Tensor, ref: torch.Tensor, tools: list[str], peer: dict,
              tokens: int, cfg: dict, ours: Any) -> list[dict]:
    rows = []
    for name in tools:
        if name == "deepsparse":
            rows += [peer_row(peer[(tokens, s.label, name, c)]) for c in ("hot", "cold") if (tokens, s.label, name, c) in peer]
            continue
        try:
            tool = (csr_tool(w, x, cfg) if name == "torch_csr" else bsr_tool(w, s.block) if name == "torch_bsr"
                    else our_tool(ours, w, name.split(":")[1], s))
        # a format that refuses this matrix (ours: ValueError / NotImplementedError; torch's MKL: RuntimeError)
        except (NotImplementedError, ValueError, *((RuntimeError,) if name.startswith("torch") else ())) as e:
            print(f"# {name} skipped on {s.label}: {e}", flush=True)
            rows += [{"tool": name, "cache": c, "seconds": None, "skipped": str(e)[:200]} for c in ("hot", "cold")]
            continue
        rows += [measure(tool, c, x, ref, cfg, f"{tuple(w.shape)} T={tokens} {s.label}") for c in ("hot", "cold")]
    return rows


def measure(tool: Tool, cache: str, x: torch.Tensor, ref: torch.Tensor, cfg: dict, where: str) -> dict:
    count = 1 if cache == "hot" else copies_for(tool.nbytes, cfg)
    fns = [tool.make() for _ in range(count)]
    error = max(rel_error(fn(x), ref) for fn in fns)
    if error > MAX_REL_ERROR:
        raise SystemExit(f"{tool.name} on {where}: max relative error {error:.2e} > {MAX_REL_ERROR:g}")
    seconds, reps = time_cycle(fns, x, cfg)
    row = {"tool": tool.name, "cache": cache, "seconds": seconds, "reps": reps, "copies": count, "nbytes": tool.nbytes,
           "max_rel_error": error}
    return {**row, "variant": tool.variant} if tool.variant else row


def peer_row(r: dict) -> dict:
    keep = ("tool", "cache", "seconds", "reps", "copies", "max_rel_error", "build_seconds", "ort_spinning", "version")
    return {k: r[k] for k in keep if k in r}


def write(out: Path, row: dict, best: dict[str, float], dense_bytes: int, cfg: dict) -> None:
    if row.get("seconds"):
        row["best_dense_seconds"] = best[row["cache"]]
        row["speedup"] = best[row["cache"]] / row["seconds"]
    if row["T"] == 1 and row.get("nbytes"):  # a T=1 product reads every weight byte once: memory bound
        row["ideal_speedup"] = dense_bytes / row["nbytes"]
        row["bandwidth_gbs"] = cfg["bandwidth"]["read_gbs"]
        row["ideal_seconds"] = row["nbytes"] / (row["bandwidth_gbs"] * 1e9)
    row["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    # a 5-minute load average well above --threads means something else ran: the time is suspect
    row["loadavg_5min"] = os.getloadavg()[1]
    if row["tool"].startswith("ours:"):
        row["compiled"] = cfg["compiled"]
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    speed = f"{row['speedup']:.2f}x" if row.get("speedup") else row.get("skipped", "")
    print(f"{row['shape']} T={row['T']} {row['setting']} {row['tool']} {row['cache']}: "
          f"{(row['seconds'] or 0) * 1e6:.1f} us {speed}", flush=True)


def machine_row(cfg: dict, out: Path) -> None:
    import torch

    cfg["bandwidth"] = bandwidth(cfg["bandwidth_mib"])
    machine = {"kind": "machine", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": cfg["threads"], **cfg["bandwidth"],
               "torch": torch.__version__, "compiled": cfg["compiled"], "loadavg_5min": os.getloadavg()[1]}
    with out.open("a") as f:
        f.write(json.dumps(machine) + "\n")
    print(f"# bandwidth: read {machine['read_gbs']:.1f} GB/s, copy {machine['copy_gbs']:.1f} GB/s", flush=True)


def wait_while_paused() -> None:
    while PAUSE.exists():  # other work that would disturb the timings waits between cells, not during one
        time.sleep(5)


def load_ours() -> Any:
    try:
        import sparsecraft.kernels as K
    except ImportError as e:
        print(f"# ours skipped: sparsecraft.kernels cannot be imported ({e})", flush=True)
        return None
    if not K.available():
        print("# WARNING: sparsecraft.kernels has no compiled fast path here; ours rows time the fallback", flush=True)
    return K


def drive(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR|CSC|BSC) tensor support is in beta.*")
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        done = {key(r["shape"], r["T"], r["setting"], r["tool"], r["cache"], r["threads"]) for r in rows if "tool" in r}
    ours = load_ours()
    if not PEER_PYTHON.exists():
        print(f"# ONNX Runtime and DeepSparse skipped: no {PEER_PYTHON} (run benchmarks/peers/setup_deepsparse.sh)", flush=True)
    cfg = {"threads": args.threads, "target_seconds": args.target_seconds, "min_reps": args.min_reps,
           "max_reps": args.max_reps, "cold_bytes": args.cold_mib * MIB, "max_copies": args.max_copies,
           "compiled": bool(ours and ours.available())}
    cfg["bandwidth_mib"] = args.bandwidth_mib
    for shape in args.shapes.split(","):
        run_shape(shape, args, cfg, ours, done, out)


# ---------------------------------------------------------------- reporting

def latest(path: Path) -> tuple[dict[str, dict], list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cells = {key(r["shape"], r["T"], r["setting"], r["tool"], r["cache"], r["threads"]): r for r in rows if "tool" in r}
    return cells, [r for r in rows if r.get("kind") == "machine"]


def cell_text(hot: dict | None, cold: dict | None, applicable: bool = True) -> str:
    if not applicable:
        return "n/a"

    def one(r: dict | None) -> str:
        return "n/a" if r and r.get("skipped") else f"{r['speedup']:.2f}" if r and r.get("speedup") else "-"

    text = f"{one(hot)} / {one(cold)}"
    ideal = (hot or {}).get("ideal_speedup")
    return text + (f" ({ideal:.1f})" if ideal and hot["tool"] not in DENSE_TOOLS else "")


def applies(setting: str) -> list[str]:
    return expected_tools(parse_setting(setting), ours=True, peers=True, wanted_formats=None)


def table(args: argparse.Namespace) -> None:
    cells, machines = latest(Path(args.results))
    for m in machines[-1:]:
        print(f"Last run {m['date']}: {m['threads']} threads, read {m['read_gbs']:.1f} GB/s, copy {m['copy_gbs']:.1f} GB/s, "
              f"torch {m.get('torch')}, compiled kernels {m.get('compiled')}")
    versions = {r["tool"]: r["version"] for r in cells.values() if r.get("version")}
    print("Peers: " + (", ".join(f"{t} {v}" for t, v in sorted(versions.items())) or "none") + "\n")
    groups: dict[tuple, dict[tuple[str, str], dict]] = {}
    for r in cells.values():
        groups.setdefault((r["shape"], r["T"], r["setting"], r["threads"]), {})[(r["tool"], r["cache"])] = r
    tools = [t for t in TOOL_ORDER if any(t == tool for g in groups.values() for tool, _ in g)]
    print("Speedup vs the best dense (min of torch and ORT, same cache), hot / cold; (ideal) = dense bytes / format "
          "bytes at T=1; n/a: format does not apply; best dense in us.\n")
    print("| shape | T | setting | best dense hot / cold | " + " | ".join(tools) + " | load (5 min) |")
    print("|---|---:|---|---:|" + "---:|" * len(tools) + "---:|")
    order = {label: i for i, label in enumerate(["dense"] + DEFAULTS["settings"].split(","))}
    for (shape, tokens, setting, _), g in sorted(groups.items(), key=lambda kv: (*kv[0][:2], order.get(kv[0][2], 99), kv[0][2:])):
        best = [next((r["best_dense_seconds"] for (_, c), r in g.items() if c == cache and r.get("best_dense_seconds")), None)
                for cache in ("hot", "cold")]
        dense_text = " / ".join(f"{b * 1e6:.0f}" if b else "-" for b in best)
        load = max(r.get("loadavg_5min", 0) for r in g.values())
        # dense tools fill the "dense" rows only, sparse ones the others: blank where a tool has no business
        texts = ["" if t not in applies(setting) and (setting == "dense" or t in DENSE_TOOLS) else
                 cell_text(g.get((t, "hot")), g.get((t, "cold")), t in applies(setting)) for t in tools]
        print(f"| {shape} | {tokens} | {setting} | {dense_text} | " + " | ".join(texts) + f" | {load:.1f} |")
    if args.plot:
        plot(cells, Path(args.plot))


def plot(cells: dict[str, dict], path: Path) -> None:
    """Speedup vs sparsity per tool: unstructured settings as lines (hot solid, cold dashed),
    structured ones as markers of their own (filled hot, hollow cold), one panel per shape and T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in cells.values() if r.get("speedup") and r["setting"] != "dense" and r["T"] in (1, 256)]
    if not rows:
        print(f"nothing to plot at T=1 or T=256; no {path}")
        return
    shapes = sorted({r["shape"] for r in rows})
    structured = sorted({r["setting"] for r in rows if parse_setting(r["setting"]).kind != "unstructured"})
    markers = dict(zip(structured, "s^v<>Dph*"))
    colours = {t: f"C{i}" for i, t in enumerate(TOOL_ORDER)}
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.5 * len(shapes) + 2.5, 8), squeeze=False, sharey=True)
    for col, shape in enumerate(shapes):
        for row_i, tokens in enumerate((1, 256)):
            ax = axes[row_i][col]
            picked = [r for r in rows if r["shape"] == shape and r["T"] == tokens]
            for tool in TOOL_ORDER:
                for cache, style in (("hot", "-"), ("cold", "--")):
                    mine = [r for r in picked if r["tool"] == tool and r["cache"] == cache]
                    line = sorted((float(r["setting"]), r["speedup"]) for r in mine if r["setting"] not in markers)
                    if line:
                        ax.plot(*zip(*line), style, marker=".", color=colours[tool])
                    for r in (r for r in mine if r["setting"] in markers):
                        # structured settings share a sparsity: a small offset each keeps them apart
                        x = parse_setting(r["setting"]).sparsity + 0.004 * structured.index(r["setting"])
                        ax.scatter(x, r["speedup"], marker=markers[r["setting"]], edgecolors=colours[tool],
                                   facecolors=colours[tool] if cache == "hot" else "none")
            ax.axhline(1, color="grey", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlim(0.45, 1.0)
            ax.set_title(f"{shape}, T={tokens}")
            ax.set_xlabel("sparsity")
            ax.set_ylabel("speedup vs best dense")
    handles = [Line2D([], [], color=colours[t], label=t) for t in TOOL_ORDER if any(r["tool"] == t for r in rows)]
    handles += [Line2D([], [], color="k", ls=ls, label=label) for ls, label in (("-", "hot (filled)"), ("--", "cold (hollow)"))]
    handles += [Line2D([], [], color="k", ls="", marker=m, label=s) for s, m in markers.items()]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help=f"out x in, comma separated (default {DEFAULTS['shapes']})")
    p.add_argument("--tokens", help=f"T values (default {DEFAULTS['tokens']})")
    p.add_argument("--settings", help=f"sparsity, N:M or BHxBW@sparsity (default {DEFAULTS['settings']})")
    p.add_argument("--formats", help="only these of our formats (default: every one that applies)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--target-seconds", type=float, default=0.3, help="time spent on the repetitions of one measurement")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=20000)
    p.add_argument("--cold-mib", type=int, default=64, help="bytes of weight copies a cold cycle exceeds (2x L3)")
    p.add_argument("--max-copies", type=int, default=256, help="cap on the copies of one cold cycle")
    p.add_argument("--bandwidth-mib", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="tiny grid, few reps, own results file (smoke test)")
    p.add_argument("--results")
    p.add_argument("--table", action="store_true")
    p.add_argument("--plot", help="with --table: write a PNG of speedup vs sparsity at T=1 and T=256")
    args = p.parse_args()
    grid = QUICK if args.quick else DEFAULTS
    args.shapes, args.settings = args.shapes or grid["shapes"], args.settings or grid["settings"]
    args.tokens = [int(t) for t in (args.tokens or grid["tokens"]).split(",")]
    args.formats = args.formats.split(",") if args.formats else None
    if args.quick:
        # a smoke test: the cold cycles stay in cache, so its timings mean nothing
        args.target_seconds, args.min_reps, args.bandwidth_mib = min(args.target_seconds, 0.02), 3, 128
        args.cold_mib, args.max_copies = 4, 4
    name = "sparse_kernels_quick.jsonl" if args.quick else "sparse_kernels.jsonl"
    args.results = args.results or str(HERE / "results" / name)
    if args.table:
        table(args)
        return
    # Our C kernels and the BLAS under torch read OMP_NUM_THREADS when they start their pools.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    drive(args)


if __name__ == "__main__":
    main()
