"""``sparsecraft search`` end to end on tiny data: JSON fields, the output folder, the rebuilt
architecture, and bad recipes refused before any search starts."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sparsecraft.cli.main import app
from sparsecraft.core.masking import masks_of
from sparsecraft.methods.search.run import build_architecture, epochs_to, summarise
from sparsecraft.methods.search.result import TrainedRow

runner = CliRunner()

DATA_MODULE = '''
import torch
from sparsecraft.data.images import Split

def tiny(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    x[:, 0, y, y] += 2.0  # a learnable signal: a bright pixel per class
    return Split(x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4 :], y[n * 3 // 4 :])
'''


@pytest.fixture()
def data_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_search_data.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_search_data:tiny"


def write_recipe(tmp_path, text: str):
    path = tmp_path / "search.yaml"
    path.write_text(text)
    return path


def test_random_search_cli_json_output_folder_and_rebuild(tmp_path, data_module):
    recipe = write_recipe(tmp_path, f"""
method: random
data: {data_module}
sparsity: 0.5
seeds: [0]
val_fraction: 0.25
train: {{epochs: 2, batch_size: 16}}
random: {{model: mlp, model_args: {{hidden: [16, 8], classes: 4}}, candidates: 2, budget_epochs: 1, random_configs: 1}}
""")
    out = tmp_path / "run"
    result = runner.invoke(app, ["search", "--recipe", str(recipe), "--output", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["method"] == "random" and data["sparsity"] == 0.5
    assert [r["arch"] for r in data["rows"]] == ["searched", "random", "dense"]
    assert {s["arch"] for s in data["summary"]} == {"searched", "random", "dense"}
    assert data["cost"]["random"]["evaluated"] == 2
    for name in ("architecture.json", "result.json", "log.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # one line per scored candidate
    model = build_architecture(out / "architecture.json")
    masks = masks_of(model)
    kept_nodes = sum(int(masks[f"layers.{i}.weight"].any(1).sum()) for i in range(2))
    assert kept_nodes == 12  # 24 hidden nodes at node sparsity 0.5


def test_dass_cli_compares_dass_with_pruned_darts(tmp_path, data_module):
    recipe = write_recipe(tmp_path, f"""
method: dass
data: {data_module}
sparsity: 0.7
seeds: [0]
train: {{epochs: 1, batch_size: 16}}
dass: {{channels: 4, cells: 2, nodes: 2, search_epochs: 1, final_method: static}}
""")
    out = tmp_path / "dass"
    result = runner.invoke(app, ["search", "--recipe", str(recipe), "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "dass" in result.output and "darts-pruned" in result.output and "search cost (dass)" in result.output
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["method"] == "dass"
    net = build_architecture(arch)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize("text, message", [
    ("method: random\nrandom: {budget_epochs: 0}\n", "random.budget_epochs: 0 is a budget of zero"),
    ("method: dass\nsparsity: 1.0\n", "sparsity: 1.0 must lie in (0, 1)"),
    ("method: evolution\n", "method: 'evolution' is not one of random, dass"),
    ("method: random\nrandom: {candidatez: 3}\n", "unknown field 'random.candidatez'"),
])
def test_bad_recipes_are_refused_with_the_field(tmp_path, text, message):
    recipe = write_recipe(tmp_path, text)
    result = runner.invoke(app, ["search", "--recipe", str(recipe)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_existing_output_folder_is_refused_before_searching(tmp_path, data_module, monkeypatch):
    import sparsecraft.methods.search.run as run

    monkeypatch.setattr(run, "search", lambda *a, **k: pytest.fail("the search should not start"))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    recipe = write_recipe(tmp_path, f"method: random\ndata: {data_module}\n")
    result = runner.invoke(app, ["search", "--recipe", str(recipe), "--output", str(out)])
    assert result.exit_code == 2 and "not empty" in result.output


def _row(arch: str, acc: float, curve: list[float]) -> TrainedRow:
    return TrainedRow(arch=arch, seed=0, accuracy=acc, sparsity=0.9, params=10, flops=20, train_seconds=1.0, curve=curve)


def test_summary_means_spread_and_convergence_level():
    rows = [_row("a", 0.9, [0.5, 0.9]), _row("a", 0.7, [0.7, 0.7]), _row("b", 0.8, [0.8, 0.8])]
    summaries, level = summarise(rows, level_fraction=0.9)
    by = {s.arch: s for s in summaries}
    assert level == pytest.approx(0.9 * 0.8)  # 0.9 x the best mean accuracy (a: 0.8, b: 0.8)
    assert by["a"].accuracy_mean == pytest.approx(0.8) and by["a"].accuracy_std == pytest.approx(0.1414, abs=1e-4)
    assert by["a"].epochs_to_level == pytest.approx(2.0) and by["a"].reached == 1  # the 0.7 run never reaches 0.72
    assert by["b"].epochs_to_level == 1.0
    assert epochs_to([0.1, 0.5, 0.6], 0.55) == 3 and epochs_to([0.1], 0.5) is None
