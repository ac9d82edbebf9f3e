"""``sparsecraft sae train | eval | inspect | export``: sparse autoencoders on a causal LM's activations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from sparsecraft.cli.common import console, fail
from sparsecraft.errors import SparsecraftError

sae_app = typer.Typer(help="Sparse autoencoders and transcoders on a causal LM's activations.", no_args_is_help=True)

REPORTED = ("fvu", "l0_mean", "l0_std", "l0_p10", "l0_p90", "dead_fraction", "rare_fraction", "ce_clean", "ce_sae",
            "ce_zero", "loss_recovered", "tokens_per_second", "train_seconds")


def _print_summary(summary: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in REPORTED:
        if key in summary and summary[key] is not None:
            value = summary[key]
            table.add_row(key, f"{value:.1%}" if key.endswith("fraction") else f"{value:,.4g}")
    console.print(table)


@sae_app.command("train")
def train_command(
    model: Annotated[str, typer.Option(help="Hugging Face model folder, .gguf file or hub id")],
    hook: Annotated[str, typer.Option(help="hook point, e.g. blocks.15.resid_post (transcoders: blocks.L.mlp_in)")],
    text: Annotated[Path, typer.Option(help="text whose activations train the SAE (its tail is held out)")],
    kind: Annotated[str, typer.Option(help="relu, topk, batchtopk, feature_choice or mutual_choice")] = "topk",
    k: Annotated[int, typer.Option(help="active latents per token (on average for the batch kinds)")] = 32,
    expansion: Annotated[int, typer.Option(help="latents per input dimension")] = 8,
    tokens: Annotated[int, typer.Option(help="training tokens")] = 200_000,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 128,
    batch_size: Annotated[int, typer.Option(help="tokens per step")] = 4096,
    lr: Annotated[Optional[float], typer.Option(help="learning rate (default 2e-3 / sqrt(d_sae / 2^14))")] = None,
    l1: Annotated[float, typer.Option(help="L1 coefficient (relu kind)")] = 5.0,
    transcoder: Annotated[bool, typer.Option(help="map blocks.L.mlp_in to blocks.L.mlp_out")] = False,
    aux: Annotated[str, typer.Option(help="auxiliary loss: auto, auxk, zipf or none")] = "auto",
    outlier_factor: Annotated[float, typer.Option(help="skip tokens with norm > F x median (massive activations); 0: none")] = 10.0,
    epochs: Annotated[int, typer.Option(help="passes over the text allowed to reach --tokens")] = 1,
    eval_windows: Annotated[int, typer.Option(help="windows held out for evaluation")] = 8,
    cache: Annotated[Optional[Path], typer.Option(help="activation cache folder (written on first use)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="folder for the SAE (safetensors + JSON + density.png)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Train an SAE (or transcoder) on activations at HOOK over TEXT, evaluate it on held-out text, save it."""
    from sparsecraft.recipes.sae import SAETrainJob, run_sae_train

    job = SAETrainJob(model=model, hook=hook, text=str(text), kind=kind, k=k, expansion=expansion, tokens=tokens,
                      seqlen=seqlen, batch_size=batch_size, lr=lr, l1_coefficient=l1, transcoder=transcoder, aux=aux, outlier_factor=outlier_factor,
                      epochs=epochs, eval_windows=eval_windows, cache=str(cache) if cache else None, seed=seed)
    try:
        outcome = run_sae_train(job, out, progress=not json_out, log=None if json_out else console.print)
    except SparsecraftError as e:
        fail(str(e))
    summary = outcome.summary() | {"out": str(out) if out else None}
    if json_out:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_summary(summary, f"{kind} SAE at {hook}: held-out evaluation")
    console.print(f"written to {out} (density.png beside it)" if out else "[yellow]nothing written: pass --out DIR[/]")


@sae_app.command("eval")
def eval_command(
    sae: Annotated[Path, typer.Argument(help="folder written by `sparsecraft sae train`")],
    model: Annotated[str, typer.Option(help="the model it was trained on")],
    text: Annotated[Path, typer.Option(help="evaluation text")],
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 128,
    windows: Annotated[int, typer.Option(help="windows to evaluate (the text's last N)")] = 8,
    plot: Annotated[Optional[Path], typer.Option(help="write the density / L0 histogram PNG here")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """FVU, L0 distribution, dead and rare latents and loss recovered of a saved SAE on a text."""
    from sparsecraft.methods.sae import metrics
    from sparsecraft.recipes.sae import held_out_windows, open_for_eval

    try:
        net, tokenizer, encoder = open_for_eval(model, str(sae))
        batch = held_out_windows(tokenizer, str(text), seqlen, windows)
        cfg = encoder.config
        recon = metrics.reconstruction(encoder, metrics.activations_for(net, encoder, batch))
        loss = metrics.loss_recovered(net, encoder, batch)
    except SparsecraftError as e:
        fail(str(e))
    summary = {"sae": str(sae), "kind": cfg.kind, "hook": cfg.hook, **recon.summary(), **loss.summary()}
    if plot is not None:
        metrics.plot_density(recon, plot, f"{cfg.kind} SAE at {cfg.hook}")
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary, f"{cfg.kind} SAE at {cfg.hook} on {text.name}")


@sae_app.command("inspect")
def inspect_command(
    sae: Annotated[Path, typer.Argument(help="folder written by `sparsecraft sae train`")],
    model: Annotated[str, typer.Option(help="the model it was trained on")],
    text: Annotated[Path, typer.Option(help="text to search for activating contexts")],
    latent: Annotated[int, typer.Option(help="latent index")],
    top: Annotated[int, typer.Option(help="contexts to show")] = 10,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 128,
    windows: Annotated[int, typer.Option(help="windows to search (the text's first N)")] = 64,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """The contexts where one latent fires most strongly, activating token in [[ ]]."""
    from sparsecraft.data.text import eval_windows, read_text, tokenize
    from sparsecraft.methods.sae.metrics import top_contexts
    from sparsecraft.recipes.sae import open_for_eval

    try:
        net, tokenizer, encoder = open_for_eval(model, str(sae))
        if not 0 <= latent < encoder.config.d_sae:
            fail(f"--latent: {latent} is out of range; the SAE has latents 0..{encoder.config.d_sae - 1}")
        batch = eval_windows(tokenize(tokenizer, read_text(str(text), "text")), seqlen, windows, field="text")
        found = top_contexts(net, tokenizer, encoder, batch, latent, n=top)
    except SparsecraftError as e:
        fail(str(e))
    if json_out:
        typer.echo(json.dumps({"latent": latent, "contexts": [c.__dict__ for c in found]}, indent=2))
        return
    table = Table(title=f"latent {latent}: top {len(found)} contexts in {text.name}")
    table.add_column("activation", justify="right")
    table.add_column("context")
    for c in found:
        table.add_row(f"{c.activation:.3f}", c.text)
    console.print(table)
    if not found:
        console.print(f"[yellow]latent {latent} never fires on these {len(batch)} windows[/]")


@sae_app.command("export")
def export_command(
    sae: Annotated[Path, typer.Argument(help="folder written by `sparsecraft sae train`")],
    out: Annotated[Path, typer.Option(help="new folder for SAELens's cfg.json + sae_weights.safetensors")],
) -> None:
    """Write the SAE in SAELens's format (``SAE.load_from_disk(out)``)."""
    from sparsecraft.methods.sae.io import export_saelens, load_sae

    try:
        export_saelens(load_sae(sae), out)
    except SparsecraftError as e:
        fail(str(e))
    console.print(f"SAELens files written to {out}")
