"""``sparsecraft activations``: per-layer activation sparsity of a language model on a text, and
optionally its PPL-p% sparsity (Luo et al. 2024)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sparsecraft.cli.common import console, fail, split_list
from sparsecraft.errors import SparsecraftError


def _taus(values: list[str] | None) -> tuple[float, ...] | None:
    if not values:
        return None
    try:
        taus = tuple(float(v) for v in split_list(values))
    except ValueError:
        fail(f"--tau {' '.join(values)}: give numbers, e.g. --tau 0.01 or --tau 0.001,0.01,0.1")
    bad = [t for t in taus if not t > 0]
    if bad:
        fail(f"--tau: every threshold must be > 0 (|a| < tau counts as near zero), got {', '.join(f'{t:g}' for t in bad)}")
    return taus


def _windows(tokenizer, path: Path, option: str, seqlen: int, windows: int):  # type: ignore[no-untyped-def]
    from sparsecraft.data.text import eval_windows, read_text, tokenize

    ids = tokenize(tokenizer, read_text(path, option))
    if ids.numel() < seqlen:
        fail(f"{option} {path}: the text has {ids.numel()} tokens, too short for one window of --seqlen {seqlen}; "
             "give a longer text or a smaller --seqlen")
    return eval_windows(ids, seqlen, windows, option)


def activations_command(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder, .gguf file or hub id")],
    text: Annotated[Path, typer.Option(help="text file to run the model on")],
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 256,
    windows: Annotated[int, typer.Option(help="number of consecutive windows of the text to use")] = 8,
    tau: Annotated[Optional[list[str]], typer.Option(help="near-zero thresholds: |a| < tau (repeat or comma list; default 0.001,0.01,0.1)")] = None,
    modules: Annotated[Optional[list[str]], typer.Option(help="measure only modules matching these globs (full or last name)")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="write a per-layer plot here (PNG)")] = None,
    ppl_p: Annotated[Optional[float], typer.Option("--ppl-p", help="also find the PPL-p% sparsity for this p (percent perplexity increase; about 10 perplexity runs)")] = None,
    eval_text: Annotated[Optional[Path], typer.Option("--eval", help="text for the --ppl-p perplexity (default: --text)")] = None,
    calib_tokens: Annotated[int, typer.Option(help="--ppl-p: calibration tokens kept per layer")] = 512,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Exact zeros and |a| < tau of every MLP hidden activation and every Linear input, per layer,
    per token and over the model; with --ppl-p, the highest MLP activation sparsity within p% of
    the dense perplexity (CETT thresholds, "Sparsing Law", Luo et al. 2024)."""
    from sparsecraft.analysis.activations import DEFAULT_TAUS, measure_activations, plot_activation_sparsity
    from sparsecraft.analysis.ppl_sparsity import ppl_p_sparsity
    from sparsecraft.models.hf import load_causal_lm

    taus = _taus(tau) or DEFAULT_TAUS
    if seqlen < 2:
        fail(f"--seqlen {seqlen}: give at least 2 tokens per window")
    if windows < 1:
        fail(f"--windows {windows}: give at least 1 window")
    if ppl_p is not None and not ppl_p > 0:
        fail(f"--ppl-p {ppl_p}: give the allowed perplexity increase in percent, > 0 (1 = 1%)")
    if calib_tokens < 1:
        fail(f"--calib-tokens {calib_tokens}: give at least 1")
    for option, path in (("--text", text), ("--eval", eval_text)):
        if path is not None and not path.is_file():
            fail(f"{option}: no text file at {path}")
    progress = not json_out
    try:
        lm, tokenizer = load_causal_lm(model)
        ids = _windows(tokenizer, text, "--text", seqlen, windows)
        report = measure_activations(lm, ids, taus, modules=split_list(modules) or None, progress=progress)
        ppl = None
        if ppl_p is not None:
            evaluation = _windows(tokenizer, eval_text, "--eval", seqlen, windows) if eval_text else ids
            ppl = ppl_p_sparsity(lm, ids, evaluation, p=ppl_p, max_calib_tokens=calib_tokens, progress=progress)
        if plot is not None:
            plot_activation_sparsity(report, plot, title=f"{Path(model).name}: activation sparsity on {text.name}")
    except SparsecraftError as e:
        message = str(e)
        fail("--" + message if message.startswith("modules:") else message)  # name the option the user typed
    if json_out:
        typer.echo(json.dumps({"model": model, "text": str(text), "seqlen": seqlen, "windows": ids.shape[0],
                               "tokens": ids.numel(), **report.to_dict(), "ppl_p": ppl.to_dict() if ppl else None}, indent=2))
        return
    if report.hidden_rows:
        console.print(report.layer_table(f"{model}: MLP hidden activation sparsity on {ids.numel():,} tokens"))
    if report.of_kind("linear_input"):
        console.print(report.linear_table())
    if ppl is not None:
        bound = " (the search hit its bound: every CETT tried kept within budget)" if ppl.hit_bound else ""
        console.print(f"PPL-{ppl.p:g}% sparsity: {ppl.sparsity:.1%} of MLP neurons inactive at CETT {ppl.cett:.4f}; "
                      f"perplexity {ppl.ppl_dense:.3f} -> {ppl.ppl_sparse:.3f} ({ppl.ppl_ratio:.4f}x){bound}")
    if plot is not None:
        console.print(f"plot written to {plot}")
