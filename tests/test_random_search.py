"""Random Search over the node space (Farahani, arXiv:2403.08265, 2024): sampling, masking,
the architecture round trip and a tiny end-to-end search, all on random tensors in seconds."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecraft.core.masking import masks_of
from sparsecraft.data.images import Split
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.search import random_search
from sparsecraft.methods.search.node_space import (
    NodeSpace,
    apply_configuration,
    configuration_from_json,
    configuration_to_json,
    node_sparsity,
    sample_configuration,
    weight_sparsity,
)
from sparsecraft.methods.search.random_search import build_random_architecture, run_random_search
from sparsecraft.models import create
from sparsecraft.recipes.schema import TrainSection
from sparsecraft.recipes.search import RandomSearchSection, SearchRecipe

MODELS = {"mlp": ("mlp", {"hidden": [24, 12]}), "cnn": ("cnn", {"width": 4})}  # node widths (24, 12) / (4, 8, 8)


def _split(n_train: int = 160, n_test: int = 64) -> Split:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n_train + n_test, 1, 8, 8, generator=g)
    y = x.flatten(1)[:, :10].argmax(1)  # learnable: which of the first ten pixels is brightest
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _model(kind: str, seed: int = 0) -> nn.Module:
    name, args = MODELS[kind]
    torch.manual_seed(seed)
    return create(name, **args)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expected_masks(space: NodeSpace, model: nn.Module, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row/column masks written out by hand, independent of node_space's broadcasting."""
    out = {}
    for i, name in enumerate(space.layers):
        w = model.get_submodule(name).weight
        mask = torch.ones(w.shape, dtype=torch.bool)
        if i < len(space.hidden):
            mask[~keep[name]] = False
        if i > 0:
            mask[:, ~keep[space.layers[i - 1]]] = False
        out[f"{name}.weight"] = mask
    return out


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_node_sparsity_is_exact(kind, per_layer):
    space = NodeSpace.of(_model(kind))
    for sparsity in (0.3, 0.5, 0.7):
        for seed in range(4):
            config = sample_configuration(space, sparsity, _gen(seed), per_layer=per_layer)
            dropped = [int((~config[n]).sum()) for n in space.hidden]
            assert all(w - d >= 1 for w, d in zip(space.widths, dropped))
            if per_layer:
                assert dropped == [round(sparsity * w) for w in space.widths]
            else:
                assert sum(dropped) == round(sparsity * space.total)
            assert node_sparsity(config) == pytest.approx(sum(dropped) / space.total)


def test_masks_and_weight_sparsity_match_the_configuration():
    model = _model("mlp")
    space = NodeSpace.of(model)
    config = sample_configuration(space, 0.5, _gen(3))
    apply_configuration(model, space, config)
    masks = masks_of(model)
    for name, expected in _expected_masks(space, model, config).items():
        assert torch.equal(masks[name], expected), name
    k0, k1 = (int(config[n].sum()) for n in space.hidden)
    kept, total = 64 * k0 + k0 * k1 + k1 * 10, 64 * 24 + 24 * 12 + 12 * 10  # mlp 64-24-12-10
    assert weight_sparsity(model, space) == pytest.approx(1 - kept / total)


def test_global_sampling_is_uniform_over_subsets_that_keep_every_layer():
    # widths (2, 4), 3 of 6 nodes dropped: 4 subsets take all 3 from the second layer and 12 take
    # one from the first and two from the second; each of the 16 must come up 1/16 of the time.
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    space = NodeSpace.of(model)
    g = _gen(0)
    counts = Counter()
    for _ in range(3200):
        config = sample_configuration(space, 0.5, g)
        counts[tuple(torch.cat([~config["0"], ~config["2"]]).nonzero().flatten().tolist())] += 1
    assert len(counts) == 16
    assert all(130 <= c <= 270 for c in counts.values()), counts  # 200 +- 5 sigma


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_dropped_units_stay_zero_through_training(kind):
    model = _model(kind)
    space = NodeSpace.of(model)
    config = sample_configuration(space, 0.5, _gen(1))
    apply_configuration(model, space, config)
    before = copy.deepcopy(model.state_dict())
    # a dropped unit's bias still reaches the next layer's column through ReLU, so its gradient
    # is nonzero there: only the mask keeps that column at zero
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    split = _split()
    for step in range(5):
        loss = F.cross_entropy(model(split.x_train[:32]), split.y_train[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for i, name in enumerate(space.hidden):
        drop = ~config[name]
        assert torch.count_nonzero(model.get_submodule(name).weight[drop]) == 0
        assert torch.count_nonzero(model.get_submodule(space.layers[i + 1]).weight[:, drop]) == 0
    first = f"{space.layers[0]}.weight"
    assert not torch.equal(model.state_dict()[first], before[first])  # the kept weights did train


def test_same_seed_same_configuration_other_seed_differs():
    space = NodeSpace.of(_model("mlp"))
    for per_layer in (False, True):
        a, b = (sample_configuration(space, 0.5, _gen(5), per_layer) for _ in range(2))
        c = sample_configuration(space, 0.5, _gen(6), per_layer)
        assert configuration_to_json(a) == configuration_to_json(b)
        assert configuration_to_json(a) != configuration_to_json(c)


def test_unreachable_sparsity_is_refused_before_anything_runs(monkeypatch):
    torch.manual_seed(0)
    space = NodeSpace.of(create("mlp", hidden=[4, 2]))  # 6 nodes; at most 4 dropped
    with pytest.raises(SparsecraftError, match=r"largest reachable sparsity is 0\.6667"):
        sample_configuration(space, 0.9, _gen(0))
    with pytest.raises(SparsecraftError, match=r"'layers\.1'.*largest reachable per-layer sparsity is 0\.5000"):
        sample_configuration(space, 0.8, _gen(0), per_layer=True)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing the sparsity")

    monkeypatch.setattr(random_search, "train_and_measure", no_training)
    recipe = SearchRecipe(sparsity=0.9, random=RandomSearchSection(model="mlp", model_args={"hidden": [4, 2]}))
    with pytest.raises(SparsecraftError, match="largest reachable sparsity"):
        run_random_search(recipe, _split(), progress=False, log=lambda line: None)


class _ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.shortcut = nn.Linear(16, 32)  # reads the input, not fc2's units
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))) + self.shortcut(x))


def test_non_chain_model_is_refused_naming_the_layers():
    with pytest.raises(SparsecraftError, match=r"'fc2'.*'shortcut'.*chain model"):
        NodeSpace.of(_ResidualMLP())
    assert NodeSpace.of(_model("cnn")).widths == (4, 8, 8)


RECIPE = SearchRecipe(
    sparsity=0.5, seeds=[0, 1], val_fraction=0.5, train=TrainSection(epochs=1, batch_size=32),
    random=RandomSearchSection(model="sparsecraft.models.zoo:MLP", model_args={"hidden": [24, 12]},
                               candidates=2, budget_epochs=1, random_configs=1),
)


@pytest.fixture(scope="module")
def searched():
    lines: list[str] = []
    result = run_random_search(RECIPE, _split(), progress=False, log=lines.append)
    return result, lines


def test_end_to_end_rows_cost_and_log(searched):
    result, lines = searched
    assert [(r.seed, r.arch) for r in result.rows] == [(s, a) for s in (0, 1) for a in ("searched", "random", "dense")]
    expected = round(0.5 * 36) / 36
    for row in result.rows:
        assert len(row.curve) == 1
        if row.arch == "dense":
            assert row.extra["node_sparsity"] == 0.0 and row.sparsity == 0.0
        else:
            assert row.extra["node_sparsity"] == pytest.approx(expected)
            assert row.sparsity == pytest.approx(row.extra["weight_sparsity"]) and row.sparsity > 0
    assert [(e["seed"], e["candidate"]) for e in result.log] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert set(result.log[0]) == {"seed", "candidate", "val_accuracy", "node_sparsity", "weight_sparsity", "seconds"}
    for seed in (0, 1):
        scores = [e["val_accuracy"] for e in result.log if e["seed"] == seed]
        winner = next(r for r in result.rows if r.seed == seed and r.arch == "searched")
        assert winner.extra["candidate"] == scores.index(max(scores))  # ties: the lower index
    cost = result.cost["random"]
    dense_flops = next(r.flops for r in result.rows if r.arch == "dense")
    assert cost.evaluated == 4 and 0 < cost.flops < 4 * 3 * dense_flops * 80  # 80 examples seen per candidate
    assert len(lines) == 2 and all("wins" in line for line in lines)


def test_same_seed_same_search_log(searched):
    result, _ = searched
    again = run_random_search(
        dataclasses.replace(RECIPE, seeds=[0]), _split(), progress=False, log=lambda line: None
    )

    def strip(entries):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]

    assert strip(again.log) == strip(result.log[:2])
    assert again.architecture == result.architecture


def test_architecture_round_trip_gives_the_winner_at_init(searched):
    result, _ = searched
    arch = json.loads(json.dumps(result.architecture))
    assert arch["init_seed"] == 0 and arch["per_layer"] is False and arch["sparsity"] == 0.5
    model = build_random_architecture(arch)

    # the winner really is seed 0's best candidate, redrawn from the seed
    torch.manual_seed(0)
    parent = create("mlp", hidden=[24, 12])
    space = NodeSpace.of(parent)
    g = _gen(0)
    candidates = [sample_configuration(space, 0.5, g) for _ in range(2)]
    winner = result.rows[0].extra["candidate"]
    assert arch["nodes"] == configuration_to_json(candidates[winner])

    keep = configuration_from_json(arch["nodes"], space)
    masks = masks_of(model)
    for name, expected in _expected_masks(space, parent, keep).items():
        assert torch.equal(masks[name], expected), name
    with torch.no_grad():  # the same parent with the dropped units zeroed by hand
        for name, mask in _expected_masks(space, parent, keep).items():
            parent.get_submodule(name.removesuffix(".weight")).weight.mul_(mask)
    x = _split().x_test
    assert torch.equal(model(x), parent(x))


@pytest.mark.parametrize("edit, field", [
    (lambda a: a.pop("nodes"), "architecture.nodes"),
    (lambda a: a.update(colour=1), "colour"),
    (lambda a: a.update(method="dass"), "architecture.method"),
    (lambda a: a.update(init_seed="zero"), "architecture.init_seed"),
    (lambda a: a["nodes"].update({"layers.9": a["nodes"].pop("layers.0")}), "layers.9"),
    (lambda a: a["nodes"]["layers.1"].append(99), r"architecture\.nodes\.layers\.1.*99"),
])
def test_bad_architecture_names_the_field(searched, edit, field):
    arch = copy.deepcopy(searched[0].architecture)
    edit(arch)
    with pytest.raises(SparsecraftError, match=field):
        build_random_architecture(arch)
