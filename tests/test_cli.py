"""Smoke tests of every CLI verb, through typer's runner (no subprocess, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import sparsecraft as sc
from sparsecraft.cli.main import app
from sparsecraft.demo import DemoConfig, TrainingStageConfig, run_demo, run_training_stage
from sparsecraft.models.checkpoint import load_checkpoint

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_every_verb():
    result = invoke("--help")
    assert result.exit_code == 0
    for verb in ("demo", "prune", "report", "list"):
        assert verb in result.output


def test_list_shows_registered_names():
    result = invoke("list")
    assert result.exit_code == 0
    for name in ("erk", "magnitude", "n:m", "cnn", "digits"):
        assert name in result.output
    assert invoke("list", "nonsense").exit_code == 2


def test_report_builtin_model_json():
    result = invoke("report", "mlp", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert [row["name"] for row in data["layers"]] == ["layers.0", "layers.1", "classifier"]
    assert data["totals"]["density"] == 1.0
    assert data["layers"][0]["dense_flops"] == 2 * 64 * 256


def test_prune_then_report_checkpoint_and_masks(tmp_path):
    out, masks = tmp_path / "pruned.safetensors", tmp_path / "masks.safetensors"
    result = invoke("prune", "cnn", "--sparsity", "0.8", "--distribution", "erk", "--out", str(out), "--masks", str(masks))
    assert result.exit_code == 0, result.output
    assert "Selected for sparsification" in result.output
    model, spec = load_checkpoint(out)
    assert spec == "cnn"
    r = sc.report(model)
    assert r.kept == round(0.2 * r.weights)  # ERK total is exact
    loaded = sc.read_masks(masks)[0]
    assert {k: int(v.sum()) for k, v in loaded.items()} == {k: int(v.sum()) for k, v in sc.masks_of(model).items()}

    report = invoke("report", str(out), "--json")
    assert json.loads(report.output)["totals"]["kept"] == r.kept

    plot = tmp_path / "density.png"
    assert invoke("report", "cnn", "--masks", str(masks), "--plot", str(plot)).exit_code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_nm_pattern_pickled_output(tmp_path):
    out = tmp_path / "t.pt"
    result = invoke("prune", "transformer", "--pattern", "2:4", "--exclude", "head", "--out", str(out))
    assert result.exit_code == 0, result.output
    model = torch.load(out, weights_only=False)
    patterns = {r.name: r.pattern for r in sc.report(model).layers}
    assert patterns["blocks.0.mlp.0"] == "2:4" and patterns["head"] == "dense"


def test_prune_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "x.safetensors"
    result = invoke("prune", "mlp", "--sparsity", "0.5", "--dry-run", "--out", str(out))
    assert result.exit_code == 0
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sparsity", "1.0"), "sparsity=1.0 is outside"),
        (("--density", "0"), "outside (0, 1]"),
        (("--pattern", "3:4:5", "--sparsity", "0.5"), "does not parse"),
        (("--pattern", "1:8"), "features.0.weight: input dimension 1"),
        (("--sparsity", "0.5", "--include", "nothing*"), "matches no"),
        (("--sparsity", "0.5", "--distribution", "zipf"), "unknown distribution"),
        (("--sparsity", "0.5", "--score", "taylor"), "not available from the CLI"),
    ],
)
def test_prune_bad_input_is_a_clear_error(tmp_path, args, message):
    out = tmp_path / "never.safetensors"
    result = runner.invoke(app, ["prune", "cnn", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_report_of_missing_checkpoint_fails_cleanly(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_demo_runs_end_to_end_small():
    config = DemoConfig(sparsities=(0.5, 0.9), distributions=("uniform", "erk"), epochs=2, fine_tune_epochs=1)
    rows = run_demo(config, progress=False, log=lambda _: None)
    assert [(r.distribution, r.target_sparsity) for r in rows] == [
        ("dense", 0.0), ("uniform", 0.5), ("uniform", 0.9), ("erk", 0.5), ("erk", 0.9)
    ]
    for r in rows[1:]:
        assert r.sparsity == pytest.approx(r.target_sparsity, abs=1e-4)
        assert r.flops_ratio < 1.0
    assert rows[0].accuracy_fine_tuned > 0.5  # two epochs already learn digits


def test_demo_training_stage_small(tmp_path):
    from sparsecraft.demo import plot_training_stage

    config = TrainingStageConfig(sparsities=(0.9,), epochs=1)
    rows = run_training_stage(config, progress=False, log=lambda _: None)
    assert [r.method for r in rows] == ["dense", "random-ERK (static)", "SNIP", "GMP"]
    for r in rows[1:]:
        assert r.sparsity == pytest.approx(0.9, abs=0.005)
    plot_training_stage(rows, tmp_path / "demo.png")
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_dynamic_stage_small():
    config = TrainingStageConfig.dynamic()
    config.epochs = 1
    rows = run_training_stage(config, progress=False, log=lambda _: None)
    assert [r.method for r in rows] == ["static ERK", "SET", "RigL", "2:4 SR-STE"]
    assert [round(r.sparsity, 2) for r in rows] == [0.9, 0.9, 0.9, 0.5]
    flops = {r.method: r.train_flops_vs_dense for r in rows}
    # static = SET < RigL (dense weight gradients at update steps) < SR-STE (dense weight gradient every step)
    assert flops["static ERK"] == pytest.approx(flops["SET"], rel=1e-3)
    assert flops["SET"] < flops["RigL"] < flops["2:4 SR-STE"] < 1.0
