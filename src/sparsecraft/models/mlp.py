"""Where each supported architecture keeps its MLP: the projections and the activation between them.

Activation-sparsity methods need to know which tensor is "the MLP hidden activation" (the input
of the down projection), what produced it (the activation function, and for gated MLPs the up
projection it is multiplied with), and which Linear reads it. This table is the one place that
knows, so measurement, thresholding and ReLUfication agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.models.hf import LinearView, decoder_blocks

#: model_type -> (gate or None, up, down, activation module) as paths inside a decoder block.
#: Gated MLPs compute down(act(gate(x)) * up(x)); plain ones down(act(up(x))).
MLP_LAYOUT: dict[str, tuple[str | None, str, str, str]] = {
    "llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn"),
    "mistral": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn"),
    "qwen2": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn"),
    "opt": (None, "fc1", "fc2", "activation_fn"),
    "gpt2": (None, "mlp.c_fc", "mlp.c_proj", "mlp.act"),
}


@dataclass
class MLPParts:
    """One decoder block's MLP. ``prefix`` is the block's full name (``model.layers.3``)."""

    index: int
    prefix: str
    gate: LinearView | None
    up: LinearView
    down: LinearView
    act_path: str  # the activation module's full name, for replacing it
    act: nn.Module

    @property
    def hidden_size(self) -> int:
        """Width of the hidden activation (the down projection's input)."""
        return self.down.shape[1]


def _get(block: nn.Module, path: str) -> nn.Module:
    module: nn.Module = block
    for attr in path.split("."):
        module = getattr(module, attr)
    return module


def mlp_parts(model: nn.Module) -> list[MLPParts]:
    """The MLP of every decoder block, in order; a clear error for models without a known MLP."""
    blocks = decoder_blocks(model)  # raises for non-HF and unsupported architectures
    model_type = model.config.model_type
    if model_type not in MLP_LAYOUT:
        raise SparsecraftError(f"model: no known MLP layout for {model_type!r}; supported: {', '.join(sorted(MLP_LAYOUT))}")
    gate_path, up_path, down_path, act_path = MLP_LAYOUT[model_type]
    root = next(name for name, module in model.named_modules() if module is blocks)
    parts = []
    for i, block in enumerate(blocks):
        prefix = f"{root}.{i}"
        parts.append(MLPParts(
            index=i, prefix=prefix,
            gate=LinearView(f"{prefix}.{gate_path}", _get(block, gate_path)) if gate_path else None,
            up=LinearView(f"{prefix}.{up_path}", _get(block, up_path)),
            down=LinearView(f"{prefix}.{down_path}", _get(block, down_path)),
            act_path=f"{prefix}.{act_path}", act=_get(block, act_path),
        ))
    return parts
