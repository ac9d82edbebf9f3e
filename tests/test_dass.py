"""DASS (Mousavi et al. 2022) and DARTS (Liu et al. 2019): sparse ops, mixed edges, derivation,
genotype round trips, errors, and a tiny end-to-end comparison."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecraft.core.patterns import units_to_keep
from sparsecraft.data.images import Split, digits
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.search.dass import (
    DARTS_OPS, DASS_OPS, DiscreteNetwork, Genotype, MixedOp, SearchNetwork, SparseConv2d, SparseLinear,
    build_dass_architecture, darts_search, derive, genotype_to_dict, parse_genotype, run_dass,
)
from sparsecraft.methods.search.dass import search as search_module
from sparsecraft.recipes.schema import TrainSection
from sparsecraft.recipes.search import DassSection, SearchRecipe

MODES = ["scores", "magnitude"]


def make_layer(kind: str, sparsity: float, mode: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        return SparseConv2d(4, 6, 3, stride=2, padding=2, dilation=2, sparsity=sparsity, mask_mode=mode)
    return SparseLinear(20, 10, sparsity=sparsity, mask_mode=mode)


def reference(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


def layer_input(layer: nn.Module) -> torch.Tensor:
    return torch.randn(3, 4, 7, 7) if isinstance(layer, nn.Conv2d) else torch.randn(3, 20)


@pytest.mark.parametrize("ops", [DARTS_OPS, DASS_OPS])
@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_is_the_softmax_weighted_sum_of_its_ops(ops, stride):
    torch.manual_seed(0)
    mixed = MixedOp(4, stride, ops, sparsity=0.5)
    x = torch.randn(2, 4, 6, 6)
    weights = F.softmax(torch.randn(len(ops)), -1)
    with torch.no_grad():
        expected = sum(w * op(x) for w, op in zip(weights, mixed.ops))
        out = mixed(x, weights)
    assert out.shape == (2, 4, 6 // stride, 6 // stride)
    torch.testing.assert_close(out, expected)
    # the weights matter: another weighting gives another output
    with torch.no_grad():
        assert not torch.allclose(mixed(x, weights.flip(0)), out)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("mode", MODES)
def test_sparse_layers_keep_exactly_the_target_sparsity_while_training(kind, mode):
    layer = make_layer(kind, 0.7, mode)
    n = layer.weight.numel()
    kept = round(0.3 * n)
    opt = torch.optim.SGD(layer.parameters(), lr=2.0)
    masks = [layer.weight_mask.clone()]
    for _ in range(6):
        x = layer_input(layer)
        loss = (layer(x) - 1.0).pow(2).mean()
        assert int(layer.weight_mask.count_nonzero()) == kept
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer(x)
        masks.append(layer.weight_mask.clone())
        assert int(layer.weight_mask.count_nonzero()) == kept
        assert int((layer.weight_mask * layer.weight).count_nonzero()) <= kept
    # the steps moved the scores / weights enough to change which weights are kept
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_scores_get_straight_through_gradients(kind):
    layer = make_layer(kind, 0.6, "scores")
    x = layer_input(layer)
    layer(x).pow(2).sum().backward()
    # reference: the gradient of the loss with respect to the masked weight W * mask
    masked = (layer.weight.detach() * layer.weight_mask).requires_grad_()
    reference(layer, x, masked).pow(2).sum().backward()
    expected = masked.grad * layer.weight.detach() * layer.scores.detach().sign()
    torch.testing.assert_close(layer.scores.grad, expected)
    pruned = layer.weight_mask == 0
    assert layer.scores.grad[pruned].abs().sum() > 0  # pruned weights' scores learn too (they can come back)
    assert torch.all(layer.weight.grad[pruned] == 0)  # HYDRA: the weight gradient is masked


def test_magnitude_mode_passes_dense_gradients_to_the_weights():
    layer = make_layer("linear", 0.6, "magnitude")
    assert layer.scores is None
    x = layer_input(layer)
    layer(x).pow(2).sum().backward()
    masked = (layer.weight.detach() * layer.weight_mask).requires_grad_()
    reference(layer, x, masked).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, masked.grad)  # straight through, pruned positions too
    assert layer.weight.grad[layer.weight_mask == 0].abs().sum() > 0


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_is_the_plain_op_on_the_masked_weight(kind, mode):
    layer = make_layer(kind, 0.75, mode)
    x = layer_input(layer)
    out = layer(x)
    mask = layer.weight_mask
    torch.testing.assert_close(out, reference(layer, x, layer.weight * mask), rtol=0, atol=1e-6)
    assert not torch.allclose(out, reference(layer, x, layer.weight), atol=1e-3)  # the mask is in force
    # the mask keeps the largest |scores| (or |W|): every kept entry >= every pruned one
    source = (layer.scores if mode == "scores" else layer.weight).detach().abs()
    assert source[mask == 1].min() >= source[mask == 0].max()


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1])
def test_sparsity_outside_zero_one_raises(bad):
    with pytest.raises(SparsecraftError, match=r"SparseConv2d\(4->6.*sparsity=.*outside \[0, 1\)"):
        SparseConv2d(4, 6, 3, sparsity=bad)
    with pytest.raises(SparsecraftError, match=r"SparseLinear\(20->10\).*sparsity"):
        SparseLinear(20, 10, sparsity=bad)
    with pytest.raises(SparsecraftError, match="mask_mode"):
        SparseLinear(20, 10, sparsity=0.5, mask_mode="random")
    assert int(SparseLinear(20, 10, sparsity=0.0).weight_mask.sum()) == 200  # 0 is allowed: dense


def set_row(alphas: torch.Tensor, edge: int, ops: list[str], **values: float) -> None:
    alphas.data[edge] = 0.0
    for op, v in values.items():
        alphas.data[edge, ops.index(op)] = v


def test_derive_keeps_the_two_strongest_non_none_edges_per_node():
    net = SearchNetwork(1, 4, 10, cells=3, nodes=2, ops=DARTS_OPS)
    ops = net.ops
    # normal cell: node 0 has edges 0, 1; node 1 has edges 2, 3, 4 (from states 0, 1, 2)
    set_row(net.alphas_normal, 0, ops, none=6.0, avg_pool_3x3=3.0)  # none wins, but never chosen
    set_row(net.alphas_normal, 1, ops, max_pool_3x3=2.0)
    set_row(net.alphas_normal, 2, ops, none=5.0, sep_conv_5x5=4.0)  # strongest overall only through none
    set_row(net.alphas_normal, 3, ops, dil_conv_5x5=1.5)
    set_row(net.alphas_normal, 4, ops, skip_connect=2.0)
    # reduce cell: node 1 keeps states 0 and 2
    set_row(net.alphas_reduce, 0, ops, sep_conv_3x3=1.0)
    set_row(net.alphas_reduce, 1, ops, dil_conv_3x3=1.0)
    set_row(net.alphas_reduce, 2, ops, max_pool_3x3=3.0)
    set_row(net.alphas_reduce, 3, ops, skip_connect=0.5)
    set_row(net.alphas_reduce, 4, ops, sep_conv_5x5=2.0, avg_pool_3x3=1.0)
    g = derive(net)
    assert g.normal == [("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("dil_conv_5x5", 1), ("skip_connect", 2)]
    assert g.reduce == [("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 2)]
    assert g.normal_concat == g.reduce_concat == [2, 3]


GENOTYPE = Genotype(
    normal=[("sparse_sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 0),
            ("sparse_dil_conv_3x3", 3), ("avg_pool_3x3", 1)],
    normal_concat=[2, 3, 4],
    reduce=[("max_pool_3x3", 0), ("skip_connect", 1), ("sep_conv_5x5", 2), ("sparse_sep_conv_5x5", 1)],
    reduce_concat=[2, 3],
)


def structure(model: nn.Module) -> list[tuple]:
    return [(n, type(m).__name__, tuple((k, tuple(p.shape)) for k, p in m.named_parameters(recurse=False)))
            for n, m in model.named_modules()]


def test_genotype_json_round_trip_rebuilds_the_same_network():
    text = json.dumps(genotype_to_dict(GENOTYPE))
    parsed = parse_genotype(json.loads(text))
    assert parsed == GENOTYPE
    torch.manual_seed(0)
    a = DiscreteNetwork(GENOTYPE, 1, 4, 10, cells=3)
    torch.manual_seed(1)
    b = DiscreteNetwork(parsed, 1, 4, 10, cells=3)
    assert structure(a) == structure(b)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in a.modules())  # sparse ops become plain convs
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert a(x).shape == (5, 10)
    c = build_dass_architecture({"genotype": json.loads(text), "in_channels": 1, "C": 4, "classes": 10, "cells": 3})
    assert structure(c) == structure(a)
    other = parse_genotype({**json.loads(text), "reduce": [["sep_conv_3x3", 0], ["skip_connect", 1]], "reduce_concat": [2]})
    assert structure(DiscreteNetwork(other, 1, 4, 10, cells=3)) != structure(a)


@pytest.mark.parametrize("change, message", [
    ({"normal": [["conv_7x7", 0], ["skip_connect", 1]]}, r"normal\[0\].*unknown operation 'conv_7x7'; known: .*sep_conv_3x3"),
    ({"normal": [["none", 0], ["skip_connect", 1]]}, r"unknown operation 'none'"),
    ({"reduce": [["skip_connect", 0], ["skip_connect", 2]]}, r"reduce\[1\] \(node 0\): input 2 is out of range.*0\.\.1"),
    ({"reduce": [["skip_connect", 0], ["skip_connect", 1], ["skip_connect", 3]]}, r"reduce: 3 edges is an odd number"),
    ({"normal": [["skip_connect", 0], "skip_connect"]}, r"normal\[1\].*pair"),
    ({"normal_concat": [2, 9]}, r"normal_concat.*intermediate nodes 2\.\.4"),
    ({"reduce_concat": None}, r"reduce_concat"),
])
def test_bad_cell_descriptions_say_what_is_wrong(change, message):
    data = {**genotype_to_dict(GENOTYPE), **change}
    with pytest.raises(SparsecraftError, match=message):
        parse_genotype(data)


def test_missing_keys_are_named():
    data = genotype_to_dict(GENOTYPE)
    del data["reduce_concat"]
    with pytest.raises(SparsecraftError, match="missing key.*reduce_concat"):
        parse_genotype(data)
    with pytest.raises(SparsecraftError, match="missing key.*genotype"):
        build_dass_architecture({"in_channels": 1, "C": 4, "classes": 10, "cells": 3})


@pytest.fixture(scope="module")
def small_digits() -> Split:
    s = digits()
    return Split(s.x_train[:128], s.y_train[:128], s.x_test[:64], s.y_test[:64])


def test_darts_search_updates_alphas_and_keeps_sparse_ops_sparse(small_digits):
    train_part = val_part = Split(*(t[:64] for t in (small_digits.x_train, small_digits.y_train) * 2))
    torch.manual_seed(0)
    net = SearchNetwork(1, 4, 10, cells=3, nodes=2, ops=DASS_OPS, sparsity=0.9, sparse_classifier=True)
    before = [a.detach().clone() for a in net.arch_parameters()]
    genotype, log, seconds, flops = darts_search(net, train_part, val_part, 2, 32, seed=0)
    assert all(not torch.equal(b, a) for b, a in zip(before, net.arch_parameters()))
    assert [e["epoch"] for e in log] == [0, 1] and seconds > 0 and flops > 0
    assert set(log[0]) >= {"train_loss", "val_accuracy", "alphas_normal", "alphas_reduce", "genotype"}
    rows = torch.tensor(log[-1]["alphas_normal"])
    torch.testing.assert_close(rows.sum(1), torch.ones(len(rows)))
    assert parse_genotype(log[-1]["genotype"]) == genotype
    sparse = [m for m in net.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    assert len(sparse) > 100 and isinstance(net.classifier, SparseLinear)
    for m in sparse:  # every masked op keeps round(10%) of its weights, after the search too
        assert int(m.weight_mask.sum()) == units_to_keep(1 - 0.9, m.weight.numel())


@pytest.mark.parametrize("final_method", ["gmp", "static", "rigl"])
def test_run_dass_end_to_end(small_digits, monkeypatch, final_method):
    trained = {}
    real = search_module.train_and_measure

    def capture(model, *args, **kwargs):
        trained[kwargs["arch"]] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(search_module, "train_and_measure", capture)
    baseline = final_method == "gmp"  # the DARTS baseline once: the other methods train the same way
    recipe = SearchRecipe(method="dass", sparsity=0.8, seeds=[0], train=TrainSection(epochs=1, batch_size=32),
                          dass=DassSection(channels=4, cells=3, nodes=2, search_epochs=1, final_method=final_method,
                                           baseline=baseline))
    result = run_dass(recipe, small_digits, progress=False, log=lambda line: None)
    searches = ["dass", "darts"] if baseline else ["dass"]
    assert [r.arch for r in result.rows] == ["dass", "darts-pruned"][: len(searches)]
    for row in result.rows:
        layers = [m for m in trained[row.arch].modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        stem, rest = layers[0], layers[1:]
        assert int(stem.weight.count_nonzero()) == stem.weight.numel()  # the stem conv stays dense
        zeros = sum(int((m.weight == 0).sum()) for m in rest)
        measured = zeros / sum(m.weight.numel() for m in rest)
        assert abs(measured - 0.8) < 0.01 and abs(row.sparsity - measured) < 1e-9
        assert 0.0 <= row.accuracy <= 1.0 and len(row.curve) == 1
    assert list(result.cost) == searches and all(c.evaluated == 1 and c.flops > 0 for c in result.cost.values())
    assert [(e["seed"], e["search"]) for e in result.log] == [(0, name) for name in searches]
    arch = json.loads(json.dumps(result.architecture))
    assert arch["method"] == "dass" and arch["sparsity"] == 0.8 and arch["final_method"] == final_method
    dass_genotype = parse_genotype(arch["genotype"])
    assert {op for op, _ in dass_genotype.normal + dass_genotype.reduce} <= set(DASS_OPS)
    if baseline:
        darts_genotype = parse_genotype(arch["darts_genotype"])
        assert {op for op, _ in darts_genotype.normal + darts_genotype.reduce} <= set(DARTS_OPS)
    assert build_dass_architecture(arch)(small_digits.x_test[:2]).shape == (2, 10)


def test_second_order_alpha_gradient_matches_the_exact_unrolled_gradient():
    """DARTS eq. 7: d/d alpha L_val(w - xi (grad_w L_train(w, alpha) + wd w), alpha), here exactly by
    autograd through the virtual step, against the central-difference version we run."""
    from torch.func import functional_call

    from sparsecraft.methods.search.dass.search import unrolled_arch_grads

    torch.manual_seed(0)
    net = SearchNetwork(1, 2, 3, cells=3, nodes=2, ops=["none", "skip_connect", "avg_pool_3x3", "sep_conv_3x3"]).double()
    # a central difference of gradients needs a smooth loss: ReLU's kinks make grad_alpha jump as w moves
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Softplus())
    g = torch.Generator().manual_seed(1)
    xt, xv = (torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    yt, yv = (torch.randint(0, 3, (8,), generator=g) for _ in range(2))
    xi, wd = 0.5, 3e-4
    params = dict(net.named_parameters())
    alpha_ids = {id(a) for a in net.arch_parameters()}
    names = [n for n, p in params.items() if id(p) not in alpha_ids]

    def loss(ps, x, y):
        return F.cross_entropy(functional_call(net, ps, (x,)), y)

    grads_w = torch.autograd.grad(loss(params, xt, yt), [params[n] for n in names], create_graph=True, allow_unused=True)
    unrolled = {**params, **{n: params[n] - xi * ((0 if gw is None else gw) + wd * params[n]) for n, gw in zip(names, grads_w)}}
    exact = torch.autograd.grad(loss(unrolled, xv, yv), net.arch_parameters())
    first = torch.autograd.grad(loss(params, xv, yv), net.arch_parameters())

    before = [p.detach().clone() for p in net.parameters()]
    approx = unrolled_arch_grads(net, (xt, yt), (xv, yv), xi, wd)
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))  # the virtual step is undone
    for a, e, f in zip(approx, exact, first):
        torch.testing.assert_close(a, e, rtol=1e-2, atol=2e-4)
        assert (f - e).abs().max() > 20 * (a - e).abs().max()  # the second-order term is there and matters


def test_second_order_search_runs_and_order_is_validated(small_digits):
    part = Split(*(t[:32] for t in (small_digits.x_train, small_digits.y_train) * 2))
    net = SearchNetwork(1, 2, 10, cells=3, nodes=2, ops=["none", "skip_connect", "sep_conv_3x3"])
    before = [a.detach().clone() for a in net.arch_parameters()]
    darts_search(net, part, part, 1, 16, seed=0, order=2)
    assert all(not torch.equal(b, a) for b, a in zip(before, net.arch_parameters()))
    with pytest.raises(SparsecraftError, match="first .1. or second .2. order"):
        darts_search(net, part, part, 1, 16, order=3)
