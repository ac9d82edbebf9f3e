"""``sparsecraft demo``: the main job on embedded defaults."""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from sparsecraft.cli.common import console
from sparsecraft.demo import (
    DemoConfig,
    TrainingStageConfig,
    demo_table,
    acceleration_table,
    activation_stage_models,
    activation_stage_table,
    demo_models,
    language_model_table,
    plot_training_stage,
    prune_language_model,
    run_acceleration_stage,
    run_activation_stage,
    run_demo,
    run_training_stage,
    training_table,
)
from sparsecraft.utils import write_text_atomic


def demo_command(
    full: Annotated[bool, typer.Option(help="train longer, more sparsities, average 3 seeds (several minutes)")] = False,
    plot: Annotated[Path, typer.Option(help="accuracy-vs-sparsity plot of the training stage (PNG)")] = Path("sparsecraft-demo.png"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the results as JSON here")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    language_model: Annotated[bool, typer.Option("--lm/--no-lm", help="stage 3: Wanda on a language model")] = True,
) -> None:
    """Digits CNN: (1) one-shot pruning at 50/80/90% with uniform and ERK, fine-tuned;
    (2) sparse training: dense vs static random-ERK vs SNIP vs GMP at 80/90/95%;
    (3) dynamic sparse training: static ERK vs SET vs RigL at 90%, and 2:4 with SR-STE;
    (4) a language model (SmolLM2-135M when available offline) pruned 50% with Wanda;
    (5) that model on the sparse CPU kernels: per-layer and whole-forward speed, dense vs sparse;
    (6) the measured activation sparsity (exact zeros, |a| < tau) of the digits CNN and the language models."""
    progress = not quiet and console.is_terminal
    start = time.perf_counter()
    console.rule("stage 1: one-shot magnitude pruning")
    config = DemoConfig.full() if full else DemoConfig()
    rows = run_demo(config, progress=progress, log=console.print)
    console.print(demo_table(rows, len(config.seeds)))
    console.rule("stage 2: sparse training")
    stage2 = TrainingStageConfig.full() if full else TrainingStageConfig()
    trained = run_training_stage(stage2, progress=progress, log=console.print)
    console.print(training_table(trained, len(stage2.seeds)))
    plot_training_stage(trained, plot)
    console.print(f"plot written to {plot}")
    console.rule("stage 3: dynamic sparse training and N:M training")
    stage3 = TrainingStageConfig.dynamic(full)
    dynamic = run_training_stage(stage3, progress=progress, log=console.print)
    console.print(training_table(
        dynamic, len(stage3.seeds), title="sparsecraft demo: sparse-to-sparse training of the digits CNN",
        caption="SET regrows at random, RigL where the dense gradient is largest; 2:4 keeps 2 of every 4 weights"))
    lm = pruned = None
    accelerated: list = []
    decisions: list = []
    if language_model and importlib.util.find_spec("transformers") is None:
        console.print("[yellow]stage 4 skipped: it needs transformers (pip install 'sparsecraft[hf]')[/]")
    elif language_model:
        console.rule("stage 4: one-shot pruning of a language model")
        lm, pruned = prune_language_model(progress=progress, log=console.print)
        console.print(language_model_table(lm))
        console.rule("stage 5: the pruned models on the sparse CPU kernels")
        accelerated, decisions = run_acceleration_stage(demo_models(pruned, f"{lm.method} {lm.sparsity:.0%}"), progress=progress,
                                                        log=console.print)
        console.print(acceleration_table(accelerated))
    console.rule("stage 6: activation sparsity of the demo models")
    activations, activation_layers = run_activation_stage(activation_stage_models(lm, pruned, console.print), progress=progress,
                                                          log=console.print)
    console.print(activation_stage_table(activations))
    console.print(f"demo finished in {time.perf_counter() - start:.1f} s")
    if json_out is not None:
        results = {"one_shot": [asdict(r) for r in rows], "sparse_training": [asdict(r) for r in trained],
                   "dynamic_sparse_training": [asdict(r) for r in dynamic], "language_model": asdict(lm) if lm else None,
                   "acceleration": [asdict(r) | {"speedup": r.speedup} for r in accelerated], "acceleration_layers": decisions,
                   "activation_sparsity": [asdict(r) for r in activations], "activation_layers": activation_layers}
        write_text_atomic(json_out, json.dumps(results, indent=2))
