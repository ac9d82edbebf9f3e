"""SAEs on SmolLM2-135M's residual stream: TopK, BatchTopK, Feature Choice, Mutual Choice (ours) and
the peers' TopK / BatchTopK (sae-lens, EleutherAI sparsify) on the same cached activations.

Stage ``cache``: run the model over ../shared/data/wikitext2-test.txt in windows of ``--seqlen``
(first position dropped), store the activations at ``--hook`` of all but the last ``--eval-windows``
windows as safetensors shards (about 200k tokens), once. Stage ``train``: every (tool, kind) trains
in a fresh process on that cache with the same expansion, k (= average L0), batch size, learning
rate and token budget, and saves W_enc / b_enc / W_dec / b_dec (/ threshold); then one evaluation
process scores every SAE with the same code: FVU and L0 on the held-out windows, dead and rare
latents over the whole cache (eval mode), and loss recovered on the held-out windows (the SAE
spliced into the model vs zero-ablation). Rows go to a JSONL file; a re-run skips what is there.

    python benchmarks/sae_bench.py --stage cache
    python benchmarks/sae_bench.py --stage train                   # ours; + peers whose venv exists
    python benchmarks/sae_bench.py --table

Peers: benchmarks/peers/setup_saelens.sh, setup_sparsify.sh make their virtual environments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from smollm2 import load_smollm2  # benchmarks/smollm2.py, beside this script

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
RESULTS = HERE / "results" / "sae_bench.jsonl"
WORK = HERE / "results" / "sae_work"  # cache and weights (gitignored)
PEERS = {"saelens": HERE / ".venvs" / "saelens" / "bin" / "python", "sparsify": HERE / ".venvs" / "sparsify" / "bin" / "python"}
OURS = ("topk", "batchtopk", "feature_choice", "mutual_choice")
PEER_KINDS = ("topk", "batchtopk")


def load_model(args):
    return load_smollm2(args.model)


def windows_of(args, tokenizer):
    from sparsecraft.data.text import eval_windows, read_text, tokenize

    windows = eval_windows(tokenize(tokenizer, read_text(args.text)), args.seqlen)
    return windows[:-args.eval_windows], windows[-args.eval_windows:]


def stage_cache(args) -> None:
    import torch

    from sparsecraft.methods.sae.activations import Harvest, harvest, write_cache

    torch.set_num_threads(args.threads)
    model, tokenizer, path = load_model(args)
    train, _ = windows_of(args, tokenizer)
    train = train[: -(-args.cache_tokens // (args.seqlen - 1))]
    started = time.perf_counter()
    stats: dict = {}
    spec = Harvest(args.hook, batch_size=8, outlier_factor=args.outlier_factor)
    meta = write_cache(harvest(model, train, spec, stats), WORK / "cache",
                       {"model": path, "hook": args.hook, "seqlen": args.seqlen, "d_in": model.config.hidden_size,
                        "outlier_factor": args.outlier_factor, "n_tokens": len(train) * (args.seqlen - 1)})
    print(f"cached {meta['n_tokens']:,} tokens ({stats['dropped']} outlier tokens dropped) "
          f"in {time.perf_counter() - started:.0f} s")


def worker_ours(args) -> None:
    """Train one of our kinds on the cache (fresh process: its time and memory are its own)."""
    import torch
    from safetensors.torch import save_file

    from sparsecraft.methods.sae import SAEConfig, SparseAutoencoder, TrainConfig, train_sae
    from sparsecraft.methods.sae.activations import ShuffleBuffer, read_cache, read_cache_meta, repeat

    torch.set_num_threads(args.threads)
    meta = read_cache_meta(WORK / "cache")
    d_in = meta["d_in"]
    sae = SparseAutoencoder(SAEConfig(kind=args.kind, d_in=d_in, d_sae=d_in * args.expansion, k=args.k, hook=args.hook,
                                      outlier_factor=args.outlier_factor))
    batches = ShuffleBuffer(repeat(lambda: read_cache(WORK / "cache", verify=False), args.tokens), 262_144,
                            args.batch_size, seed=args.seed)
    result = train_sae(sae, batches, TrainConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, seed=args.seed))
    tensors = {name: t.detach().contiguous() for name, t in sae.state_dict().items()}
    save_file(tensors, args.out)
    Path(args.json).write_text(json.dumps({"tool": "sparsecraft", "kind": args.kind, "train_seconds": result.seconds,
                                           "tokens": result.tokens, "lr": result.lr, "final_fvu": result.history[-1]["fvu"]}))


def worker_eval(args) -> None:
    """Score every saved SAE with the same code (see the module docstring)."""
    import torch
    from safetensors.torch import load_file

    from sparsecraft.methods.sae import SAEConfig, SparseAutoencoder, metrics
    from sparsecraft.methods.sae.activations import read_cache

    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args)
    _, held_out = windows_of(args, tokenizer)
    pending = json.loads(Path(args.pending).read_text())
    for job in pending:
        state = load_file(job["weights"])
        d_in, d_sae = state["W_enc"].shape
        # peers' TopK ran as TopK at inference; BatchTopK as JumpReLU with their threshold (ours: the same rule)
        kind = job["kind"] if job["tool"] == "sparsecraft" else ("batchtopk" if "threshold" in state else "topk")
        sae = SparseAutoencoder(SAEConfig(kind=kind, d_in=d_in, d_sae=d_sae, k=args.k, hook=args.hook,
                                          outlier_factor=args.outlier_factor))
        if "threshold" in state:
            state["threshold"] = state["threshold"].reshape(-1).expand(d_sae).clone()
        else:
            state["threshold"] = torch.zeros(d_sae)
        sae.load_state_dict(state)
        sae.eval()
        stats: dict = {}
        recon = metrics.reconstruction(sae, metrics.activations_for(model, sae, held_out, stats))
        density = metrics.reconstruction(sae, read_cache(WORK / "cache", verify=False))
        loss = metrics.loss_recovered(model, sae, held_out)
        row = {**job["train"], "tool": job["tool"], "kind": job["kind"], "expansion": args.expansion, "k": args.k,
               "batch_size": args.batch_size, "hook": args.hook, "fvu": recon.fvu, "l0_mean": recon.l0_mean,
               "l0_std": recon.l0_std, "l0_p10": recon.l0_p10, "l0_p90": recon.l0_p90,
               "dead_fraction": density.dead_fraction, "rare_fraction": density.rare_fraction,
               "density_tokens": density.tokens, "eval_tokens": recon.tokens, "outlier_factor": args.outlier_factor,
               "eval_outliers_dropped": stats["dropped"], **loss.summary(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "eval_loadavg_5min": os.getloadavg()[1], "threads": args.threads}
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def our_lr(args) -> float:
    from sparsecraft.methods.sae.activations import read_cache_meta
    from sparsecraft.methods.sae.train import default_lr

    return args.lr or default_lr(read_cache_meta(WORK / "cache")["d_in"] * args.expansion)


def key(tool: str, kind: str, args) -> str:
    lr = f"{our_lr(args):.4g}" if tool == "sparsecraft" else "peer"  # peers always run at their own default
    return f"{tool}|{kind}|x{args.expansion}|k{args.k}|{args.tokens}|{args.hook}|seed{args.seed}|lr{lr}"


def stage_train(args) -> None:
    done = set()
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            r = json.loads(line)
            if r.get("outlier_factor") == args.outlier_factor:
                lr = f"{r['lr']:.4g}" if r["tool"] == "sparsecraft" else "peer"
                done.add(f"{r['tool']}|{r['kind']}|x{r['expansion']}|k{r['k']}|{r['tokens']}|{r['hook']}|seed{r.get('seed', 0)}"
                         f"|lr{lr}")
    jobs = [("sparsecraft", kind) for kind in args.kinds.split(",") if kind in OURS]
    jobs += [(peer, kind) for peer, python in PEERS.items() if python.exists() and peer in args.peers.split(",")
             for kind in PEER_KINDS]
    pending = []
    common = ["--expansion", str(args.expansion), "--k", str(args.k), "--batch-size", str(args.batch_size),
              "--tokens", str(args.tokens), "--seed", str(args.seed), "--threads", str(args.threads)]
    for tool, kind in jobs:
        if key(tool, kind, args) in done:
            continue
        tag = f"-lr{our_lr(args):.4g}" if tool == "sparsecraft" else ""
        weights, info = WORK / f"{tool}-{kind}{tag}.safetensors", WORK / f"{tool}-{kind}{tag}.json"
        if tool == "sparsecraft":
            cmd = [sys.executable, __file__, "--worker", "ours", "--kind", kind, "--hook", args.hook,
                   "--outlier-factor", str(args.outlier_factor)]
            cmd += ["--lr", str(our_lr(args))]
        else:  # each peer with its own default optimiser and learning rate
            cmd = [str(PEERS[tool]), str(HERE / "peers" / "sae_peer_train.py"), "--peer", tool, "--kind", kind,
                   "--cache", str(WORK / "cache")]
            if tool == "saelens":  # sae-lens v6 never sets b_dec from data: give it sparsify's (and our) data init
                cmd += ["--b-dec-init", "mean"]
        print(f"training {tool} {kind} ...", flush=True)
        proc = subprocess.run(cmd + common + ["--out", str(weights), "--json", str(info)])
        if proc.returncode != 0:
            print(f"{tool} {kind} failed (exit {proc.returncode}); skipped", flush=True)
            continue
        # the 5-minute load when the training ended: well above --threads means the time is disturbed
        train = json.loads(info.read_text()) | {"tokens": args.tokens, "seed": args.seed,
                                                "train_loadavg_5min": os.getloadavg()[1]}
        pending.append({"tool": tool, "kind": kind, "weights": str(weights), "train": train})
    if pending:
        (WORK / "pending.json").write_text(json.dumps(pending))
        subprocess.run([sys.executable, __file__, "--worker", "eval", "--pending", str(WORK / "pending.json"), "--hook", args.hook,
                        "--expansion", str(args.expansion), "--k", str(args.k), "--batch-size", str(args.batch_size),
                        "--threads", str(args.threads), "--outlier-factor", str(args.outlier_factor)], check=True)


def table(args) -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    print("| tool | kind | x | k | train tokens | FVU | L0 mean (p10-p90) | dead | rare | loss recovered | CE clean / SAE / zero | train s | load (train) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lr = f" lr {r['lr']:.2g}" if r["tool"] == "sparsecraft" else ""
        load = f"{r['train_loadavg_5min']:.1f}" if "train_loadavg_5min" in r else "-"
        print(f"| {r['tool']}{lr} | {r['kind']} | {r['expansion']} | {r['k']} | {r['tokens']:,} | {r['fvu']:.4f} | "
              f"{r['l0_mean']:.1f} ({r['l0_p10']:.0f}-{r['l0_p90']:.0f}) | {r['dead_fraction']:.1%} | {r['rare_fraction']:.1%} | "
              f"{r['loss_recovered']:.3f} | {r['ce_clean']:.3f} / {r['ce_sae']:.3f} / {r['ce_zero']:.2f} | "
              f"{r['train_seconds']:.0f} | {load} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["cache", "train"])
    p.add_argument("--worker", choices=["ours", "eval"])
    p.add_argument("--table", action="store_true")
    p.add_argument("--model")
    p.add_argument("--text", default=str(SHARED / "wikitext2-test.txt"))
    p.add_argument("--hook", default="blocks.15.resid_post")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--cache-tokens", type=int, default=200_000)
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="drop tokens with norm > F x median (massive activations), from training and scoring")
    p.add_argument("--kinds", default=",".join(OURS))
    p.add_argument("--peers", default="saelens,sparsify")
    p.add_argument("--kind")
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="ours (default: 2e-3 / sqrt(d_sae / 2^14)); peers use their own")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=819_200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out")
    p.add_argument("--json")
    p.add_argument("--pending")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.worker == "ours":
        worker_ours(args)
    elif args.worker == "eval":
        worker_eval(args)
    elif args.stage == "cache":
        stage_cache(args)
    elif args.stage == "train":
        stage_train(args)
    elif args.table:
        table(args)
    else:
        p.print_help()


if __name__ == "__main__":
    main()
