"""Per-layer sparsity and FLOPs: a table to read, JSON to parse, a PNG to look at."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from sparsecraft.analysis.flops import count_flops, kept_weights
from sparsecraft.core.masking import MASK_SUFFIX, patterns_of
from sparsecraft.core.patterns import infer_pattern
from sparsecraft.core.selection import kind_of
from sparsecraft.utils import atomic_path, write_text_atomic


@dataclass
class LayerRow:
    name: str
    type: str
    shape: list[int]
    pattern: str
    density: float
    kept: int
    weights: int
    dense_flops: int | None = None  # per sample; None when no input was given
    sparse_flops: int | None = None


@dataclass
class SparsityReport:
    layers: list[LayerRow]
    other_flops: int | None = None  # per sample: attention and other matmuls, not sparsified
    parameters: int = 0  # every parameter of the model
    nonzero_parameters: int = 0
    input_shape: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.layers)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.layers)

    @property
    def density(self) -> float:
        return self.kept / max(self.weights, 1)

    @property
    def dense_flops(self) -> int | None:
        if self.other_flops is None:
            return None
        return self.other_flops + sum(r.dense_flops or 0 for r in self.layers)

    @property
    def sparse_flops(self) -> int | None:
        if self.other_flops is None:
            return None
        return self.other_flops + sum(r.sparse_flops or 0 for r in self.layers)

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "weights": self.weights,
            "kept": self.kept,
            "density": self.density,
            "sparsity": 1 - self.density,
            "parameters": self.parameters,
            "nonzero_parameters": self.nonzero_parameters,
        }
        if self.other_flops is not None:
            out |= {
                "dense_flops": self.dense_flops,
                "sparse_flops": self.sparse_flops,
                "other_flops": self.other_flops,
                "flops_ratio": self.sparse_flops / max(self.dense_flops, 1),  # type: ignore[operator]
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": self.input_shape,
            "flops_are": "per sample; 1 multiply-add = 2 FLOPs",
            "layers": [asdict(r) for r in self.layers],
            "totals": self.totals(),
            "notes": self.notes,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, title: str = "Sparsity report"):
        from rich.table import Table

        flops = self.other_flops is not None
        table = Table(title=title, show_footer=True)
        t = self.totals()
        table.add_column("layer", footer="total", no_wrap=True)
        table.add_column("type")
        table.add_column("shape", no_wrap=True)
        table.add_column("pattern")
        table.add_column("density", justify="right", footer=f"{t['density']:.4f}")
        table.add_column("kept", justify="right", footer=f"{t['kept']:,} of {t['weights']:,}")
        if flops:
            table.add_column("dense FLOPs", justify="right", footer=_human(self.dense_flops))
            table.add_column("sparse FLOPs", justify="right", footer=_human(self.sparse_flops))
        for r in self.layers:
            row = [r.name, r.type, "x".join(map(str, r.shape)), r.pattern, f"{r.density:.4f}", f"{r.kept:,}"]
            if flops:
                row += [_human(r.dense_flops), _human(r.sparse_flops)]
            table.add_row(*row)
        if flops and self.other_flops:
            table.add_row("(other matmuls)", "", "", "dense", "", "", _human(self.other_flops), _human(self.other_flops))
        caption = [f"all parameters: {self.nonzero_parameters:,} nonzero of {self.parameters:,}"]
        if flops:
            caption.append(f"FLOPs per sample, input {self.input_shape}: sparse/dense = {t['flops_ratio']:.3f}")
        table.caption = "; ".join(caption)
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text()

    def save_json(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, self.to_json())

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Bar chart of per-layer density (PNG), with the overall density as a line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.name for r in self.layers]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
        ax.bar(range(len(names)), [r.density for r in self.layers], color="#3b7dd8")
        ax.axhline(self.density, color="#d8573b", linestyle="--", label=f"overall {self.density:.3f}")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("density (fraction of weights kept)")
        ax.set_title("Per-layer density")
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def example_input_for(model: nn.Module, input_shape: tuple[int, ...] | None) -> Any:
    """A random input of ``input_shape`` on the model's device, or the model's own ``example_input()``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if input_shape is not None:
        return torch.randn(*input_shape, device=device)
    if hasattr(model, "example_input"):
        return model.example_input().to(device)
    return None


def report(
    model: nn.Module,
    inputs: Any = None,
    input_shape: tuple[int, ...] | None = None,
) -> SparsityReport:
    """Sparsity of every Linear/Conv/Embedding weight; FLOPs too when an input (or shape) is known.

    ``inputs`` may be a tensor, a tuple of tensors or a dict of keyword tensors; ``input_shape``
    makes a random float input; built-in models know their own example input.
    """
    if inputs is None:
        inputs = example_input_for(model, input_shape)
    recorded = patterns_of(model)
    rows: list[LayerRow] = []
    for name, module in model.named_modules():
        kind = kind_of(module)
        weight = module._parameters.get("weight") if kind else None
        if weight is None:
            continue
        fqn = f"{name}.weight" if name else "weight"
        kept = kept_weights(module)
        mask = module._buffers.get("weight" + MASK_SUFFIX)
        pattern = recorded.get(fqn) or infer_pattern(mask if mask is not None else weight.detach() != 0)
        rows.append(LayerRow(name, kind, list(weight.shape), pattern, kept / weight.numel(), kept, weight.numel()))  # type: ignore[arg-type]
    params = list({id(p): p for p in model.parameters()}.values())
    result = SparsityReport(
        rows,
        parameters=sum(p.numel() for p in params),
        nonzero_parameters=sum(int(torch.count_nonzero(p.detach())) for p in params),
    )
    if inputs is not None:
        per_layer, other, batch = count_flops(model, inputs)
        for r in rows:
            f = per_layer.get(r.name)
            r.dense_flops = f.dense // batch if f else 0
            r.sparse_flops = f.sparse // batch if f else 0
        result.other_flops = other // batch
        first = inputs if isinstance(inputs, torch.Tensor) else None
        result.input_shape = list(first.shape) if first is not None else None
    else:
        result.notes.append("no input given: FLOPs not counted (pass an input or input_shape)")
    return result
