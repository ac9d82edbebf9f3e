"""Sparse checkpoints: a model whose SparseLinear layers are stored in their formats, not dense.

One safetensors file, ``sparse_model.safetensors``: the formats' arrays (size on disk
proportional to the kept weights) plus every other tensor of the state dict, and in its
metadata the formats, tied-tensor aliases and a CRC32 per tensor, so that a corrupted file is
refused with a clear error instead of producing garbage. Hugging Face models also get their
``config.json`` (and the tokenizer when given), so ``load_sparse(folder)`` rebuilds the model
with its parameters on the meta device and fills them from the file: no dense weight of a sparse
layer is ever materialised. The folder is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.kernels.formats import SparseWeight
from sparsecraft.kernels.modules import PREFIX, SparseLinear
from sparsecraft.utils import atomic_folder, replace_module

FILE = "sparse_model.safetensors"
FORMAT_VERSION = 1


def _crc(t: Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes()) if t.numel() else 0


def save_sparse(model: nn.Module, out: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (with its SparseLinear layers in their formats) into the new folder ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):  # checked before the work, not only at the rename
        raise SparsecraftError(f"output folder {out} exists and is not empty; choose a new folder or remove it")
    modules = {name: {"format": m.fmt, "shape": [m.out_features, m.in_features], "n": m.n, "m": m.m, "block": list(m.block),
                      "arrays": list(m._names), "bias": m.bias is not None}
               for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.numel(), tuple(t.shape))
        if key in seen:  # tied weights (embeddings and LM head) are stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    meta = {"version": FORMAT_VERSION, "modules": modules, "aliases": aliases, "crc32": {k: _crc(v) for k, v in tensors.items()}}
    with atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / FILE), metadata={"sparsecraft": json.dumps(meta)})
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def read_sparse_file(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """The metadata and tensors of a sparse checkpoint, verified against their checksums."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if "sparsecraft" not in header:
                raise SparsecraftError(f"{path} is a safetensors file but not a sparsecraft sparse checkpoint")
            meta = json.loads(header["sparsecraft"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SparsecraftError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated or malformed files
        raise SparsecraftError(f"cannot read sparse checkpoint {path}: {exc} (truncated or corrupted? save it again)") from exc
    if meta.get("version") != FORMAT_VERSION:
        raise SparsecraftError(f"{path}: sparse checkpoint version {meta.get('version')}, this sparsecraft reads {FORMAT_VERSION}")
    for name, expected in meta["crc32"].items():
        if name not in tensors:
            raise SparsecraftError(f"{path}: tensor {name} is missing; the file is incomplete")
        if _crc(tensors[name]) != expected:
            raise SparsecraftError(f"{path}: tensor {name} fails its checksum; the file is corrupted, save it again")
    return meta, tensors


def _skeleton(folder: Path) -> nn.Module:
    """The Hugging Face model of ``folder``'s config with parameters on the meta device (buffers real)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise SparsecraftError("loading a Hugging Face sparse checkpoint needs transformers and accelerate: pip install 'sparsecraft[hf]'") from exc
    if not (folder / "config.json").exists():
        raise SparsecraftError(f"{folder} has no config.json; pass the model skeleton as load_sparse(folder, model=...)")
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def load_sparse(folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_sparse`; its sparse layers run on the kernels directly.

    ``model`` is the architecture to fill (on any device, meta included); without it the folder's
    Hugging Face config is used.
    """
    folder = Path(folder)
    path = folder / FILE if folder.is_dir() else folder
    if not path.exists():
        raise SparsecraftError(f"no sparse checkpoint at {path}; save one with sparsecraft.kernels.save_sparse")
    meta, tensors = read_sparse_file(path)
    model = model if model is not None else _skeleton(path.parent)
    for name, spec in meta["modules"].items():
        arrays = {a: tensors.pop(f"{name}.{PREFIX}{a}") for a in spec["arrays"]}
        bias = tensors.pop(f"{name}.bias") if spec["bias"] else None
        sparse = SparseWeight(spec["format"], tuple(spec["shape"]), arrays, spec["n"], spec["m"], tuple(spec["block"]))
        try:
            replace_module(model, name, SparseLinear(sparse, bias))
        except AttributeError as exc:
            raise SparsecraftError(f"{path}: the model has no module {name!r}; is this the architecture it was saved from?") from exc
    for alias, source in meta["aliases"].items():
        tensors[alias] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    sparse_keys = {f"{n}.{PREFIX}{a}" for n, s in meta["modules"].items() for a in s["arrays"]}
    sparse_keys |= {f"{n}.bias" for n, s in meta["modules"].items() if s["bias"]}  # given to the SparseLinear above
    missing = [k for k in missing if k not in sparse_keys]
    if missing or unexpected:
        raise SparsecraftError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise SparsecraftError(f"{path}: {still_meta[0]} was not in the checkpoint")
    return model.eval()
