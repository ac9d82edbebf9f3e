"""Masks in a standalone safetensors file: ``{parameter name: bool mask}`` plus each layer's pattern."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sparsecraft.core.masking import apply_masks, masks_of, patterns_of
from sparsecraft.errors import MaskMismatchError
from sparsecraft.utils import atomic_path

FORMAT = "sparsecraft.masks/1"


def save_masks(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the model's masks (bool) and patterns to ``path`` atomically."""
    masks = {name: m.detach().to("cpu", torch.bool).contiguous() for name, m in masks_of(model).items()}
    if not masks:
        raise MaskMismatchError("the model has no masks to save; prune or sparsify it first")
    metadata = {"format": FORMAT, "patterns": json.dumps(patterns_of(model))}
    with atomic_path(path) as tmp:
        save_file(masks, str(tmp), metadata=metadata)


def read_masks(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(masks, patterns) from a file written by :func:`save_masks`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise MaskMismatchError(f"{path}: not a sparsecraft masks file (format {metadata.get('format')!r}, expected {FORMAT!r})")
    return load_file(str(path)), json.loads(metadata.get("patterns", "{}"))


def load_masks(model: nn.Module, path: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Apply the masks in ``path`` to ``model``; a name or shape that does not fit changes nothing."""
    masks, patterns = read_masks(path)
    apply_masks(model, masks, patterns, optimizer=optimizer)
