"""Minimal supervised training: mini-batches, one optimizer, a progress bar per epoch.

Sparsity needs nothing from this loop: masks applied with ``sparsecraft.prune(..., optimizer=opt)``
stay in force on their own. ``on_step`` is where a sparsifier's ``step()`` goes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
}


def make_optimizer(model: nn.Module, name: str = "adam", lr: float = 3e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](model.parameters(), lr, weight_decay)


def task_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy for classification (logits (b, c)) or sequences (logits (b, t, c), labels
    (b, t) with ``IGNORE`` = -100 where a position is not scored)."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return F.cross_entropy(logits, y)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (of the scored positions, for sequence labels)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = scored = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        labels = y[i : i + batch_size]
        valid = labels != -100
        correct += int(((logits.argmax(-1).cpu() == labels) & valid).sum())
        scored += int(valid.sum())
    model.train(was_training)
    return correct / max(scored, 1)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    description: str = "train",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[int, float], None] | None = None,
    extra_loss: Callable[[], Tensor] | None = None,
) -> list[float]:
    """Train with cross-entropy; returns the mean loss of each epoch run.

    The LR follows ``scheduler`` (default: cosine decay over the run, stepped per batch). Batch
    order depends only on ``seed`` and the epoch, so a run resumed at ``start_epoch`` (with the
    model, optimizer and scheduler state restored) continues exactly as the uninterrupted one.
    ``on_step(step)`` runs after every optimizer step (a sparsifier's ``step()`` goes there),
    ``on_epoch_end(epoch, loss)`` after every epoch (checkpoints, metrics). ``extra_loss()``, called
    after each forward, is added to the loss that is minimised (a regularizer that reads the forward,
    such as ``ActivationL1.penalty``); the returned history is the task loss alone.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    device = next(model.parameters()).device
    per_epoch = steps_per_epoch(len(x), batch_size)
    if scheduler is None:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * per_epoch))
    history: list[float] = []
    step = start_epoch * per_epoch
    model.train()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=epochs, completed=start_epoch, loss=float("nan"))
        for epoch in range(start_epoch, epochs):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            total = 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                loss = task_loss(model(x[idx].to(device)), y[idx].to(device))
                objective = loss if extra_loss is None else loss + extra_loss()
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if on_step is not None:
                    on_step(step)
                total += loss.item() * len(idx)
            history.append(total / len(x))
            bar.update(task, advance=1, loss=history[-1])
            if on_epoch_end is not None:
                on_epoch_end(epoch, history[-1])
    return history


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: Tensor, batch_size: int = 256) -> None:
    """Re-estimate BatchNorm running statistics on ``x`` (cumulative average over its batches).

    Pruning shifts every activation distribution, so the stored statistics of a dense model are
    stale; recomputing them is the standard cheap repair before judging one-shot accuracy.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size].to(device))
    model.train(was_training)
    for m, momentum in saved:
        m.momentum = momentum
