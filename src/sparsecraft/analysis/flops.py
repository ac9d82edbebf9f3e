"""FLOPs counted on a real forward pass.

What is counted (one multiply-add = 2 FLOPs, as in ``torch.utils.flop_counter``):
- Linear and Conv1d/2d/3d: dense = 2 * output positions * weight elements; sparse = 2 * output
  positions * nonzero (kept) weights. Bias additions, padding borders and activations are not counted.
- Embedding lookups: 0.
- Every other matrix product of the forward pass (attention's QK^T and AV, ``F.linear`` on raw
  weights, bmm, SDPA, ...) as counted by ``torch.utils.flop_counter.FlopCounterMode``: reported
  as "other matmuls", dense in both columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sparsecraft.core.masking import MASK_SUFFIX
from sparsecraft.core.selection import kind_of


@dataclass
class LayerFlops:
    dense: int = 0
    sparse: int = 0


def kept_weights(module: nn.Module, param_name: str = "weight") -> int:
    """Kept weights: the mask's count when masked, else the weight's nonzeros."""
    mask = module._buffers.get(param_name + MASK_SUFFIX)
    if mask is not None:
        return int(torch.count_nonzero(mask))
    return int(torch.count_nonzero(module._parameters[param_name].detach()))


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    first = next((v for v in values if isinstance(v, Tensor)), None)
    return batch_size(first) if first is not None else 1


def count_flops(model: nn.Module, inputs: Any) -> tuple[dict[str, LayerFlops], int, int]:
    """(per-layer FLOPs by module name, FLOPs of other matmuls, batch size), for one forward pass."""
    layers: dict[str, LayerFlops] = {}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if kind_of(module) == "embedding" or not isinstance(output, Tensor):
                return
            weight = module._parameters["weight"]
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
            positions = output.numel() // max(channels, 1)
            entry = layers.setdefault(name, LayerFlops())
            entry.dense += 2 * positions * weight.numel()
            entry.sparse += 2 * positions * kept_weights(module)

        return hook

    for name, module in model.named_modules():
        if kind_of(module) is not None and module._parameters.get("weight") is not None:
            layers[name] = LayerFlops()
            handles.append(module.register_forward_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _call(model, inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    other = max(0, counter.get_total_flops() - sum(f.dense for f in layers.values()))
    return layers, other, batch_size(inputs)
