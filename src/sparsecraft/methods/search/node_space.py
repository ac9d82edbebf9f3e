"""The node space of a chain network: which hidden units / channels a sparse sub-network keeps.

Following "Random Search as a Baseline for Sparse Neural Network Architecture Search"
(Rezsa Farahani, arXiv:2403.08265, 2024): a candidate sparse network is the over-parameterised
parent with some of its *nodes* removed, a node being an output unit of a hidden Linear layer or
an output channel of a hidden Conv layer. Removing node ``j`` of layer ``i`` masks row ``j`` of
layer ``i``'s weight and column (input channel) ``j`` of layer ``i + 1``'s weight, so every
candidate is the parent's own initialisation under a structured mask.

A configuration is ``{hidden layer name: bool keep-mask over its output units}``; its JSON form
is ``{hidden layer name: [kept indices]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import comb
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.core.masking import apply_masks
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.search.training import kept_and_total, weight_layers

Configuration = dict[str, Tensor]

_CHAIN_HINT = ("node-space search needs a chain model (mlp, cnn, cnn32, or a model whose weight layers "
               "feed each other in order)")


def _units(module: nn.Module) -> tuple[int, int]:
    """(input units, output units) of a Linear or Conv layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels  # type: ignore[return-value]


@dataclass(frozen=True)
class NodeSpace:
    """The searchable nodes of a chain model (Farahani 2024): output units of every weight layer
    but the last (the classifier), whose width is fixed by the task."""

    layers: tuple[str, ...]  # every Linear/Conv layer of the chain, in module order
    widths: tuple[int, ...]  # output units of each hidden layer (``layers[:-1]``)

    @property
    def hidden(self) -> tuple[str, ...]:
        return self.layers[:-1]

    @property
    def total(self) -> int:
        return sum(self.widths)

    @classmethod
    def of(cls, model: nn.Module) -> NodeSpace:
        """The node space of ``model``; SparsecraftError unless its weight layers form a chain."""
        layers = weight_layers(model)
        if len(layers) < 2:
            raise SparsecraftError(f"the model has {len(layers)} Linear/Conv layer(s), so no hidden nodes to search; {_CHAIN_HINT}")
        for name, module in layers:
            if getattr(module, "groups", 1) != 1:  # a grouped conv's input columns are not its input channels
                raise SparsecraftError(f"layer {name!r} is a grouped convolution (groups={module.groups}); {_CHAIN_HINT}")
        for (a, first), (b, second) in zip(layers, layers[1:]):
            out_units, in_units = _units(first)[1], _units(second)[0]
            if out_units != in_units:
                raise SparsecraftError(
                    f"layer {a!r} has {out_units} output units but the next weight layer {b!r} takes {in_units} "
                    f"inputs, so {a!r} does not feed {b!r}; {_CHAIN_HINT}"
                )
        return cls(tuple(n for n, _ in layers), tuple(_units(m)[1] for _, m in layers[:-1]))


def check_sparsity(space: NodeSpace, sparsity: float, per_layer: bool = False) -> list[int]:
    """Nodes to drop (one count per hidden layer when ``per_layer``, else one global count);
    SparsecraftError, with the largest reachable sparsity, when ``sparsity`` empties a layer."""
    if not 0.0 <= sparsity < 1.0:
        raise SparsecraftError(f"sparsity={sparsity} must lie in [0, 1): the fraction of nodes removed")
    if per_layer:
        drops = [round(sparsity * w) for w in space.widths]
        for name, w, d in zip(space.hidden, space.widths, drops):
            if d >= w:
                largest = min((v - 1) / v for v in space.widths)
                raise SparsecraftError(
                    f"per-layer node sparsity {sparsity} drops {d} of the {w} nodes of layer {name!r}, emptying it; "
                    f"the largest reachable per-layer sparsity is {largest:.4f}: lower sparsity or widen the layer"
                )
        return drops
    drop = round(sparsity * space.total)
    most = space.total - len(space.widths)  # one node left in every hidden layer
    if drop > most:
        raise SparsecraftError(
            f"node sparsity {sparsity} drops {drop} of the {space.total} nodes, which would empty a layer; "
            f"the largest reachable sparsity is {most / space.total:.4f} (one node left in each of the "
            f"{len(space.widths)} hidden layers): lower sparsity or widen the model"
        )
    return [drop]


@lru_cache(maxsize=64)
def _ways(widths: tuple[int, ...], drop: int) -> tuple[tuple[int, ...], ...]:
    """``ways[i][r]``: subsets of ``r`` nodes of layers ``i..`` that leave each of them >= 1 node."""
    ways = [[0] * (drop + 1) for _ in range(len(widths) + 1)]
    ways[-1][0] = 1
    for i in reversed(range(len(widths))):
        choose = [comb(widths[i], d) for d in range(widths[i])]  # d < width: the layer keeps a node
        for r in range(drop + 1):
            ways[i][r] = sum(choose[d] * ways[i + 1][r - d] for d in range(min(len(choose) - 1, r) + 1))
    return tuple(tuple(row) for row in ways)


def _randbelow(n: int, generator: torch.Generator) -> int:
    """A uniform integer in [0, n) for arbitrarily large n (the subset counts overflow floats)."""
    bits = n.bit_length()
    while True:
        words = torch.randint(0, 1 << 30, ((bits + 29) // 30,), generator=generator).tolist()
        value = 0
        for word in words:
            value = (value << 30) | word
        value >>= 30 * len(words) - bits
        if value < n:
            return value


def _global_drops(widths: tuple[int, ...], drop: int, generator: torch.Generator) -> list[int]:
    """Per-layer drop counts, each with probability proportional to its number of subsets, so the
    dropped set is uniform over all ``drop``-subsets that keep every layer non-empty."""
    ways = _ways(widths, drop)
    pick, counts, r = _randbelow(ways[0][drop], generator), [], drop
    for i, w in enumerate(widths):
        d = 0
        while pick >= comb(w, d) * ways[i + 1][r - d]:  # ends: pick < ways[i][r], the sum of these
            pick -= comb(w, d) * ways[i + 1][r - d]
            d += 1
        pick %= ways[i + 1][r - d]  # still uniform: indexes the later layers' subsets
        counts.append(d)
        r -= d
    return counts


def sample_configuration(space: NodeSpace, sparsity: float, generator: torch.Generator, per_layer: bool = False) -> Configuration:
    """Keep-masks that drop exactly ``round(sparsity * total)`` nodes, uniformly among the subsets
    that leave every hidden layer a node (or, ``per_layer``, ``round(sparsity * width)`` per layer)."""
    drops = check_sparsity(space, sparsity, per_layer)
    counts = drops if per_layer else _global_drops(space.widths, drops[0], generator)
    config: Configuration = {}
    for name, w, d in zip(space.hidden, space.widths, counts):
        keep = torch.ones(w, dtype=torch.bool)
        keep[torch.randperm(w, generator=generator)[:d]] = False
        config[name] = keep
    return config


def node_sparsity(config: Configuration) -> float:
    """Fraction of the hidden nodes a configuration drops."""
    total = sum(k.numel() for k in config.values())
    return 1.0 - sum(int(k.sum()) for k in config.values()) / max(total, 1)


def _check_configuration(space: NodeSpace, config: Configuration) -> None:
    missing, unknown = set(space.hidden) - set(config), set(config) - set(space.hidden)
    if missing or unknown:
        raise SparsecraftError(
            f"configuration layers do not match the node space: missing {sorted(missing)}, unknown {sorted(unknown)}; "
            f"give one keep-mask for each hidden layer {list(space.hidden)}"
        )
    for name, w in zip(space.hidden, space.widths):
        keep = config[name]
        if keep.dtype != torch.bool or tuple(keep.shape) != (w,):
            raise SparsecraftError(f"configuration[{name!r}]: expected a bool tensor of shape ({w},), got {keep.dtype} {tuple(keep.shape)}")
        if not bool(keep.any()):
            raise SparsecraftError(f"configuration[{name!r}] keeps no node; keep at least one per layer")


def _broadcast(keep: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """``keep`` laid along dimension ``dim`` (0: output rows, 1: input columns) of a weight of ``shape``."""
    view = [1] * len(shape)
    view[dim] = -1
    return keep.view(view)


def configuration_masks(model: nn.Module, space: NodeSpace, config: Configuration) -> dict[str, Tensor]:
    """``{"layer.weight": bool mask}`` for every layer of the chain: rows of dropped units and the
    matching input columns of the next layer are False."""
    _check_configuration(space, config)
    masks: dict[str, Tensor] = {}
    for i, name in enumerate(space.layers):
        weight = model.get_submodule(name).weight
        mask = torch.ones(weight.shape, dtype=torch.bool)
        if i < len(space.hidden):
            mask &= _broadcast(config[name], weight.shape, 0)
        if i > 0:
            mask &= _broadcast(config[space.layers[i - 1]], weight.shape, 1)
        masks[f"{name}.weight"] = mask
    return masks


def apply_configuration(model: nn.Module, space: NodeSpace, config: Configuration) -> None:
    """Mask the dropped nodes of ``model`` (replacing any mask on its chain's weights).

    Masks act on weights only: a dropped unit keeps its bias (and any BatchNorm shift after it),
    but its output cannot reach the network's output because every column of the next layer that
    reads it is masked, so the sub-network computes exactly what the smaller network would.
    """
    for name, w in zip(space.hidden, space.widths):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SparsecraftError(f"the model has no layer {name!r} of the node space; build the space from this model") from None
        if _units(module)[1] != w:
            raise SparsecraftError(f"layer {name!r} has {_units(module)[1]} output units, the node space {w}; build the space from this model")
    apply_masks(model, configuration_masks(model, space, config))


def configuration_to_json(config: Configuration) -> dict[str, list[int]]:
    """``{layer: [kept indices]}`` (ascending)."""
    return {name: torch.nonzero(keep).flatten().tolist() for name, keep in config.items()}


def configuration_from_json(data: Any, space: NodeSpace, field: str = "nodes") -> Configuration:
    """The configuration ``{layer: [kept indices]}`` describes; errors name ``field.<layer>``."""
    if not isinstance(data, dict):
        raise SparsecraftError(f"{field}: expected {{layer: [kept indices]}}, got {type(data).__name__}")
    unknown, missing = set(data) - set(space.hidden), set(space.hidden) - set(data)
    if unknown:
        raise SparsecraftError(f"{field}: layer(s) {sorted(unknown)} do not exist in this model's node space; its hidden layers are {list(space.hidden)}")
    if missing:
        raise SparsecraftError(f"{field}: layer(s) {sorted(missing)} are missing; give kept indices for every hidden layer {list(space.hidden)}")
    config: Configuration = {}
    for name, w in zip(space.hidden, space.widths):
        indices = data[name]
        where = f"{field}.{name}"
        if not isinstance(indices, list) or not indices:
            raise SparsecraftError(f"{where}: expected a non-empty list of kept indices")
        for j in indices:
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < w:
                raise SparsecraftError(f"{where}: index {j!r} is out of range; layer {name!r} has {w} units (0..{w - 1})")
        if len(set(indices)) != len(indices):
            raise SparsecraftError(f"{where}: repeated indices; list each kept unit once")
        keep = torch.zeros(w, dtype=torch.bool)
        keep[indices] = True
        config[name] = keep
    return config


def weight_sparsity(model: nn.Module, space: NodeSpace) -> float:
    """Fraction of zero (or masked) weights over the chain's layers, the classifier included."""
    kept, total = kept_and_total(model, list(space.layers))
    return 1.0 - kept / max(total, 1)
