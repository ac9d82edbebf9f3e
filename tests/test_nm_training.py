"""N:M training: STE / SR-STE, mask decay and structure decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsecraft.core.patterns import NM
from sparsecraft.errors import PatternError, SparsecraftError
from sparsecraft.methods.nm_training import NMTraining, effective_groups_valid, structure_schedule


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 8))


def run(model, sparsifier, optimizer, steps, check=None):
    for step in range(steps):
        x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(step))
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sparsifier.step()
        if check:
            check(step + 1)


@pytest.mark.parametrize("method", ["ste", "srste"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (1, 8)])
def test_every_group_is_valid_after_every_step(method, n, m):
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    training = NMTraining(model, optimizer, n=n, m=m, total_steps=12, method=method)
    layers = [model[0], model[3], model[5]]

    def check(step):
        for layer in layers:
            assert effective_groups_valid(layer.weight, n, m)  # the weight the forward uses

    run(model, training, optimizer, 12, check)
    dense = model[3].weight_dense
    assert float((dense == 0).float().mean()) < 0.1  # the dense weights keep learning underneath
    training.finalize()
    for layer in layers:
        assert type(layer.weight) is nn.Parameter and effective_groups_valid(layer.weight, n, m)
        assert float((layer.weight == 0).float().mean()) == pytest.approx(1 - n / m)


def test_srste_gradient_equals_the_formula():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    W = layer.weight.detach().clone()
    NMTraining(layer, None, n=2, m=4, total_steps=10, method="srste", lam=0.01)
    x = torch.randn(5, 8)
    layer(x).sum().backward()
    mask = NM(2, 4).mask(W.abs()).float()
    g = torch.ones(5, 4).T @ x  # d(sum(x (W*mask)^T))/d(W*mask)
    expected = g + 0.01 * (1 - mask) * W
    assert torch.allclose(layer.weight_dense.grad, expected, atol=1e-6)


def test_plain_ste_passes_the_gradient_to_every_weight():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    NMTraining(layer, None, n=1, m=4, total_steps=10, method="ste")
    x = torch.randn(5, 8)
    layer(x).sum().backward()
    assert torch.allclose(layer.weight_dense.grad, torch.ones(5, 4).T @ x, atol=1e-6)


@pytest.mark.parametrize(("decay", "t", "alpha"), [("linear", 0, 1.0), ("linear", 25, 0.75), ("linear", 150, 0.0),
                                                   ("exponential", 30, math.exp(-0.01 * 30))])
def test_mask_decay_forward_equals_the_formula(decay, t, alpha):
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    W = layer.weight.detach().clone()
    training = NMTraining(layer, None, n=1, m=4, total_steps=1000, method="mask_decay", decay=decay, decay_coef=0.01)
    training.load_state_dict({"step_count": t})
    assert training.alpha_at(t) == pytest.approx(alpha)
    mask = NM(1, 4).mask(W.abs()).float()
    assert torch.allclose(layer.weight, W * (mask + (1 - mask) * alpha), atol=1e-7)


def test_mask_decay_uses_the_binary_mask_while_fine_tuning():
    layer = nn.Linear(8, 4)
    training = NMTraining(layer, None, n=1, m=4, total_steps=100, method="mask_decay", decay="exponential",
                          finetune_fraction=0.2)
    assert training.alpha_at(50) > 0 and training.alpha_at(80) == 0.0
    training.load_state_dict({"step_count": 85})
    assert effective_groups_valid(layer.weight, 1, 4)


@pytest.mark.parametrize(
    ("n", "m", "kind", "expected"),
    [
        (1, 8, "sparsify", [(7, 8), (4, 8), (2, 8)]),
        (1, 16, "sparsify", [(15, 16), (8, 16), (4, 16), (2, 16)]),
        (2, 4, "sparsify", [(3, 4)]),
        (2, 8, "sparsify", [(7, 8), (4, 8)]),
        (1, 4, "densify", [(1, 32), (1, 16), (1, 8)]),
        (1, 4, "fine", [(8, 32), (4, 16), (2, 8)]),
    ],
)
def test_structure_decay_visits_the_documented_patterns_in_order(n, m, kind, expected):
    assert structure_schedule(n, m, kind) == expected
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))  # inputs of 32: every M up to 32 fits
    training = NMTraining(model, None, n=n, m=m, total_steps=60, method="ste", structure_decay=kind, finetune_fraction=0.1)
    visited = []
    for step in range(60):
        pattern = training.pattern
        if not visited or visited[-1] != pattern:
            visited.append(pattern)
        training.step()
    assert visited == [f"{a}:{b}" for a, b in expected] + [f"{n}:{m}"]


def test_custom_structure_schedule_and_dense_warmup():
    model = net()
    training = NMTraining(model, None, n=1, m=8, total_steps=100, method="srste", dense_fraction=0.1,
                          structure_decay=[(0.2, "4:8"), (0.5, "2:8"), (0.7, "1:8")])
    assert [training.phase_at(s).n for s in (0, 15, 30, 60, 90)] == [1, 4, 4, 2, 1]
    assert training.phase_at(5).dense and not training.phase_at(15).dense


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(n=2, m=5), PatternError, r"0\.weight.*divisible by M=5"),
        (dict(structure_decay=[(0.3, "4:8"), (0.6, "2:8")]), SparsecraftError, "must end at the target 1:8"),
        (dict(structure_decay=[(0.6, "4:8"), (0.3, "1:8")]), SparsecraftError, "must increase"),
        (dict(structure_decay="cubic"), SparsecraftError, "sparsify, densify, fine"),
        (dict(method="sr-ste"), SparsecraftError, "ste, srste, mask_decay"),
        (dict(dense_fraction=0.6, finetune_fraction=0.5), SparsecraftError, "sparse phase"),
    ],
)
def test_bad_settings_fail_before_training(kwargs, error, message):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        NMTraining(model, None, **{"n": 1, "m": 8, "total_steps": 50, **kwargs})
    assert not any(hasattr(layer, "weight_dense") for layer in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_optimizer_made_before_keeps_training_the_dense_weights():
    model = net()
    param = model[3].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training = NMTraining(model, optimizer, n=2, m=4, total_steps=5)
    assert model[3].weight_dense is param
    before = param.detach().clone()
    run(model, training, optimizer, 2)
    assert not torch.equal(before, param.detach())


def test_a_deep_copy_computes_its_own_effective_weights():
    import copy

    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    training = NMTraining(model, optimizer, n=2, m=4, total_steps=6)
    run(model, training, optimizer, 2)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone[5].weight_dense.mul_(-3.0)  # change the copy's dense weights only
    x = torch.randn(2, 8, 6, 6)
    before = model(x)
    clone(x)
    assert torch.equal(model(x), before)  # the copy's hooks do not touch the original
    assert torch.allclose(clone[5].weight, -3.0 * model[5].weight)
