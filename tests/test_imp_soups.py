"""IMP with rewinding, Sparse Model Soups and SPDF's mask release."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecraft as sc
from sparsecraft.errors import DensityError, MaskMismatchError
from sparsecraft.methods.imp import RewindPoint, iterative_magnitude_pruning, per_round_rate, round_sparsity
from sparsecraft.methods.soups import greedy_soup, release_masks, sparse_model_soups, uniform_soup


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 4))


X = torch.randn(64, 10, generator=torch.Generator().manual_seed(5))
Y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()


def train_steps(model, optimizer, scheduler, start, on_step, total=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    for step in range(start + 1, total + 1):
        idx = torch.randint(0, 64, (16,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        optimizer.step()
        scheduler.step()
        on_step(step)


def make_opt(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)


def test_per_round_rate_reaches_the_target_after_all_rounds():
    assert per_round_rate(0.875, 3) == pytest.approx(0.5)
    assert round_sparsity(0.9, 4, 4) == pytest.approx(0.9)


def test_imp_rewinds_to_exactly_the_saved_weights_and_schedule():
    model = net()
    rewound = []

    def train(model, optimizer, scheduler, start, on_step):
        if start:  # a rewound round: record what training starts from
            rewound.append((copy.deepcopy(model.state_dict()), sc.masks_of(model), scheduler.last_epoch, optimizer.param_groups[0]["lr"]))
        train_steps(model, optimizer, scheduler, start, on_step)

    snapshots = {}
    # capture the weights at step 5 independently, with the same seeded run
    twin = net()
    opt, sch = make_opt(twin)
    train_steps(twin, opt, sch, 0, lambda s: snapshots.setdefault(s, copy.deepcopy(twin.state_dict())) if s == 5 else None)

    iterative_magnitude_pruning(model, make_opt, train, final_sparsity=0.75, rounds=2, rewind_step=5)
    assert len(rewound) == 2
    for state, masks, last_epoch, lr in rewound:
        assert last_epoch == 5 and lr == pytest.approx(0.1 * 0.5)  # StepLR at step 5
        for key, value in snapshots[5].items():
            expected = value * masks[key] if key in masks else value
            assert torch.equal(state[key], expected), key
    assert [sum(int(m.sum()) for m in r[1].values()) for r in rewound] == [168, 84]  # 50%, then 75%
    masks = sc.masks_of(model)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.25 * (240 + 96))


def test_imp_refuses_a_rewind_point_beyond_the_run():
    with pytest.raises(DensityError, match="beyond the run"):
        iterative_magnitude_pruning(net(), make_opt, lambda *a: None, 0.9, rewind_step=50, total_steps=20)


def test_rewind_point_keeps_the_ticket_mask():
    model = net()
    point = RewindPoint.capture(0, model)
    sc.prune(model, sparsity=0.5)
    point.restore(model)
    for name, mask in sc.masks_of(model).items():
        w = model.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.count_nonzero(w[~mask]) == 0
        assert torch.equal(w[mask], point.model[name][mask])


def members_from(parent: nn.Module, n: int = 3) -> list[nn.Module]:
    out = []
    for k in range(n):
        m = copy.deepcopy(parent)
        opt, sch = make_opt(m)
        train_steps(m, opt, sch, 0, lambda s: None, total=6, seed=k)
        out.append(m)
    return out


def test_uniform_soup_keeps_the_shared_mask_and_averages_weights():
    parent = net()
    sc.prune(parent, sparsity=0.7)
    members = members_from(parent)
    soup = uniform_soup(members)
    for name, mask in sc.masks_of(parent).items():
        assert torch.equal(sc.masks_of(soup)[name], mask)
        w = soup.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.count_nonzero(w[~mask]) == 0
    expected = torch.stack([m[0].bias.detach() for m in members]).mean(0)
    assert torch.allclose(soup[0].bias, expected)


def test_soup_of_models_with_different_masks_is_refused():
    a, b = net(0), net(1)
    sc.prune(a, sparsity=0.5)
    sc.prune(b, sparsity=0.5)
    with pytest.raises(MaskMismatchError, match="different mask for 0.weight"):
        uniform_soup([a, b])


def test_greedy_soup_only_keeps_members_that_help():
    parent = net()
    sc.prune(parent, sparsity=0.5)
    members = members_from(parent)
    broken = copy.deepcopy(members[0])
    with torch.no_grad():
        broken[2].bias.add_(100.0)  # a terrible member: always predicts one class

    def accuracy(model):
        return float((model(X).argmax(1) == Y).float().mean())

    soup, chosen = greedy_soup(members + [broken], accuracy)
    assert 3 not in chosen
    assert accuracy(soup) >= max(accuracy(m) for m in members) - 1e-9 or len(chosen) == 1


def test_sparse_model_soups_reach_the_target_sparsity():
    model = net()

    def retrain(member, k):
        opt, sch = make_opt(member)
        train_steps(member, opt, sch, 0, lambda s: None, total=4, seed=k)

    soup = sparse_model_soups(model, retrain, None, final_sparsity=0.8, phases=2, members=2)
    kept = sum(int(m.sum()) for m in sc.masks_of(soup).values())
    assert kept == round(0.2 * 240) + round(0.2 * 96)


def test_spdf_release_keeps_exactly_the_pruned_weights_at_zero_then_trains_them():
    model = net()
    sc.prune(model, sparsity=0.8)
    masks = sc.masks_of(model)
    release_masks(model)
    assert not sc.masks_of(model)
    for name, mask in masks.items():
        w = model.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.count_nonzero(w[~mask]) == 0
    opt, sch = make_opt(model)
    train_steps(model, opt, sch, 0, lambda s: None, total=3)
    assert torch.count_nonzero(model[0].weight[~masks["0.weight"]]) > 0  # dense fine-tuning revives them
