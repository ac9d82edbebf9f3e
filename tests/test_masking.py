"""Masks that last: zeros survive optimizers, in-place edits, loading, copying, pickling and saving."""

from __future__ import annotations

import copy
import io
import os
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import sparsecraft as sc
from sparsecraft.core.masking import MaskEnforcer, _enforce_after_load, patterns_of
from sparsecraft.errors import MaskMismatchError

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "sgd_weight_decay": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01),
    "sgd_momentum_weight_decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam_weight_decay": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw_weight_decay": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
}
STATEFUL = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw_weight_decay": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
}


def step(model: nn.Module, opt: torch.optim.Optimizer, batch, check_grads: dict[str, torch.Tensor] | None = None) -> None:
    x, y = batch
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if check_grads is not None:
        assert_zero_where_pruned(model, check_grads, grads=True)
    opt.step()


def assert_zero_where_pruned(model: nn.Module, masks: dict[str, torch.Tensor], grads: bool = False) -> None:
    assert masks
    for name, mask in masks.items():
        param = model.get_parameter(name)
        tensor = param.grad if grads else param.detach()
        assert tensor is not None, name
        pruned = tensor[~mask]
        assert pruned.numel() > 0, name
        assert torch.equal(pruned, torch.zeros_like(pruned)), f"{name}: {int(torch.count_nonzero(pruned))} pruned entries nonzero"


def has_mask_machinery(model: nn.Module) -> bool:
    for module in model.modules():
        if any(isinstance(h, MaskEnforcer) for h in module._forward_pre_hooks.values()):
            return True
        if any(h is _enforce_after_load for h in module._load_state_dict_post_hooks.values()):
            return True
        if any(key.endswith("_mask") for key in module._buffers):
            return True
    return False


def cloned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bound", [True, False], ids=["bound_in_prune", "created_after_unbound"])
def test_pruned_weights_stay_zero_for_100_steps(make_mlp, mlp_batch, name, bound):
    model = make_mlp()
    if bound:
        opt = OPTIMIZERS[name](model.parameters())
        sc.prune(model, sparsity=0.8, optimizer=opt)
    else:
        sc.prune(model, sparsity=0.8)
        opt = OPTIMIZERS[name](model.parameters())  # never bound: masked gradients keep the zeros
    masks = sc.masks_of(model)
    before = {n: model.get_parameter(n).detach().clone() for n in masks}
    for _ in range(100):
        step(model, opt, mlp_batch, check_grads=masks)
    assert_zero_where_pruned(model, masks)
    for n, mask in masks.items():
        kept_now = model.get_parameter(n).detach()[mask]
        assert not torch.equal(kept_now, before[n][mask]), f"{n}: kept weights never trained"
    assert sc.masks_of(model).keys() == masks.keys()
    assert all(torch.equal(sc.masks_of(model)[n], masks[n]) for n in masks)


@pytest.mark.parametrize("name", list(STATEFUL))
def test_existing_optimizer_state_is_zeroed_when_bound(make_mlp, mlp_batch, name):
    model = make_mlp()
    opt = STATEFUL[name](model.parameters())
    for _ in range(5):  # dense steps: every state tensor is nonzero almost everywhere
        step(model, opt, mlp_batch)
    weights = [model.fc1.weight, model.fc2.weight, model.fc3.weight]
    state_keys = {k for p in weights for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
    assert state_keys, "the optimizer should hold per-weight state"
    for p in weights:
        for k in state_keys:
            assert int(torch.count_nonzero(opt.state[p][k])) > p.numel() // 2

    sc.prune(model, sparsity=0.75, optimizer=opt)
    masks = sc.masks_of(model)

    def assert_state_zero():
        for n, mask in masks.items():
            state = opt.state[model.get_parameter(n)]
            for k in state_keys:
                pruned = state[k][~mask]
                assert torch.equal(pruned, torch.zeros_like(pruned)), f"{n}: {k} not zero at pruned positions"
                assert int(torch.count_nonzero(state[k][mask])) > 0, f"{n}: {k} of kept weights was wiped"

    assert_state_zero()  # right after binding, before any step
    assert_zero_where_pruned(model, masks)
    for _ in range(20):
        step(model, opt, mlp_batch, check_grads=masks)
    assert_zero_where_pruned(model, masks)
    assert_state_zero()


# --------------------------------------------------------------------------- in-place edits and loading


def test_forward_pre_hook_reapplies_masks_after_an_in_place_edit(make_mlp, mlp_batch):
    x, _ = mlp_batch
    model = make_mlp()
    sc.prune(model, sparsity=0.75)
    masks = sc.masks_of(model)
    plain = sc.finalize(copy.deepcopy(model))  # same weights, no hooks
    assert not has_mask_machinery(plain)

    with torch.no_grad():
        model.fc2.weight.add_(1.0)
        plain.fc2.weight.add_(1.0)
    edited_unmasked = plain(x)
    with torch.no_grad():
        plain.fc2.weight.mul_(masks["fc2.weight"])
    expected = plain(x)
    assert not torch.allclose(expected, edited_unmasked)  # the edit did touch pruned weights

    out = model(x)
    assert torch.equal(out, expected)
    assert_zero_where_pruned(model, masks)
    kept = model.fc2.weight.detach()[masks["fc2.weight"]]
    assert torch.equal(kept, plain.fc2.weight.detach()[masks["fc2.weight"]])  # the edit stays on kept weights


def test_enforce_masks_zeroes_immediately(make_mlp):
    model = make_mlp()
    sc.prune(model, sparsity=0.5)
    masks = sc.masks_of(model)
    with torch.no_grad():
        for n in masks:
            model.get_parameter(n).fill_(3.0)
    sc.enforce_masks(model)
    assert_zero_where_pruned(model, masks)
    for n, mask in masks.items():
        assert bool((model.get_parameter(n).detach()[mask] == 3.0).all())


def test_loading_dense_weights_into_a_masked_model_zeroes_them_at_once(make_mlp):
    model = make_mlp()
    sc.prune(model, sparsity=0.6)
    masks = sc.masks_of(model)
    dense = make_mlp(seed=5)
    result = model.load_state_dict(dense.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc1.weight_mask", "fc2.weight_mask", "fc3.weight_mask"]
    assert_zero_where_pruned(model, masks)  # no forward pass needed
    for n, mask in masks.items():
        assert torch.equal(model.get_parameter(n).detach()[mask], dense.get_parameter(n).detach()[mask])

    # a strict load of a full state_dict whose weights are dense
    state = model.state_dict()
    state["fc2.weight"] = torch.full_like(state["fc2.weight"], 2.0)
    model.load_state_dict(state)
    assert_zero_where_pruned(model, masks)
    assert bool((model.fc2.weight.detach()[masks["fc2.weight"]] == 2.0).all())


def test_state_dict_round_trip_into_a_fresh_dense_model(make_mlp, mlp_batch):
    x, _ = mlp_batch
    model = make_mlp()
    sc.prune(model, pattern="2:4")
    masks = sc.masks_of(model)
    state = model.state_dict()
    assert {k for k in state if k.endswith("_mask")} == {"fc1.weight_mask", "fc2.weight_mask", "fc3.weight_mask"}
    for n, mask in masks.items():
        assert torch.equal(state[n + "_mask"], mask.to(state[n].dtype))

    fresh = make_mlp(seed=123)
    assert not has_mask_machinery(fresh)
    sc.load_sparse_state_dict(fresh, state)
    fresh_masks = sc.masks_of(fresh)
    assert fresh_masks.keys() == masks.keys()
    assert all(torch.equal(fresh_masks[n], masks[n]) for n in masks)
    assert torch.equal(fresh(x), model(x))
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        step(fresh, opt, mlp_batch, check_grads=masks)
    assert_zero_where_pruned(fresh, masks)


# --------------------------------------------------------------------------- copies


def _deepcopy(model):
    return copy.deepcopy(model)


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("clone", [_deepcopy, _pickle, _torch_save], ids=["deepcopy", "pickle", "torch.save"])
def test_copies_keep_enforcing_masks_during_training(make_mlp, mlp_batch, clone):
    x, _ = mlp_batch
    model = make_mlp()
    sc.prune(model, sparsity=0.8)
    masks = sc.masks_of(model)
    original = cloned_state(model)

    twin = clone(model)
    assert torch.equal(twin(x), model(x))
    twin_masks = sc.masks_of(twin)
    assert twin_masks.keys() == masks.keys() and all(torch.equal(twin_masks[n], masks[n]) for n in masks)
    assert twin.fc1.weight_mask.data_ptr() != model.fc1.weight_mask.data_ptr()

    opt = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    before = {n: twin.get_parameter(n).detach().clone() for n in masks}
    for _ in range(10):
        step(twin, opt, mlp_batch, check_grads=masks)  # gradients of pruned weights are zero in the copy
    assert_zero_where_pruned(twin, masks)
    assert any(not torch.equal(twin.get_parameter(n).detach(), before[n]) for n in masks)
    # the original is untouched by training the copy
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- finalize, dense gradients


def test_finalize_leaves_a_plain_model_with_the_zeros(make_mlp, mlp_batch):
    model = make_mlp()
    sc.prune(model, sparsity=0.75)
    masks = sc.masks_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    step(model, opt, mlp_batch)
    assert has_mask_machinery(model)

    result = sc.finalize(model)
    assert result is model
    assert not has_mask_machinery(model)
    assert not any(k.endswith("_mask") for k in model.state_dict())
    assert sc.masks_of(model) == {}
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    assert_zero_where_pruned(model, masks)
    # nothing keeps the zeros any more: one dense step moves pruned weights
    step(model, opt, mlp_batch)
    assert any(int(torch.count_nonzero(model.get_parameter(n).detach()[~m])) > 0 for n, m in masks.items())


def test_remove_masks_by_name_releases_only_those(make_mlp, mlp_batch):
    model = make_mlp()
    sc.prune(model, sparsity=0.75)
    masks = sc.masks_of(model)
    sc.remove_masks(model, names=["fc1.weight"])
    assert set(sc.masks_of(model)) == {"fc2.weight", "fc3.weight"}
    assert "fc1.weight_mask" not in model.state_dict()
    assert not any(isinstance(h, MaskEnforcer) for h in model.fc1._forward_pre_hooks.values())
    assert_zero_where_pruned(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    step(model, opt, mlp_batch)
    assert int(torch.count_nonzero(model.fc1.weight.detach()[~masks["fc1.weight"]])) > 0
    assert_zero_where_pruned(model, {n: masks[n] for n in ("fc2.weight", "fc3.weight")})


def test_dense_gradients_context(make_mlp, mlp_batch):
    x, y = mlp_batch
    model = make_mlp()
    sc.prune(model, sparsity=0.75)
    masks = sc.masks_of(model)
    with sc.dense_gradients(model):
        F.cross_entropy(model(x), y).backward()
    for n, mask in masks.items():
        assert int(torch.count_nonzero(model.get_parameter(n).grad[~mask])) > 0, n
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert_zero_where_pruned(model, masks, grads=True)
    # restored even when the block raises
    with pytest.raises(RuntimeError), sc.dense_gradients(model):
        raise RuntimeError("boom")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert_zero_where_pruned(model, masks, grads=True)


# --------------------------------------------------------------------------- masks files


def test_save_and_load_masks_round_trip(make_mlp, tmp_path):
    model = make_mlp()
    sc.prune(model, pattern="2:4", layer_patterns={"fc3": "unstructured"}, density=0.5)
    masks = sc.masks_of(model)
    path = tmp_path / "masks.safetensors"
    sc.save_masks(model, path)
    assert os.listdir(tmp_path) == ["masks.safetensors"]  # written atomically: no temp file left

    read, patterns = sc.read_masks(path)
    assert read.keys() == masks.keys()
    assert all(read[n].dtype == torch.bool and torch.equal(read[n], masks[n]) for n in masks)
    assert patterns == {"fc1.weight": "2:4", "fc2.weight": "2:4", "fc3.weight": "unstructured"}

    fresh = make_mlp(seed=77)
    sc.load_masks(fresh, path)
    assert all(torch.equal(sc.masks_of(fresh)[n], masks[n]) for n in masks)
    assert patterns_of(fresh) == patterns
    assert_zero_where_pruned(fresh, masks)

    # overwriting replaces the file in place, still without leftovers
    sc.prune(model, sparsity=0.9, pattern="unstructured")
    sc.save_masks(model, path)
    assert os.listdir(tmp_path) == ["masks.safetensors"]
    assert int(sum(m.sum() for m in sc.read_masks(path)[0].values())) == int(sum(m.sum() for m in sc.masks_of(model).values()))


def test_a_failed_save_leaves_the_old_file_and_no_temp_files(make_mlp, tmp_path, monkeypatch):
    model = make_mlp()
    sc.prune(model, sparsity=0.5)
    path = tmp_path / "masks.safetensors"
    sc.save_masks(model, path)
    good = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("sparsecraft.core.io.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        sc.save_masks(model, path)
    assert os.listdir(tmp_path) == ["masks.safetensors"]
    assert path.read_bytes() == good


def test_save_masks_of_an_unmasked_model_is_an_error(make_mlp, tmp_path):
    with pytest.raises(MaskMismatchError, match="no masks to save"):
        sc.save_masks(make_mlp(), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


class OtherMLP(nn.Module):
    """Same names as TinyMLP, but fc2 has another shape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 8)


def _masks_from_other_shapes(tmp_path):
    other = OtherMLP()
    sc.prune(other, sparsity=0.5)
    path = tmp_path / "other.safetensors"
    sc.save_masks(other, path)
    return path, [r"'fc2\.weight': shape \(24, 32\) does not match the parameter's \(32, 32\)"]


def _masks_from_other_names(tmp_path):
    other = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    sc.prune(other, sparsity=0.5)
    path = tmp_path / "seq.safetensors"
    sc.save_masks(other, path)
    return path, [r"'0\.weight': the model has no module '0'", r"'1\.weight'"]


@pytest.mark.parametrize("make_file", [_masks_from_other_shapes, _masks_from_other_names], ids=["shapes", "names"])
def test_masks_that_do_not_fit_raise_and_change_nothing(make_mlp, tmp_path, make_file):
    path, messages = make_file(tmp_path)
    model = make_mlp()
    before = cloned_state(model)
    with pytest.raises(MaskMismatchError) as info:
        sc.load_masks(model, path)
    for pattern in messages:
        assert re.search(pattern, str(info.value)), str(info.value)
    assert "nothing was changed" in str(info.value)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not has_mask_machinery(model)
    assert sc.masks_of(model) == {}


def test_one_bad_mask_among_good_ones_applies_none(make_mlp):
    model = make_mlp()
    before = cloned_state(model)
    masks = {
        "fc1.weight": torch.ones(32, 16, dtype=torch.bool),
        "fc2.weight": torch.full((32, 32), 0.5),  # not 0/1
        "fc9.weight": torch.ones(8, 32, dtype=torch.bool),
    }
    with pytest.raises(MaskMismatchError) as info:
        sc.apply_masks(model, masks)
    message = str(info.value)
    assert "'fc2.weight': values must be 0/1" in message and "'fc9.weight'" in message
    assert not has_mask_machinery(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_read_masks_rejects_other_safetensors_files(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"fc1.weight": torch.ones(2, 2)}, str(path))
    with pytest.raises(MaskMismatchError, match="not a sparsecraft masks file"):
        sc.read_masks(path)
