"""Language models on the CLI: ``prune`` (one-shot, calibrated), ``eval`` (perplexity), ``sweep``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sparsecraft.cli.common import console, fail, split_list
from sparsecraft.errors import SparsecraftError
from sparsecraft.recipes.oneshot import DSnoTSection, OneShotJob, OWLSection, dense_perplexity, parse_job, run_one_shot
from sparsecraft.registry import UnknownNameError


def is_language_model(spec: str) -> bool:
    """A Hugging Face model folder, a .gguf file, or something shaped like a hub id (owner/name)."""
    path = Path(spec)
    if path.suffix == ".gguf":
        return True
    if path.is_dir():
        return (path / "config.json").is_file() or any(path.glob("*.gguf"))
    return not path.exists() and ":" not in spec and spec.count("/") == 1 and not spec.startswith((".", "/"))


def _echo_json(data: dict) -> None:
    typer.echo(json.dumps(data, indent=2))


def llm_prune(
    model: str, method: str | None, sparsity: float | None, pattern: str, dsnot: bool, owl: bool, calib: Path | None,
    nsamples: int, seqlen: int, eval_text: Path | None, eval_windows: int | None, include: list[str] | None,
    exclude: list[str] | None, seed: int, out: Path | None, json_out: bool, recipe: Path | None,
) -> None:
    try:
        if recipe is not None:
            if not recipe.is_file():
                fail(f"--recipe: no file at {recipe}")
            job = parse_job(recipe.read_text(), str(recipe))
            job.model = model
        else:
            job = OneShotJob(
                model=model, method=method or "wanda", sparsity=0.5 if sparsity is None else sparsity, pattern=pattern,
                dsnot=DSnoTSection() if dsnot else None, owl=OWLSection() if owl else None,
                calib=str(calib) if calib else None, nsamples=nsamples, seqlen=seqlen, seed=seed,
                eval=str(eval_text) if eval_text else None, eval_windows=eval_windows, include=include, exclude=exclude,
            )
            if sparsity is not None and ":" in pattern:
                fail(f"--sparsity and --pattern {pattern} conflict: N:M fixes the sparsity; drop --sparsity")
        job.validate()
        # warnings (e.g. overlapping calibration windows) go to stderr as usual; --json output stays clean
        outcome = run_one_shot(job, out, progress=not json_out, log=None if json_out else console.print)
    except (SparsecraftError, UnknownNameError) as e:
        fail(str(e))
    summary = outcome.summary()
    if json_out:
        _echo_json(summary)
        return
    console.print(outcome.result.table())
    for key in ("sparsity", "ppl_before", "ppl_after", "prune_seconds", "peak_rss_bytes"):
        if summary[key] is not None:
            console.print(f"{key}: {summary[key]:.4g}" if isinstance(summary[key], float) else f"{key}: {summary[key]}")
    console.print(f"pruned model written to {out}" if out else "[yellow]nothing written: pass --out DIR to keep the pruned model[/]")


def eval_command(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder, .gguf file or hub id")],
    text: Annotated[Path, typer.Option(help="text file to evaluate on")],
    seqlen: Annotated[int, typer.Option(help="tokens per non-overlapping window")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="evaluate only the first N windows")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Perplexity of a causal language model on a text file (non-overlapping windows)."""
    try:
        ppl, tokens = dense_perplexity(model, str(text), seqlen, max_windows, progress=not json_out)
    except (SparsecraftError, UnknownNameError) as e:
        fail(str(e))
    data = {"model": model, "text": str(text), "seqlen": seqlen, "tokens": tokens, "perplexity": ppl}
    if json_out:
        _echo_json(data)
    else:
        console.print(f"perplexity {ppl:.3f} over {tokens} tokens ({tokens // seqlen} windows of {seqlen})")


def sweep_command(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder, .gguf file or hub id")],
    calib: Annotated[Path, typer.Option(help="calibration text file")],
    eval_text: Annotated[Path, typer.Option("--eval", help="text file for perplexity")],
    methods: Annotated[list[str], typer.Option("--methods", help="one-shot methods, comma-separated")] = ["magnitude", "wanda"],  # noqa: B006
    sparsities: Annotated[str, typer.Option(help="comma-separated sparsities, or START:STOP:STEP")] = "0:0.9:0.1",
    nsamples: Annotated[int, typer.Option(help="calibration windows")] = 128,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 512,
    eval_windows: Annotated[Optional[int], typer.Option(help="evaluate only the first N windows")] = None,
    out: Annotated[Path, typer.Option(help="folder for sweep.json and sweep.png")] = Path("runs/sweep"),
    json_out: Annotated[bool, typer.Option("--json", help="print all points as JSON")] = False,
) -> None:
    """Prune at a series of sparsities with each method; plot perplexity against sparsity and mark
    the essential sparsity (the knee where the curve turns sharply upward)."""
    from sparsecraft.analysis.sweep import parse_sparsities, run_sweep

    try:
        points = parse_sparsities(sparsities)
        result = run_sweep(model, split_list(methods), points, str(calib), str(eval_text), nsamples, seqlen, eval_windows,
                           out, progress=not json_out, log=None if json_out else console.print)
    except (SparsecraftError, UnknownNameError) as e:
        fail(str(e))
    if json_out:
        _echo_json(result.to_dict())
    else:
        console.print(result.table())
        console.print(f"written: {out / 'sweep.json'}, {out / 'sweep.png'}")
