"""Measuring activation sparsity: counts against a direct count, per-token stats, the plot, CETT and
PPL-p% sparsity, the ``activations`` verb, demo stage 6, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from sparsecraft.analysis.activations import (  # noqa: E402
    histogram_stats,
    measure_activations,
    plot_activation_sparsity,
    tau_key,
)
from sparsecraft.analysis.perplexity import perplexity  # noqa: E402
from sparsecraft.analysis.ppl_sparsity import calibrate_cett, cett, cett_sparsified, ppl_p_sparsity  # noqa: E402
from sparsecraft.cli.main import app  # noqa: E402
from sparsecraft.data.text import char_tokenizer  # noqa: E402
from sparsecraft.errors import SparsecraftError  # noqa: E402
from sparsecraft.models.hf import TinySpec, tiny_causal_lm  # noqa: E402
from sparsecraft.models.mlp import mlp_parts  # noqa: E402

TAUS = (1e-3, 1e-2, 1e-1)
runner = CliRunner()


def _ids(n: int = 3, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _tokens(x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    if channels_first and x.dim() >= 3:
        x = x.movedim(1, -1)
    return x.detach().reshape(-1, x.shape[-1]).float()


def _capture(model: nn.Module, names: list[str], run, output: bool = False, channels_first: bool = False) -> dict[str, torch.Tensor]:
    """Every named module's input (or output), all calls concatenated as (tokens, width)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = []
    for n in names:
        if output:
            handles.append(modules[n].register_forward_hook(lambda _m, _a, out, n=n: seen[n].append(_tokens(out, channels_first))))
        else:
            handles.append(modules[n].register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(_tokens(a[0], channels_first))))
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def _check_row(row, x: torch.Tensor, taus=TAUS) -> None:
    """The row's numbers against a direct count on the captured tensor x (tokens, width)."""
    assert (row.tokens, row.width, row.elements) == (x.shape[0], x.shape[1], x.numel())
    assert row.zero_fraction == pytest.approx(float((x == 0).double().mean()), abs=1e-12)
    for tau in taus:
        assert row.below[tau_key(tau)] == pytest.approx(float((x.abs() < tau).double().mean()), abs=1e-12)
    mid = taus[len(taus) // 2]
    for stats, per_token in ((row.token_zero, (x == 0).double().mean(1)), (row.token_below, (x.abs() < mid).double().mean(1))):
        assert stats.mean == pytest.approx(float(per_token.mean()), abs=1e-9)
        for q, value in ((0.1, stats.p10), (0.5, stats.p50), (0.9, stats.p90)):
            assert value == pytest.approx(float(torch.quantile(per_token, q)), abs=1e-9)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_measured_fractions_equal_a_direct_count_on_hf_models(arch):
    model = tiny_causal_lm(TinySpec(arch=arch))
    ids = _ids()
    report = measure_activations(model, ids, TAUS, batch_size=2, progress=False)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    captured = _capture(model, linear_names, lambda: [model(input_ids=b, use_cache=False) for b in ids.split(2)])
    hidden = report.of_kind("mlp_hidden")
    assert [r.name for r in hidden] == [p.down.name for p in mlp_parts(model)]
    assert [r.layer for r in hidden] == [0, 1]
    for r in hidden:
        _check_row(r, captured[r.name])
    linear = report.of_kind("linear_input")
    assert sorted(r.name for r in linear) == sorted(linear_names)
    for r in linear:
        _check_row(r, captured[r.name])
    # aggregate: element-weighted over the layers of each kind
    xs = [captured[r.name] for r in hidden]
    assert report.aggregate["mlp_hidden"]["zero_fraction"] == pytest.approx(
        sum(float((x == 0).sum()) for x in xs) / sum(x.numel() for x in xs))
    if arch == "opt":  # ReLU: exact zeros, and they are counted
        assert report.aggregate["mlp_hidden"]["zero_fraction"] > 0.2
    parts = {g["part"]: g for g in report.by_part()}
    assert parts["lm_head"]["layers"] == 1 and all(g["layers"] in (1, 2) for g in parts.values())


class _PlainNet(nn.Module):
    """Conv -> ReLU -> Conv -> GELU -> pool -> Linear -> ReLU -> Linear, every activation a module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 6, 3, padding=1), nn.GELU()
        self.fc1, self.act3 = nn.Linear(6, 12), nn.ReLU()
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc2(self.act3(self.fc1(x.mean(dim=(2, 3)))))


def test_plain_module_measures_layer_inputs_and_activation_outputs_like_a_direct_count():
    torch.manual_seed(0)
    model = _PlainNet()
    batches = [torch.randn(5, 3, 6, 6), torch.randn(3, 3, 6, 6)]
    report = measure_activations(model, batches, TAUS, progress=False)
    assert [(r.name, r.kind) for r in report.rows] == [
        ("conv1", "linear_input"), ("act1", "activation_output"), ("conv2", "linear_input"), ("act2", "activation_output"),
        ("fc1", "linear_input"), ("act3", "activation_output"), ("fc2", "linear_input")]
    run = lambda: [model(b) for b in batches]  # noqa: E731
    convs = _capture(model, ["conv1", "conv2"], run, channels_first=True)
    linears = _capture(model, ["fc1", "fc2"], run)
    images = _capture(model, ["act1", "act2"], run, output=True, channels_first=True)
    vectors = _capture(model, ["act3"], run, output=True)
    rows = {r.name: r for r in report.rows}
    for name, x in {**convs, **linears, **images, **vectors}.items():
        _check_row(rows[name], x)
    assert rows["conv1"].tokens == 8 * 36 and rows["conv1"].width == 3  # one token per pixel, channels as width
    assert rows["act1"].zero_fraction > 0.3 and rows["act2"].zero_fraction == 0.0
    # only activation outputs, and a glob filter
    only = measure_activations(model, batches, kinds=("mlp_hidden",), modules=["act*"], progress=False)
    assert [r.name for r in only.rows] == ["act1", "act2", "act3"] and set(only.aggregate) == {"activation_output"}


def test_histogram_percentiles_equal_torch_quantile():
    g = torch.Generator().manual_seed(3)
    for width, n in ((7, 1), (7, 2), (16, 101), (50, 1000)):
        counts = torch.randint(0, width + 1, (n,), generator=g)
        stats = histogram_stats(torch.bincount(counts, minlength=width + 1), width)
        values = counts.double() / width
        assert stats.mean == pytest.approx(float(values.mean()))
        for q, v in ((0.1, stats.p10), (0.5, stats.p50), (0.9, stats.p90)):
            assert v == pytest.approx(float(torch.quantile(values, q)), abs=1e-12)


def test_module_globs_select_and_a_glob_matching_nothing_names_close_modules():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    report = measure_activations(model, _ids(1), modules=["*.down_proj"], progress=False)
    assert {r.part for r in report.rows} == {"mlp.down_proj"} and {r.kind for r in report.rows} == {"mlp_hidden", "linear_input"}
    assert len(measure_activations(model, _ids(1), modules=["q_proj"], progress=False).rows) == 2  # last-name match
    with pytest.raises(SparsecraftError, match=r"modules: 'model.layers.0.mlp.dwn_proj' matches no measured module.*"
                                               r"model.layers.0.mlp.down_proj"):
        measure_activations(model, _ids(1), modules=["model.layers.0.mlp.dwn_proj"], progress=False)


def test_bad_models_kinds_and_taus_give_clear_errors():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    model.config.model_type = "falcon"  # an architecture without a known block/MLP layout
    with pytest.raises(SparsecraftError, match="architecture 'falcon' is not supported"):
        measure_activations(model, _ids(1), progress=False)
    with pytest.raises(SparsecraftError, match="architecture 'falcon' is not supported"):
        ppl_p_sparsity(model, _ids(1), _ids(1))
    with pytest.raises(SparsecraftError, match="no Linear/Conv layers and no activation modules"):
        measure_activations(nn.Sequential(nn.Identity()), [torch.randn(2, 3)], progress=False)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(SparsecraftError, match="thresholds must be > 0"):
        measure_activations(plain, [torch.randn(2, 4)], taus=(0.0, 0.1), progress=False)
    with pytest.raises(SparsecraftError, match="kinds"):
        measure_activations(plain, [torch.randn(2, 4)], kinds=("attention",), progress=False)
    with pytest.raises(SparsecraftError, match="no batches"):
        measure_activations(plain, [], progress=False)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in plain.modules())  # hooks gone after the error


def test_plot_writes_a_png_for_hf_and_plain_models(tmp_path):
    report = measure_activations(tiny_causal_lm(TinySpec(arch="llama")), _ids(1), progress=False)
    plot_activation_sparsity(report, tmp_path / "lm.png")
    plain = measure_activations(_PlainNet(), [torch.randn(2, 3, 6, 6)], progress=False)
    plot_activation_sparsity(plain, tmp_path / "plain.png")
    for name in ("lm.png", "plain.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.png", "plain.png"]  # no temporary files left


# --- CETT and PPL-p% sparsity -----------------------------------------------------------------


def test_cett_equals_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    a, W = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)
    a[0, 2] = 0.0
    norms = W.norm(dim=0)
    for t in (0.0, 0.3, 1.0, 100.0):
        expected = []
        for token in a:
            tail = sum((token[i] * W[:, i] for i in range(6) if abs(token[i]) * norms[i] <= t), torch.zeros(3))
            expected.append(float(tail.norm() / (W @ token).norm()))
        assert cett(a, W, t).tolist() == pytest.approx(expected, abs=1e-6)
    assert cett(a, W, 100.0).tolist() == pytest.approx([1.0] * 5)  # everything inactive: the whole output is the error


def _mlp_heavy_llama() -> nn.Module:
    """A tiny random Llama whose MLPs matter (random init leaves them almost invisible)."""
    model = tiny_causal_lm(TinySpec(arch="llama"))
    with torch.no_grad():
        for p in mlp_parts(model):
            p.down.module.weight.mul_(30.0)
    return model


def test_thresholds_reach_the_cett_and_the_ppl_search_stays_within_p_percent():
    model = _mlp_heavy_llama()
    calib, evaluation = _ids(4, 32, seed=1), _ids(3, 32, seed=2)
    calibration = calibrate_cett(model, calib, max_calib_tokens=64)
    assert calibration.tokens == 64  # bounded, spread over the windows
    for c in (0.05, 0.2, 0.5):
        for layer, t in zip(calibration.layers, calibration.thresholds(c)):
            assert layer.mean_cett(t) <= c + 1e-9 and layer.mean_cett(t) == pytest.approx(c, abs=0.01)
    dense = perplexity(model, evaluation)
    result = ppl_p_sparsity(model, calib, evaluation, p=1.0, tol=1e-3, max_calib_tokens=64)
    target = 1.01
    assert result.ppl_dense == pytest.approx(dense)
    assert result.ppl_ratio <= target and 0 < result.sparsity < 1
    assert result.cett_upper - result.cett <= 1e-3
    assert result.hit_bound or result.ppl_ratio_upper > target
    assert not result.hit_bound  # with heavy MLPs, dropping everything costs more than 1%
    assert all(lc <= result.cett + 1e-9 for lc in result.layer_cett)
    assert result.sparsity == pytest.approx(sum(result.layer_sparsity) / len(result.layer_sparsity))
    # re-evaluating at the upper CETT independently exceeds the budget; the hooks are gone afterwards
    with cett_sparsified(calibration.parts, calibrate_cett(model, calib, 64).thresholds(result.cett_upper)):
        assert perplexity(model, evaluation) / dense > target
    assert perplexity(model, evaluation) == pytest.approx(dense)
    assert not any(m._forward_pre_hooks for m in model.modules())
    json.dumps(result.to_dict())
    with pytest.raises(SparsecraftError, match="p: 0"):
        ppl_p_sparsity(model, calib, evaluation, p=0)


def test_sparsified_hooks_are_removed_after_an_exception():
    model = _mlp_heavy_llama()
    parts = mlp_parts(model)
    with pytest.raises(RuntimeError, match="boom"), cett_sparsified(parts, [1.0] * len(parts)):
        raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in model.modules())


# --- CLI ----------------------------------------------------------------------------------------

TEXT = " ".join(f"The {a} {b} was {c}." for a in ("old", "red", "tall") for b in ("house", "ship") for c in ("seen", "sold")) + "\n"


@pytest.fixture
def model_dir(lm_dir):
    return lm_dir("opt")


def test_cli_activations_json_table_plot_and_ppl_p(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 3)
    result = runner.invoke(app, ["activations", str(model_dir), "--text", str(text), "--seqlen", "32", "--windows", "4",
                                 "--tau", "0.01,0.1", "--ppl-p", "1", "--calib-tokens", "32", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout is one JSON object (load bars go to stderr)
    assert data["tokens"] == 4 * 32 and data["taus"] == [0.01, 0.1]
    hidden = [r for r in data["layers"] if r["kind"] == "mlp_hidden"]
    assert len(hidden) == 2 and hidden[0]["tokens"] == 128 and hidden[0]["zero_fraction"] > 0.2  # OPT: ReLU
    assert data["aggregate"]["mlp_hidden"]["zero_fraction"] == pytest.approx(sum(r["zero_fraction"] for r in hidden) / 2)
    assert data["ppl_p"]["ppl_ratio"] <= 1.01 and data["ppl_p"]["sparsity"] >= data["aggregate"]["mlp_hidden"]["zero_fraction"] - 0.05
    plot = tmp_path / "act.png"
    table = runner.invoke(app, ["activations", str(model_dir), "--text", str(text), "--seqlen", "32", "--tau", "0.01",
                                "--tau", "0.1", "--plot", str(plot)], catch_exceptions=False)
    assert table.exit_code == 0, table.output
    assert "MLP hidden activation sparsity" in table.output and "fc2" in table.output and "q_proj" in table.output
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--text", "MISSING"], "--text: no text file at"),
    (["--text", "SHORT"], "too short for one window of --seqlen 32"),
    (["--text", "TEXT", "--tau", "0"], "--tau: every threshold must be > 0"),
    (["--text", "TEXT", "--tau", "abc"], "--tau abc: give numbers"),
    (["--text", "TEXT", "--ppl-p", "-1"], "--ppl-p -1.0: give the allowed perplexity increase"),
    (["--text", "TEXT", "--eval", "MISSING"], "--eval: no text file at"),
    (["--text", "TEXT", "--modules", "nothing_like_it"], "--modules: 'nothing_like_it' matches no measured module"),
])
def test_cli_bad_input_names_the_option(model_dir, tmp_path, args, message):
    files = {"TEXT": tmp_path / "text.txt", "SHORT": tmp_path / "short.txt", "MISSING": tmp_path / "missing.txt"}
    files["TEXT"].write_text(TEXT * 3)
    files["SHORT"].write_text("too short")
    args = [str(files.get(a, a)) for a in args]
    result = runner.invoke(app, ["activations", str(model_dir), "--seqlen", "32", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


# --- demo stage 6 -------------------------------------------------------------------------------


def test_demo_activation_stage_on_the_tiny_fallback_and_a_cnn(monkeypatch):
    from types import SimpleNamespace

    from sparsecraft.demo import activation_stage_models, activation_stage_table, run_activation_stage
    from sparsecraft.demo import activations as stage6

    from sparsecraft.demo import language_model

    monkeypatch.setattr(language_model, "demo_texts", lambda: (TEXT, TEXT * 4, "test texts"))  # self-contained: no corpora
    messages: list[str] = []
    with monkeypatch.context() as m:  # --no-lm: the CNN only (not trained here: one training below is enough)
        m.setattr(stage6, "digits_cnn", lambda epochs: (nn.Identity(), torch.zeros(1)))
        assert [label for label, *_ in activation_stage_models(None, None, messages.append)] == ["digits CNN (dense, 3 epochs)"]
    stage4 = SimpleNamespace(model="tiny built-in Llama (4 blocks)", method="wanda", sparsity=0.5)
    pruned = tiny_causal_lm(TinySpec(arch="llama", vocab=len(char_tokenizer())))
    models = activation_stage_models(stage4, pruned, messages.append, cnn_epochs=1)
    assert [m[0] for m in models] == ["digits CNN (dense, 1 epochs)", "tiny Llama wanda 50%"]
    assert any("pruned in place" in m for m in messages)  # the fallback has no dense copy, and says so
    models = [(label, model, inputs[:64] if inputs.is_floating_point() else inputs[:2], what) for label, model, inputs, what in models]
    rows, layers = run_activation_stage(models, progress=False, log=messages.append)
    assert [(r.model, r.activations) for r in rows] == [
        ("digits CNN (dense, 1 epochs)", "ReLU outputs"), ("digits CNN (dense, 1 epochs)", "Linear/Conv inputs"),
        ("tiny Llama wanda 50%", "MLP hidden"), ("tiny Llama wanda 50%", "Linear/Conv inputs")]
    relu = rows[0]
    assert relu.layers == 3 and relu.zero_fraction > 0.2  # ReLU outputs are naturally sparse
    assert rows[2].zero_fraction == 0.0 and rows[2].below["0.1"] > rows[2].below["0.001"]  # SiLU: near zeros only
    assert {d["model"] for d in layers} == {r.model for r in rows}
    assert activation_stage_table(rows).row_count == 4
    assert not math.isnan(rows[3].layer_min)
    json.dumps(layers)
