"""The process-wide optimizer guard: zeros survive whatever happens between backward and step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecraft as sc


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g)


def backward(model: nn.Module) -> None:
    x, y = batch()
    F.cross_entropy(model(x), y).backward()


def assert_pruned_zero(model: nn.Module) -> None:
    masks = sc.masks_of(model)
    assert masks, "model should be masked"
    for name, mask in masks.items():
        weight = model.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.count_nonzero(weight.detach()[~mask]) == 0, name


class NoisyOptimizer(torch.optim.Optimizer):
    """Moves every weight, gradient or not: the guard must not trust it."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=group["lr"])


def test_state_built_before_pruning_is_zeroed_before_the_first_step():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        backward(model)
        opt.step()
    sc.prune(model, sparsity=0.75)  # optimizer not passed: the guard finds it on its own
    opt.zero_grad()
    backward(model)
    opt.step()
    assert_pruned_zero(model)
    for name, mask in sc.masks_of(model).items():
        state = opt.state[model.get_submodule(name.rsplit(".", 1)[0]).weight]
        assert torch.count_nonzero(state["exp_avg"][~mask]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][~mask]) == 0


def test_gradient_edited_in_place_after_backward_is_not_trusted():
    model = make_model()
    sc.prune(model, sparsity=0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        backward(model)
        for p in model.parameters():  # e.g. DP-SGD noise added to gradients
            p.grad.add_(torch.randn_like(p.grad))
        opt.step()
        assert_pruned_zero(model)


def test_gradient_replaced_by_hand_is_not_trusted():
    model = make_model()
    sc.prune(model, sparsity=0.75)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        assert_pruned_zero(model)


def test_weight_edited_between_backward_and_step_is_masked_again():
    model = make_model()
    sc.prune(model, sparsity=0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    backward(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    opt.step()
    assert_pruned_zero(model)


def test_unknown_optimizer_is_masked_after_each_step():
    model = make_model()
    sc.prune(model, sparsity=0.9)
    opt = NoisyOptimizer(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        backward(model)
        opt.step()
        assert_pruned_zero(model)


def test_dense_gradient_step_does_not_leave_state_that_revives_weights_later():
    model = make_model()
    sc.prune(model, sparsity=0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with sc.dense_gradients(model):
        opt.zero_grad()
        backward(model)
        assert torch.count_nonzero(model[0].weight.grad[~sc.masks_of(model)["0.weight"]]) > 0
        opt.step()
    assert_pruned_zero(model)
    for _ in range(5):  # momentum from the dense step must not leak into pruned weights
        opt.zero_grad()
        backward(model)
        opt.step()
        assert_pruned_zero(model)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01),
    lambda p: torch.optim.NAdam(p, lr=0.01),
    lambda p: torch.optim.RAdam(p, lr=0.01, decoupled_weight_decay=True, weight_decay=0.1),
    lambda p: torch.optim.Rprop(p, lr=0.01),
])
def test_other_elementwise_optimizers_keep_zeros(make_opt):
    model = make_model()
    sc.prune(model, pattern="2:4")
    opt = make_opt(model.parameters())
    for _ in range(20):
        opt.zero_grad()
        backward(model)
        opt.step()
    assert_pruned_zero(model)


def test_new_masks_make_the_optimizer_zero_its_state_again():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sc.prune(model, sparsity=0.5)
    for _ in range(3):
        opt.zero_grad()
        backward(model)
        opt.step()
    sc.prune(model, sparsity=0.9)  # sparser: more positions pruned, their momentum must go
    opt.zero_grad()
    backward(model)
    opt.step()
    assert_pruned_zero(model)
    for name, mask in sc.masks_of(model).items():
        buf = opt.state[model.get_submodule(name.rsplit(".", 1)[0]).weight]["momentum_buffer"]
        assert torch.count_nonzero(buf[~mask]) == 0


def test_optimizer_state_loaded_after_pruning_is_zeroed_before_the_next_step():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        backward(model)
        opt.step()
    dense_state = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    sc.prune(model, sparsity=0.75)
    opt.zero_grad()
    backward(model)
    opt.step()
    opt.load_state_dict(dense_state)  # e.g. rewinding: dense moments come back
    for _ in range(3):
        opt.zero_grad()
        backward(model)
        opt.step()
        assert_pruned_zero(model)
