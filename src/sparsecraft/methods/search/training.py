"""Training and measuring the networks a search compares (shared by Random Search and DASS).

Every compared network goes through :func:`train_and_measure`: the same optimizer, schedule,
batches and epochs from the recipe's ``train`` section, test accuracy after every epoch (the
convergence curve), then its measured sparsity, kept weights and forward FLOPs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sparsecraft.analysis.flops import count_flops, kept_weights
from sparsecraft.core.masking import masks_of
from sparsecraft.data.images import Split
from sparsecraft.methods.search.result import TrainedRow
from sparsecraft.recipes.schema import TrainSection
from sparsecraft.train.trainer import evaluate, fit, make_optimizer, steps_per_epoch


def holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train part, held-out part) of the training split: ``fraction`` of it held out, by seed.

    The search only ever sees these two; the test split is kept for the final comparison.
    """
    order = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * len(order))))
    val, train = order[:n_val], order[n_val:]
    x, y = split.x_train, split.y_train
    return Split(x[train], y[train], x[val], y[val]), Split(x[val], y[val], x[val], y[val])


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and Conv layers (the searchable / prunable weights), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def kept_and_total(model: nn.Module, names: list[str] | None = None) -> tuple[int, int]:
    """(nonzero weights, weights) over the named layers (default: every Linear/Conv layer).

    Counts what the forward pass uses (``analysis.flops.kept_weights``): the mask where one is
    attached (a ``weight_mask`` buffer, ours or a sparse operation's), else the weight's nonzeros.
    """
    layers = [m for name, m in weight_layers(model) if names is None or name in names]
    return sum(kept_weights(m) for m in layers), sum(m.weight.numel() for m in layers)


def forward_flops(model: nn.Module, example: Tensor) -> int:
    """FLOPs of one forward pass per example, counting only kept weights of Linear/Conv layers
    (plus every other matmul, dense); see ``analysis/flops.py``."""
    layers, other, batch = count_flops(model, example)
    return (sum(f.sparse for f in layers.values()) + other) // max(batch, 1)


def train_and_measure(
    model: nn.Module,
    split: Split,
    train: TrainSection,
    *,
    arch: str,
    seed: int,
    make_sparsifier: Callable[[nn.Module, torch.optim.Optimizer, int], object] | None = None,
    epochs: int | None = None,
    progress: bool = False,
) -> TrainedRow:
    """Train ``model`` on ``split`` (its masks, if any, stay in force) and measure it.

    ``make_sparsifier(model, optimizer, total_steps)`` may return an object whose ``step()`` runs
    after every optimizer step (GMP, RigL): how a network is trained sparse from dense.
    """
    epochs = epochs or train.epochs
    torch.manual_seed(seed)
    opt = make_optimizer(model, train.optimizer, train.lr, train.weight_decay)
    sparsifier = make_sparsifier(model, opt, epochs * steps_per_epoch(len(split.y_train), train.batch_size)) if make_sparsifier else None
    curve: list[float] = []
    start = time.perf_counter()
    fit(
        model, split.x_train, split.y_train, opt, epochs, batch_size=train.batch_size, seed=seed,
        on_step=(lambda step: sparsifier.step()) if sparsifier is not None else None,  # type: ignore[attr-defined]
        progress=progress, description=arch,
        on_epoch_end=lambda epoch, loss: curve.append(evaluate(model, split.x_test, split.y_test)),
    )
    seconds = time.perf_counter() - start
    kept, total = kept_and_total(model)
    example = split.x_test[:1].to(next(model.parameters()).device)
    return TrainedRow(
        arch=arch, seed=seed, accuracy=curve[-1], sparsity=1.0 - kept / max(total, 1), params=kept,
        flops=forward_flops(model, example), train_seconds=seconds, curve=curve,
        extra={"masked_layers": len(masks_of(model))},
    )


def training_flops(forward_flops_per_example: int, examples_seen: int) -> float:
    """Training FLOPs as 3x the forward pass (forward + backward for activations and weights),
    the usual accounting (Evci et al., RigL, appendix H)."""
    return 3.0 * forward_flops_per_example * examples_seen
