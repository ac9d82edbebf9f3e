"""Time y = x @ W^T in ONNX Runtime and DeepSparse (run with benchmarks/.venvs/deepsparse/bin/python).

DIR holds the weights (.npy, dense (out, in) float32 with zeros where pruned), optional inputs
(.npy, (T, in) float32) and cases.json:

    {"target_seconds": 0.3, "min_reps": 5, "max_reps": 20000,
     "cases": [{"id": "...", "weight": "w.npy", "x": "x.npy", "shape": [out, in], "setting": "0.9", "T": 8,
                "reps": 0, "tools": ["ort", "deepsparse"], "cold_copies": {"ort": 2, "deepsparse": 12}}]}

Each case gets one ONNX graph (MatMul with the transposed weight as initializer, input (T, in)).
``reps`` 0 means adaptive: enough repetitions of one forward for ``target_seconds``, at least
``min_reps``. "hot" runs one engine again and again; "cold" builds ``cold_copies[tool]`` engines,
each holding its own copy of the weight, and runs one forward on each in turn, so the weights come
from memory rather than cache (the caller picks the count so the copies exceed the last-level cache).
ORT runs through I/O binding (buffers bound once) with idle workers sleeping (--ort-spinning to
let them spin), DeepSparse with its input check off: per-call overheads a deployment avoids.
Every output is checked against a float64 x @ W^T; an error above 1e-3 (max |y - ref| / max |ref|)
stops the run. Results: one JSON line per measurement on stdout, all of them in --out.

    python onnx_linear.py DIR --threads 2 [--out DIR/results.json] [--tools ort,deepsparse]
    python onnx_linear.py --serve --threads 2      # engines on request, JSON lines on stdin (see serve)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse would otherwise try to phone home

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MAX_REL_ERROR = 1e-3
Forward = Callable[[], np.ndarray]  # one forward on the input the engine was built for


def linear_model(weight: np.ndarray, tokens: int) -> onnx.ModelProto:
    """y = x @ W^T as one MatMul; static shapes, as DeepSparse compiles for one input shape."""
    out_features, in_features = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight_t"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, out_features])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "weight_t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def ort_engine(path: Path, x: np.ndarray, threads: int, spinning: bool = False) -> Forward:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Each session has its own pool, and idle pools that spin steal the cores of the session that
    # runs (cold cycles through many); so by default workers sleep when idle, in hot runs too.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    # Input and output bound to numpy buffers: session.run's dict and output allocation cost ~10 us a call.
    y = np.empty(session.get_outputs()[0].shape, np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)

    def forward() -> np.ndarray:
        session.run_with_iobinding(binding)
        return y

    return forward


def deepsparse_engine(path: Path, x: np.ndarray, threads: int) -> Forward:
    import deepsparse

    engine = deepsparse.Engine(str(path), batch_size=x.shape[0], num_cores=threads)  # batch_size: the first dim
    return lambda: engine.run([x], val_inp=False)[0]  # shape and dtype are right: skip the check (~3 us)


Factory = Callable[[Path, np.ndarray], Forward]


def engine_factories(threads: int, ort_spinning: bool) -> dict[str, Factory]:
    return {"ort": lambda path, x: ort_engine(path, x, threads, ort_spinning),
            "deepsparse": lambda path, x: deepsparse_engine(path, x, threads)}


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def time_cycle(engines: list[Forward], reps: int, target: float, min_reps: int, max_reps: int) -> tuple[float, int]:
    """Median seconds of one forward, engine i % K at step i; two full cycles first as warm-up."""
    warm = engines * max(1, math.ceil(3 / len(engines)))
    for run in warm:  # first calls allocate, fault pages in, build plans: not timed
        run()
    start = time.perf_counter()
    for run in warm:
        run()
    per_call = (time.perf_counter() - start) / len(warm)
    if not reps:
        reps = min(max_reps, max(min_reps, len(engines), math.ceil(target / max(per_call, 1e-7))))
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        engines[i % len(engines)]()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), reps


def load_case(case: dict, root: Path) -> tuple[np.ndarray, np.ndarray]:
    weight = np.load(root / case["weight"]).astype(np.float32, copy=False)
    if case.get("x"):
        return weight, np.load(root / case["x"]).astype(np.float32, copy=False)
    return weight, np.random.default_rng(0).standard_normal((int(case["T"]), weight.shape[1]), dtype=np.float32)


def measure(make: Callable[[], Forward], count: int, ref: np.ndarray, reps: int, cfg: dict) -> dict:
    """Builds ``count`` engines, checks each output, times the cycle through them."""
    t0 = time.perf_counter()
    engines = [make() for _ in range(count)]
    build = (time.perf_counter() - t0) / count
    error = max(rel_error(run(), ref) for run in engines)
    if error > MAX_REL_ERROR:
        raise SystemExit(f"max relative error {error:.2e} > {MAX_REL_ERROR:g}")
    seconds, reps = time_cycle(engines, reps, cfg["target_seconds"], cfg["min_reps"], cfg["max_reps"])
    return {"seconds": seconds, "reps": reps, "copies": count, "max_rel_error": error, "build_seconds": build}


def run_case(case: dict, root: Path, work: Path, factories: dict[str, Factory], cfg: dict) -> list[dict]:
    weight, x = load_case(case, root)
    ref = x.astype(np.float64) @ weight.T.astype(np.float64)
    path = work / f"{case['id']}.onnx"
    onnx.save(linear_model(weight, x.shape[0]), str(path))
    rows = []
    for tool in [t for t in case.get("tools", list(factories)) if t in factories]:
        for cache, count in (("hot", 1), ("cold", int(case.get("cold_copies", {}).get(tool, 2)))):
            print(f"# {tool} {cache} x{count}: {case['id']}", file=sys.stderr, flush=True)
            row = {"id": case["id"], "shape": case.get("shape", list(weight.shape)), "setting": case.get("setting"),
                   "T": x.shape[0], "tool": tool, "cache": cache, "threads": cfg["threads"],
                   **measure(lambda: factories[tool](path, x), count, ref, int(case.get("reps", 0)), cfg)}
            if tool == "ort":
                row["ort_spinning"] = cfg["ort_spinning"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    path.unlink()
    return rows


def serve(factories: dict[str, Factory], threads: int, work: Path) -> None:
    """--serve: engines built once, timed on request, so that a caller can interleave them with its
    own tools round by round (benchmarks/peer_ab.py). One JSON request per stdin line, one reply per
    stdout line:

        {"cmd": "build", "id": "...", "tool": "deepsparse", "weight": "/abs/w.npy", "x": "/abs/x.npy", "copies": 12}
            -> {"id": ..., "build_seconds": ..., "max_rel_error": ...}
        {"cmd": "time", "id": "...", "reps": 200}  -> {"id": ..., "seconds": median of reps calls (cycling the copies)}
        {"cmd": "drop", "id": "..."} -> {"id": ...} (the engines are freed)
        {"cmd": "versions"} -> versions(); {"cmd": "quit"}
    """
    engines: dict[str, list[Forward]] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            return
        if req["cmd"] == "versions":
            reply = versions()
        elif req["cmd"] == "drop":
            engines.pop(req["id"], None)
            reply = {"id": req["id"]}
        elif req["cmd"] == "build":
            weight = np.load(req["weight"]).astype(np.float32, copy=False)
            x = np.load(req["x"]).astype(np.float32, copy=False)
            path = work / f"{req['id']}.onnx"
            onnx.save(linear_model(weight, x.shape[0]), str(path))
            t0 = time.perf_counter()
            runs = [factories[req["tool"]](path, x) for _ in range(int(req["copies"]))]
            build = (time.perf_counter() - t0) / len(runs)
            ref = x.astype(np.float64) @ weight.T.astype(np.float64)
            error = max(rel_error(run(), ref) for run in runs)
            if error > MAX_REL_ERROR:
                raise SystemExit(f"{req['id']}: max relative error {error:.2e} > {MAX_REL_ERROR:g}")
            for run in runs * 2:  # warm-up: first calls fault pages in
                run()
            engines[req["id"]] = runs
            reply = {"id": req["id"], "build_seconds": build, "max_rel_error": error}
        else:
            runs = engines[req["id"]]
            times = []
            for i in range(int(req["reps"])):
                t0 = time.perf_counter()
                runs[i % len(runs)]()
                times.append(time.perf_counter() - t0)
            reply = {"id": req["id"], "seconds": statistics.median(times)}
        print(json.dumps(reply), flush=True)


def versions() -> dict:
    import onnxruntime

    out = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import deepsparse

        out["deepsparse"] = deepsparse.__version__
    except ImportError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", help="cases to time (not with --serve)")
    p.add_argument("--serve", action="store_true", help="build and time engines on request (see serve)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tools", default="ort,deepsparse")
    p.add_argument("--out")
    p.add_argument("--ort-spinning", action="store_true", help="let idle ORT workers spin (off: they sleep)")
    args = p.parse_args()
    if args.serve:
        with tempfile.TemporaryDirectory(prefix="onnx-linear-") as work:
            serve(engine_factories(args.threads, args.ort_spinning), args.threads, Path(work))
        return
    if not args.dir:
        p.error("give the cases' DIR, or --serve")
    root = Path(args.dir)
    spec = json.loads((root / "cases.json").read_text())
    cfg = {"target_seconds": spec.get("target_seconds", 0.3), "min_reps": spec.get("min_reps", 5),
           "max_reps": spec.get("max_reps", 20000), "ort_spinning": args.ort_spinning, "threads": args.threads}
    factories = engine_factories(args.threads, args.ort_spinning)
    tools = args.tools.split(",")
    if set(tools) - set(factories):
        sys.exit(f"unknown tools {sorted(set(tools) - set(factories))}; known: {sorted(factories)}")
    factories = {t: factories[t] for t in tools}
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx-linear-") as work:
        for case in spec["cases"]:
            rows += run_case(case, root, Path(work), factories, cfg)
    out = Path(args.out) if args.out else root / "results.json"
    out.write_text(json.dumps({"versions": versions(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
