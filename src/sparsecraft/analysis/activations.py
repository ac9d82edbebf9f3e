"""Activation sparsity, measured per layer: exact zeros and |a| < tau, per token and over the model.

What is measured (``kinds``):

- ``"mlp_hidden"``: in a Hugging Face decoder, each block's MLP hidden activation, i.e. the input
  of its down projection (``act(gate(x)) * up(x)`` or ``act(fc1(x))``), the tensor whose zeros
  let the down projection skip weight columns (Deja Vu: Liu et al. 2023; "ReLU Strikes Back":
  Mirzadeh et al. 2023). In a plain ``nn.Module``, which has no known MLP, the outputs of its
  activation modules (``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``, ...), rows of kind ``"activation_output"``.
- ``"linear_inputs"``: the input of every ``nn.Linear`` and GPT-2 ``Conv1D`` (plain models: also
  ``nn.Conv1d/2d/3d``, one "token" per spatial position), the tensors that input-thresholding
  methods such as TEAL sparsify.

Measurement streams: forward hooks add counts per batch and keep, per statistic, a histogram of
per-token counts (width + 1 integers), never the activations. Every per-token fraction is
count / width, so the histogram gives its mean and percentiles exactly in bounded memory.

Layout: Linear inputs are channels-last; conv inputs and activation outputs of 4-D/5-D tensors
are channels-first (images); other activation outputs are channels-last. Only the per-token
statistics and the width depend on this; element fractions do not.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.utils import atomic_path, progress_bar

DEFAULT_TAUS: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
KINDS: tuple[str, ...] = ("mlp_hidden", "linear_inputs")
#: Activation modules whose outputs plain models are measured at.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish, nn.Softplus,
)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Swapped-in layers (sparse kernels, activation-sparse linears) still read a Linear's input.
_LINEAR_LIKE = {"Conv1D", "SparseLinear", "ActivationSparseLinear"}


def tau_key(tau: float) -> str:
    """JSON/table key of a threshold: ``0.01`` -> ``"0.01"``."""
    return f"{tau:g}"


def check_taus(taus: Iterable[float], field_name: str = "taus") -> tuple[float, ...]:
    values = tuple(sorted({float(t) for t in taus}))
    if not values:
        raise SparsecraftError(f"{field_name}: give at least one threshold, e.g. 0.01")
    bad = [t for t in values if not t > 0 or t != t]
    if bad:
        raise SparsecraftError(f"{field_name}: thresholds must be > 0 (|a| < tau counts as near zero), got {bad}")
    return values


def middle_tau(taus: Sequence[float]) -> float:
    """The threshold the per-token distribution is reported at."""
    return taus[len(taus) // 2]


@dataclass
class TokenStats:
    """Distribution over tokens of one per-token fraction (mean and linear-interpolated percentiles)."""

    mean: float
    p10: float
    p50: float
    p90: float


@dataclass
class ActivationRow:
    name: str  # the module's full name (for mlp_hidden: the down projection reading the activation)
    kind: str  # "mlp_hidden", "activation_output" or "linear_input"
    part: str  # path inside the decoder block, shared across blocks (self_attn.q_proj); else the full name
    layer: int | None  # decoder block index (None outside the blocks); plain models: order within the kind
    width: int
    tokens: int
    elements: int
    zero_fraction: float
    below: dict[str, float]  # tau_key(tau) -> fraction of |a| < tau
    token_zero: TokenStats  # per-token fraction of exact zeros
    token_below: TokenStats  # per-token fraction of |a| < middle tau


@dataclass
class ActivationReport:
    taus: tuple[float, ...]
    rows: list[ActivationRow]
    batches: int
    aggregate: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> element-weighted fractions

    @property
    def middle_tau(self) -> float:
        return middle_tau(self.taus)

    def of_kind(self, *kinds: str) -> list[ActivationRow]:
        return [r for r in self.rows if r.kind in kinds]

    @property
    def hidden_rows(self) -> list[ActivationRow]:
        """MLP hidden activations (HF) or activation-module outputs (plain models)."""
        return self.of_kind("mlp_hidden", "activation_output")

    def by_part(self) -> list[dict[str, Any]]:
        """Linear inputs summed over the blocks per projection name (q_proj, down_proj, ...)."""
        groups: dict[str, list[ActivationRow]] = {}
        for r in self.of_kind("linear_input"):
            groups.setdefault(r.part, []).append(r)
        return [{"part": part, **_pool(rows, self.taus)} for part, rows in groups.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"taus": list(self.taus), "batches": self.batches, "aggregate": self.aggregate,
                "linear_by_part": self.by_part(), "layers": [asdict(r) for r in self.rows]}

    def layer_table(self, title: str = "activation sparsity per layer") -> Any:
        from rich.table import Table

        mid = tau_key(self.middle_tau)
        table = Table(title=title, caption=f"per token: the fraction of |a| < {mid} in each token's vector, p10 / p50 / p90 over tokens")
        for col in ("layer", "module", "width", "tokens", "zeros", *(f"|a|<{tau_key(t)}" for t in self.taus), "per token p10/p50/p90"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for r in self.hidden_rows:
            t = r.token_below
            table.add_row(str(r.layer), r.name, str(r.width), f"{r.tokens:,}", _pct(r.zero_fraction),
                          *(_pct(r.below[tau_key(x)]) for x in self.taus), f"{_pct(t.p10)} / {_pct(t.p50)} / {_pct(t.p90)}")
        for kind in ("mlp_hidden", "activation_output"):
            if kind in self.aggregate:
                a = self.aggregate[kind]
                table.add_row("all", f"{a['layers']} layers (element-weighted)", "", "", _pct(a["zero_fraction"]),
                              *(_pct(a["below"][tau_key(x)]) for x in self.taus), "", style="bold")
        return table

    def linear_table(self, title: str = "inputs of the linear layers, by projection") -> Any:
        from rich.table import Table

        table = Table(title=title, caption="element-weighted over the layers of each projection")
        for col in ("projection", "layers", "width", "zeros", *(f"|a|<{tau_key(t)}" for t in self.taus)):
            table.add_column(col, justify="left" if col == "projection" else "right")
        for g in self.by_part():
            table.add_row(g["part"], str(g["layers"]), g["width"], _pct(g["zero_fraction"]),
                          *(_pct(g["below"][tau_key(x)]) for x in self.taus))
        if "linear_input" in self.aggregate:
            a = self.aggregate["linear_input"]
            table.add_row("all", str(a["layers"]), "", _pct(a["zero_fraction"]), *(_pct(a["below"][tau_key(x)]) for x in self.taus),
                          style="bold")
        return table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pool(rows: list[ActivationRow], taus: Sequence[float]) -> dict[str, Any]:
    """Element-weighted fractions over ``rows``."""
    elements = sum(r.elements for r in rows)
    widths = sorted({r.width for r in rows})
    return {
        "layers": len(rows), "width": str(widths[0]) if len(widths) == 1 else f"{widths[0]}-{widths[-1]}",
        "tokens": sum(r.tokens for r in rows), "elements": elements,
        "zero_fraction": sum(r.zero_fraction * r.elements for r in rows) / max(elements, 1),
        "below": {tau_key(t): sum(r.below[tau_key(t)] * r.elements for r in rows) / max(elements, 1) for t in taus},
    }


# --- what to hook ---------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    module: nn.Module
    kind: str
    part: str
    layer: int | None
    output: bool  # measure the module's output (activation modules) rather than its input
    channels_first: bool


def _is_hf(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in _LINEAR_LIKE


def _kinds(kinds: Iterable[str]) -> set[str]:
    chosen = {"linear_inputs" if k == "linear_input" else k for k in kinds}
    unknown = chosen - set(KINDS)
    if unknown or not chosen:
        raise SparsecraftError(f"kinds: {sorted(unknown) or 'none'} given; choose from {', '.join(KINDS)}")
    return chosen


def activation_targets(model: nn.Module, kinds: Iterable[str] = KINDS) -> list[_Target]:
    """Every tensor ``measure_activations`` would watch, in module order."""
    chosen = _kinds(kinds)
    targets: list[_Target] = []
    if _is_hf(model):
        from sparsecraft.models.hf import decoder_blocks
        from sparsecraft.models.mlp import mlp_parts

        blocks = decoder_blocks(model)  # a clear error for unsupported architectures
        root = next(name for name, module in model.named_modules() if module is blocks)
        if "mlp_hidden" in chosen:
            targets += [_Target(p.down.name, p.down.module, "mlp_hidden", p.down.name[len(p.prefix) + 1:], p.index, False, False)
                        for p in mlp_parts(model)]
        if "linear_inputs" in chosen:
            for name, module in model.named_modules():
                if _is_linear(module):
                    # part: the path inside the block (GPT-2 has both attn.c_proj and mlp.c_proj)
                    index, _, part = name[len(root) + 1:].partition(".") if name.startswith(root + ".") else ("", "", name)
                    targets.append(_Target(name, module, "linear_input", part, int(index) if index else None, False, False))
        return targets
    counters = {"activation_output": 0, "linear_input": 0}
    for name, module in model.named_modules():
        if "mlp_hidden" in chosen and isinstance(module, ACTIVATION_TYPES):
            kind, output, channels_first = "activation_output", True, None
        elif "linear_inputs" in chosen and (_is_linear(module) or isinstance(module, _CONV_TYPES)):
            kind, output, channels_first = "linear_input", False, isinstance(module, _CONV_TYPES)
        else:
            continue
        targets.append(_Target(name or type(module).__name__, module, kind, name or type(module).__name__, counters[kind],
                               output, channels_first))  # type: ignore[arg-type]
        counters[kind] += 1
    if not targets:
        raise SparsecraftError(
            f"model: {type(model).__name__} has no Linear/Conv layers and no activation modules "
            f"({', '.join(t.__name__ for t in ACTIVATION_TYPES[:4])}, ...) to measure; functional activations "
            "(F.relu) are invisible to hooks, use modules"
        )
    return targets


def select_targets(targets: list[_Target], modules: Sequence[str] | None) -> list[_Target]:
    """Keep the targets whose full or last name matches one of the globs; each glob must match."""
    if not modules:
        return targets
    names = list(dict.fromkeys(t.name for t in targets))
    for glob in modules:
        if not any(fnmatch.fnmatchcase(n, glob) or fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], glob) for n in names):
            close = difflib.get_close_matches(glob, names, n=5, cutoff=0.4) or names[:5]
            raise SparsecraftError(f"modules: {glob!r} matches no measured module; close names: {', '.join(close)}")
    return [t for t in targets if any(fnmatch.fnmatchcase(t.name, g) or fnmatch.fnmatchcase(t.name.rsplit(".", 1)[-1], g)
                                      for g in modules)]


# --- counting -------------------------------------------------------------------------------


class _Counts:
    """Running counts for one tensor: totals per tau, and histograms of per-token counts."""

    def __init__(self, name: str, taus: tuple[float, ...]) -> None:
        self.name, self.taus, self.mid = name, taus, middle_tau(taus)
        self.width = 0
        self.tokens = 0
        self.zeros = 0
        self.below = [0] * len(taus)
        self.zero_hist: Tensor | None = None
        self.below_hist: Tensor | None = None

    def add(self, x: Tensor, channels_first: bool | None) -> None:
        if channels_first is None:  # activation outputs: images are channels-first
            channels_first = x.dim() >= 4
        if channels_first and x.dim() >= 3:
            x = x.movedim(1, -1)
        x = x.detach().reshape(-1, x.shape[-1] if x.dim() else 1).float()
        if x.numel() == 0:
            return
        if self.zero_hist is None:
            self.width = x.shape[1]
            self.zero_hist = torch.zeros(self.width + 1, dtype=torch.long)
            self.below_hist = torch.zeros(self.width + 1, dtype=torch.long)
        elif x.shape[1] != self.width:
            raise SparsecraftError(f"{self.name}: its width changed from {self.width} to {x.shape[1]} between calls")
        magnitude = x.abs()
        per_token_zero = (x == 0).sum(dim=1)
        per_token_below = (magnitude < self.mid).sum(dim=1)
        self.tokens += x.shape[0]
        self.zeros += int(per_token_zero.sum())
        for i, tau in enumerate(self.taus):
            self.below[i] += int((magnitude < tau).sum())
        self.zero_hist += torch.bincount(per_token_zero, minlength=self.width + 1).cpu()
        self.below_hist += torch.bincount(per_token_below, minlength=self.width + 1).cpu()  # type: ignore[operator]


def histogram_stats(hist: Tensor, width: int) -> TokenStats:
    """Mean and percentiles of values k / width with counts ``hist[k]``; percentiles interpolate
    linearly between order statistics, as ``torch.quantile`` does."""
    counts = hist.double()
    n = float(counts.sum())
    if n == 0:
        return TokenStats(float("nan"), float("nan"), float("nan"), float("nan"))
    values = torch.arange(len(hist), dtype=torch.float64) / width
    cumulative = counts.cumsum(0)

    def order_statistic(j: int) -> float:  # the j-th smallest value (0-based)
        return float(values[int(torch.searchsorted(cumulative, j, right=True))])

    def quantile(q: float) -> float:
        pos = q * (n - 1)
        lo = int(pos)
        a = order_statistic(lo)
        return a + (pos - lo) * (order_statistic(min(lo + 1, int(n) - 1)) - a)

    return TokenStats(float((counts * values).sum() / n), quantile(0.1), quantile(0.5), quantile(0.9))


def _forward(model: nn.Module, batch: Any, device: torch.device, hf: bool) -> None:
    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, Tensor) else v

    if isinstance(batch, dict):
        model(**{k: move(v) for k, v in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*(move(v) for v in batch))
    elif hf and isinstance(batch, Tensor) and not batch.is_floating_point():
        model(input_ids=move(batch), use_cache=False)
    else:
        model(move(batch))


def _batches(batches: Tensor | Iterable[Any], batch_size: int) -> list[Any] | Iterable[Any]:
    if isinstance(batches, Tensor):  # e.g. (n, seqlen) token windows: split along the first dim
        return list(batches.split(batch_size))
    return batches


@torch.no_grad()
def measure_activations(
    model: nn.Module, batches: Tensor | Iterable[Any], taus: Iterable[float] = DEFAULT_TAUS,
    modules: Sequence[str] | None = None, kinds: Iterable[str] = KINDS, progress: bool = True, batch_size: int = 4,
) -> ActivationReport:
    """Run ``batches`` through ``model`` and count, per watched tensor, exact zeros and |a| < tau.

    ``batches``: a tensor (split into ``batch_size`` along dim 0; integer tensors are token ids
    for Hugging Face models) or an iterable of tensors, tuples (positional inputs) or dicts
    (keyword inputs). ``modules``: globs on full or last module names; each must match.
    """
    taus_t = check_taus(taus)
    targets = select_targets(activation_targets(model, kinds), modules)
    counts: dict[tuple[int, bool], _Counts] = {}
    handles = []
    for t in targets:  # down_proj is both mlp_hidden and a linear input: one counter, two rows
        key = (id(t.module), t.output)
        if key in counts:
            continue
        c = counts[key] = _Counts(t.name, taus_t)
        if t.output:
            handles.append(t.module.register_forward_hook(lambda _m, _a, out, c=c, cf=t.channels_first: c.add(out, cf)))
        else:
            handles.append(t.module.register_forward_pre_hook(
                lambda _m, args, c=c, cf=t.channels_first: c.add(args[0], cf) if args and isinstance(args[0], Tensor) else None))
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    try:
        for batch in progress_bar(_batches(batches, batch_size), "activations", enabled=progress):
            _forward(model, batch, device, _is_hf(model))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise SparsecraftError("batches: no batches given; pass at least one input batch")
    rows = []
    for t in targets:
        c = counts[(id(t.module), t.output)]
        if c.tokens == 0:
            continue  # never called on this data (e.g. an unused head)
        elements = c.tokens * c.width
        rows.append(ActivationRow(
            t.name, t.kind, t.part, t.layer, c.width, c.tokens, elements, c.zeros / elements,
            {tau_key(tau): b / elements for tau, b in zip(taus_t, c.below)},
            histogram_stats(c.zero_hist, c.width), histogram_stats(c.below_hist, c.width),  # type: ignore[arg-type]
        ))
    if not rows:
        raise SparsecraftError("modules: none of the selected modules ran on these batches")
    report = ActivationReport(taus_t, rows, seen)
    for kind in dict.fromkeys(r.kind for r in rows):
        pooled = _pool(report.of_kind(kind), taus_t)
        report.aggregate[kind] = {k: pooled[k] for k in ("layers", "elements", "zero_fraction", "below")}
    return report


# --- plot -----------------------------------------------------------------------------------


def plot_activation_sparsity(report: ActivationReport, path: str | os.PathLike[str], title: str = "activation sparsity") -> None:
    """PNG: exact-zero and |a| < tau fractions against layer index for the MLP hidden activations
    (or activation outputs), and a second panel with the linear inputs, one line per projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    hidden, linear = report.hidden_rows, report.of_kind("linear_input")
    panels = [p for p in (hidden, linear) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    mid = tau_key(report.middle_tau)
    for ax, rows in zip(axes[0], panels):
        if rows is hidden:
            xs = [r.layer if r.layer is not None else i for i, r in enumerate(rows)]
            ax.plot(xs, [r.zero_fraction for r in rows], marker="o", color="black", label="exact zeros")
            for tau in report.taus:
                ax.plot(xs, [r.below[tau_key(tau)] for r in rows], marker=".", label=f"|a| < {tau_key(tau)}")
            ax.set_title("MLP hidden activation" if rows[0].kind == "mlp_hidden" else "activation outputs")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            parts: dict[str, list[ActivationRow]] = {}
            for r in rows:
                parts.setdefault(r.part, []).append(r)
            if all(len(v) == 1 for v in parts.values()):  # plain models or head-only: one bar per module
                ax.bar(range(len(rows)), [r.below[mid] for r in rows], label=f"|a| < {mid}")
                ax.bar(range(len(rows)), [r.zero_fraction for r in rows], color="black", label="exact zeros")
                ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=45, ha="right", fontsize=7)
                ax.set_title(f"layer inputs: |a| < {mid} by module")
            else:
                for part, group in parts.items():
                    if len(group) > 1:
                        ax.plot([r.layer for r in group], [r.below[mid] for r in group], marker=".", label=part)
                ax.set_title(f"linear inputs: |a| < {mid} by projection")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of activations")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
