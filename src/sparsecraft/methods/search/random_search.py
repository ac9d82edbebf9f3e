"""Random Search over the node space, the baseline of Farahani (2024).

"Random Search as a Baseline for Sparse Neural Network Architecture Search", Rezsa Farahani,
arXiv:2403.08265, 2024. For each seed, one over-parameterised parent is initialised; ``candidates``
sub-networks of it (which hidden units / channels to keep, at the recipe's node sparsity; see
:mod:`node_space`) are sampled at initialisation, each is scored by a short training on part of the
training split and its accuracy on the held-out rest, and the best is kept. The winner is then
trained fully and compared, at the same sparsity and from the same parent initialisation, with
fresh random configurations and with the dense parent. The paper finds that the searched networks
neither beat nor converge faster than the random ones; the rows' test curves let you check that.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsecraft.data.images import Split
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.search.node_space import (
    Configuration,
    NodeSpace,
    apply_configuration,
    check_sparsity,
    configuration_from_json,
    configuration_to_json,
    node_sparsity,
    sample_configuration,
    weight_sparsity,
)
from sparsecraft.methods.search.result import SearchCost, SearchResult, TrainedRow
from sparsecraft.methods.search.training import holdout, train_and_measure, training_flops
from sparsecraft.models import create
from sparsecraft.recipes.search import SearchRecipe
from sparsecraft.utils import progress_bar

ARCHITECTURE_KEYS = ("method", "model", "model_args", "init_seed", "sparsity", "per_layer", "nodes")
_REQUIRED_KEYS = ("method", "model", "init_seed", "nodes")


def _parent(model: str, model_args: dict[str, Any], seed: int) -> nn.Module:
    """The parent at its seeded initialisation (the caller's global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create(model, **model_args)


def _sub_network(parent: nn.Module, space: NodeSpace, config: Configuration) -> nn.Module:
    """A fresh copy of the parent's initialisation with ``config``'s nodes masked."""
    model = copy.deepcopy(parent)
    apply_configuration(model, space, config)
    return model


def _describe(model: nn.Module, space: NodeSpace, config: Configuration | None, **extra: Any) -> dict[str, Any]:
    return {"node_sparsity": node_sparsity(config) if config else 0.0, "weight_sparsity": weight_sparsity(model, space), **extra}


def _score(parent: nn.Module, space: NodeSpace, configs: list[Configuration], recipe: SearchRecipe, train_part: Split,
           seed: int, progress: bool) -> tuple[list[dict[str, Any]], float]:
    """Short training of each candidate; (one log entry each, training FLOPs spent)."""
    entries, flops = [], 0.0
    for index, config in enumerate(progress_bar(configs, f"random search, seed {seed}", enabled=progress)):
        start = time.perf_counter()
        model = _sub_network(parent, space, config)
        # train_part's test tensors are the held-out part: the score never sees the test split
        row = train_and_measure(model, train_part, recipe.train, arch="candidate", seed=seed, epochs=recipe.random.budget_epochs)
        seen = recipe.random.budget_epochs * len(train_part.y_train)
        flops += training_flops(row.flops, seen)  # row.flops: forward_flops of the masked candidate
        entries.append({"seed": seed, "candidate": index, "val_accuracy": row.accuracy,
                        **_describe(model, space, config), "seconds": time.perf_counter() - start})
    return entries, flops


def _best(entries: list[dict[str, Any]]) -> int:
    """Index of the highest held-out accuracy; the lower index wins ties."""
    best = 0
    for i, entry in enumerate(entries):
        if entry["val_accuracy"] > entries[best]["val_accuracy"]:
            best = i
    return best


def _full_training(parent: nn.Module, space: NodeSpace, split: Split, recipe: SearchRecipe, seed: int,
                   winner: Configuration, winner_entry: dict[str, Any], randoms: list[Configuration],
                   progress: bool) -> list[TrainedRow]:
    """The searched winner, the random configurations and the dense parent, all from one init."""
    runs: list[tuple[str, nn.Module, Configuration | None, dict[str, Any]]] = [
        ("searched", _sub_network(parent, space, winner), winner,
         {"candidate": winner_entry["candidate"], "val_accuracy": winner_entry["val_accuracy"]}),
        *[("random", _sub_network(parent, space, c), c, {"candidate": None, "random_config": j}) for j, c in enumerate(randoms)],
        ("dense", copy.deepcopy(parent), None, {"candidate": None}),
    ]
    rows = []
    for arch, model, config, extra in runs:
        row = train_and_measure(model, split, recipe.train, arch=arch, seed=seed, progress=progress)
        row.extra.update(_describe(model, space, config, **extra))
        rows.append(row)
    return rows


def run_random_search(recipe: SearchRecipe, split: Split, progress: bool = True,
                      log: Callable[[str], None] = print) -> SearchResult:
    """Random Search (Farahani 2024) over ``recipe.random``'s node space, then the full comparison.

    Every seed gets its own parent initialisation, held-out part and candidates. A sparsity the
    model cannot reach, or a model that is not a chain, is refused before anything trains.
    """
    r = recipe.random
    check_sparsity(NodeSpace.of(_parent(r.model, r.model_args, recipe.seeds[0])), recipe.sparsity, r.per_layer)
    rows: list[TrainedRow] = []
    entries: list[dict[str, Any]] = []
    seconds = flops = 0.0
    architecture: dict[str, Any] = {}
    for seed in recipe.seeds:
        start = time.perf_counter()
        parent = _parent(r.model, r.model_args, seed)
        space = NodeSpace.of(parent)
        train_part, _ = holdout(split, recipe.val_fraction, seed)
        generator = torch.Generator().manual_seed(seed)
        configs = [sample_configuration(space, recipe.sparsity, generator, r.per_layer) for _ in range(r.candidates)]
        scored, spent = _score(parent, space, configs, recipe, train_part, seed, progress)
        seconds += time.perf_counter() - start
        flops += spent
        entries += scored
        best = _best(scored)
        log(f"random search seed {seed}: candidate {best} of {len(configs)} wins, held-out accuracy "
            f"{scored[best]['val_accuracy']:.4f} (node sparsity {scored[best]['node_sparsity']:.4f}, "
            f"weight sparsity {scored[best]['weight_sparsity']:.4f})")
        # fresh draws after the candidates: random configurations independent of the scored pool
        randoms = [sample_configuration(space, recipe.sparsity, generator, r.per_layer) for _ in range(r.random_configs)]
        rows += _full_training(parent, space, split, recipe, seed, configs[best], scored[best], randoms, progress)
        if not architecture:
            architecture = {"method": "random", "model": r.model, "model_args": dict(r.model_args), "init_seed": seed,
                            "sparsity": recipe.sparsity, "per_layer": r.per_layer, "nodes": configuration_to_json(configs[best])}
    cost = {"random": SearchCost(seconds=seconds, flops=flops, evaluated=len(entries))}
    return SearchResult(method="random", sparsity=recipe.sparsity, rows=rows, cost=cost, architecture=architecture, log=entries)


def _check_architecture(arch: Any) -> None:
    if not isinstance(arch, dict):
        raise SparsecraftError(f"architecture: expected a dict with keys {list(ARCHITECTURE_KEYS)}, got {type(arch).__name__}")
    unknown = sorted(set(arch) - set(ARCHITECTURE_KEYS))
    if unknown:
        raise SparsecraftError(f"architecture: unknown key(s) {unknown}; the keys are {list(ARCHITECTURE_KEYS)}")
    for key in _REQUIRED_KEYS:
        if key not in arch:
            raise SparsecraftError(f"architecture.{key} is missing; a Random Search architecture needs {list(_REQUIRED_KEYS)}")
    if arch["method"] != "random":
        raise SparsecraftError(f"architecture.method is {arch['method']!r}; this builder rebuilds 'random' architectures only")
    if not isinstance(arch["model"], str):
        raise SparsecraftError("architecture.model: expected a model name or 'package.module:callable'")
    if not isinstance(arch.get("model_args", {}), dict):
        raise SparsecraftError("architecture.model_args: expected a dict of keyword arguments for the model")
    if isinstance(arch["init_seed"], bool) or not isinstance(arch["init_seed"], int):
        raise SparsecraftError(f"architecture.init_seed: expected an integer seed, got {arch['init_seed']!r}")


def build_random_architecture(arch: dict[str, Any]) -> nn.Module:
    """The parent at ``init_seed`` with the found nodes masked: the winner at initialisation
    (same masks, same outputs), ready to train. Errors name the offending field."""
    _check_architecture(arch)
    model = _parent(arch["model"], arch.get("model_args", {}), arch["init_seed"])
    space = NodeSpace.of(model)
    apply_configuration(model, space, configuration_from_json(arch["nodes"], space, field="architecture.nodes"))
    return model


__all__ = ["build_random_architecture", "run_random_search"]
