"""DARTS's bi-level search and DASS's comparison: search, derive, train sparse, measure.

Search (Liu et al., "DARTS", ICLR 2019, first-order approximation, or second order with ``order=2``): alternately one Adam step on
the architecture weights alpha with a batch of the held-out half (lr 3e-4, betas (0.5, 0.999),
weight decay 1e-3) and one SGD step on the network weights with a batch of the training half
(momentum 0.9, cosine LR, weight decay 3e-4, gradient norm clipped at 5; the LR, 0.05 by default,
is sized for tiny networks). DASS (Mousavi et al., arXiv:2207.06968) runs the same objective on
the *sparse* supernet: the masked operations' weights and importance scores are trained at the
lower level, alpha on the validation loss of that same masked network at the upper level.

:func:`run_dass` then trains both derived networks with the same sparse training (GMP, static
magnitude pruning at initialisation or RigL) to the recipe's sparsity, every Linear/Conv layer
but the stem convolution, so that only the architectures differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.data.images import Split
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.search.dass.cells import SearchNetwork
from sparsecraft.methods.search.dass.genotype import DiscreteNetwork, Genotype, derive, genotype_to_dict, parse_genotype
from sparsecraft.methods.search.dass.ops import DARTS_OPS, DASS_OPS, check_ops, dense_name
from sparsecraft.methods.search.result import SearchCost, SearchResult, TrainedRow
from sparsecraft.methods.search.training import forward_flops, holdout, kept_and_total, train_and_measure, training_flops, weight_layers
from sparsecraft.recipes.search import SearchRecipe
from sparsecraft.train.trainer import evaluate
from sparsecraft.utils import progress_bar


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def unrolled_arch_grads(network: SearchNetwork, train_batch: tuple[Tensor, Tensor], val_batch: tuple[Tensor, Tensor],
                        xi: float, weight_decay: float = 0.0) -> list[Tensor | None]:
    """DARTS's second-order alpha gradient (Liu et al. 2019, eq. 7-8): the gradient of the validation
    loss after one virtual SGD step w' = w - xi (grad_w L_train + wd w), with the Hessian-vector
    product replaced by a central difference at w +- r dL_val/dw', r = 0.01 / ||dL_val/dw'||.

    The network's weights are left as they were (the virtual step is undone). Momentum is not part
    of the virtual step (the paper's code includes it; with xi = the weight LR the difference is small).
    """
    weights = network.weight_parameters()
    alphas = network.arch_parameters()
    saved = [p.detach().clone() for p in weights]

    def loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(network(batch[0]), batch[1])

    def grads(value: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        return list(torch.autograd.grad(value, params, allow_unused=True))

    train_grads = grads(loss(train_batch), weights)
    with torch.no_grad():
        for p, g in zip(weights, train_grads):
            p.sub_(xi * ((g if g is not None else 0.0) + weight_decay * p))
    both = grads(loss(val_batch), alphas + weights)
    d_alpha, d_w = both[: len(alphas)], both[len(alphas) :]
    d_w = [torch.zeros_like(p) if g is None else g for p, g in zip(weights, d_w)]
    r = 0.01 / torch.sqrt(sum((g * g).sum() for g in d_w)).clamp_min(1e-12)
    with torch.no_grad():
        for p, w0, g in zip(weights, saved, d_w):
            p.copy_(w0 + r * g)
    plus = grads(loss(train_batch), alphas)
    with torch.no_grad():
        for p, w0, g in zip(weights, saved, d_w):
            p.copy_(w0 - r * g)
    minus = grads(loss(train_batch), alphas)
    with torch.no_grad():
        for p, w0 in zip(weights, saved):
            p.copy_(w0)
    out: list[Tensor | None] = []
    for a, gp, gm in zip(d_alpha, plus, minus):
        hvp = None if gp is None or gm is None else (gp - gm) / (2 * r)
        out.append(a if hvp is None else (hvp * -xi if a is None else a - xi * hvp))
    return out


def darts_search(
    network: SearchNetwork,
    train_part: Split,
    val_part: Split,
    epochs: int,
    batch_size: int = 64,
    arch_lr: float = 3e-4,
    arch_weight_decay: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    *,
    lr: float = 0.05,
    lr_min: float = 1e-3,
    weight_decay: float = 3e-4,
    grad_clip: float = 5.0,
    description: str = "search",
    order: int = 1,
) -> tuple[Genotype, list[dict[str, Any]], float, float]:
    """DARTS on ``network``: (derived genotype, per-epoch log, seconds, training FLOPs).

    Each step: one alpha step on a batch of ``val_part``, then one weight step on a batch of
    ``train_part``. ``order`` 1 takes the weights as fixed for the alpha step; 2 differentiates
    through one virtual weight step (:func:`unrolled_arch_grads`, about 2.5x the alpha step's cost).
    FLOPs count the passes made (3x forward per example seen).
    """
    if order not in (1, 2):
        raise SparsecraftError(f"order={order}: DARTS's approximation is first (1) or second (2) order")
    device = next(network.parameters()).device
    torch.manual_seed(seed)
    arch_opt = torch.optim.Adam(network.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999), weight_decay=arch_weight_decay)
    w_opt = torch.optim.SGD(network.weight_parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    per_epoch = -(-len(train_part.y_train) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=max(1, epochs * per_epoch), eta_min=lr_min)
    x_t, y_t, x_v, y_v = train_part.x_train, train_part.y_train, val_part.x_train, val_part.y_train
    log: list[dict[str, Any]] = []
    seen = 0
    start = time.perf_counter()
    network.train()
    for epoch in progress_bar(range(epochs), description, progress):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        train_batches, val_batches = _batches(len(y_t), batch_size, gen), _batches(len(y_v), batch_size, gen)
        total = 0.0
        for step, idx in enumerate(train_batches):
            v = val_batches[step % len(val_batches)]
            # upper level: alpha on the validation loss (first order: the weights are taken as fixed)
            if order == 2:
                grads = unrolled_arch_grads(network, (x_t[idx].to(device), y_t[idx].to(device)),
                                            (x_v[v].to(device), y_v[v].to(device)), schedule.get_last_lr()[0], weight_decay)
                seen += 3 * len(idx)  # the virtual step and the two difference points
            else:
                val_loss = F.cross_entropy(network(x_v[v].to(device)), y_v[v].to(device))
                # allow_unused: a network with no normal cell (cells=2: both reductions) leaves alpha_normal out
                grads = list(torch.autograd.grad(val_loss, network.arch_parameters(), allow_unused=True))
            for p, g in zip(network.arch_parameters(), grads):
                p.grad = g
            arch_opt.step()
            # lower level: weights (and sparse ops' scores) on the training loss
            loss = F.cross_entropy(network(x_t[idx].to(device)), y_t[idx].to(device))
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(network.weight_parameters(), grad_clip)
            w_opt.step()
            schedule.step()
            total += loss.item() * len(idx)
            seen += len(idx) + len(v)
        log.append({
            "epoch": epoch,
            "train_loss": total / len(y_t),
            "val_accuracy": evaluate(network, x_v, y_v),
            "alphas_normal": F.softmax(network.alphas_normal.detach(), -1).cpu().tolist(),
            "alphas_reduce": F.softmax(network.alphas_reduce.detach(), -1).cpu().tolist(),
            "genotype": genotype_to_dict(derive(network)),
        })
    seconds = time.perf_counter() - start
    flops = training_flops(forward_flops(network, x_v[:1].to(device)), seen)
    return derive(network), log, seconds, flops


def _gmp(model: nn.Module, opt: torch.optim.Optimizer, total: int, sparsity: float) -> object:
    from sparsecraft.methods.gmp import GradualMagnitudePruning

    # cubic schedule from ~10% to ~60% of training; the first pruning step is >= 1 and the last <= total
    start = max(1, round(0.1 * total))
    span = max(0, round(0.6 * total) - start)
    frequency = max(1, span // 20)
    return GradualMagnitudePruning(model, opt, final_sparsity=sparsity, start_step=start, frequency=frequency,
                                   n_prunes=span // frequency, total_steps=total, keep_first_dense=True)


def _static(model: nn.Module, opt: torch.optim.Optimizer, total: int, sparsity: float) -> None:
    from sparsecraft.core.prune import prune

    prune(model, sparsity=sparsity, distribution="erk", keep_first_dense=True, optimizer=opt)
    return None  # the masks stay in force on their own


def _rigl(model: nn.Module, opt: torch.optim.Optimizer, total: int, sparsity: float) -> object:
    from sparsecraft.methods.dst import RigL

    # RigL updates every 100 steps; short runs update more often so that the mask moves at all
    return RigL(model, opt, sparsity=sparsity, total_steps=total, update_interval=max(1, min(100, total // 10)), keep_first_dense=True)


FINAL_METHODS: dict[str, Callable[[nn.Module, torch.optim.Optimizer, int, float], object]] = {
    "gmp": _gmp, "static": _static, "rigl": _rigl,
}


def _train_sparse(model: nn.Module, recipe: SearchRecipe, split: Split, arch: str, seed: int, progress: bool) -> TrainedRow:
    """Train with the recipe's final method; sparsity and kept weights are measured on the pruned
    layers (all but the stem conv), the all-layer numbers go to ``extra``."""
    method = FINAL_METHODS[recipe.dass.final_method]
    row = train_and_measure(model, split, recipe.train, arch=arch, seed=seed, progress=progress,
                            make_sparsifier=lambda m, opt, total: method(m, opt, total, recipe.sparsity))
    pruned = [name for name, _ in weight_layers(model)][1:]
    kept, total = kept_and_total(model, pruned)
    row.extra.update(sparsity_all_layers=row.sparsity, params_all_layers=row.params)
    row.sparsity, row.params = 1.0 - kept / max(total, 1), kept
    return row


def run_dass(recipe: SearchRecipe, split: Split, progress: bool = True, log: Callable[[str], None] = print) -> SearchResult:
    """DASS against DARTS-then-prune, per seed: search both, derive, train both sparse, measure."""
    d = recipe.dass
    dass_ops = check_ops(list(d.ops) if d.ops else DASS_OPS, "dass.ops")
    # the baseline searches the dense counterparts of the same candidates (DARTS's own list by default)
    darts_ops = DARTS_OPS if not d.ops else list(dict.fromkeys(dense_name(op) for op in dass_ops))
    in_channels = int(split.x_train.shape[1])
    classes = int(max(split.y_train.max(), split.y_test.max())) + 1
    rows: list[TrainedRow] = []
    cost = {"dass": SearchCost(0.0, 0.0, 0), **({"darts": SearchCost(0.0, 0.0, 0)} if d.baseline else {})}
    entries: list[dict[str, Any]] = []
    architecture: dict[str, Any] = {}
    for seed in recipe.seeds:
        train_part, val_part = holdout(split, recipe.val_fraction, seed)
        searches = [("dass", dass_ops, recipe.sparsity, True)] + ([("darts", darts_ops, 0.0, False)] if d.baseline else [])
        genotypes: dict[str, Genotype] = {}
        for name, ops, sparsity, sparse_classifier in searches:
            torch.manual_seed(seed)
            net = SearchNetwork(in_channels, d.channels, classes, d.cells, d.nodes, ops, sparsity, d.mask, sparse_classifier)
            genotypes[name], epochs_log, seconds, flops = darts_search(
                net, train_part, val_part, d.search_epochs, recipe.train.batch_size, d.arch_lr, d.arch_weight_decay,
                seed, progress, description=f"{name} search (seed {seed})", order=d.order,
            )
            entries += [{"seed": seed, "search": name, **e} for e in epochs_log]
            c = cost[name]
            c.seconds, c.flops, c.evaluated = c.seconds + seconds, c.flops + flops, c.evaluated + d.search_epochs
            log(f"seed {seed}: {name} search {seconds:.1f}s, held-out accuracy {epochs_log[-1]['val_accuracy']:.3f}")
        for name, arch in (("dass", "dass"), ("darts", "darts-pruned")):
            if name not in genotypes:
                continue
            torch.manual_seed(seed)
            model = DiscreteNetwork(genotypes[name], in_channels, d.channels, classes, d.cells)
            rows.append(_train_sparse(model, recipe, split, arch, seed, progress))
            log(f"seed {seed}: {arch} accuracy {rows[-1].accuracy:.4f}, sparsity {rows[-1].sparsity:.4f}")
        if not architecture:
            architecture = {
                "method": "dass", "in_channels": in_channels, "C": d.channels, "classes": classes, "cells": d.cells,
                "genotype": genotype_to_dict(genotypes["dass"]), "sparsity": recipe.sparsity, "final_method": d.final_method,
                "darts_genotype": genotype_to_dict(genotypes["darts"]) if "darts" in genotypes else None,
            }
    return SearchResult("dass", recipe.sparsity, rows, cost, architecture, entries)


def build_dass_architecture(arch: dict[str, Any]) -> nn.Module:
    """The dense, untrained DiscreteNetwork of ``arch["genotype"]`` (a SearchResult.architecture of DASS)."""
    missing = [k for k in ("genotype", "in_channels", "C", "classes", "cells") if k not in arch]
    if missing:
        raise SparsecraftError(f"DASS architecture: missing key(s) {', '.join(missing)}")
    return DiscreteNetwork(parse_genotype(arch["genotype"]), int(arch["in_channels"]), int(arch["C"]), int(arch["classes"]), int(arch["cells"]))
