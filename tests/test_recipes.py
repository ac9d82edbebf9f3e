"""Recipes: validation errors name file, line and field; runs of every method; exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sparsecraft.cli.main import app
from sparsecraft.errors import DensityError, SparsecraftError
from sparsecraft.recipes import Run, RecipeError, load_recipe, parse_recipe

SMALL = """
model: mlp
data: digits
seed: 0
train: {{epochs: {epochs}, batch_size: 128, optimizer: adam, lr: 0.003}}
sparsity:
  method: {method}
  sparsity: {sparsity}
  distribution: {distribution}
  start: 0.2
  end: 0.6
  frequency: 4
  rounds: 2
  members: 2
  dense_epochs: 1
"""


def small(method: str, epochs: int = 2, sparsity: float = 0.8, distribution: str = "uniform"):
    return parse_recipe(SMALL.format(method=method, epochs=epochs, sparsity=sparsity, distribution=distribution))


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("model: cnn\nsparsity:\n  method: gmp\n  sparsty: 0.9\n", ".yaml", "r.yaml:4: unknown field 'sparsity.sparsty'"),
        ("seed: 0\ntrain:\n  epochs: ten\n", ".yaml", "r.yaml:3: field 'train.epochs' should be int"),
        ("[sparsity]\nmethod = 'gmp'\nsparsity = 'x'\n", ".toml", "r.toml:3: field 'sparsity.sparsity'"),
        ("sparsity:\n  method: magic\n  sparsity: 0.5\n", ".yaml", "r.yaml:2: sparsity.method 'magic' is not one of"),
        ("sparsity:\n  method: gmp\n  sparsity: 1.5\n", ".yaml", "r.yaml:3: sparsity.sparsity=1.5 must lie in [0, 1)"),
        ("sparsity:\n  method: gmp\n", ".yaml", "sparsity.sparsity is required"),
        ("sparsity: [1, 2]\n", ".yaml", "sparsity must be a table"),
        ("train: {epochs: 2\n", ".yaml", "does not parse"),
    ],
)
def test_bad_recipes_name_file_line_and_field(text, suffix, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r" + suffix, suffix)
    assert message in str(err.value)


def test_toml_and_yaml_give_the_same_recipe(tmp_path):
    (tmp_path / "a.toml").write_text("model = 'mlp'\n[train]\nepochs = 3\n[sparsity]\nmethod = 'gmp'\nsparsity = 0.5\n")
    (tmp_path / "a.yaml").write_text("model: mlp\ntrain: {epochs: 3}\nsparsity: {method: gmp, sparsity: 0.5}\n")
    assert load_recipe(tmp_path / "a.toml") == load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("method", ["dense", "static", "random", "snip", "grasp", "synflow", "gmp", "spdf", "set", "rigl"])
def test_every_single_run_method_reaches_its_target(tmp_path, method):
    result = Run(small(method), tmp_path, progress=False, log=lambda _: None).run()
    summary = json.loads((tmp_path / "result.json").read_text())
    if method in ("dense", "spdf"):
        assert summary["target_sparsity"] is None
    else:
        assert result.sparsity == pytest.approx(0.8, abs=0.005)
    assert result.accuracy > 0.3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.parametrize("method", ["imp", "sms"])
def test_multi_run_methods_reach_their_target(tmp_path, method):
    result = Run(small(method, epochs=1), tmp_path, progress=False, log=lambda _: None).run()
    assert result.sparsity == pytest.approx(0.8, abs=0.005)


def test_a_schedule_that_ends_after_training_is_refused_before_training(tmp_path):
    recipe = small("gmp")
    recipe.sparsity.start, recipe.sparsity.end = 5, 5000  # steps; the run has 2 x 12 steps
    with pytest.raises(DensityError, match="but training has 24 steps"):
        Run(recipe, tmp_path, progress=False, log=lambda _: None).run()
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("method", ["gmp", "rigl"])
def test_resume_equals_an_uninterrupted_run(tmp_path, method):
    recipe = small(method, epochs=4, distribution="erk")
    recipe.sparsity.update_interval = 5  # rigl rewires every 5 of the 48 steps
    Run(recipe, tmp_path / "full", progress=False, log=lambda _: None).run()
    Run(recipe, tmp_path / "cut", progress=False, log=lambda _: None).run(stop_after_epoch=2)
    Run(recipe, tmp_path / "cut", progress=False, log=lambda _: None).run(resume=True)
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert full["epoch"] == cut["epoch"] == 3
    assert full["model"].keys() == cut["model"].keys()
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    assert full["sparsifier"] == cut["sparsifier"]


def test_train_cli_runs_a_recipe_and_refuses_a_bad_one(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text(SMALL.format(method="gmp", epochs=1, sparsity=0.5, distribution="uniform"))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--recipe", str(good), "--output", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "sparsity of the selected layers 0.5" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity:\n  method: gmp\n  sparsity: 0.5\n  shedule: 3\n")
    result = runner.invoke(app, ["train", "--recipe", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml:4: unknown field 'sparsity.shedule'" in " ".join(result.output.split())


def test_user_dataset_and_model_plug_in_as_module_callable(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from sparsecraft.data import Split\n"
        "def blobs():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(200, 8, generator=g)\n"
        "    y = (x[:, 0] > 0).long()\n"
        "    return Split(x[:160], y[:160], x[160:], y[160:])\n"
        "def net():\n"
        "    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = parse_recipe(
        "model: my_task:net\ndata: my_task:blobs\ntrain: {epochs: 10, batch_size: 32, lr: 0.03}\n"
        "sparsity: {method: gmp, sparsity: 0.5, start: 0.0, end: 0.5, frequency: 2}\n"
    )
    result = Run(recipe, tmp_path / "out", progress=False, log=lambda _: None).run()
    assert result.sparsity == pytest.approx(0.5, abs=0.01)
    assert result.accuracy > 0.8


@pytest.mark.parametrize("nm_method", ["srste", "mask_decay"])
def test_nm_training_recipe_ends_with_valid_groups(tmp_path, nm_method):
    text = SMALL.format(method="nm", epochs=2, sparsity=0.75, distribution="uniform").replace(
        "  sparsity: 0.75\n", f"  pattern: '1:4'\n  nm_method: {nm_method}\n  structure_decay: sparsify\n  finetune_fraction: 0.25\n"
    )
    recipe = parse_recipe(text)
    result = Run(recipe, tmp_path, progress=False, log=lambda _: None).run()
    assert result.sparsity == pytest.approx(0.75, abs=0.01)
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert any(k.endswith("weight_dense") for k in model)  # checkpoints hold the dense weights during training
    with pytest.raises(RecipeError, match="needs an N:M pattern"):
        parse_recipe(SMALL.format(method="nm", epochs=1, sparsity=0.5, distribution="uniform"))


def test_granet_recipe_reaches_its_target_and_checks_its_interval(tmp_path):
    recipe = small("granet")
    recipe.sparsity.update_interval = 3
    result = Run(recipe, tmp_path / "ok", progress=False, log=lambda _: None).run()
    assert result.sparsity == pytest.approx(0.8, abs=0.005)
    recipe.sparsity.update_interval = 100
    with pytest.raises(SparsecraftError, match="leaves no pruning step"):
        Run(recipe, tmp_path / "bad", progress=False, log=lambda _: None).run()


def test_every_shipped_recipe_is_valid():
    from pathlib import Path

    from sparsecraft.recipes import load_recipe
    from sparsecraft.recipes.search import load_search_recipe

    shipped = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    searches = [p for p in shipped if p.name.startswith("search-")]
    assert len(shipped) - len(searches) >= 4 and len(searches) >= 2
    for path in shipped:
        if path in searches:
            search = load_search_recipe(path)
            assert search.output and search.method in path.name, path
            continue
        recipe = load_recipe(path)
        assert recipe.output and recipe.sparsity.method != "dense", path
