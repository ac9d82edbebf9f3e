"""Layer-wise densities: ERK/ER against their closed forms, exact totals, one global threshold,
uniform (with dense globs), uniform+ and explicit mappings."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecraft as sc
from sparsecraft.errors import DensityError


def seq(*layers: nn.Module, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*layers)


def make_linear3(seed: int = 0) -> nn.Module:
    """Weights (64,64), (128,64), (64,128): sum(shape) = 128, 192, 192."""
    return seq(nn.Linear(64, 64), nn.Linear(64, 128), nn.Linear(128, 64), seed=seed)


def make_conv3(seed: int = 0) -> nn.Module:
    """Weights (8,4,3,3), (16,8,3,3), (10,16): 288 + 1152 + 160 = 1600 weights."""
    return seq(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 16, 3), nn.Linear(16, 10), seed=seed)


def kept_per_layer(model: nn.Module, plan: sc.PrunePlan) -> dict[str, int]:
    """Kept weights of every selected layer: the mask's count, or all of a layer left dense."""
    return {t.name: int(plan.masks[t.name].sum()) if t.name in plan.masks else t.numel for t in plan.selection}


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


# --------------------------------------------------------------------------- ERK / ER closed forms


def erk_ideal(shapes: dict[str, tuple[int, ...]], density: float) -> tuple[dict[str, float], set[str]]:
    """density_l = eps * raw_l with raw_l = sum(shape)/prod(shape), written out by hand; layers above 1 go dense."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    target = round_half_up(density * sum(numel.values()))
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        eps = (target - sum(numel[n] for n in dense)) / sum(raw[n] * numel[n] for n in free)
        over = {n for n in free if eps * raw[n] > 1}
        if not over:
            break
        top = max(raw[n] for n in over)
        dense |= {n for n in free if raw[n] == top}
    return {n: numel[n] if n in dense else eps * raw[n] * numel[n] for n in shapes}, dense


def test_erk_matches_the_closed_form_exactly_on_integer_friendly_shapes():
    model = make_linear3()
    plan = sc.compute_masks(model, density=0.1, distribution="erk")
    # raw_l * n_l = sum(shape_l): 128, 192, 192 (total 512); target = 0.1 * 20480 = 2048; eps = 2048 / 512 = 4
    assert kept_per_layer(model, plan) == {"0.weight": 512, "1.weight": 768, "2.weight": 768}
    assert plan.densities == {"0.weight": 512 / 4096, "1.weight": 768 / 8192, "2.weight": 768 / 8192}
    eps = 2048 / (128 + 192 + 192)
    for name, shape in {"0.weight": (64, 64), "1.weight": (128, 64), "2.weight": (64, 128)}.items():
        assert plan.densities[name] == pytest.approx(eps * sum(shape) / math.prod(shape), abs=0)


def test_erk_on_convolutions_uses_every_kernel_dimension():
    model = make_conv3()
    # raw_l * n_l = sum(shape): 8+4+3+3 = 18, 16+8+3+3 = 30, 10+16 = 26 (total 74)
    # density 0.185: target = 296, eps = 296 / 74 = 4 -> kept 72, 120, 104 (all below their size)
    plan = sc.compute_masks(model, density=0.185, distribution="erk")
    assert kept_per_layer(model, plan) == {"0.weight": 72, "1.weight": 120, "2.weight": 104}
    assert plan.densities["0.weight"] == 72 / 288
    assert plan.densities["2.weight"] == 104 / 160


def test_erk_makes_a_layer_dense_when_it_would_exceed_one_and_solves_eps_again():
    model = make_conv3()
    # density 0.37: target 592, eps = 592 / 74 = 8 -> the Linear would keep 8 * 26 = 208 > 160 weights
    target = round_half_up(0.37 * 1600)
    eps0 = target / (18 + 30 + 26)
    assert (target, eps0) == (592, 8.0) and eps0 * 26 / 160 > 1
    # so it is dense (160 kept) and eps is solved again on the convs: (592 - 160) / (18 + 30) = 9
    eps1 = (target - 160) / (18 + 30)
    assert eps1 == 9.0
    plan = sc.compute_masks(model, density=0.37, distribution="erk")
    assert plan.densities == {"0.weight": 9 * 18 / 288, "1.weight": 9 * 30 / 1152, "2.weight": 1.0}
    assert kept_per_layer(model, plan) == {"0.weight": 162, "1.weight": 270, "2.weight": 160}
    assert "2.weight" not in plan.masks  # dense layers get no mask at all


def test_er_uses_in_plus_out_over_in_times_out():
    model = make_conv3()
    # raw_l = (n_in + n_out) / (n_in * n_out), n_out = shape[0], n_in = shape[1] (kernel ignored)
    # raw_l * n_l = (4+8)*9 = 108, (8+16)*9 = 216, 16+10 = 26 (total 350); density 350/1600 -> eps = 1
    plan = sc.compute_masks(model, density=350 / 1600, distribution="er")
    assert kept_per_layer(model, plan) == {"0.weight": 108, "1.weight": 216, "2.weight": 26}
    assert plan.densities == {
        "0.weight": (4 + 8) / (4 * 8),
        "1.weight": (8 + 16) / (8 * 16),
        "2.weight": (16 + 10) / (16 * 10),
    }
    erk_plan = sc.compute_masks(model, density=350 / 1600, distribution="erk")
    assert kept_per_layer(model, erk_plan) != kept_per_layer(model, plan)  # ERK counts the kernel


def test_er_dense_layer_and_largest_remainder_rounding():
    model = make_conv3()
    plan = sc.compute_masks(model, density=0.7, distribution="er")
    # eps = 1120 / 350 = 3.2 would give the first conv 3.2 * 12/32 > 1: it is dense, eps re-solved on the rest
    eps1 = (1120 - 288) / (216 + 26)
    ideal = {"1.weight": eps1 * 216, "2.weight": eps1 * 26}  # 742.6..., 89.3...
    kept = kept_per_layer(model, plan)
    assert kept["0.weight"] == 288 and plan.densities["0.weight"] == 1.0
    for name, value in ideal.items():
        assert abs(kept[name] - value) < 1
    assert kept == {"0.weight": 288, "1.weight": 743, "2.weight": 89}
    assert sum(kept.values()) == 1120


@pytest.mark.parametrize("density", [0.02, 0.05, 0.1, 0.2, 0.33, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("maker", [make_linear3, make_conv3])
def test_erk_densities_follow_the_closed_form_within_one_weight(maker, density):
    model = maker()
    plan = sc.compute_masks(model, density=density, distribution="erk")
    shapes = {t.name: t.shape for t in plan.selection}
    ideal, dense = erk_ideal(shapes, density)
    kept = kept_per_layer(model, plan)
    for name in shapes:
        assert abs(kept[name] - ideal[name]) < 1, name
        if name in dense:
            assert plan.densities[name] == 1.0 and name not in plan.masks
    assert sum(kept.values()) == round_half_up(density * sum(math.prod(s) for s in shapes.values()))


def test_erk_power_scale_zero_is_uniform():
    model = make_linear3()
    plan = sc.compute_masks(model, density=0.25, distribution="erk", power_scale=0.0)
    assert plan.densities == {"0.weight": 0.25, "1.weight": 0.25, "2.weight": 0.25}


# --------------------------------------------------------------------------- exact totals


@settings(max_examples=40, deadline=None, derandomize=True)
@example(density=0.125, distribution="global", which="linear3")  # the last Linear would keep nothing
@given(
    density=st.floats(min_value=0.01, max_value=0.99, allow_nan=False),
    distribution=st.sampled_from(["erk", "er", "global"]),
    which=st.sampled_from(["linear3", "conv3", "convnd"]),
)
def test_total_kept_is_exactly_round_density_times_total(density, distribution, which):
    if which == "linear3":
        model = make_linear3(seed=3)
    elif which == "conv3":
        model = make_conv3(seed=3)
    else:
        model = seq(nn.Conv1d(4, 8, 3), nn.Conv3d(8, 8, 2), nn.Flatten(), nn.Linear(8, 4), seed=3)
    plan = sc.compute_masks(model, density=density, distribution=distribution)
    total = sum(t.numel for t in plan.selection)
    expected = round_half_up(density * total)
    assert sum(kept_per_layer(model, plan).values()) == expected
    assert plan.kept == expected
    for name, mask in plan.masks.items():
        assert int(mask.sum()) == round_half_up(plan.densities[name] * mask.numel())


def test_prune_applies_the_exact_total(make_cnn):
    model = make_cnn()
    plan = sc.prune(model, sparsity=0.9, distribution="erk")
    total = sum(t.numel for t in plan.selection)
    masks = sc.masks_of(model)
    kept = sum(int(masks[t.name].sum()) if t.name in masks else t.numel for t in plan.selection)
    assert kept == round_half_up(0.1 * total)


# --------------------------------------------------------------------------- global threshold


@pytest.mark.parametrize("density", [0.05, 0.3, 0.6])
def test_global_is_one_threshold_across_layers(density):
    model = make_conv3(seed=7)
    # distinct magnitudes everywhere (a random permutation of 1..N spread over the layers)
    g = torch.Generator().manual_seed(11)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    total = sum(p.numel() for p in weights)
    values = (torch.randperm(total, generator=g).float() + 1.0) / total
    offset = 0
    with torch.no_grad():
        for p in weights:
            signs = torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0)
            p.copy_(values[offset : offset + p.numel()].reshape(p.shape) * signs)
            offset += p.numel()
    plan = sc.compute_masks(model, density=density, distribution="global")
    kept_w, pruned_w = [], []
    for t in plan.selection:
        w = t.param.detach().abs()
        mask = plan.masks.get(t.name, torch.ones_like(w, dtype=torch.bool))
        kept_w.append(w[mask])
        pruned_w.append(w[~mask])
    kept_all, pruned_all = torch.cat(kept_w), torch.cat(pruned_w)
    assert kept_all.numel() == round_half_up(density * total)
    assert float(kept_all.min()) > float(pruned_all.max())
    # the same as one top-k over all weights together
    all_w = torch.cat([t.param.detach().abs().reshape(-1) for t in plan.selection])
    assert float(kept_all.min()) == float(torch.topk(all_w, kept_all.numel()).values.min())
    # and not a uniform split: the layers end up with different densities
    assert len({round(d, 6) for d in plan.densities.values()}) > 1


def test_global_on_layers_of_different_scales_follows_the_threshold():
    model = seq(nn.Linear(16, 16), nn.Linear(16, 16), seed=0)
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 257.0).reshape(16, 16))  # 1..256
        model[1].weight.copy_(torch.arange(1.0, 257.0).reshape(16, 16) + 128)  # 129..384
    plan = sc.compute_masks(model, density=0.25, distribution="global")
    # the 128 largest of 1..256 and 129..384 together: 257..384 (layer 1) ... all of them in layer 1
    assert int(plan.masks["1.weight"].sum()) == 127  # one handed to layer 0, which would be empty
    assert int(plan.masks["0.weight"].sum()) == 1 and bool(plan.masks["0.weight"][15, 15])
    assert not bool(plan.masks["1.weight"][8, 0])  # 257 was the weakest kept: given back
    plan = sc.compute_masks(model, density=0.5, distribution="global")
    kept0, kept1 = int(plan.masks["0.weight"].sum()), int(plan.masks["1.weight"].sum())
    assert (kept0, kept1) == (0 + 64, 192)  # threshold 193: 193..256 of layer 0, 193..384 of layer 1


def test_global_keeps_at_least_one_weight_per_layer_and_the_exact_total():
    model = seq(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), seed=0)
    with torch.no_grad():
        model[0].weight.fill_(1e-6)
        model[1].weight.uniform_(1.0, 2.0)
        model[2].weight.fill_(2e-6)
    plan = sc.compute_masks(model, density=0.25, distribution="global")
    assert int(plan.masks["0.weight"].sum()) == 1
    assert int(plan.masks["2.weight"].sum()) == 1
    assert int(plan.masks["1.weight"].sum()) == 46  # 48 minus the two handed to the starved layers
    strongest = plan.masks["1.weight"]
    w1 = model[1].weight.detach()
    assert float(w1[strongest].min()) > float(w1[~strongest].max())


# --------------------------------------------------------------------------- uniform, uniform+, mapping


def test_uniform_with_dense_globs(make_mlp):
    model = make_mlp()
    plan = sc.compute_masks(model, density=0.25, distribution="uniform", dense=["fc[13]"])
    assert plan.densities == {"fc1.weight": 1.0, "fc2.weight": 0.25, "fc3.weight": 1.0}
    assert set(plan.masks) == {"fc2.weight"}
    assert int(plan.masks["fc2.weight"].sum()) == 256


def test_uniform_dense_globs_on_a_cnn(make_cnn):
    model = make_cnn()
    sc.prune(model, density=0.5, dense=["conv*"])
    masks = sc.masks_of(model)
    assert set(masks) == {"fc.weight"}
    assert int(masks["fc.weight"].sum()) == 80


def test_uniform_plus_first_dense_last_at_least_20_percent(make_cnn):
    model = make_cnn()
    plan = sc.compute_masks(model, density=0.05, distribution="uniform+")
    assert plan.densities == {"conv1.weight": 1.0, "conv2.weight": 0.05, "fc.weight": 0.2}
    assert "conv1.weight" not in plan.masks
    assert int(plan.masks["conv2.weight"].sum()) == round_half_up(0.05 * 1152)
    assert int(plan.masks["fc.weight"].sum()) == 32
    plan = sc.compute_masks(model, density=0.5, distribution="uniform+")
    assert plan.densities == {"conv1.weight": 1.0, "conv2.weight": 0.5, "fc.weight": 0.5}


def test_mapping_first_matching_glob_wins(make_mlp):
    model = make_mlp()
    plan = sc.compute_masks(model, densities={"fc1": 0.5, "fc*": 0.25, "fc3.weight": 0.9})
    assert plan.densities == {"fc1.weight": 0.5, "fc2.weight": 0.25, "fc3.weight": 0.25}
    plan = sc.compute_masks(model, distribution="mapping", densities={"fc3.weight": 0.75, "fc?": 0.125})
    assert plan.densities == {"fc1.weight": 0.125, "fc2.weight": 0.125, "fc3.weight": 0.75}
    assert int(plan.masks["fc3.weight"].sum()) == 192


def test_mapping_missing_layer_takes_density_or_raises(make_mlp):
    model = make_mlp()
    plan = sc.compute_masks(model, density=0.5, densities={"fc1": 0.25})
    assert plan.densities == {"fc1.weight": 0.25, "fc2.weight": 0.5, "fc3.weight": 0.5}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DensityError, match=r"fc2\.weight: no entry of the density mapping matches it; add one"):
        sc.prune(model, densities={"fc1": 0.25})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(DensityError, match=r"densities\['fc\*'\]=1\.5"):
        sc.compute_masks(model, densities={"fc*": 1.5})
