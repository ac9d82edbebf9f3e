"""prune(): every pattern and distribution, selection, scores, and bad inputs that change nothing."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import sparsecraft as sc
from sparsecraft.core.masking import MaskEnforcer, patterns_of
from sparsecraft.core.patterns import NM, parse_pattern
from sparsecraft.errors import DensityError, PatternError, SelectionError, SparsecraftError
from sparsecraft.registry import UnknownNameError


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_nothing_changed(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(k.endswith("_mask") for k in after)
    assert sc.masks_of(model) == {}
    for module in model.modules():
        assert not any(isinstance(h, MaskEnforcer) for h in module._forward_pre_hooks.values())


def assert_pruned_zero(model, masks):
    for name, mask in masks.items():
        w = model.get_parameter(name).detach()
        assert int(torch.count_nonzero(w[~mask])) == 0, name


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


# --------------------------------------------------------------------------- every pattern


@pytest.mark.parametrize(
    ("pattern", "density"),
    [
        ("unstructured", 0.3),
        ("2:4", None),
        ("1:4", None),
        ("4:8", 0.5),
        ("1:8", None),
        ("3:16", None),
        ("block4x4", 0.25),
        ("block2x8", 0.4),
        ("out_channels", 0.25),
        ("in_channels", 0.6),
    ],
)
def test_prune_mlp_with_every_pattern(make_mlp, mlp_batch, pattern, density):
    model = make_mlp()
    plan = sc.prune(model, pattern=pattern, density=density)
    p = parse_pattern(pattern)
    masks = sc.masks_of(model)
    assert set(masks) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    d = density if density is not None else p.fixed_density
    for name, mask in masks.items():
        shape = tuple(mask.shape)
        assert int(mask.sum()) == p.kept(shape, d), name
        assert plan.densities[name] == pytest.approx(d)
        assert torch.equal(plan.masks[name], mask)
        if isinstance(p, NM):
            assert p.is_valid(mask)
    assert patterns_of(model) == {n: str(p) for n in masks}
    assert plan.kept == sum(int(m.sum()) for m in masks.values())
    assert_pruned_zero(model, masks)
    assert torch.isfinite(model(mlp_batch[0])).all()


def test_prune_cnn_and_convnd_with_structured_patterns(make_cnn, make_convnd, cnn_batch):
    cnn = make_cnn()
    sc.prune(cnn, pattern="2:4", keep_first_dense=True)  # conv1 has 3 input channels
    masks = sc.masks_of(cnn)
    assert set(masks) == {"conv2.weight", "fc.weight"}
    assert all(NM(2, 4).is_valid(m) for m in masks.values())
    assert torch.isfinite(cnn(cnn_batch[0])).all()

    cnn = make_cnn()
    sc.prune(cnn, pattern="block2x1", density=0.5)
    for name, mask in sc.masks_of(cnn).items():
        rows = mask.reshape(mask.shape[0], -1)
        assert torch.equal(rows[0::2], rows[1::2]), name  # pairs of rows kept together

    nd = make_convnd()
    sc.prune(nd, pattern="out_channels", density=0.5)
    masks = sc.masks_of(nd)
    assert set(masks) == {"conv1d.weight", "conv3d.weight", "head.weight"}
    for name, mask in masks.items():
        per_row = mask.reshape(mask.shape[0], -1)
        assert bool((per_row.all(1) | ~per_row.any(1)).all()), name
        assert int(per_row.all(1).sum()) == mask.shape[0] // 2


def test_layer_patterns_override_the_default(make_mlp):
    model = make_mlp()
    sc.prune(model, density=0.5, pattern="unstructured", layer_patterns={"fc2": "2:4", "fc3*": "out_channels"})
    assert patterns_of(model) == {"fc1.weight": "unstructured", "fc2.weight": "2:4", "fc3.weight": "out_channels"}
    masks = sc.masks_of(model)
    assert NM(2, 4).is_valid(masks["fc2.weight"])
    assert int(masks["fc3.weight"].all(1).sum()) == 4


# --------------------------------------------------------------------------- every distribution


@pytest.mark.parametrize(
    ("distribution", "extra"),
    [
        ("uniform", {}),
        ("uniform+", {}),
        ("er", {}),
        ("erk", {}),
        ("global", {}),
        ("mapping", {"densities": {"conv1*": 0.5, "*": 0.2}}),
    ],
)
@pytest.mark.parametrize("which", ["cnn", "convnd"])
def test_prune_with_every_distribution(make_cnn, make_convnd, distribution, extra, which):
    model = make_cnn() if which == "cnn" else make_convnd()
    density = None if distribution == "mapping" else 0.2
    plan = sc.prune(model, density=density, distribution=distribution, **extra)
    masks = sc.masks_of(model)
    assert masks
    for t in plan.selection:
        d = plan.densities[t.name]
        if t.name in masks:
            assert int(masks[t.name].sum()) == parse_pattern("unstructured").kept(t.shape, d)
        else:
            assert d == 1.0
    assert_pruned_zero(model, masks)
    if distribution in ("er", "erk", "global"):
        total = sum(t.numel for t in plan.selection)
        assert plan.kept == int(0.2 * total + 0.5)


# --------------------------------------------------------------------------- bad inputs change nothing


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"density": 0.0}, DensityError, r"density=0\.0 is outside \(0, 1\]; density is the fraction of weights kept"),
        ({"density": 1.5}, DensityError, r"density=1\.5 is outside \(0, 1\]"),
        ({"sparsity": 1.0}, DensityError, r"sparsity=1\.0 is outside \[0, 1\); it is the fraction of weights removed"),
        ({"sparsity": -0.1}, DensityError, r"sparsity=-0\.1 is outside"),
        ({"sparsity": 0.5, "density": 0.5}, DensityError, "give exactly one of sparsity="),
        ({}, DensityError, r"give sparsity= \(fraction removed\) or density= \(fraction kept\)"),
        (
            {"pattern": "block3x3", "density": 0.5},
            PatternError,
            r"fc1\.weight: matrix view 32x16 .* not divisible into 3x3 blocks; exclude this layer or choose a block size",
        ),
        ({"pattern": "2 of 4", "density": 0.5}, PatternError, r"pattern '2 of 4' does not parse; use unstructured \| N:M"),
        ({"pattern": "2:4", "density": 0.3}, DensityError, r"fc1\.weight: pattern 2:4 fixes the density at 0\.5 .* drop sparsity/density"),
        ({"pattern": "1:8", "sparsity": 0.5}, DensityError, r"fixes the density at 0\.125"),
        (
            {"pattern": "2:4", "distribution": "erk"},
            DensityError,
            r"distribution 'erk' cannot apply, use uniform",
        ),
        ({"density": 0.5, "distribution": "erk-ish"}, UnknownNameError, r"unknown distribution 'erk-ish'; choose one of: .*erk.*global.*uniform"),
        ({"density": 0.5, "score": "magnitud"}, UnknownNameError, r"unknown score 'magnitud'; choose one of: .*magnitude.*random.*taylor"),
        ({"density": 0.5, "include": ["fc9"]}, SelectionError, r"include pattern 'fc9' matches no linear/conv module; available: fc1, fc2, fc3"),
        ({"density": 0.5, "include": ["re:fc"]}, SelectionError, r"include pattern 're:fc' matches no"),
        ({"density": 0.5, "types": ["lstm"]}, SelectionError, r"unknown module type 'lstm' in types; choose from linear"),
        ({"density": 0.5, "types": ["conv"]}, SelectionError, r"no modules of types \['conv'\]"),
        ({"density": 0.5, "include": ["fc1"], "exclude": ["fc1"]}, SelectionError, "leave nothing to sparsify; loosen them"),
        (
            {"density": 0.5, "score": "taylor"},
            SparsecraftError,
            r"fc1\.weight: score 'taylor' needs gradients, but \.grad is empty; run a backward pass first, e\.g\. .*accumulate_gradients",
        ),
        ({"density": 0.5, "score": "gradient"}, SparsecraftError, r"score 'gradient' needs gradients"),
        ({"densities": {"fc1": 0.5}}, DensityError, r"fc2\.weight: no entry of the density mapping matches it"),
        ({"density": 1.0}, SparsecraftError, "keeps every selected layer dense; nothing to prune"),
        ({"density": 0.5, "dense": ["fc*"]}, SparsecraftError, "keeps every selected layer dense"),
    ],
)
def test_bad_inputs_raise_clearly_and_change_nothing(make_mlp, kwargs, error, message):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(error) as info:
        sc.prune(model, **kwargs)
    assert re.search(message, str(info.value)), str(info.value)
    assert_nothing_changed(model, before)


def test_nm_on_an_input_dim_not_divisible_names_that_layer_only(make_cnn):
    model = make_cnn()
    before = snapshot(model)
    with pytest.raises(PatternError) as info:
        sc.prune(model, pattern="2:4")
    message = str(info.value)
    assert "nothing was changed" in message
    assert (
        "conv1.weight: input dimension 3 (shape (8, 3, 3, 3)) is not divisible by M=4 for pattern 2:4; "
        "exclude this layer or choose an M that divides 3"
    ) in message
    assert "conv2.weight" not in message and "fc.weight" not in message
    assert_nothing_changed(model, before)


def test_bad_input_on_an_already_pruned_model_keeps_its_masks(make_mlp):
    model = make_mlp()
    sc.prune(model, density=0.5)
    masks = sc.masks_of(model)
    before = snapshot(model)
    with pytest.raises(PatternError):
        sc.prune(model, pattern="block5x5", density=0.25)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(sc.masks_of(model)[n], masks[n]) for n in masks)


def test_errors_are_value_errors_or_key_errors():
    assert issubclass(DensityError, ValueError) and issubclass(PatternError, SparsecraftError)
    assert issubclass(UnknownNameError, KeyError)


# --------------------------------------------------------------------------- selection


def test_selection_by_type(make_cnn, make_convnd):
    cnn = make_cnn()
    assert sc.select(cnn).names == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert sc.select(cnn, types=["linear"]).names == ["fc.weight"]
    assert sc.select(cnn, types=["conv"]).names == ["conv1.weight", "conv2.weight"]
    assert sc.select(cnn, types=["conv2d"]).names == ["conv1.weight", "conv2.weight"]
    sc.prune(cnn, density=0.5, types=["linear"])
    assert set(sc.masks_of(cnn)) == {"fc.weight"}

    nd = make_convnd()
    assert sc.select(nd).names == ["conv1d.weight", "conv3d.weight", "head.weight"]  # embeddings only on request
    assert sc.select(nd, types=["conv1d"]).names == ["conv1d.weight"]
    assert sc.select(nd, types=["conv3d"]).names == ["conv3d.weight"]
    assert [t.kind for t in sc.select(nd, types=["conv", "embedding"])] == ["embedding", "conv1d", "conv3d"]
    sc.prune(nd, density=0.25, types=["embedding"])
    masks = sc.masks_of(nd)
    assert set(masks) == {"embed.weight"} and int(masks["embed.weight"].sum()) == 10


def test_include_exclude_globs_and_regexes(make_mlp):
    model = make_mlp()
    assert sc.select(model, include=["fc*"], exclude=["fc2"]).names == ["fc1.weight", "fc3.weight"]
    assert sc.select(model, include=["re:fc[12]"]).names == ["fc1.weight", "fc2.weight"]
    assert sc.select(model, exclude=["re:fc[^2]"]).names == ["fc2.weight"]
    assert sc.select(model, include=["*3", "fc1"]).names == ["fc1.weight", "fc3.weight"]
    with pytest.warns(UserWarning, match="exclude pattern 'nope' matches no module"):
        assert len(sc.select(model, exclude=["nope"])) == 3
    sc.prune(model, density=0.5, include=["re:fc[23]"])
    assert set(sc.masks_of(model)) == {"fc2.weight", "fc3.weight"}


def test_keep_first_and_last_dense(make_cnn):
    model = make_cnn()
    assert sc.select(model, keep_first_dense=True).names == ["conv2.weight", "fc.weight"]
    assert sc.select(model, keep_last_dense=True).names == ["conv1.weight", "conv2.weight"]
    assert sc.select(model, keep_first_dense=True, keep_last_dense=True).names == ["conv2.weight"]
    sc.prune(model, sparsity=0.5, keep_first_dense=True, keep_last_dense=True)
    assert set(sc.masks_of(model)) == {"conv2.weight"}
    assert int(torch.count_nonzero(model.conv1.weight)) == model.conv1.weight.numel()


def test_tied_weights_are_selected_once():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.weight = a.weight
    model = torch.nn.Sequential(a, b)
    assert sc.select(model).names == ["0.weight"]


# --------------------------------------------------------------------------- scores


def test_random_score_is_seeded(make_mlp):
    masks = []
    for model_seed, seed in [(0, 1), (0, 1), (5, 1), (0, 2)]:
        model = make_mlp(model_seed)
        sc.prune(model, density=0.5, score="random", seed=seed)
        masks.append(sc.masks_of(model))
    same, same_again, other_weights, other_seed = masks
    assert all(torch.equal(same[n], same_again[n]) for n in same)
    assert all(torch.equal(same[n], other_weights[n]) for n in same)  # depends on the seed, not the weights
    assert all(not torch.equal(same[n], other_seed[n]) for n in same)
    magnitude = make_mlp(0)
    sc.prune(magnitude, density=0.5)
    assert not torch.equal(sc.masks_of(magnitude)["fc2.weight"], same["fc2.weight"])


def test_custom_score_callable(make_mlp):
    model = make_mlp()

    def first_rows(target, *, seed):
        rows = torch.arange(target.shape[0], 0, -1, dtype=torch.float32)
        return rows.reshape(-1, 1).expand(target.shape).clone()

    sc.prune(model, density=0.25, score=first_rows, pattern="out_channels")
    for name, mask in sc.masks_of(model).items():
        k = mask.shape[0] // 4
        assert mask[:k].all() and not mask[k:].any(), name


def test_custom_score_with_wrong_shape_changes_nothing(make_mlp):
    model = make_mlp()
    before = snapshot(model)

    def bad(target, *, seed):
        return torch.ones(3)

    with pytest.raises(SparsecraftError, match=r"fc1\.weight: score 'bad' returned shape \(3,\), expected \(32, 16\)"):
        sc.prune(model, density=0.5, score=bad)
    assert_nothing_changed(model, before)


@pytest.mark.parametrize("score", ["magnitude", "random"])
def test_pruning_again_never_revives_pruned_weights(make_mlp, score):
    model = make_mlp()
    sc.prune(model, density=0.5, pattern="unstructured")
    first = sc.masks_of(model)
    sc.prune(model, density=0.25, score=score, seed=3)
    second = sc.masks_of(model)
    for name in first:
        assert not bool((second[name] & ~first[name]).any()), name
        assert int(second[name].sum()) == second[name].numel() // 4
    assert_pruned_zero(model, second)


def test_pruning_again_with_random_scores_prefers_surviving_units(make_mlp):
    model = make_mlp()
    sc.prune(model, density=0.5, pattern="out_channels")
    first = sc.masks_of(model)
    sc.prune(model, density=0.25, pattern="out_channels", score="random", seed=9)
    second = sc.masks_of(model)
    for name in first:
        assert not bool((second[name] & ~first[name]).any()), name


def test_gradient_scores_after_accumulate_gradients(make_mlp, mlp_batch):
    x, y = mlp_batch
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    for score in ("taylor", "gradient"):
        model = make_mlp()
        assert sc.accumulate_gradients(model, ce_loss, batches) == 2
        expected = {}
        for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
            p = model.get_parameter(name)
            s = (p.detach() * p.grad).abs() if score == "taylor" else p.grad.abs()
            k = round(0.25 * p.numel())
            keep = torch.zeros(p.numel(), dtype=torch.bool)
            keep[torch.topk(s.reshape(-1), k).indices] = True
            expected[name] = keep.reshape(p.shape)
        sc.prune(model, density=0.25, score=score)
        masks = sc.masks_of(model)
        assert all(torch.equal(masks[n], expected[n]) for n in expected), score
    # gradients are accumulated over every batch (not only the last)
    model = make_mlp()
    sc.accumulate_gradients(model, ce_loss, batches)
    total = model.fc1.weight.grad.clone()
    sc.accumulate_gradients(model, ce_loss, batches[:1])
    only_first = model.fc1.weight.grad.clone()
    assert not torch.allclose(total, only_first)


def test_accumulate_gradients_gives_dense_gradients_on_a_pruned_model(make_mlp, mlp_batch):
    model = make_mlp()
    sc.prune(model, density=0.5)
    masks = sc.masks_of(model)
    sc.accumulate_gradients(model, ce_loss, [mlp_batch])
    for name, mask in masks.items():
        assert int(torch.count_nonzero(model.get_parameter(name).grad[~mask])) > 0, name
    with pytest.raises(SparsecraftError, match="got no batches"):
        sc.accumulate_gradients(model, ce_loss, [])


def test_compute_masks_is_pure_and_verbose_prints_the_plan(make_mlp, capsys):
    model = make_mlp()
    before = snapshot(model)
    plan = sc.compute_masks(model, sparsity=0.75, distribution="erk")
    assert_nothing_changed(model, before)
    assert plan.density == pytest.approx(0.25, abs=1e-3)
    sc.prune(model, sparsity=0.75, verbose=True)
    out = capsys.readouterr().out
    assert "Pruning plan" in out and "fc2.weight" in out
