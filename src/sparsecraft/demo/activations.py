"""Demo stage 6: how sparse the demo models' activations are, measured.

A digits CNN (its ReLU outputs are naturally sparse: exact zeros) and the language models of
stage 4 (SwiGLU MLPs: almost no exact zeros, but many near-zero values, which is what
threshold-based activation sparsity exploits). One row per model and kind of activation,
element-weighted over the layers; the JSON keeps every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.analysis.activations import ActivationReport, measure_activations, tau_key

LABELS = {"mlp_hidden": "MLP hidden", "activation_output": "ReLU outputs", "linear_input": "Linear/Conv inputs"}


@dataclass
class ActivationStageRow:
    model: str
    activations: str  # MLP hidden, ReLU outputs, Linear/Conv inputs
    inputs: str  # what the model was run on
    layers: int
    zero_fraction: float
    below: dict[str, float]  # tau_key(tau) -> fraction |a| < tau
    layer_min: float  # the least and most sparse layer at the middle tau
    layer_max: float


def digits_cnn(epochs: int = 3, seed: int = 0, progress: bool = False) -> tuple[nn.Module, Tensor]:
    """The stage-1 CNN, dense, trained a few epochs (about 2 s), and the held-out digits."""
    from sparsecraft.data import digits
    from sparsecraft.models import create
    from sparsecraft.train import fit, make_optimizer

    split = digits()
    torch.manual_seed(seed)
    model = create("cnn")
    fit(model, split.x_train, split.y_train, make_optimizer(model), epochs, seed=seed, progress=progress, description="digits CNN")
    return model.eval(), split.x_test


def lm_windows(tokenizer: Any, text: str, windows: int = 4, seqlen: int = 128) -> Tensor:
    """The first ``windows`` x ``seqlen`` tokens of ``text``, tokenizing only a prefix (corpora are long)."""
    from sparsecraft.data.text import eval_windows, tokenize

    ids = tokenize(tokenizer, text[: 16 * windows * seqlen])  # a token rarely spans fewer than 1/16 characters
    if ids.numel() < windows * seqlen:
        ids = tokenize(tokenizer, text)
    return eval_windows(ids, seqlen, windows)


def activation_stage_models(lm: Any, pruned: nn.Module | None, log: Callable[[str], Any] = print,
                 cnn_epochs: int = 3) -> list[tuple[str, nn.Module, Tensor, str]]:
    """(label, model, inputs, what the inputs are) for stage 6: the digits CNN, and with a stage-4
    result the dense language model (SmolLM2 is reloaded from its local copy; the tiny fallback's
    dense weights were pruned in place, so it has no dense row) and the pruned one."""
    cnn, images = digits_cnn(cnn_epochs)
    models = [(f"digits CNN (dense, {cnn_epochs} epochs)", cnn, images, f"{len(images)} test digits")]
    if lm is None or pruned is None:
        return models
    from sparsecraft.data.text import char_tokenizer
    from sparsecraft.demo.language_model import LanguageModelStageConfig, demo_texts, load_demo_model

    calib_text, eval_text, _ = demo_texts()
    if lm.model.startswith("SmolLM2"):
        dense, tokenizer, _ = load_demo_model(LanguageModelStageConfig(), calib_text, log)
        ids = lm_windows(tokenizer, eval_text)
        models.append(("SmolLM2-135M dense", dense, ids, f"{ids.shape[0]} x {ids.shape[1]} tokens"))
        name = "SmolLM2-135M"
    else:
        tokenizer, name = char_tokenizer(), "tiny Llama"
        ids = lm_windows(tokenizer, eval_text)
        log("the tiny Llama's dense weights were pruned in place by stage 4: measuring the pruned model only")
    models.append((f"{name} {lm.method} {lm.sparsity:.0%}", pruned, ids, f"{ids.shape[0]} x {ids.shape[1]} tokens"))
    return models


def stage_rows(label: str, report: ActivationReport, inputs: str) -> list[ActivationStageRow]:
    mid = tau_key(report.middle_tau)
    rows = []
    for kind in (k for k in LABELS if k in report.aggregate):  # the activations first, then the layer inputs
        agg = report.aggregate[kind]
        per_layer = [r.below[mid] for r in report.of_kind(kind)]
        rows.append(ActivationStageRow(label, LABELS[kind], inputs, agg["layers"], agg["zero_fraction"], agg["below"],
                                       min(per_layer), max(per_layer)))
    return rows


def run_activation_stage(models: list[tuple[str, nn.Module, Tensor, str]], progress: bool = True,
                         log: Callable[[str], Any] = print) -> tuple[list[ActivationStageRow], list[dict]]:
    """Measure every model; (table rows, every layer's row as a dict labelled with its model)."""
    rows: list[ActivationStageRow] = []
    layers: list[dict] = []
    for label, model, inputs, what in models:
        report = measure_activations(model, inputs, batch_size=4 if not inputs.is_floating_point() else 512, progress=progress)
        rows += stage_rows(label, report, what)
        layers += [{"model": label, **asdict(r)} for r in report.rows]
        hidden = next((r for r in rows[::-1] if r.model == label and r.activations != LABELS["linear_input"]), None)
        if hidden is not None:
            log(f"{label}: {hidden.activations} exact zeros {hidden.zero_fraction:.1%}")
    return rows, layers


def activation_stage_table(rows: list[ActivationStageRow]) -> Any:
    from rich.table import Table

    taus = list(rows[0].below) if rows else []
    mid = taus[len(taus) // 2] if taus else ""
    table = Table(title="activation sparsity of the demo models (measured)",
                  caption=f"element-weighted over the layers; layer range: least and most sparse layer at |a| < {mid}; "
                          "exact zeros can be skipped for free, near zeros only by thresholding (TEAL, CETT)")
    for col in ("model", "activations", "inputs", "layers", "exact zeros", *(f"|a|<{t}" for t in taus), "layer range"):
        table.add_column(col, justify="left" if col in ("model", "activations", "inputs") else "right")
    for r in rows:
        table.add_row(r.model, r.activations, r.inputs, str(r.layers), f"{r.zero_fraction:.1%}", *(f"{r.below[t]:.1%}" for t in taus),
                      f"{r.layer_min:.0%}-{r.layer_max:.0%}")
    return table
