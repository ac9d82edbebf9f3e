"""Sparse-IFT families are iso-FLOP with the dense layer they replace (counted by the FLOPs counter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsecraft.analysis.flops import count_flops
from sparsecraft.core.prune import prune
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.dst import RigL
from sparsecraft.methods.sparse_ift import SparseWide, sift_densities, sift_exclude, sparse_ift, sparse_wide_model


def sparse_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    layers, _, _ = count_flops(model, x)
    return sum(f.sparse for f in layers.values()), sum(f.dense for f in layers.values())


def sparsify(model: nn.Module, sparsity: float) -> None:
    prune(model, sparsity=sparsity, distribution="mapping", densities=sift_densities(model), exclude=sift_exclude(model) or None)


@pytest.mark.parametrize("family", ["parallel", "factorized", "doped"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_each_family_is_iso_flop_with_the_dense_layer(family, sparsity):
    torch.manual_seed(0)
    dense = nn.Linear(128, 96)
    x = torch.randn(3, 128)
    reference, _ = sparse_flops(dense, x)
    sift = sparse_ift(dense, family, sparsity)
    assert sift(x).shape == (3, 96)
    sparsify(sift, sparsity)
    ours, total = sparse_flops(sift, x)
    assert total > reference  # the transformed layer is bigger ...
    assert ours == pytest.approx(reference, rel=0.01)  # ... and costs the same sparse FLOPs


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_sparse_wide_block_is_iso_flop(sparsity):
    x = torch.randn(2, 64)
    dense = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    reference, _ = sparse_flops(dense, x)
    wide = SparseWide(64, 100, 10, sparsity)
    assert wide.hidden == round(100 / (1 - sparsity))
    sparsify(wide, sparsity)
    ours, _ = sparse_flops(wide, x)
    assert ours == pytest.approx(reference, rel=0.01)


def test_sparse_ift_trains_with_rigl_at_iso_flop():
    torch.manual_seed(0)
    model = nn.Sequential(sparse_ift(nn.Linear(32, 32), "factorized", 0.75), nn.ReLU(), nn.Linear(32, 4))
    densities = {**sift_densities(model), "2": 1.0}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rigl = RigL(model, optimizer, sparsity=0.75, total_steps=20, update_interval=5, distribution="mapping",
                densities=densities, exclude=["2"])
    x = torch.randn(8, 32)
    before, _ = sparse_flops(model, x)
    for _ in range(20):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rigl.step()
    after, _ = sparse_flops(model, x)
    assert after == before  # rewiring keeps the FLOPs


def test_bad_sparse_ift_input():
    with pytest.raises(SparsecraftError, match="choose parallel, factorized, doped"):
        sparse_ift(nn.Linear(4, 4), "deep", 0.5)
    with pytest.raises(SparsecraftError, match="sparsity > 0"):
        sparse_ift(nn.Linear(4, 4), "parallel", 0.0)
    with pytest.raises(SparsecraftError, match="nn.Linear and nn.Conv2d"):
        sparse_ift(nn.LSTM(4, 4), "parallel", 0.5)
    with pytest.raises(SparsecraftError, match="grouped"):
        sparse_ift(nn.Conv2d(4, 4, 3, groups=2), "parallel", 0.5)


@pytest.mark.parametrize("family", ["parallel", "factorized", "doped"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_each_family_is_iso_flop_for_a_strided_conv(family, sparsity):
    torch.manual_seed(0)
    dense = nn.Conv2d(24, 40, 3, stride=2, padding=1)
    x = torch.randn(2, 24, 9, 9)
    reference, _ = sparse_flops(dense, x)
    sift = sparse_ift(dense, family, sparsity)
    assert sift(x).shape == dense(x).shape
    sparsify(sift, sparsity)
    ours, total = sparse_flops(sift, x)
    assert total > reference
    assert ours == pytest.approx(reference, rel=0.01)


def test_sparse_wide_conv_block_is_iso_flop():
    x = torch.randn(2, 8, 6, 6)
    block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    reference, _ = sparse_flops(block, x)
    wide = SparseWide.from_block(*block, sparsity=0.75)
    assert wide.hidden == 64 and wide(x).shape == block(x).shape
    sparsify(wide, 0.75)
    assert sparse_flops(wide, x)[0] == pytest.approx(reference, rel=0.01)


@pytest.mark.parametrize("name, args, example", [
    ("transformer", {"vocab": 17, "dim": 32, "context": 16}, torch.randint(0, 17, (1, 16))),
    ("cnn", {"width": 8}, torch.randn(1, 1, 8, 8)),
])
def test_whole_model_sparse_wide_keeps_the_dense_models_flops(name, args, example):
    from sparsecraft.models import create

    dense_layers, dense_other, _ = count_flops(create(name, **args), example)
    wide, densities = sparse_wide_model(name, args, 0.75, example)
    prune(wide, distribution="mapping", densities=densities, include=list(densities))
    layers, other, _ = count_flops(wide, example)
    assert sum(f.dense for f in layers.values()) > 1.5 * sum(f.dense for f in dense_layers.values())
    assert sum(f.sparse for f in layers.values()) + other == pytest.approx(
        sum(f.dense for f in dense_layers.values()) + dense_other, rel=0.01)


@pytest.mark.parametrize("model, args", [("cnn", {"width": 8}), ("transformer", {"vocab": 17, "dim": 32, "context": 16})])
def test_recipe_trains_sparse_wide_at_the_dense_models_training_flops(tmp_path, model, args):
    from sparsecraft.recipes.runner import Run
    from sparsecraft.recipes.schema import Recipe, SparsitySection, TrainSection

    data, data_args = ("digits", {}) if model == "cnn" else ("sort", {"n_train": 256, "n_test": 64})
    recipe = Recipe(model=model, model_args=args, data=data, data_args=data_args,
                    train=TrainSection(epochs=1, batch_size=64),
                    sparsity=SparsitySection(method="static", sparsity=0.75, distribution="uniform", sift="wide"))
    result = Run(recipe, tmp_path, progress=False, log=lambda _: None).run()
    assert result.train_flops_vs_dense == pytest.approx(1.0, rel=0.01)
    assert 0.5 < result.sparsity < 0.9


def test_bad_sift_recipe_names_the_field():
    from sparsecraft.recipes.schema import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="sift"):
        parse_recipe("sparsity:\n  method: gmp\n  sparsity: 0.5\n  sift: wide\n")
    with pytest.raises(RecipeError, match="'wide'"):
        parse_recipe("sparsity:\n  method: rigl\n  sparsity: 0.5\n  sift: tall\n")
