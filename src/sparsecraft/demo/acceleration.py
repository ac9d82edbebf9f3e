"""Demo stage 5: the demo's pruned language model on the sparse CPU kernels, dense vs sparse, measured.

Each pruned model is timed for one-token decoding (T = 1): every projection dense and in each
format that applies, then the whole forward pass before and after ``accelerate``. Layers with
the same name in every block share a shape, so the table shows one row per projection (median
over the blocks) plus the whole model; the JSON keeps every layer.
"""

from __future__ import annotations

import copy
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsecraft.kernels import accelerate, available
from sparsecraft.kernels.speed import forward_seconds
from sparsecraft.methods.sequential import prune_decoder


@dataclass
class AccelerationRow:
    model: str
    part: str  # a projection name (q_proj, ...) or "whole forward"
    layers: int
    swapped: int
    density: float
    format: str
    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def demo_models(pruned: nn.Module, label: str) -> list[tuple[str, nn.Module]]:
    """The stage-4 model as pruned, and a copy magnitude-pruned to 90% (for speed only, not quality)."""
    sparser = copy.deepcopy(pruned)
    prune_decoder(sparser, None, "magnitude", 0.9, progress=False)
    return [(label, pruned), ("magnitude 90% (speed only)", sparser)]


def run_acceleration_stage(models: list[tuple[str, nn.Module]], tokens: int = 1, progress: bool = True,
                           log: Callable[[str], Any] = print) -> tuple[list[AccelerationRow], list[dict]]:
    if not available():
        log("[yellow]the compiled kernels are not available here: nothing is swapped (see the warning above)[/]")
    rows: list[AccelerationRow] = []
    decisions: list[dict] = []
    for label, model in models:
        model.eval()
        ids = torch.randint(0, model.config.vocab_size, (1, tokens))
        dense_s = forward_seconds(model, ids, reps=7)
        report = accelerate(model, tokens=tokens, progress=progress)
        sparse_s = forward_seconds(model, ids, reps=7)
        by_part: dict[str, list] = {}
        for d, as_dict in zip(report.layers, report.to_dict()["layers"]):
            by_part.setdefault(d.name.rsplit(".", 1)[-1], []).append(d)
            decisions.append({"model": label, **as_dict})
        for part, ds in by_part.items():
            timed = [d for d in ds if d.sparse_ms]
            if not timed:
                continue
            formats = Counter(d.format or "dense" for d in ds)
            rows.append(AccelerationRow(label, part, len(ds), sum(d.format is not None for d in ds),
                                        statistics.median(d.density for d in ds), formats.most_common(1)[0][0],
                                        statistics.median(d.dense_ms for d in timed),
                                        statistics.median(d.dense_ms if d.format is None else d.sparse_ms for d in timed)))
        swapped = len(report.swapped)
        rows.append(AccelerationRow(label, "whole forward", len(report.layers), swapped, float("nan"), "-", dense_s * 1e3, sparse_s * 1e3))
    return rows, decisions


def acceleration_table(rows: list[AccelerationRow], tokens: int = 1) -> Any:
    from rich.table import Table

    table = Table(title=f"sparse CPU kernels: the pruned language models at T={tokens} (one-token decoding), dense vs accelerated",
                  caption="per projection: median over the blocks; a layer keeps dense unless its sparse product was >= 1.1x faster here")
    for col in ("model", "part", "swapped", "density", "format", "dense ms", "accelerated ms", "speedup"):
        table.add_column(col, justify="left" if col in ("model", "part", "format") else "right")
    for r in rows:
        table.add_row(r.model, r.part, f"{r.swapped}/{r.layers}", "-" if r.density != r.density else f"{r.density:.2f}", r.format,
                      f"{r.dense_ms:.3f}", f"{r.sparse_ms:.3f}", f"{r.speedup:.2f}x", style="bold" if r.part == "whole forward" else None)
    return table
