"""Save and reload an activation-sparse model: the plain model plus its rules beside it.

The folder holds the model as ``save_pretrained`` writes it (weights unchanged: activation
sparsity changes no weight, so it loads with plain ``from_pretrained`` as the dense model), the
tokenizer, ``activation_sparsity.json`` (method, sparsity, mode, one entry per swapped module)
and ``activation_sparsity.safetensors`` (the thresholds and scales). It is written to a temporary
folder and renamed, so an interrupted save leaves nothing that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.activation.calibrate import ActivationSparsityPlan, Rule, apply_rules
from sparsecraft.utils import atomic_folder

CONFIG = "activation_sparsity.json"
TENSORS = "activation_sparsity.safetensors"
FORMAT_VERSION = 1


def save_activation_sparse(model: nn.Module, tokenizer: Any, plan: ActivationSparsityPlan, out: str | Path,
                           extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (its plain weights), ``tokenizer`` and ``plan`` into the folder ``out``."""
    out = Path(out)
    with atomic_folder(out) as tmp:
        # weights stored column-major for the kernels are written in the usual row-major layout
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_plan(plan, tmp, extra)
    return out


def write_plan(plan: ActivationSparsityPlan, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """The plan's two files (config and tensors) into an existing ``folder``; ``read_plan`` reads them back."""
    tensors = {key: t.contiguous() for r in plan.rules for key, t in r.tensors().items()}
    config = {"format_version": FORMAT_VERSION, **plan.config(), **(extra or {})}
    save_file(tensors, str(folder / TENSORS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2))


def read_plan(folder: str | Path) -> ActivationSparsityPlan:
    folder = Path(folder)
    for name in (CONFIG, TENSORS):
        if not (folder / name).is_file():
            raise SparsecraftError(f"{folder}: not an activation-sparse model folder ({name} is missing)")
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / TENSORS))
    except Exception as e:  # json, OS and safetensors' own error types: a damaged file either way
        raise SparsecraftError(f"{folder}: the activation-sparsity files are damaged ({e}); save the model again") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise SparsecraftError(f"{folder / CONFIG}: format_version {config.get('format_version')} is not {FORMAT_VERSION}")
    plan = ActivationSparsityPlan(config["method"], config["sparsity"], config["mode"],
                                  calibration_tokens=config.get("calibration_tokens", 0))
    for entry in config["rules"]:
        name = entry["name"]

        def get(key: str, present: bool) -> torch.Tensor | None:
            if not present:
                return None
            if f"{name}.{key}" not in tensors:
                raise SparsecraftError(f"{folder / TENSORS}: {name}.{key} is missing; the file does not match {CONFIG}")
            return tensors[f"{name}.{key}"]

        plan.rules.append(Rule(name, entry["kind"], tau=get("tau", entry["tau"]), scale=get("scale", entry["scale"]), k=entry["k"]))
    return plan


def load_activation_sparse(folder: str | Path, mode: str | None = None, **load_kwargs: Any) -> tuple[nn.Module, Any, ActivationSparsityPlan]:
    """The model of ``folder`` with its activation-sparse modules in place (``mode`` overrides the saved one)."""
    from sparsecraft.models.hf import load_causal_lm

    plan = read_plan(folder)
    if mode is not None:
        plan.mode = mode
    model, tokenizer = load_causal_lm(folder, **load_kwargs)
    apply_rules(model, plan)
    return model, tokenizer, plan
