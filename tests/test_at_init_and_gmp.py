"""Pruning at initialisation (SNIP, GraSP, SynFlow, random) and gradual magnitude pruning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecraft as sc
from sparsecraft.errors import DensityError
from sparsecraft.methods.at_init import grasp_scores, random_prune, snip_scores, synflow_prune, synflow_scores
from sparsecraft.methods.gmp import GradualMagnitudePruning, cubic_sparsity


def two_layer(seed: int = 0, bias: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias))


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]


def loss_fn(model, batch, temperature=1.0):
    x, y = batch
    return F.cross_entropy(model(x) / temperature, y)


def test_snip_scores_are_abs_grad_times_weight_summed_over_batches():
    model = two_layer()
    batches = data()
    scores = snip_scores(model, sc.select(model), loss_fn, batches)
    total = sum(loss_fn(model, b) for b in batches)
    grads = torch.autograd.grad(total, [model[0].weight, model[2].weight])
    assert torch.allclose(scores["0.weight"], (grads[0] * model[0].weight).abs(), atol=1e-6)
    assert torch.allclose(scores["2.weight"], (grads[1] * model[2].weight).abs(), atol=1e-6)
    assert model[0].weight.grad is None  # scoring leaves no gradients behind


def test_grasp_scores_equal_weight_times_hessian_gradient_product():
    model = two_layer()
    batches = data()
    T = 2.0
    scores = grasp_scores(model, sc.select(model), loss_fn, batches, temperature=T)

    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    flat = torch.cat([w1.reshape(-1), w2.reshape(-1)]).requires_grad_(True)

    def total_loss(v):
        a, b = v[: w1.numel()].view_as(w1), v[w1.numel():].view_as(w2)
        return sum(F.cross_entropy((torch.tanh(x @ a.T) @ b.T) / T, y) for x, y in batches)

    g = torch.autograd.grad(total_loss(flat), flat)[0]
    hessian = torch.autograd.functional.hessian(total_loss, flat.detach())
    expected = flat.detach() * (hessian @ g)
    got = torch.cat([scores["0.weight"].reshape(-1), scores["2.weight"].reshape(-1)])
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4)


def test_synflow_scores_match_the_closed_form_of_a_linear_chain():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    torch.manual_seed(0)
    for layer in model:
        nn.init.normal_(layer.weight)
    scores = synflow_scores(model, sc.select(model), (4,))
    a1, a2 = model[0].weight.detach().abs().double(), model[1].weight.detach().abs().double()
    # R = 1^T |W2| |W1| 1: dR/dW1_ij = sum_k |W2|_ki, dR/dW2_ki = sum_j |W1|_ij
    expected1 = a1 * a2.sum(0)[:, None]
    expected2 = a2 * a1.sum(1)[None, :]
    assert torch.allclose(scores["0.weight"].double(), expected1, rtol=1e-5)
    assert torch.allclose(scores["1.weight"].double(), expected2, rtol=1e-5)
    assert model[0].weight.min() < 0  # the model itself was not linearised


def collapse_prone() -> nn.Sequential:
    """A middle layer with tiny weights: one global magnitude threshold removes all of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40, bias=False), nn.ReLU(), nn.Linear(40, 40, bias=False), nn.ReLU(), nn.Linear(40, 10, bias=False))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    return model


def paths_through(model: nn.Sequential) -> float:
    """Total synaptic flow 1^T |W3||W2||W1| 1: zero when some layer is cut."""
    with torch.no_grad():
        flow = torch.ones(20)
        for layer in (model[0], model[2], model[4]):
            flow = layer.weight.abs() @ flow
    return float(flow.sum())


def test_synflow_avoids_the_layer_collapse_of_global_magnitude():
    magnitude = collapse_prone()
    sc.prune(magnitude, sparsity=0.98, distribution="global")
    kept = {n: int(m.sum()) for n, m in sc.masks_of(magnitude).items()}
    assert kept["2.weight"] == 1  # collapsed to the one weight the engine always keeps
    assert paths_through(magnitude) == 0.0

    synflow = collapse_prone()
    synflow_prune(synflow, 0.98, input_shape=(20,), rounds=50)
    kept = {n: int(m.sum()) for n, m in sc.masks_of(synflow).items()}
    assert sum(kept.values()) == round(0.02 * 2800)
    assert min(kept.values()) >= 5
    assert paths_through(synflow) > 0.0


def test_random_pruning_with_erk_follows_erk_densities_and_seed():
    model = two_layer()
    plan = random_prune(model, 0.5, distribution="erk", seed=3)
    raw = {"0.weight": (6 + 5) / 30, "2.weight": (5 + 3) / 15}
    eps = 0.5 * 45 / (raw["0.weight"] * 30 + raw["2.weight"] * 15)
    for name, n in (("0.weight", 30), ("2.weight", 15)):
        assert abs(plan.densities[name] - eps * raw[name]) <= 1 / n
    again = two_layer()
    random_prune(again, 0.5, distribution="erk", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(sc.masks_of(model).values(), sc.masks_of(again).values()))


@pytest.mark.parametrize("step", [0, 9, 10, 11, 15, 20, 34, 40, 45, 100])
def test_cubic_schedule_formula(step):
    s_i, s_f, t0, dt, n = 0.1, 0.9, 10, 5, 6
    if step < t0:
        expected = 0.0
    else:
        progress = min(1.0, (step - t0) / (n * dt))
        expected = s_f + (s_i - s_f) * (1 - progress) ** 3
    assert cubic_sparsity(step, s_i, s_f, t0, dt, n) == pytest.approx(expected)


def test_gmp_sparsity_at_each_pruning_step_equals_the_cubic_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gmp = GradualMagnitudePruning(model, opt, final_sparsity=0.8, initial_sparsity=0.1, start_step=3, frequency=4, n_prunes=5)
    x, y = torch.randn(32, 16), torch.randint(0, 8, (32,))
    total = sc.select(model).numel
    seen = []
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        gmp.step()
        t = gmp.step_count
        if gmp.is_pruning_step(t):
            target = s = 0.8 + (0.1 - 0.8) * (1 - (t - 3) / 20) ** 3
            kept = sum(int(m.sum()) for m in sc.masks_of(model).values())
            assert abs(kept - (1 - target) * total) <= 1.0, (t, kept)  # each of 2 layers rounds by <= 0.5
            seen.append(round(s, 4))
    assert seen == sorted(seen) and len(seen) == 6
    assert gmp.sparsity == pytest.approx(0.8, abs=1 / total)


def test_gmp_with_nm_ends_with_valid_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    gmp = GradualMagnitudePruning(model, None, pattern="1:4", start_step=1, frequency=2, n_prunes=4)
    for _ in range(10):
        gmp.step()
    for mask in sc.masks_of(model).values():
        assert bool((mask.reshape(-1, 4).sum(1) == 1).all())


def test_gmp_bad_schedules_are_refused():
    model = two_layer()
    with pytest.raises(DensityError, match="ends at step 110"):
        GradualMagnitudePruning(model, final_sparsity=0.9, start_step=10, frequency=10, n_prunes=10, total_steps=100)
    with pytest.raises(DensityError, match="initial_sparsity"):
        GradualMagnitudePruning(model, final_sparsity=0.5, initial_sparsity=0.7)
    with pytest.raises(DensityError, match="fixed by pattern 2:4"):
        GradualMagnitudePruning(model, final_sparsity=0.9, pattern="2:4")
    assert not sc.masks_of(model)
    assert math.isclose(cubic_sparsity(5, 0.0, 0.5, 0, 1, 0), 0.5)
