"""PPL-p% sparsity: the most activation sparsity an LLM's MLPs reach for at most p% more perplexity.

Luo et al. 2024, "Sparsing Law: Towards Large Language Models with Greater Activation Sparsity"
(arXiv 2411.02335), measuring with CETT (cumulative error of tail truncation; Zhang et al. 2024,
"ReLU^2 Wins"). For the MLP of block l with hidden activation a (the down projection's input)
and down weight W (d x F, columns W_i):

- neuron i is inactive for a token when its output norm |a_i| * ||W_i||_2 <= t_l;
- CETT of a token = ||sum_{inactive i} a_i W_i||_2 / ||W a||_2 (the bias is not part of it);
- given one CETT value c for the whole model, each layer's t_l is a candidate threshold whose
  mean CETT over calibration tokens is <= c and within 1% of it (the reference implementation
  binary-searches for the largest such candidate; ours are 4097 quantiles of the layer's scores,
  searched by safeguarded interpolation, which needs fewer of the costly CETT evaluations);
- an outer bisection on c in [0, 1] finds the largest c whose perplexity ratio (sparsified /
  dense, on the evaluation windows) is <= 1 + p/100; the PPL-p% sparsity is the fraction of
  inactive neurons at that c, measured during the sparsified evaluation.

Memory: calibration keeps at most ``max_calib_tokens`` tokens per layer (spread evenly over the
calibration windows), float32, with their scores: 2 x layers x max_calib_tokens x F x 4 bytes
(SmolLM2-135M with the default 512: 2 x 30 x 512 x 1536 x 4 B = 189 MB), plus a float32 copy of
each down weight. Cost: about log2(1 / tol) perplexity evaluations (10 for the default tol).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.analysis.perplexity import perplexity
from sparsecraft.errors import SparsecraftError
from sparsecraft.models.mlp import MLPParts, mlp_parts
from sparsecraft.utils import progress_bar

DEFAULT_MAX_CALIB_TOKENS = 512
#: Candidate thresholds per layer: quantiles of its scores at k / LEVELS.
LEVELS = 4096
#: A layer's threshold is accepted once its mean CETT is within this fraction of c (below it).
CETT_REL_TOL = 0.01


def cett(a: Tensor, W: Tensor, t: float, column_norms: Tensor | None = None) -> Tensor:
    """Per-token CETT of activations ``a`` (n, F) through ``W`` (d, F) at threshold ``t``.

    Tokens whose full output W a is zero have no defined CETT; they get 0.
    """
    norms = W.norm(dim=0) if column_norms is None else column_norms
    inactive = a.abs() * norms <= t
    tail = (a * inactive).matmul(W.t()).norm(dim=-1)
    full = a.matmul(W.t()).norm(dim=-1)
    return torch.where(full > 0, tail / full.clamp_min(torch.finfo(full.dtype).tiny), torch.zeros_like(full))


class LayerCalibration:
    """One MLP's calibration activations; CETT at candidate thresholds, memoized."""

    def __init__(self, activations: Tensor, W: Tensor) -> None:
        self.a = activations.float()
        self.W = W.float().to(self.a.device)
        self.norms = self.W.norm(dim=0)
        self.full = self.a.matmul(self.W.t()).norm(dim=-1)
        keep = self.full > 0  # CETT is undefined for tokens with no MLP output
        self.a, self.full = self.a[keep], self.full[keep]
        if self.a.shape[0] == 0:
            raise SparsecraftError("calibration: an MLP produced no nonzero output on the calibration tokens")
        self.scores = self.a.abs() * self.norms  # kept: recomputing it dominated the search's elementwise work
        scores = self.scores.reshape(-1)
        # quantiles from a bounded subsample of the scores (exact for up to 2**24 scores)
        if scores.numel() > 1 << 24:
            scores = scores[torch.linspace(0, scores.numel() - 1, 1 << 24, device=scores.device).long()]
        ordered = scores.sort().values
        positions = torch.linspace(0, ordered.numel() - 1, LEVELS + 1, device=ordered.device).round().long()
        self.candidates = ordered[positions].tolist()
        self._cett: dict[int, float] = {}

    def mean_cett(self, t: float) -> float:
        tail = self.a.masked_fill(self.scores > t, 0.0).matmul(self.W.t()).norm(dim=-1)
        return float((tail / self.full).mean())

    def _at(self, k: int) -> float:
        """Mean CETT at candidate k; k = -1 is t = 0, where only exact zeros are inactive (CETT 0)."""
        if k < 0:
            return 0.0
        if k not in self._cett:
            self._cett[k] = self.mean_cett(self.candidates[k])
        return self._cett[k]

    def threshold(self, c: float, rel_tol: float = CETT_REL_TOL) -> float:
        """A candidate threshold whose mean CETT lies in [c - rel_tol * c - 1e-4, c] (or the largest
        candidate with CETT <= c, when adjacent candidates straddle that band).

        Each CETT costs a (tokens x F) @ (F x d) product, so the search brackets c with the values
        already computed (for other c) and interpolates, bisecting whenever a step fails to halve
        the bracket: a few products per layer and c instead of the log2(LEVELS) of plain bisection.
        """
        if self._at(LEVELS) <= c:
            return self.candidates[LEVELS]
        lo = max((k for k, v in self._cett.items() if v <= c), default=-1)  # CETT(lo) <= c < CETT(hi)
        hi = min(k for k, v in self._cett.items() if v > c)
        band = rel_tol * c + 1e-4
        halved = True
        while hi - lo > 1 and c - self._at(lo) > band:
            v_lo, v_hi = self._at(lo), self._at(hi)
            guess = lo + (c - v_lo) / (v_hi - v_lo) * (hi - lo) if halved else (lo + hi) / 2
            mid = min(max(round(guess), lo + 1), hi - 1)
            width = hi - lo
            if self._at(mid) <= c:
                lo = mid
            else:
                hi = mid
            halved = 2 * (hi - lo) <= width
        return 0.0 if lo < 0 else self.candidates[lo]


@dataclass
class CETTCalibration:
    parts: list[MLPParts]
    layers: list[LayerCalibration]
    tokens: int

    def thresholds(self, c: float) -> list[float]:
        return [layer.threshold(c) for layer in self.layers]


@torch.no_grad()
def calibrate_cett(model: nn.Module, windows: Tensor, max_calib_tokens: int = DEFAULT_MAX_CALIB_TOKENS, batch_size: int = 4,
                   progress: bool = False) -> CETTCalibration:
    """Collect each MLP's hidden activations on ``windows`` (n, seqlen), at most ``max_calib_tokens``
    tokens per layer, every k-th token so they spread over all windows."""
    if max_calib_tokens < 1:
        raise SparsecraftError(f"max_calib_tokens: {max_calib_tokens}; give at least 1 token per layer")
    if windows.dim() != 2 or windows.numel() == 0:
        raise SparsecraftError(f"calibration: expected (n, seqlen) token windows, got shape {tuple(windows.shape)}")
    parts = mlp_parts(model)
    stride = max(1, math.ceil(windows.numel() / max_calib_tokens))
    stored: list[list[Tensor]] = [[] for _ in parts]
    seen = [0] * len(parts)

    def keep(i: int, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        first = (-seen[i]) % stride  # the global token index of the kept rows is a multiple of stride
        stored[i].append(flat[first::stride].float())
        seen[i] += flat.shape[0]

    handles = [p.down.module.register_forward_pre_hook(lambda _m, args, i=i: keep(i, args[0])) for i, p in enumerate(parts)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(windows.split(batch_size), "CETT calibration", enabled=progress):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = [LayerCalibration(torch.cat(s)[:max_calib_tokens], p.down.weight()) for s, p in zip(stored, parts)]
    return CETTCalibration(parts, layers, min(layer.a.shape[0] for layer in layers))


@contextmanager
def cett_sparsified(parts: list[MLPParts], thresholds: list[float]) -> Iterator[list[list[int]]]:
    """Zero, in every down projection's input, the neurons with |a_i| * ||W_i|| <= t_l.

    Yields per layer [inactive, total] counts, filled while the block runs; the hooks are removed
    on exit, also after an exception."""
    counts = [[0, 0] for _ in parts]
    handles = []

    def hook(i: int, norms: Tensor, t: float, args: tuple) -> tuple:
        a = args[0]
        inactive = a.abs() * norms.to(a.dtype) <= t
        counts[i][0] += int(inactive.sum())
        counts[i][1] += inactive.numel()
        return (a.masked_fill(inactive, 0), *args[1:])

    try:
        for i, (p, t) in enumerate(zip(parts, thresholds)):
            norms = p.down.weight().norm(dim=0).to(p.down.module.weight.device)
            handles.append(p.down.module.register_forward_pre_hook(lambda _m, args, i=i, n=norms, t=t: hook(i, n, t, args)))
        yield counts
    finally:
        for h in handles:
            h.remove()


@dataclass
class PPLSparsityResult:
    p: float
    cett: float  # the largest CETT found whose perplexity ratio is <= 1 + p/100
    thresholds: list[float]  # per layer t_l, in units of |a_i| * ||W_down[:, i]||
    layer_cett: list[float]  # mean calibration CETT at t_l (<= cett)
    layer_sparsity: list[float]  # fraction of inactive neurons on the evaluation windows
    sparsity: float  # element-weighted mean of layer_sparsity: the PPL-p% sparsity
    ppl_dense: float
    ppl_sparse: float
    cett_upper: float  # the smallest CETT tried whose ratio exceeded the target (1.0: none did)
    ppl_ratio_upper: float | None  # its perplexity ratio (None: the search hit its bound)
    calib_tokens: int
    evaluations: int
    history: list[dict[str, float]] = field(default_factory=list)  # every (cett, ratio, sparsity) tried

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_sparse / self.ppl_dense

    @property
    def hit_bound(self) -> bool:
        """True when even the largest CETT tried stayed within the budget."""
        return self.ppl_ratio_upper is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ppl_ratio": self.ppl_ratio, "hit_bound": self.hit_bound}


def ppl_p_sparsity(
    model: nn.Module, calib_windows: Tensor, eval_windows: Tensor, p: float = 1.0, tol: float = 1e-3,
    max_calib_tokens: int = DEFAULT_MAX_CALIB_TOKENS, batch_size: int = 4, progress: bool = False,
) -> PPLSparsityResult:
    """PPL-p% sparsity of a Hugging Face causal LM (see the module docstring); bisects CETT to ``tol``."""
    if not p > 0 or not math.isfinite(p):
        raise SparsecraftError(f"p: {p}; give the allowed perplexity increase in percent, > 0 (1 = 1%)")
    if not 0 < tol < 1:
        raise SparsecraftError(f"tol: {tol}; the CETT bisection tolerance must lie in (0, 1)")
    if eval_windows.dim() != 2 or eval_windows.numel() == 0:
        raise SparsecraftError(f"evaluation: expected (n, seqlen) token windows, got shape {tuple(eval_windows.shape)}")
    calibration = calibrate_cett(model, calib_windows, max_calib_tokens, batch_size, progress)
    dense = perplexity(model, eval_windows, batch_size, progress)
    target = 1 + p / 100
    history: list[dict[str, float]] = []

    def evaluate(c: float) -> dict[str, Any]:
        thresholds = calibration.thresholds(c)
        with cett_sparsified(calibration.parts, thresholds) as counts:
            ppl = perplexity(model, eval_windows, batch_size, False)
        total = sum(n for _, n in counts)
        point = {"cett": c, "thresholds": thresholds, "ppl": ppl, "ratio": ppl / dense,
                 "layer_sparsity": [k / max(n, 1) for k, n in counts], "sparsity": sum(k for k, _ in counts) / max(total, 1)}
        history.append({"cett": c, "ppl_ratio": point["ratio"], "sparsity": point["sparsity"]})
        return point

    lo, hi = 0.0, 1.0
    best: dict[str, Any] | None = None
    upper_ratio: float | None = None
    steps = max(1, math.ceil(math.log2(1 / tol)))
    for _ in progress_bar(range(steps), f"PPL-{p:g}% search", enabled=progress):
        c = (lo + hi) / 2
        point = evaluate(c)
        if point["ratio"] <= target:
            lo, best = c, point
        else:
            hi, upper_ratio = c, point["ratio"]
    if best is None:  # even the smallest CETT tried was too much: report c = 0 (only exact zeros dropped)
        best = evaluate(0.0)
    return PPLSparsityResult(
        p=p, cett=best["cett"], thresholds=best["thresholds"],
        layer_cett=[layer.mean_cett(t) for layer, t in zip(calibration.layers, best["thresholds"])],
        layer_sparsity=best["layer_sparsity"], sparsity=best["sparsity"], ppl_dense=dense, ppl_sparse=best["ppl"],
        cett_upper=hi, ppl_ratio_upper=upper_ratio, calib_tokens=calibration.tokens, evaluations=len(history), history=history,
    )
