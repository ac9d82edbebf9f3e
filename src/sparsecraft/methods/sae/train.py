"""Training an SAE on a stream of activation batches, on one process or under torch DDP.

The recipe is Gao et al. 2024's for the unit-norm kinds (Adam, decoder rows kept at unit norm with
the gradient component along them removed, b_dec initialised at the geometric median of a
sample, loss = NMSE + alpha x auxiliary loss) and the Anthropic April-2024 update's for ReLU + L1
(loss = ||x - x_hat||^2 + lambda sum_i f_i ||W_dec,i||, lambda ramped up over the first 5% of
steps, no norm constraint). Inputs are scaled so that E||x||^2 = d_in (SAELens's
"expected_average_only_in"), which makes learning rates and lambda transfer between sites; the
scale is folded into the weights at the end, so the saved SAE works on raw activations.
Learning rate: linear warm-up, constant, linear decay to 0 over the last 20% of steps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sparsecraft.core.distributed import is_distributed, mean_over_ranks, sum_over_ranks
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.sae import allocate, losses
from sparsecraft.methods.sae.activations import Chunk
from sparsecraft.methods.sae.model import BATCH_KINDS, UNIT_NORM_KINDS, SparseAutoencoder

THRESHOLD_BATCHES = 8  # the last training batches the eval-mode threshold is estimated on
AUX_BY_KIND = {"relu": "none", "topk": "auxk", "batchtopk": "auxk", "feature_choice": "zipf", "mutual_choice": "zipf"}


@dataclass
class TrainConfig:
    tokens: int
    batch_size: int = 4096
    lr: float | None = None  # None: 2e-3 / sqrt(d_sae / 2^14), see default_lr
    warmup_steps: int | None = None  # None: 5% of the steps, at most 1000
    decay_fraction: float = 0.2
    aux: str = "auto"  # auxk | zipf | none | auto (AuxK for TopK/BatchTopK, zipf for Feature/Mutual Choice)
    aux_coefficient: float = 1 / 32
    k_aux: int | None = None  # None: d_in // 2 (Gao et al.)
    dead_tokens: int = 1_000_000  # a latent that has not fired for this many tokens is dead
    l1_warmup_fraction: float = 0.05
    b_dec_init: str = "geometric_median"  # geometric_median | mean | zeros
    normalize: bool = True
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise SparsecraftError(f"sae train: tokens must be positive, got {self.tokens}")
        if self.batch_size <= 0:
            raise SparsecraftError(f"sae train: batch_size must be positive, got {self.batch_size}")
        if self.aux not in ("auto", "auxk", "zipf", "none"):
            raise SparsecraftError(f"sae train: aux {self.aux!r} is unknown; choose auto, auxk, zipf or none")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise SparsecraftError(f"sae train: b_dec_init {self.b_dec_init!r} is unknown; choose geometric_median, mean or zeros")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    input_scale: float
    output_scale: float
    lr: float
    history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def default_lr(d_sae: int) -> float:
    """Gao et al.'s 1/sqrt(latents) scaling, 2e-4 / sqrt(d_sae / 2^14), times 10: their constant was
    fitted to runs of many thousands of steps at 131k tokens per batch; for runs of hundreds of
    steps at 4096 tokens (SmolLM2-135M, d_sae 4608, 150 steps) 10x gave FVU 0.20 against 0.33
    (benchmarks/sae_bench.py, BENCHMARKS.md). Pass lr for long runs."""
    return 2e-3 / math.sqrt(d_sae / 2**14)


def geometric_median(points: Tensor, iterations: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to ``points``."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            return new
        median = new
    return median


def estimate_threshold(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> None:
    """Set the eval-mode threshold of a batch-kind SAE to the mean over ``batches`` of the smallest
    value its training selection keeps (per latent for Feature Choice), with the current weights,
    averaged over ranks under torch.distributed."""
    found = [sae.smallest_kept(x) for x in batches]
    if not found:
        return
    mean = torch.stack(found).mean(dim=0)
    mean_over_ranks([mean])
    with torch.no_grad():
        sae.threshold.copy_(mean)


def lr_factor(step: int, steps: int, warmup: int, decay_fraction: float) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over the last fraction."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(steps * (1 - decay_fraction))
    if step >= decay_start and steps > decay_start:
        return max(0.0, (steps - step) / (steps - decay_start))
    return 1.0


class _Step(nn.Module):
    """One training forward as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        super().__init__()
        self.sae = sae

    def forward(self, x: Tensor, target: Tensor, aux_mask: Tensor | None, aux_kind: str, k_aux: int,
                l1: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss, auxiliary loss, tokens each latent fired on, reconstruction) of one batch."""
        sae = self.sae
        pre = sae.pre_activations(x)
        kept = sae.allocation(pre)
        x_hat = allocate.decode(kept, sae.W_dec, len(x)) + sae.b_dec
        fired = torch.bincount(kept.cols[kept.values > 0], minlength=sae.config.d_sae).float()
        if sae.kind == "relu":
            recon = (x_hat - target).pow(2).sum(dim=-1).mean()
            penalty = (kept.values * sae.W_dec.norm(dim=1)[kept.cols]).sum() / len(x)  # losses.l1_penalty, sparse
            return recon + l1 * penalty, recon.new_zeros(()), fired, x_hat
        loss = losses.normalized_mse(x_hat, target)
        aux = loss.new_zeros(())
        if aux_mask is not None:
            residual = (target - x_hat).detach()
            if aux_kind == "auxk":
                aux = losses.auxk_loss(pre, aux_mask, residual, sae.W_dec, k_aux)
            else:
                aux = losses.aux_zipf_loss(pre, aux_mask, residual, sae.W_dec, k_aux)
        return loss, aux, fired, x_hat


def _first_batch(batches: Iterator[Chunk]) -> Chunk:
    try:
        return next(batches)
    except StopIteration:
        raise SparsecraftError("sae train: the activation source gave no batches") from None


def _scale_of(t: Tensor) -> float:
    """Factor making E||t||^2 = d."""
    return math.sqrt(t.shape[-1] / t.pow(2).sum(dim=-1).mean().clamp_min(1e-12).item())


def train_sae(sae: SparseAutoencoder, batches: Iterable[Chunk], config: TrainConfig, progress: bool = True,
              log: callable | None = None) -> TrainResult:  # type: ignore[valid-type]
    """Train ``sae`` in place on ``batches`` ((x, y) pairs of ``config.batch_size`` rows; y is None
    for SAEs) for ``config.tokens`` tokens. Under torch.distributed each rank must be given its own
    batches; the initialisation, dead-latent statistics and threshold are shared across ranks."""
    from tqdm import tqdm

    c, cfg = config, sae.config
    stream = iter(batches)
    x0, y0 = _first_batch(stream)
    if x0.shape[-1] != cfg.d_in or (cfg.transcoder and (y0 is None or y0.shape[-1] != cfg.d_out)):
        raise SparsecraftError(
            f"sae train: activations have width {x0.shape[-1]}{'' if y0 is None else f' -> {y0.shape[-1]}'}, "
            f"the SAE expects {cfg.d_in}{f' -> {cfg.d_out}' if cfg.transcoder else ''}")
    device = sae.W_enc.device
    generator = torch.Generator().manual_seed(c.seed)
    sae.reset_parameters(generator)
    target0 = y0 if cfg.transcoder else x0
    scales = torch.tensor([_scale_of(x0) if c.normalize else 1.0, _scale_of(target0) if c.normalize else 1.0])
    if not cfg.transcoder:
        scales[1] = scales[0]
    b_dec = {"geometric_median": lambda t: geometric_median(t), "mean": lambda t: t.mean(dim=0),
             "zeros": lambda t: torch.zeros(t.shape[-1])}[c.b_dec_init](target0.float() * scales[1])
    mean_over_ranks([scales, b_dec])  # every rank starts from the same point
    sae.to(device)
    with torch.no_grad():
        sae.b_dec.copy_(b_dec.to(device))
    in_scale, out_scale = float(scales[0]), float(scales[1])

    aux_kind = AUX_BY_KIND[sae.kind] if c.aux == "auto" else c.aux
    k_aux = c.k_aux or max(1, cfg.d_out // 2)  # type: ignore[operator]
    lr = c.lr or default_lr(cfg.d_sae)
    steps = c.steps
    warmup = c.warmup_steps if c.warmup_steps is not None else min(1000, max(1, steps // 20))
    step_module: nn.Module = _Step(sae)
    if is_distributed():
        step_module = nn.parallel.DistributedDataParallel(step_module)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, c.decay_fraction))
    since_fired = torch.zeros(cfg.d_sae, device=device)
    density = torch.full((cfg.d_sae,), cfg.k / cfg.d_sae, device=device)
    history: list[dict] = []
    sae.train()
    bar = tqdm(total=steps * c.batch_size, unit="tok", unit_scale=True, desc=f"training {sae.kind} SAE", disable=not progress)
    started = time.perf_counter()

    def all_batches() -> Iterator[Chunk]:
        yield x0, y0
        yield from stream

    last_batches: deque[Tensor] = deque(maxlen=THRESHOLD_BATCHES)
    step = 0
    for x, y in all_batches():
        if step >= steps:
            break
        x = x.to(device, torch.float32) * in_scale
        target = (y.to(device, torch.float32) * out_scale) if cfg.transcoder else x
        aux_mask = None
        if aux_kind == "auxk":
            aux_mask = since_fired >= c.dead_tokens
        elif aux_kind == "zipf":
            aux_mask = losses.zipf_deficit(density, cfg.k)
        l1 = cfg.l1_coefficient * min(1.0, (step + 1) / max(1, int(steps * c.l1_warmup_fraction)))
        loss, aux, fired, x_hat = step_module(x, target, aux_mask, aux_kind, k_aux, l1)
        total = loss + c.aux_coefficient * aux
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        unit_norm = sae.kind in UNIT_NORM_KINDS
        if unit_norm:
            sae.project_decoder_grad()
        optimizer.step()
        schedule.step()
        if unit_norm:
            sae.normalize_decoder()
        with torch.no_grad():
            counts = torch.cat([fired, fired.new_tensor([len(x)])])
            sum_over_ranks([counts])
            batch_tokens = counts[-1]
            since_fired += batch_tokens
            since_fired[counts[:-1] > 0] = 0
            density.mul_(0.99).add_(0.01 * counts[:-1] / batch_tokens)
            if sae.kind in BATCH_KINDS:
                last_batches.append(x)
        step += 1
        bar.update(len(x))
        if step % c.log_every == 0 or step == steps:
            with torch.no_grad():
                fvu = float(losses.normalized_mse(x_hat, target))
            record = {"step": step, "tokens": step * len(x), "loss": float(total.detach()), "fvu": fvu,
                      "aux": float(aux.detach()), "l0": float(fired.sum()) / len(x),
                      "dead_fraction": float((since_fired >= c.dead_tokens).float().mean()),
                      "lr": schedule.get_last_lr()[0]}
            history.append(record)
            bar.set_postfix(fvu=f"{fvu:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.1%}")
            if log is not None:
                log(record)
    bar.close()
    seconds = time.perf_counter() - started
    if step < steps:
        raise SparsecraftError(f"sae train: the activation source ran out after {step} of {steps} steps; "
                               "give more text or fewer --tokens")
    if sae.kind in BATCH_KINDS:
        estimate_threshold(sae, last_batches)
    sae.eval()
    sae.fold_scales(in_scale, out_scale)
    return TrainResult(steps=steps, tokens=steps * c.batch_size, seconds=seconds, input_scale=in_scale,
                       output_scale=out_scale, lr=lr, history=history)
