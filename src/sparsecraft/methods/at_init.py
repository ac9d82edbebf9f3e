"""Pruning at initialisation: random (uniform / ERK), SNIP, GraSP, SynFlow.

Each method is a pure score function (``snip_scores`` ...) plus a one-call ``*_prune`` that applies
the paper's selection rule through the mask engine. Scores follow sparsecraft's convention,
higher = keep.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.core.masking import dense_gradients
from sparsecraft.core.prune import PrunePlan, prune
from sparsecraft.core.distributed import sum_over_ranks
from sparsecraft.core.scores import accumulate_gradients, taylor
from sparsecraft.core.selection import Selection, select_from_options
from sparsecraft.errors import DensityError, SparsecraftError

LossFn = Callable[[nn.Module, Any], Tensor]


def random_prune(model: nn.Module, sparsity: float, distribution: str = "erk", seed: int = 0, **options: Any) -> PrunePlan:
    """Random pruning with uniform or ERK layer ratios (Liu et al., "The Unreasonable Effectiveness
    of Random Pruning: Return of the Most Naive Baseline for Sparse Training", ICLR 2022)."""
    return prune(model, sparsity=sparsity, distribution=distribution, score="random", seed=seed, **options)


def snip_scores(model: nn.Module, selection: Selection, loss_fn: LossFn, batches: Iterable[Any]) -> dict[str, Tensor]:
    """Connection sensitivity |g * w| summed over the batches (Lee et al., "SNIP: Single-shot
    Network Pruning based on Connection Sensitivity", ICLR 2019)."""
    accumulate_gradients(model, loss_fn, batches)
    sum_over_ranks(t.param.grad for t in selection if t.param.grad is not None)  # DDP: the gradient of all ranks' data
    scores = {t.name: taylor(t) for t in selection}  # |w * g|: SNIP's sensitivity is the first-order Taylor term
    model.zero_grad(set_to_none=True)
    return scores


def snip_prune(model: nn.Module, sparsity: float, loss_fn: LossFn, batches: Iterable[Any], **options: Any) -> PrunePlan:
    """SNIP: keep the weights with the largest connection sensitivity, one global threshold."""
    selection = select_from_options(model, options)
    scores = snip_scores(model, selection, loss_fn, batches)
    options.setdefault("distribution", "global")
    return prune(model, sparsity=sparsity, score=lambda t, seed=0: scores[t.name], selection=selection, **options)


def grasp_scores(
    model: nn.Module, selection: Selection, loss_fn: LossFn, batches: Iterable[Any], temperature: float = 200.0
) -> dict[str, Tensor]:
    """GraSP keep-scores w * (H g) (Wang et al., "Picking Winning Tickets Before Training by
    Preserving Gradient Flow", ICLR 2020).

    The paper removes the weights with the largest -w * Hg (their removal reduces gradient flow
    least); higher-is-keep is therefore w * Hg. g is the gradient summed over the batches, Hg the
    Hessian-gradient product from a second backward pass; logits are divided by ``temperature``
    as in the reference implementation. ``loss_fn(model, batch, temperature)`` must accept it.
    """
    params = [t.param for t in selection]
    batches = list(batches)
    if not batches:
        raise SparsecraftError("GraSP needs at least one batch")
    with dense_gradients(model):
        g = [torch.zeros_like(p) for p in params]
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch, temperature), params)
            for acc, gr in zip(g, grads):
                acc += gr.detach()
        sum_over_ranks(g)  # DDP: g and H g over every rank's batches (H is a sum over the data), the same on all ranks
        hg = [torch.zeros_like(p) for p in params]
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch, temperature), params, create_graph=True)
            z = sum((gr * gd).sum() for gr, gd in zip(grads, g))
            for acc, h in zip(hg, torch.autograd.grad(z, params)):
                acc += h.detach()
        sum_over_ranks(hg)
    return {t.name: (t.param.detach() * h) for t, h in zip(selection, hg)}


def grasp_prune(
    model: nn.Module, sparsity: float, loss_fn: LossFn, batches: Iterable[Any], temperature: float = 200.0, **options: Any
) -> PrunePlan:
    """GraSP: one global threshold on w * Hg (see :func:`grasp_scores`)."""
    selection = select_from_options(model, options)
    scores = grasp_scores(model, selection, loss_fn, batches, temperature)
    options.setdefault("distribution", "global")
    return prune(model, sparsity=sparsity, score=lambda t, seed=0: scores[t.name], selection=selection, **options)


@torch.no_grad()
def _linearize(model: nn.Module) -> dict[str, Tensor]:
    signs = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            signs[name] = torch.sign(tensor)
            tensor.abs_()
    return signs


def synflow_scores(model: nn.Module, selection: Selection, input_shape: tuple[int, ...]) -> dict[str, Tensor]:
    """Synaptic saliency |w * dR/dw| with R = 1^T (prod_l |W_l|) 1, the all-ones input through the
    network with absolute weights (Tanaka et al., "Pruning neural networks without any data by
    iteratively conserving synaptic flow", NeurIPS 2020). Computed in float64 on a copy in eval mode
    (BatchNorm uses its running statistics), so the model itself is untouched."""
    probe = copy.deepcopy(model).double().eval()
    _linearize(probe)
    probe.zero_grad(set_to_none=True)
    device = next(probe.parameters()).device
    with dense_gradients(probe):
        probe(torch.ones(1, *input_shape, dtype=torch.float64, device=device)).sum().backward()
    scores = {}
    for t in selection:
        p = probe.get_submodule(t.module_name)._parameters[t.param_name]
        scores[t.name] = (p.grad * p).detach().abs().to(t.param.dtype)
    return scores


def synflow_prune(
    model: nn.Module, sparsity: float, input_shape: tuple[int, ...] | None = None, rounds: int = 100, **options: Any
) -> PrunePlan:
    """SynFlow: ``rounds`` iterations, each re-scoring the currently pruned network and pruning
    globally to density d^(k / rounds) (the paper's exponential schedule), so that no layer
    collapses."""
    if rounds < 1:
        raise DensityError(f"SynFlow needs rounds >= 1, got {rounds}")
    if input_shape is None:
        if not hasattr(model, "example_input"):
            raise SparsecraftError("SynFlow is data-free but needs input_shape= (one sample, without the batch dimension)")
        input_shape = tuple(model.example_input().shape[1:])
    selection = select_from_options(model, options)
    options.setdefault("distribution", "global")
    density = 1.0 - sparsity
    plan = None
    for k in range(1, rounds + 1):
        scores = synflow_scores(model, selection, input_shape)
        plan = prune(model, density=density ** (k / rounds), score=lambda t, seed=0: scores[t.name], selection=selection, **options)
    assert plan is not None
    return plan

