"""Sparsity sweeps of one-shot methods: perplexity against sparsity, and the essential sparsity.

Jaiswal et al. ("The Emergence of Essential Sparsity in Large Pre-trained Models", NeurIPS 2023)
observe that quality barely moves as the smallest weights are removed, up to a point after which
it falls sharply: the *essential sparsity*. We locate that turning point with the Kneedle rule
(Satopaa et al. 2011) on log-perplexity: with sparsity and log-perplexity both scaled to [0, 1],
the knee is the point farthest below the chord from the first to the last point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsecraft.errors import SparsecraftError
from sparsecraft.utils import atomic_path, write_text_atomic


def parse_sparsities(text: str) -> list[float]:
    """``"0:0.9:0.1"`` (inclusive) or ``"0.5,0.6,0.7"``; every value in [0, 1)."""
    try:
        if text.count(":") == 2:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            values = [round(start + i * step, 10) for i in range(int(math.floor((stop - start) / step + 1e-9)) + 1)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SparsecraftError(f"--sparsities {text!r}: write 0.5,0.6,0.7 or START:STOP:STEP such as 0:0.9:0.1") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise SparsecraftError(f"--sparsities {text!r}: every sparsity must lie in [0, 1), got {bad or 'none'}")
    return sorted(set(values))


def essential_sparsity(sparsities: Sequence[float], ppls: Sequence[float]) -> float | None:
    """The knee of log(ppl) against sparsity (Kneedle); None with fewer than three finite points."""
    pts = [(s, math.log(p)) for s, p in zip(sparsities, ppls) if p is not None and math.isfinite(p) and p > 0]
    if len(pts) < 3:
        return None
    xs, ys = zip(*sorted(pts))
    x0, x1, y0, y1 = xs[0], xs[-1], min(ys), max(ys)
    if x1 == x0 or y1 == y0:
        return None
    gaps = [(x - x0) / (x1 - x0) - (y - y0) / (y1 - y0) for x, y in zip(xs, ys)]
    best = max(range(len(xs)), key=lambda i: gaps[i])
    return xs[best] if gaps[best] > 0 else None


@dataclass
class SweepResult:
    model: str
    dense_ppl: float
    points: list[dict[str, Any]] = field(default_factory=list)

    def curve(self, method: str) -> tuple[list[float], list[float]]:
        rows = sorted((p["sparsity"], p["ppl"]) for p in self.points if p["method"] == method)
        return [0.0] + [r[0] for r in rows if r[0] > 0], [self.dense_ppl] + [r[1] for r in rows if r[0] > 0]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(p["method"] for p in self.points))

    def essential(self) -> dict[str, float | None]:
        return {m: essential_sparsity(*self.curve(m)) for m in self.methods}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dense_ppl": self.dense_ppl, "essential_sparsity": self.essential(), "points": self.points}

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"Perplexity against sparsity: {self.model} (dense {self.dense_ppl:.2f})")
        table.add_column("sparsity", justify="right")
        for m in self.methods:
            table.add_column(m, justify="right")
        sparsities = sorted({p["sparsity"] for p in self.points})
        for s in sparsities:
            cells = []
            for m in self.methods:
                hit = [p["ppl"] for p in self.points if p["method"] == m and p["sparsity"] == s]
                cells.append(f"{hit[0]:.2f}" if hit else "")
            table.add_row(f"{s:.2f}", *cells)
        knees = self.essential()
        table.add_row("essential", *[f"{knees[m]:.2f}" if knees[m] is not None else "-" for m in self.methods])
        return table

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        knees = self.essential()
        for m in self.methods:
            xs, ys = self.curve(m)
            (line,) = ax.plot(xs, ys, marker="o", label=m)
            if knees[m] is not None:
                k = xs.index(knees[m])
                ax.axvline(knees[m], color=line.get_color(), linestyle=":", linewidth=1)
                ax.plot([xs[k]], [ys[k]], marker="*", markersize=14, color=line.get_color())
                ax.annotate(f"essential {knees[m]:.0%}", (xs[k], ys[k]), textcoords="offset points", xytext=(-60, 10),
                            color=line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the decoder projections")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"{Path(self.model).name}: one-shot pruning sweep (dense {self.dense_ppl:.2f})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)


def run_sweep(
    model_source: str, methods: list[str], sparsities: list[float], calib: str, eval_text: str, nsamples: int, seqlen: int,
    eval_windows: int | None, out: Path, progress: bool = True, log: Callable[[str], Any] | None = None,
) -> SweepResult:
    """Prune a fresh copy of the dense weights at every (method, sparsity); JSON rewritten after each point."""
    from sparsecraft.analysis.perplexity import perplexity
    from sparsecraft.data.text import calibration_samples, read_text, tokenize
    from sparsecraft.data.text import eval_windows as make_windows
    from sparsecraft.methods.oneshot import ONE_SHOT, STATS_FREE
    from sparsecraft.methods.sequential import prune_decoder
    from sparsecraft.models.hf import load_causal_lm

    for m in methods:
        ONE_SHOT.get(m)
    say = log or (lambda _msg: None)
    model, tokenizer = load_causal_lm(model_source)
    samples = calibration_samples(tokenize(tokenizer, read_text(calib, "calib")), nsamples, seqlen, 0, "calib")
    windows = make_windows(tokenize(tokenizer, read_text(eval_text, "eval")), seqlen, eval_windows)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = SweepResult(model_source, perplexity(model, windows, batch_size=1, progress=progress))
    say(f"dense perplexity {result.dense_ppl:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    for method in methods:
        for s in sparsities:
            if s == 0.0:
                result.points.append({"method": method, "sparsity": 0.0, "ppl": result.dense_ppl, "prune_seconds": 0.0})
                continue
            model.load_state_dict(dense_state)
            calibration = None if method in STATS_FREE else samples  # magnitude needs no forward passes
            pruned = prune_decoder(model, calibration, method, s, progress=progress, errors=False)
            ppl = perplexity(model, windows, batch_size=1, progress=progress)
            result.points.append({"method": method, "sparsity": s, "measured_sparsity": pruned.sparsity, "ppl": ppl,
                                  "prune_seconds": pruned.seconds})
            say(f"{method} {s:.2f}: perplexity {ppl:.3f}")
            write_text_atomic(out / "sweep.json", json.dumps(result.to_dict(), indent=2))
    model.load_state_dict(dense_state)
    write_text_atomic(out / "sweep.json", json.dumps(result.to_dict(), indent=2))
    result.plot(out / "sweep.png")
    return result
