"""Training FLOPs, counted the way the sparse-training papers compare methods at equal cost.

Following RigL (Evci et al., ICML 2020, appendix H), one training step of a layer costs three
products: the forward pass, the backward pass to the layer's input, and the backward pass to its
weights, each ``2 * positions * weights`` FLOPs times the fraction of the weights that product
needs (its *density*):

- dense training: (1, 1, 1);
- a fixed or dynamic mask (static, SNIP, SET, GMP, ...): (d, d, d) with d the layer's mask density;
- RigL / GraNet at a regrowth step: (d, d, 1), the dense gradient of the weights;
- N:M training with STE / SR-STE: (N/M, N/M, 1), the dense weights get a dense gradient;
- mask-decayed gradient flow while alpha > 0: (1, 1, 1), pruned weights still take part.

These are the FLOPs a sparse kernel would execute; PyTorch here computes every product densely,
so wall-clock time tells a different story (reported separately). Matrix products outside the
prunable layers (attention scores) count 3x dense per step; optimizer updates are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsecraft.analysis.flops import count_flops
from sparsecraft.core.masking import MASK_SUFFIX, find_enforcer

#: (forward, backward to inputs, backward to weights): fractions of the dense layer's FLOPs.
Densities = tuple[float, float, float]
DENSE: Densities = (1.0, 1.0, 1.0)


def layer_densities(model: nn.Module, sparsifier: Any = None) -> dict[str, Densities]:
    """What each prunable layer of ``model`` costs in the step being run, by module name."""
    out: dict[str, Densities] = {}
    for name, module in model.named_modules():
        mask = module._buffers.get("weight" + MASK_SUFFIX)
        if mask is None:
            continue
        d = float(torch.count_nonzero(mask)) / mask.numel()
        enforcer = find_enforcer(module)
        dense_weight_grad = enforcer is not None and enforcer.keep_dense_grads
        out[name] = (d, d, 1.0 if dense_weight_grad else d)
    parametrizations = getattr(sparsifier, "parametrizations", None) or {}
    for param_name, p in parametrizations.items():  # N:M training keeps dense weights
        module_name = param_name.rpartition(".")[0]
        if p.dense or p.alpha > 0:
            out[module_name] = DENSE
        else:
            out[module_name] = (p.n / p.m, p.n / p.m, 1.0)
    return out


@dataclass
class TrainingFlops:
    """Accumulates training FLOPs step by step next to what dense training would have cost.

    Build it on the model *before* a sparsifier changes it (so the per-sample dense FLOPs of every
    layer are known), then call :meth:`add_step` once per optimizer step, before the sparsifier's
    ``step()`` (the masks then are the ones that step's forward and backward used).
    """

    layer_flops: dict[str, float]  # dense forward FLOPs per sample of each prunable layer
    other_flops: float  # forward FLOPs per sample of every other matrix product
    total: float = 0.0
    steps: int = 0

    @classmethod
    def for_model(cls, model: nn.Module, example: Any) -> TrainingFlops:
        layers, other, batch = count_flops(model, example)
        return cls({name: f.dense / batch for name, f in layers.items()}, other / batch)

    def step_flops(self, densities: Mapping[str, Densities], samples: int) -> float:
        per_sample = 3 * self.other_flops
        for name, dense in self.layer_flops.items():
            per_sample += dense * sum(densities.get(name, DENSE))
        return per_sample * samples

    def add_step(self, densities: Mapping[str, Densities], samples: int) -> None:
        self.total += self.step_flops(densities, samples)
        self.steps += 1

    def dense_flops(self, samples: int) -> float:
        """What dense training costs over ``samples`` sample-steps (e.g. epochs x training set)."""
        return self.step_flops({}, samples)

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.total, self.steps = float(state["total"]), int(state["steps"])
