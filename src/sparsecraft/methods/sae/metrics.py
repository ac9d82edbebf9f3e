"""What the field reports for an SAE: reconstruction (FVU), sparsity (L0 and its spread over
tokens), dead and rare latents, downstream loss recovered, and each latent's top contexts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.methods.sae.activations import Chunk, Harvest, harvest, outliers
from sparsecraft.methods.sae.hooks import splice
from sparsecraft.methods.sae.model import SparseAutoencoder

RARE_DENSITY = 1e-4  # latents firing on fewer than 1 in 10,000 tokens are "rare"


def activations_for(model: nn.Module, sae: SparseAutoencoder, windows: Tensor, stats: dict | None = None):  # type: ignore[no-untyped-def]
    """The activations ``sae`` reads (and, for a transcoder, its targets) over ``windows``, with the
    same first-position and outlier rules it was trained under."""
    cfg = sae.config
    return harvest(model, windows, Harvest(cfg.hook, cfg.target_hook or None, outlier_factor=cfg.outlier_factor), stats)


@dataclass
class Reconstruction:
    """Per-token statistics of an SAE on a set of activations (eval mode: batch-free codes)."""

    tokens: int
    fvu: float  # sum ||y - y_hat||^2 / sum ||y - mean y||^2
    mse: float  # mean over tokens of ||y - y_hat||^2
    l0_mean: float
    l0_std: float
    l0_p10: float
    l0_p50: float
    l0_p90: float
    dead_fraction: float  # never fired on these tokens
    rare_fraction: float  # fired, but on fewer than RARE_DENSITY of the tokens
    density: Tensor  # per latent, fraction of tokens it fires on
    l0_per_token: Tensor
    outlier_fraction: float = 0.0  # tokens left out as massive activations (set by the caller that knows)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("density")
        d.pop("l0_per_token")
        return d


@torch.no_grad()
def reconstruction(sae: SparseAutoencoder, chunks: Iterable[Chunk]) -> Reconstruction:
    """FVU, L0 distribution and latent densities over ``chunks`` ((x, y) with y None for SAEs)."""
    was_training = sae.training
    sae.eval()
    device = sae.W_enc.device
    fired = torch.zeros(sae.config.d_sae, dtype=torch.float64)
    l0s: list[Tensor] = []
    err = tot = sum_t = sum_sq = 0.0
    n = 0
    for x, y in chunks:
        target = (y if sae.config.transcoder else x).to(device, torch.float32)
        codes = sae.encode(x.to(device, torch.float32))
        estimate = sae.decode(codes)
        err += float((estimate - target).double().pow(2).sum())
        active = codes > 0
        fired += active.sum(dim=0).double().cpu()
        l0s.append(active.sum(dim=-1).cpu())
        t = target.double()
        sum_t = sum_t + t.sum(dim=0)
        sum_sq += float(t.pow(2).sum())
        n += len(x)
    sae.train(was_training)
    if n == 0:
        raise ValueError("reconstruction: no activations given")
    tot = sum_sq - float((sum_t * sum_t).sum()) / n  # sum ||t - mean||^2
    l0 = torch.cat(l0s).float()
    density = (fired / n).float()
    q = torch.quantile(l0, torch.tensor([0.1, 0.5, 0.9])).tolist() if len(l0) else [0.0] * 3
    return Reconstruction(tokens=n, fvu=err / max(tot, 1e-12), mse=err / n, l0_mean=float(l0.mean()),
                          l0_std=float(l0.std()) if len(l0) > 1 else 0.0, l0_p10=q[0], l0_p50=q[1], l0_p90=q[2],
                          dead_fraction=float((density == 0).float().mean()),
                          rare_fraction=float(((density > 0) & (density < RARE_DENSITY)).float().mean()),
                          density=density, l0_per_token=l0)


@dataclass
class LossRecovered:
    ce_clean: float
    ce_sae: float
    ce_zero: float

    @property
    def loss_recovered(self) -> float:
        """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 for a perfect reconstruction, 0 for zero-ablation."""
        gap = self.ce_zero - self.ce_clean
        return (self.ce_zero - self.ce_sae) / gap if abs(gap) > 1e-12 else float("nan")

    def summary(self) -> dict:
        return asdict(self) | {"loss_recovered": self.loss_recovered}


def _mean_ce(model: nn.Module, windows: Tensor, batch_size: int, skip_first: bool) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        if skip_first:  # the first position is not spliced (see splice_sae): score the rest only
            logits, targets = logits[:, 1:], targets[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total / max(count, 1)


def _left_alone(skip_first: bool, outlier_factor: float) -> callable:  # type: ignore[valid-type]
    """The positions a splice leaves as the model computed them: the first of each window (when
    skipped in training) and outlier tokens (activations.outliers), as the SAE never saw them."""

    def keep(own: Tensor) -> Tensor:
        mask = outliers(own, outlier_factor) if own.dim() == 3 else torch.zeros(own.shape[:-1], dtype=torch.bool)
        if skip_first and own.dim() == 3:
            mask[:, 0] = True
        return mask
    return keep


@contextlib.contextmanager
def splice_sae(model: nn.Module, sae: SparseAutoencoder, skip_first: bool = True):  # type: ignore[no-untyped-def]
    """Within the block the model runs with the SAE's reconstruction in place of its hook's
    activation (for a transcoder: the MLP output computed from the MLP input)."""
    cfg = sae.config
    name = cfg.target_hook if cfg.transcoder else cfg.hook
    source = cfg.hook if cfg.transcoder else None

    def reconstruct(x: Tensor) -> Tensor:
        return sae(x.float())

    with splice(model, name, reconstruct, source=source, keep=_left_alone(skip_first, cfg.outlier_factor)):
        yield


@torch.no_grad()
def loss_recovered(model: nn.Module, sae: SparseAutoencoder, windows: Tensor, batch_size: int = 4,
                   skip_first: bool = True) -> LossRecovered:
    """Next-token cross-entropy clean, with the SAE spliced in, and with the hook zero-ablated."""
    was_training = sae.training
    sae.eval()
    cfg = sae.config
    name = cfg.target_hook if cfg.transcoder else cfg.hook
    clean = _mean_ce(model, windows, batch_size, skip_first)
    with splice_sae(model, sae, skip_first):
        spliced = _mean_ce(model, windows, batch_size, skip_first)
    with splice(model, name, torch.zeros_like, keep=_left_alone(skip_first, cfg.outlier_factor)):
        zero = _mean_ce(model, windows, batch_size, skip_first)
    sae.train(was_training)
    return LossRecovered(ce_clean=clean, ce_sae=spliced, ce_zero=zero)


def plot_density(result: Reconstruction, path: Path, title: str) -> None:
    """Histogram of log10 latent density, and of L0 per token (variable for batch-level kinds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsecraft.utils import atomic_path

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    alive = result.density[result.density > 0]
    if len(alive):
        left.hist(torch.log10(alive).numpy(), bins=50, color="#3b6ea5")
    left.set_xlabel("log10 feature density (fraction of tokens)")
    left.set_ylabel("latents")
    left.set_title(f"density: {result.dead_fraction:.1%} dead, {result.rare_fraction:.1%} rare")
    right.hist(result.l0_per_token.numpy(), bins=min(60, max(10, int(result.l0_per_token.max()) + 1)), color="#a55b3b")
    right.set_xlabel("active latents per token (L0)")
    right.set_title(f"L0 mean {result.l0_mean:.1f}, p10-p90 {result.l0_p10:.0f}-{result.l0_p90:.0f}")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


@dataclass
class Context:
    activation: float
    window: int
    position: int
    text: str  # the context, with the activating token in [[ ]]


@torch.no_grad()
def top_contexts(model: nn.Module, tokenizer: object, sae: SparseAutoencoder, windows: Tensor, latent: int,
                 n: int = 10, before: int = 12, after: int = 4, batch_size: int = 8,
                 skip_first: bool = True) -> list[Context]:
    """The ``n`` tokens of ``windows`` where ``latent`` fires most strongly, with their contexts
    (each window's first position skipped, as in training)."""
    from sparsecraft.methods.sae.hooks import run_captured

    if not 0 <= latent < sae.config.d_sae:
        raise ValueError(f"latent {latent} is out of range: the SAE has {sae.config.d_sae} latents")
    sae.eval()
    device = next(model.parameters()).device
    best: list[tuple[float, int, int]] = []
    for i in range(0, len(windows), batch_size):
        acts = run_captured(model, windows[i:i + batch_size].to(device), [sae.config.hook])[sae.config.hook]
        values = sae.encode(acts.float())[..., latent].cpu()  # [batch, seq]
        if skip_first:
            values[:, 0] = 0
        top = values.flatten().topk(min(n, values.numel()))
        seq = values.shape[1]
        best += [(float(v), i + int(j) // seq, int(j) % seq) for v, j in zip(top.values, top.indices) if v > 0]
        best = sorted(best, reverse=True)[:n]
    out = []
    for value, w, p in best:
        ids = windows[w]
        left = tokenizer.decode(ids[max(0, p - before):p])  # type: ignore[attr-defined]
        here = tokenizer.decode(ids[p:p + 1])  # type: ignore[attr-defined]
        right = tokenizer.decode(ids[p + 1:p + 1 + after])  # type: ignore[attr-defined]
        out.append(Context(value, w, p, f"{left}[[{here}]]{right}".replace("\n", "\\n")))
    return out
