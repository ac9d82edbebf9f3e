"""Checkpoints the CLI can reopen: safetensors weights (masks included) + how to rebuild the model.

The metadata holds the model spec (a built-in name or ``package.module:callable``) and its keyword
arguments as JSON, so ``sparsecraft report pruned.safetensors`` needs nothing else. A whole pickled
module (``torch.save(model)``, ``.pt``) is read too, for models no spec can rebuild.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from sparsecraft.core.masking import apply_masks, patterns_of, split_state_dict
from sparsecraft.errors import SparsecraftError
from sparsecraft.models import create
from sparsecraft.utils import atomic_path

FORMAT = "sparsecraft.checkpoint/1"


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], spec: str, kwargs: dict[str, Any] | None = None) -> None:
    """Write weights, masks and the model spec to ``path`` (atomically)."""
    metadata = {"format": FORMAT, "model": spec, "kwargs": json.dumps(kwargs or {}), "patterns": json.dumps(patterns_of(model))}
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata=metadata)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, str]:
    """(model with its masks, spec) from a checkpoint written by :func:`save_checkpoint`, or a pickled ``.pt``."""
    p = Path(path)
    if not p.exists():
        raise SparsecraftError(f"checkpoint {p} does not exist")
    if p.suffix in (".pt", ".pth"):
        model = torch.load(p, map_location="cpu", weights_only=False)  # a pickled module: trusted files only
        if not isinstance(model, nn.Module):
            raise SparsecraftError(f"{p} holds a {type(model).__name__}, not a pickled nn.Module; save with torch.save(model)")
        return model, str(p)
    with safe_open(str(p), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise SparsecraftError(f"{p}: not a sparsecraft checkpoint (no model spec in its metadata); use `sparsecraft prune --out` to make one")
    model = create(metadata["model"], **json.loads(metadata.get("kwargs", "{}")))
    masks = split_state_dict(model, load_file(str(p)))
    if masks:
        apply_masks(model, masks, json.loads(metadata.get("patterns", "{}")))
    load_model(model, str(p), strict=True)
    return model, metadata["model"]


def load_any(source: str, **kwargs: Any) -> tuple[nn.Module, str]:
    """A checkpoint file, a built-in model name, or ``package.module:callable``."""
    if os.path.exists(source) or source.endswith((".safetensors", ".pt", ".pth")):
        return load_checkpoint(source)
    return create(source, **kwargs), source
