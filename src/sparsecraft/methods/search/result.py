"""What a search returns: the compared networks, the search's cost, the found architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainedRow:
    """One fully trained network of the comparison."""

    arch: str  # e.g. "searched", "random", "dense", "dass", "darts-pruned"
    seed: int
    accuracy: float  # test accuracy after the full training
    sparsity: float  # measured fraction of zero weights in the searchable layers
    params: int  # kept (nonzero) weights of the searchable layers
    flops: int  # forward FLOPs per example, counting kept weights only
    train_seconds: float
    curve: list[float] = field(default_factory=list)  # test accuracy after each epoch (convergence)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchCost:
    seconds: float
    flops: float  # training FLOPs spent by the search (3x forward per example seen; see analysis/flops.py)
    evaluated: int  # candidates scored (random) or search epochs run (dass)


@dataclass
class SearchResult:
    method: str
    sparsity: float
    rows: list[TrainedRow]
    cost: dict[str, SearchCost]  # per searched architecture ("random", "dass", "darts")
    architecture: dict[str, Any]  # JSON-able; sparsecraft.methods.search.build_architecture rebuilds it
    log: list[dict[str, Any]] = field(default_factory=list)  # one entry per scored candidate / search epoch
