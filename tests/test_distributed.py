"""Under DistributedDataParallel (gloo, 2 processes) every rank ends with bitwise-equal masks,
with each rank training on different data (RigL, SET, GraNet, GMP, SNIP at initialisation, N:M
training); FSDP2 keeps static masks and refuses mask changes on sharded weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _ranks import process_group, save_result, spawn_ranks
from torch import nn

from sparsecraft.core.masking import masks_of
from sparsecraft.methods.at_init import snip_prune
from sparsecraft.methods.dst import SET, GraNet, RigL
from sparsecraft.methods.gmp import GradualMagnitudePruning
from sparsecraft.methods.nm_training import NMTraining

METHODS = {"rigl": RigL, "set": SET, "granet": GraNet}


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: int, after_step=None) -> None:
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def _worker(rank: int, world: int, init_file: str, out_dir: str, method: str) -> None:
    with process_group(rank, world, init_file):
        torch.manual_seed(0)  # same initial weights everywhere
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        step = None
        if method == "gmp":
            step = GradualMagnitudePruning(model, optimizer, final_sparsity=0.8, start_step=1, frequency=3, n_prunes=5,
                                           total_steps=30).step
        elif method == "snip":  # each rank scores on its own batches: the scores must still agree
            g = torch.Generator().manual_seed(7 + rank)
            batches = [(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
            snip_prune(model, 0.8, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, optimizer=optimizer)
        elif method == "nm":
            nm = NMTraining(model, optimizer, n=1, m=4, total_steps=30, method="srste")
            step = nm.step
        else:
            step = METHODS[method](model, optimizer, sparsity=0.8, total_steps=30, update_interval=3).step
        _train(ddp, optimizer, rank, 30, step)
        if method == "nm":
            nm.finalize()
            masks = {n: p != 0 for n, p in model.named_parameters() if n.endswith("weight")}
        else:
            masks = masks_of(model)
        save_result({"masks": masks, "state": model.state_dict()}, out_dir, rank)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("method", ["rigl", "set", "granet", "gmp", "snip", "nm"])
def test_masks_are_identical_on_every_rank(tmp_path, method):
    spawn_ranks(_worker, 2, tmp_path, method)
    a = torch.load(tmp_path / "rank0.pt", weights_only=False)
    b = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert a["masks"].keys() == b["masks"].keys() and a["masks"]
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    for name in a["state"]:  # DDP keeps the weights equal too, and pruned weights are zero on both
        assert torch.allclose(a["state"][name], b["state"][name], atol=1e-6), name
    for name, mask in a["masks"].items():
        assert bool((a["state"][name][~mask] == 0).all())


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from sparsecraft.core.prune import prune
    from sparsecraft.errors import SparsecraftError

    with process_group(rank, world, init_file):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
        prune(model, sparsity=0.75, distribution="uniform", score="magnitude")  # static masks, before sharding
        masks = {k: v.clone() for k, v in masks_of(model).items()}
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        _train(model, optimizer, rank, 10)
        state = {k: v.full_tensor() for k, v in model.state_dict().items() if not k.endswith("_mask")}
        try:  # a mask change after sharding is refused with a clear message, and changes nothing
            prune(model, sparsity=0.9, distribution="uniform", score="magnitude")
            refused = ""
        except SparsecraftError as e:
            refused = str(e)
        save_result({"masks": masks, "state": state, "refused": refused}, out_dir, rank)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_keeps_static_masks_and_refuses_mask_changes_after_sharding(tmp_path):
    spawn_ranks(_fsdp_worker, 2, tmp_path)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name, mask in out["masks"].items():
            weight = out["state"][name]
            assert bool((weight[~mask.bool()] == 0).all()), name  # pruned weights stayed zero through AdamW
            assert bool((weight[mask.bool()] != 0).all()), name  # kept ones trained
        assert "FSDP2" in out["refused"] and "before fully_shard" in out["refused"]
