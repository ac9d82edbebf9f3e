"""``sparsecraft accelerate``: swap a saved pruned model's sparse layers for the CPU kernels, report, save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from sparsecraft.cli.common import console, fail, split_list
from sparsecraft.errors import SparsecraftError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def accelerate_command(
    model: Annotated[str, typer.Argument(help="pruned Hugging Face model folder (e.g. written by `sparsecraft prune --out`)")],
    tokens: Annotated[int, typer.Option(help="tokens per forward the layers are tuned for (1 = one-token decoding)")] = 1,
    formats: Annotated[Optional[list[str]], typer.Option(help="formats to try (default: csr16, bitmask, nm, and panels from 8 tokens)")] = None,
    values: Annotated[str, typer.Option(help="value storage: float32, or float16/bfloat16 (rounds the weights)")] = "float32",
    min_speedup: Annotated[float, typer.Option(help="swap a layer only when its sparse product is at least this much faster")] = 1.1,
    retime: Annotated[bool, typer.Option(help="ignore the timing cache of this machine")] = False,
    out: Annotated[Optional[Path], typer.Option(help="write a sparse checkpoint (load it with sparsecraft.kernels.load_sparse)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Time each pruned layer dense vs sparse on this machine; swap the ones that are faster; print the speedups."""
    from sparsecraft.kernels import accelerate, available, save_sparse
    from sparsecraft.kernels.speed import forward_seconds
    from sparsecraft.models.hf import load_causal_lm

    if values not in DTYPES:
        fail(f"--values {values!r}: choose one of {', '.join(DTYPES)}")
    if tokens < 1:
        fail(f"--tokens {tokens}: give the tokens per forward pass, 1 for decoding")
    try:
        lm, tokenizer = load_causal_lm(model, need_tokenizer=False)
        lm.eval()
        ids = torch.randint(0, lm.config.vocab_size, (1, tokens))
        dense_s = forward_seconds(lm, ids)
        report = accelerate(lm, tokens=tokens, formats=split_list(formats) or None, dtype=DTYPES[values],
                            min_speedup=min_speedup, use_cache=not retime, progress=not json_out)
        sparse_s = forward_seconds(lm, ids)
        if out is not None:
            save_sparse(lm, out, tokenizer)
    except SparsecraftError as e:
        fail(str(e))
    summary = {"model": model, "tokens": tokens, "kernels": available(), "swapped": len(report.swapped),
               "layers": len(report.layers), "forward_dense_s": dense_s, "forward_sparse_s": sparse_s,
               "forward_speedup": dense_s / sparse_s, "out": str(out) if out else None}
    if json_out:
        typer.echo(json.dumps(summary | {"decisions": report.to_dict()["layers"]}, indent=2))
        return
    console.print(report.table())
    console.print(f"swapped {len(report.swapped)} of {len(report.layers)} layers; whole forward at T={tokens}: "
                  f"dense {dense_s * 1e3:.2f} ms, accelerated {sparse_s * 1e3:.2f} ms ({dense_s / sparse_s:.2f}x)")
    if out:
        console.print(f"sparse checkpoint written to {out}")
