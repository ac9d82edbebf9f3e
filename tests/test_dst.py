"""SET and RigL: constant density, RigL's regrowth from dense gradients, the schedule, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecraft.core.masking import finalize, find_enforcer, masks_of
from sparsecraft.core.patterns import topk_mask
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.dst import SET, RigL, cosine_drop_fraction, drop_and_grow


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)


def train_step(model, optimizer, step):
    x, y = batch(step)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("method", [SET, RigL])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_every_layer_keeps_its_count_at_every_step(method, distribution):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier = method(model, optimizer, sparsity=0.8, total_steps=60, update_interval=5, distribution=distribution)
    counts = {k: int(v.sum()) for k, v in masks_of(model).items()}
    before = masks_of(model)
    for step in range(1, 61):
        train_step(model, optimizer, step)
        sparsifier.step()
        assert {k: int(v.sum()) for k, v in masks_of(model).items()} == counts
        assert all(int((p != 0).sum()) <= counts[n] for n, p in model.named_parameters() if n in counts)
    assert any(not torch.equal(before[k], v) for k, v in masks_of(model).items())  # it did rewire
    assert len(sparsifier.history) == len([s for s in range(1, 61) if s % 5 == 0 and s < 45])


def test_rigl_regrows_exactly_the_top_dense_gradient_positions_with_zero_weight_and_state():
    model = mlp(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rigl = RigL(model, optimizer, sparsity=0.7, total_steps=100, update_interval=4, distribution="uniform")
    for step in range(1, 4):
        train_step(model, optimizer, step)
        rigl.step()
    # step 4 is an update step: predict its outcome from a plain copy
    before = masks_of(model)
    x, y = batch(4)
    plain = finalize(copy.deepcopy(model))
    F.cross_entropy(plain(x), y).backward()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    # the weights and dense gradients RigL sees: after this optimizer step, gradient of the step's backward
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense = {n: p.grad.detach().clone() for n, p in plain.named_parameters()}
    rigl.step()
    after = masks_of(model)
    fraction = cosine_drop_fraction(4, 0.3, 75)
    for name, mask in before.items():
        k, n = int(mask.sum()), round(fraction * int(mask.sum()))
        survivors = topk_mask(weights[name].abs().reshape(-1).masked_fill(~mask.reshape(-1), -1), k - n)
        grown = topk_mask(dense[name].abs().reshape(-1).masked_fill(survivors, -math.inf), n)
        assert torch.equal(after[name].reshape(-1), survivors | grown), name
        new = after[name] & ~mask
        assert int(new.sum()) > 0
        param = dict(model.named_parameters())[name]
        assert bool((param[new] == 0).all())
        for state in optimizer.state[param].values():
            if isinstance(state, torch.Tensor) and state.shape == param.shape:
                assert bool((state[new] == 0).all())


def test_rigl_keeps_dense_gradients_only_for_the_backward_before_an_update():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, optimizer, sparsity=0.5, total_steps=40, update_interval=3)
    enforcer = find_enforcer(model[0])
    armed = []
    for step in range(1, 10):
        armed.append(enforcer.keep_dense_grads)
        train_step(model, optimizer, step)
        rigl.step()
        if step % 3:
            assert not enforcer.dense_grads
    assert armed == [False, False, True, False, False, True, False, False, True]


def test_cosine_drop_fraction_equals_the_formula():
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(100, 0.3, 100) == 0.0
    rigl = RigL(mlp(), None, sparsity=0.5, total_steps=200, update_interval=10)
    assert rigl.end_step == 150 and not rigl.is_update_step(150) and rigl.is_update_step(140)


def test_set_regrowth_is_seeded():
    def run(seed):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        s = SET(model, optimizer, sparsity=0.8, total_steps=20, update_interval=2, seed=seed)
        for step in range(1, 11):
            train_step(model, optimizer, step)
            s.step()
        return masks_of(model)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_drop_and_grow_pure():
    w = torch.tensor([[5.0, 0.1, 3.0, 0.0], [0.0, 2.0, 0.0, 4.0]])
    mask = w != 0
    scores = torch.tensor([[0.0, 0.0, 0.0, 9.0], [8.0, 0.0, 7.0, 0.0]])
    new = drop_and_grow(w, mask, 2, scores)  # drops 0.1 and 2.0, grows (0,3) and (1,0)
    assert new.tolist() == [[True, False, True, True], [True, False, False, True]]
    assert torch.equal(drop_and_grow(w, mask, 0, scores), mask)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(drop_fraction=1.0), r"drop_fraction=1.0 must lie in \[0, 1\)"),
        (dict(update_interval=0), "update_interval=0"),
        (dict(end=250), "outside training"),
        (dict(end=1.5), "outside training"),
        (dict(pattern="2:4"), "unstructured"),
    ],
)
def test_bad_settings_fail_before_training(kwargs, message):
    with pytest.raises(SparsecraftError, match=message):
        RigL(mlp(), None, sparsity=0.5, total_steps=200, **kwargs)


@pytest.mark.parametrize("initial", [0.0, 0.5])
def test_granet_follows_the_cubic_schedule_and_regrows_at_every_pruning_step(initial):
    from sparsecraft.methods.dst import GraNet
    from sparsecraft.methods.gmp import cubic_sparsity

    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    granet = GraNet(model, optimizer, sparsity=0.9, initial_sparsity=initial, total_steps=80, update_interval=5)
    assert granet.sparsity == pytest.approx(initial, abs=0.01)
    for step in range(1, 81):
        before = masks_of(model)
        train_step(model, optimizer, step)
        granet.step()
        after = masks_of(model)
        if granet.is_update_step(step):
            expected = cubic_sparsity(step, initial, 0.9, 5, 5, granet.n_prunes)
            assert granet.sparsity == pytest.approx(max(expected, initial), abs=0.01)
            if step <= 40 and any(not bool(m.all()) for m in before.values()):  # room and a drop fraction that moves one
                assert any(bool((after[k] & ~before[k]).any()) for k in after), step
        else:
            assert all(torch.equal(before[k], after[k]) for k in after)
    assert granet.sparsity == pytest.approx(0.9, abs=0.005)
