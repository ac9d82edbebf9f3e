"""Sparse-IFT families are iso-FLOP with the dense layer they replace (counted by the FLOPs counter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsecraft.analysis.flops import count_flops
from sparsecraft.core.prune import prune
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.dst import RigL
from sparsecraft.methods.sparse_ift import SparseWide, sift_densities, sift_exclude, sparse_ift


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
    with pytest.raises(SparsecraftError, match="nn.Linear"):
        sparse_ift(nn.Conv2d(4, 4, 3), "parallel", 0.5)
