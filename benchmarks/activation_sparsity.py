"""Training-free activation sparsity on SmolLM2-135M: perplexity and one-token decode speed.

Stage ``ppl``: for each method (threshold = TEAL, CHESS, WINA) and activation sparsity, calibrate
on tinyshakespeare, measure the dropped fraction per layer on the calibration windows, and the
perplexity on wikitext2-test with every position sparsified; each plan (thresholds only) is kept
under ``--work`` for the next stage. Stage ``speed``: greedy decoding at batch 1 (KV cache, the
prompt's prefill subtracted), the dense model and each activation-sparse one alternated in one
process, median of ``--rounds``; plus a control: our column-skipping kernel keeping every input
(how much of the gain is the kernel rather than the sparsity). Timing needs a quiet machine
(the row records the load average).

    python benchmarks/activation_sparsity.py --stage ppl
    python benchmarks/activation_sparsity.py --stage speed
    python benchmarks/activation_sparsity.py --table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

from smollm2 import load_smollm2  # benchmarks/smollm2.py, beside this script

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def load(args):
    model, tokenizer, _ = load_smollm2(args.model)
    return model, tokenizer


def append(path: Path, row: dict) -> None:
    row["loadavg_1min"] = os.getloadavg()[0]
    row["date"] = time.strftime("%Y-%m-%d %H:%M")
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def stage_ppl(args, results: Path, work: Path) -> None:
    import torch

    from sparsecraft.analysis.perplexity import perplexity
    from sparsecraft.data.text import calibration_samples, eval_windows, read_text, tokenize
    from sparsecraft.methods.activation.calibrate import measured_sparsity, sparsify_activations
    from sparsecraft.methods.activation.io import write_plan
    from sparsecraft.methods.activation.modules import sparsify_everywhere

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    calib = calibration_samples(tokenize(tokenizer, read_text(args.calib)), args.nsamples, args.seqlen, 0)
    evaluation = eval_windows(tokenize(tokenizer, read_text(args.eval)), args.seqlen, args.eval_windows)
    common = {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows}
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["method"], r["sparsity"]) for r in rows if r["stage"] == "ppl" and all(r.get(k) == v for k, v in common.items())}
    if ("dense", 0.0) not in done:
        append(results, {"stage": "ppl", "method": "dense", "sparsity": 0.0, "ppl": perplexity(model, evaluation, 1), **common})
    for sparsity in [float(s) for s in args.sparsities.split(",")]:  # resumable: settings already measured are skipped
        for method in args.methods.split(","):
            if (method, sparsity) in done:
                continue
            sparse = copy.deepcopy(model)
            start = time.perf_counter()
            plan = sparsify_activations(sparse, calib, method, sparsity, progress=False)
            seconds = time.perf_counter() - start
            dropped = measured_sparsity(sparse, calib[:4])
            with sparsify_everywhere(sparse):
                ppl = perplexity(sparse, evaluation, 1)
            folder = work / f"{method}-{sparsity}"
            folder.mkdir(parents=True, exist_ok=True)
            write_plan(plan, folder)
            append(results, {"stage": "ppl", "method": method, "sparsity": sparsity, "ppl": ppl,
                             "measured_sparsity": statistics.fmean(dropped.values()), "calibrate_seconds": seconds,
                             "plan": str(folder), **common})
            del sparse


def stage_speed(args, results: Path, work: Path) -> None:
    import torch

    from sparsecraft.data.text import read_text, tokenize
    from sparsecraft.kernels.speed import decode_tokens_per_second
    from sparsecraft.methods.activation.calibrate import ActivationSparsityPlan, Rule, apply_rules, _targets
    from sparsecraft.methods.activation.io import read_plan

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    prompt = tokenize(tokenizer, read_text(args.eval))[:32].unsqueeze(0)
    variants = {}
    control = copy.deepcopy(model)  # every input kept: our kernel, no sparsity
    apply_rules(control, ActivationSparsityPlan("threshold", 0.0, "decode",
                                                [Rule(n, "linear", tau=torch.tensor(-1.0)) for n in _targets(control, None, None)]))
    variants["kernel, 0% (control)"] = control
    for folder in sorted(work.iterdir()):
        if not (folder / "activation_sparsity.json").is_file():
            continue
        plan = read_plan(folder)
        if args.methods and plan.method not in args.methods.split(","):
            continue
        if args.sparsities and plan.sparsity not in [float(s) for s in args.sparsities.split(",")]:
            continue
        sparse = copy.deepcopy(model)
        apply_rules(sparse, plan)
        variants[f"{plan.method} {plan.sparsity}"] = sparse
    rates: dict[str, list[float]] = {"dense": [], **{k: [] for k in variants}}
    for _ in range(args.rounds):  # interleaved, so drifts of the machine hit every variant alike
        rates["dense"].append(decode_tokens_per_second(model, prompt, args.new_tokens, reps=1))
        for name, m in variants.items():
            rates[name].append(decode_tokens_per_second(m, prompt, args.new_tokens, reps=1))
    dense = statistics.median(rates["dense"])
    for name, values in rates.items():
        append(results, {"stage": "speed", "variant": name, "decode_tok_s": statistics.median(values),
                         "speedup": statistics.median(values) / dense, "rounds": args.rounds, "new_tokens": args.new_tokens,
                         "threads": args.threads})


def table(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    ppl = [r for r in rows if r["stage"] == "ppl"]
    print("| method | target | measured | ppl |\n|---|---:|---:|---:|")
    for r in ppl:
        print(f"| {r['method']} | {r['sparsity']:.0%} | {r.get('measured_sparsity', 0):.1%} | {r['ppl']:.2f} |")
    print("\n| variant | decode tok/s | vs dense |\n|---|---:|---:|")
    for r in [r for r in rows if r["stage"] == "speed"]:
        print(f"| {r['variant']} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["ppl", "speed"], default="ppl")
    p.add_argument("--model")
    p.add_argument("--calib", default=str(SHARED / "tinyshakespeare.txt"))
    p.add_argument("--eval", default=str(SHARED / "wikitext2-test.txt"))
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--methods", default="threshold,chess,wina")
    p.add_argument("--sparsities", default="0.5,0.25,0.4,0.6,0.7")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work", default=str(HERE / "results" / "activation_plans"))
    p.add_argument("--results", default=str(HERE / "results" / "activation_sparsity.jsonl"))
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    results, work = Path(args.results), Path(args.work)
    if args.table:
        return table(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    (stage_ppl if args.stage == "ppl" else stage_speed)(args, results, work)


if __name__ == "__main__":
    main()
