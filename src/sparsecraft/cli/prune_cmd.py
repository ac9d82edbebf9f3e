"""``sparsecraft prune``: one-shot pruning.

Hugging Face language models (a folder, a .gguf file or a hub id) go through the layer-wise
calibrated methods (``--method wanda|sparsegpt|magnitude|magnitude-row``, DSnoT, OWL); built-in
models and sparsecraft checkpoints through magnitude or random scores with any pattern and
distribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from sparsecraft.analysis.report import report
from sparsecraft.cli.common import console, fail, split_list
from sparsecraft.cli.oneshot_cmd import is_language_model, llm_prune
from sparsecraft.core.io import save_masks
from sparsecraft.core.masking import apply_masks
from sparsecraft.core.patterns import PATTERN_GRAMMAR
from sparsecraft.core.prune import compute_masks
from sparsecraft.core.selection import select
from sparsecraft.errors import SparsecraftError
from sparsecraft.models.checkpoint import load_any, save_checkpoint
from sparsecraft.registry import UnknownNameError
from sparsecraft.utils import atomic_path


def _pairs(values: list[str], field: str) -> dict[str, str]:
    out = {}
    for item in split_list(values):
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            fail(f"{field}: {item!r} should look like GLOB=VALUE")
        out[key] = value
    return out


def prune_command(
    model: Annotated[str, typer.Argument(help="Hugging Face model folder / .gguf / hub id, built-in model name, package.module:callable, or a checkpoint")],
    sparsity: Annotated[Optional[float], typer.Option(help="fraction of selected weights removed, in [0, 1)")] = None,
    density: Annotated[Optional[float], typer.Option(help="fraction kept, in (0, 1] (instead of --sparsity)")] = None,
    pattern: Annotated[str, typer.Option(help=PATTERN_GRAMMAR)] = "unstructured",
    distribution: Annotated[str, typer.Option(help="uniform, uniform+, global, er, erk, mapping")] = "uniform",
    score: Annotated[str, typer.Option(help="magnitude or random (gradient scores need data: use the Python API)")] = "magnitude",
    types: Annotated[list[str], typer.Option("--types", help="module types: linear, conv, conv1d/2d/3d, embedding")] = ["linear", "conv"],  # noqa: B006
    include: Annotated[Optional[list[str]], typer.Option(help="only modules matching these globs (or re:REGEX)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="leave modules matching these globs dense")] = None,
    keep_first_dense: Annotated[bool, typer.Option(help="leave the first selected layer dense")] = False,
    keep_last_dense: Annotated[bool, typer.Option(help="leave the last selected layer (classifier) dense")] = False,
    dense: Annotated[Optional[list[str]], typer.Option(help="uniform: module globs kept dense inside the selection")] = None,
    densities: Annotated[Optional[list[str]], typer.Option(help="mapping: GLOB=DENSITY pairs")] = None,
    layer_pattern: Annotated[Optional[list[str]], typer.Option(help="per-layer pattern overrides, GLOB=PATTERN")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random score")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="write the pruned model here (.safetensors checkpoint, or .pt)")] = None,
    masks: Annotated[Optional[Path], typer.Option(help="write the masks alone here (.safetensors)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the resulting report as JSON")] = False,
    dry_run: Annotated[bool, typer.Option(help="show the selection and the plan, change and write nothing")] = False,
    method: Annotated[Optional[str], typer.Option(help="language models: magnitude, magnitude-row, wanda, sparsegpt")] = None,
    dsnot: Annotated[bool, typer.Option(help="language models: refine the mask with DSnoT")] = False,
    owl: Annotated[bool, typer.Option(help="language models: OWL per-block sparsities (unstructured)")] = False,
    calib: Annotated[Optional[Path], typer.Option(help="language models: calibration text file")] = None,
    nsamples: Annotated[int, typer.Option(help="language models: calibration windows")] = 128,
    seqlen: Annotated[int, typer.Option(help="language models: tokens per calibration (and evaluation) window")] = 512,
    eval_text: Annotated[Optional[Path], typer.Option("--eval", help="language models: text file for perplexity before and after")] = None,
    eval_windows: Annotated[Optional[int], typer.Option(help="language models: evaluate only the first N windows")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="language models: a one-shot job as YAML (flags given here override it)")] = None,
) -> None:
    """Show the selection, plan the masks, apply them, report, save. Bad input changes nothing."""
    if method is not None or recipe is not None or is_language_model(model):
        llm_prune(model, method, sparsity, pattern, dsnot, owl, calib, nsamples, seqlen, eval_text, eval_windows,
                  split_list(include) or None, split_list(exclude) or None, seed, out, json_out, recipe)
        return
    if score not in ("magnitude", "random"):
        fail(f"score {score!r} is not available from the CLI; use magnitude or random")
    try:
        net, spec = load_any(model)
        selection = select(net, split_list(types), split_list(include) or None, split_list(exclude) or None, keep_first_dense, keep_last_dense)
        if not json_out:
            console.print(selection.table())
        options: dict = {}
        if dense:
            options["dense"] = split_list(dense)
        plan = compute_masks(
            net, sparsity=sparsity, density=density, pattern=pattern, distribution=distribution, score=score, seed=seed,
            selection=selection, layer_patterns=_pairs(layer_pattern or [], "--layer-pattern") or None,
            densities={k: float(v) for k, v in _pairs(densities or [], "--densities").items()} or None, **options,
        )
    except (SparsecraftError, UnknownNameError, ValueError) as e:
        fail(str(e))
    if not json_out:
        console.print(plan.table())
    if dry_run:
        console.print("dry run: nothing changed, nothing written")
        return
    apply_masks(net, plan.masks, {n: str(p) for n, p in plan.patterns.items()})
    result = report(net)
    if json_out:
        typer.echo(result.to_json())
    else:
        console.print(result.table(title=f"After pruning: {spec}"))
    if out is not None:
        if out.suffix in (".pt", ".pth"):
            with atomic_path(out) as tmp:
                torch.save(net, tmp)
        else:
            save_checkpoint(net, out, spec)
        if not json_out:
            console.print(f"pruned model written to {out}")
    if masks is not None:
        save_masks(net, masks)
        if not json_out:
            console.print(f"masks written to {masks}")
    if out is None and masks is None and not json_out:
        console.print("[yellow]nothing written: pass --out and/or --masks to keep the result[/]")
