"""The one-shot pipeline around the engine: texts, perplexity, saving, sweeps, CLI and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from sparsecraft.analysis.perplexity import perplexity  # noqa: E402
from sparsecraft.analysis.sweep import SweepResult, essential_sparsity, parse_sparsities  # noqa: E402
from sparsecraft.cli.main import app  # noqa: E402
from sparsecraft.data.text import calibration_samples, char_tokenizer, eval_windows, tokenize  # noqa: E402
from sparsecraft.errors import SparsecraftError  # noqa: E402
from sparsecraft.models import hf  # noqa: E402
from sparsecraft.models.hf import TinySpec, load_causal_lm, tiny_causal_lm  # noqa: E402
from sparsecraft.recipes.oneshot import OneShotJob, parse_job, run_one_shot  # noqa: E402

TEXT = " ".join(
    f"The {a} {b} of the {c} was {d}." for a in ("old", "red", "tall", "quiet") for b in ("house", "ship", "tree")
    for c in ("town", "river", "king") for d in ("seen", "sold", "lost", "kept")
) + "\n"

runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_causal_lm(TinySpec(arch="llama")).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def texts(tmp_path):
    calib, evaluation = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(TEXT * 2)
    evaluation.write_text(TEXT[::-1])
    return calib, evaluation


def test_calibration_windows_are_seeded_random_and_warn_when_the_text_is_short():
    ids = torch.arange(1000)
    a = calibration_samples(ids, 8, 32, seed=1)
    assert a.shape == (8, 32)
    assert torch.equal(a, calibration_samples(ids, 8, 32, seed=1))
    assert not torch.equal(a, calibration_samples(ids, 8, 32, seed=2))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous windows of the text
    with pytest.warns(UserWarning, match="overlap"):
        calibration_samples(ids, 64, 32)
    with pytest.raises(SparsecraftError, match="too short"):
        calibration_samples(ids[:20], 2, 32)


def test_eval_windows_do_not_overlap_and_drop_the_tail():
    w = eval_windows(torch.arange(100), 30)
    assert w.shape == (3, 30) and torch.equal(w.reshape(-1), torch.arange(90))
    assert eval_windows(torch.arange(100), 30, max_windows=2).shape == (2, 30)
    with pytest.raises(SparsecraftError, match="fewer than one window"):
        eval_windows(torch.arange(10), 30)


def test_perplexity_is_exp_of_the_mean_next_token_loss():
    model = tiny_causal_lm(TinySpec(arch="gpt2"))
    windows = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)


def test_char_tokenizer_round_trips_printable_text():
    tok = char_tokenizer()
    ids = tokenize(tok, "Hello,\nworld")
    assert ids.numel() == 12 and tok.decode(ids.tolist()) == "Hello,\nworld"


def test_saved_model_loads_with_plain_from_pretrained_and_gives_the_same_outputs(model_dir, texts, tmp_path):
    calib, evaluation = texts
    model, tokenizer = load_causal_lm(model_dir)
    out = tmp_path / "pruned"
    job = OneShotJob(model=str(model_dir), method="sparsegpt", sparsity=0.5, calib=str(calib), nsamples=4, seqlen=32,
                     eval=str(evaluation))
    outcome = run_one_shot(job, out, progress=False, model=model, tokenizer=tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    x = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-5)
    assert float((reloaded.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["summary"]["sparsity"] == pytest.approx(0.5)
    assert len(report["layers"]) == 14 and all(0 <= r["error"] < 1 for r in report["layers"])
    again = parse_job((out / "oneshot.yaml").read_text())
    assert again == job  # the recipe repeats the run
    assert outcome.ppl_before is not None and outcome.ppl_after is not None


def test_an_interrupted_save_leaves_no_output_folder(model_dir, texts, tmp_path, monkeypatch):
    calib, _ = texts
    out = tmp_path / "pruned"

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        run_one_shot(OneShotJob(model=str(model_dir), calib=str(calib), nsamples=2, seqlen=32), out, progress=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".pruned*"))


def test_existing_output_folder_is_refused_before_any_work(model_dir, texts, tmp_path):
    calib, _ = texts
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SparsecraftError, match="not empty"):
        run_one_shot(OneShotJob(model=str(model_dir), calib=str(calib), nsamples=2, seqlen=32), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (dict(sparsity=1.0), r"sparsity=1.0 must lie in \[0, 1\)"),
        (dict(sparsity=-0.1), r"must lie in \[0, 1\)"),
        (dict(method="obs"), "unknown one-shot method 'obs'; choose one of"),
        (dict(pattern="4:2"), "0 < N < M"),
        (dict(pattern="2-4"), "write unstructured or N:M"),
        (dict(calib=None), "needs calibration text"),
        (dict(pattern="2:4", owl={"M": 5.0, "lam": 0.08}), "owl"),
    ],
)
def test_bad_jobs_are_refused_with_the_field_named(job, message):
    base = dict(model="x", calib="c.txt")
    with pytest.raises(SparsecraftError, match=message):
        parse_job(json.dumps({**base, **job})).validate()


def test_unknown_job_field_names_the_line():
    with pytest.raises(SparsecraftError, match=r"job.yaml:3: unknown field 'sparsty'"):
        parse_job("model: x\nmethod: wanda\nsparsty: 0.5\n", "job.yaml")


def test_unreadable_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparsecraftError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(SparsecraftError, match="no folder or file"):
        load_causal_lm(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(SparsecraftError, match="cannot load"):
        load_causal_lm(broken)


def test_calibration_text_too_short_is_a_clear_error(model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(SparsecraftError, match="too short for one window of 32"):
        run_one_shot(OneShotJob(model=str(model_dir), calib=str(short), nsamples=2, seqlen=32), None, progress=False)


def test_cli_prune_json_has_the_promised_fields(model_dir, texts, tmp_path):
    calib, evaluation = texts
    out = tmp_path / "cli-out"
    result = runner.invoke(app, ["prune", str(model_dir), "--method", "wanda", "--pattern", "2:4", "--calib", str(calib),
                                 "--nsamples", "4", "--seqlen", "32", "--eval", str(evaluation), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    for key in ("method", "pattern", "target_sparsity", "sparsity", "ppl_before", "ppl_after", "prune_seconds", "peak_rss_bytes"):
        assert key in data, key
    assert data["method"] == "wanda" and data["pattern"] == "2:4" and data["sparsity"] == pytest.approx(0.5)
    assert data["ppl_before"] > 1 and data["ppl_after"] > 1 and data["peak_rss_bytes"] > 1e6
    assert (out / "model.safetensors").is_file()


def test_cli_prune_with_dsnot_owl_and_a_table(model_dir, texts):
    calib, _ = texts
    result = runner.invoke(app, ["prune", str(model_dir), "--method", "magnitude-row", "--sparsity", "0.6", "--dsnot", "--owl",
                                 "--calib", str(calib), "--nsamples", "2", "--seqlen", "32"])
    assert result.exit_code == 0, result.output
    assert "magnitude-row + DSnoT + OWL" in result.output and "nothing written" in result.output


def test_cli_prune_bad_input_exits_2_with_a_message(model_dir, texts):
    calib, _ = texts
    result = runner.invoke(app, ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.5", "--pattern", "2:4",
                                 "--calib", str(calib)])
    assert result.exit_code == 2 and "conflict" in result.output
    result = runner.invoke(app, ["prune", str(model_dir), "--method", "wanda", "--sparsity", "1.5", "--calib", str(calib)])
    assert result.exit_code == 2 and "[0, 1)" in result.output


def test_cli_eval_json(model_dir, texts):
    _, evaluation = texts
    result = runner.invoke(app, ["eval", str(model_dir), "--text", str(evaluation), "--seqlen", "32", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["perplexity"] > 1 and data["tokens"] % 32 == 0


def test_cli_sweep_writes_json_and_plot(model_dir, texts, tmp_path):
    calib, evaluation = texts
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(model_dir), "--calib", str(calib), "--eval", str(evaluation), "--methods",
                                 "magnitude,wanda", "--sparsities", "0:0.8:0.4", "--nsamples", "2", "--seqlen", "32",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert {(p["method"], p["sparsity"]) for p in data["points"]} == {
        (m, s) for m in ("magnitude", "wanda") for s in (0.0, 0.4, 0.8)
    }
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_parse_sparsities():
    assert parse_sparsities("0:0.9:0.1") == pytest.approx([i / 10 for i in range(10)])
    assert parse_sparsities("0.7,0.5") == [0.5, 0.7]
    with pytest.raises(SparsecraftError, match=r"\[0, 1\)"):
        parse_sparsities("0.5,1.0")
    with pytest.raises(SparsecraftError, match="START:STOP:STEP"):
        parse_sparsities("a,b")


def test_essential_sparsity_is_the_knee_where_perplexity_turns_upward():
    s = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    ppl = [10, 10.1, 10.2, 10.4, 10.8, 11.5, 14, 30, 120, 900]
    assert essential_sparsity(s, ppl) == 0.6
    assert essential_sparsity([0.0, 0.5], [10, 20]) is None
    assert essential_sparsity([0.0, 0.5, 0.9], [10, 10, 10]) is None
    result = SweepResult("m", 10.0, [{"method": "wanda", "sparsity": x, "ppl": p} for x, p in zip(s, ppl)])
    assert result.essential() == {"wanda": 0.6}


def test_find_smollm2_prefers_the_environment_then_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSECRAFT_SMOLLM2", raising=False)
    cache = tmp_path / "cache"
    (cache / "smollm2-135m").mkdir(parents=True)
    (cache / "smollm2-135m" / "config.json").write_text("{}")
    assert hf.find_smollm2(cache) == cache / "smollm2-135m"
    monkeypatch.setenv("SPARSECRAFT_SMOLLM2", str(tmp_path))
    assert hf.find_smollm2(cache) == tmp_path


def test_demo_language_model_stage_falls_back_to_a_tiny_model_and_says_so():
    from sparsecraft.demo import LanguageModelStageConfig, run_language_model_stage

    messages = []
    config = LanguageModelStageConfig(nsamples=4, seqlen=64, eval_windows=2, tiny_train_steps=20, use_real_model=False)
    result = run_language_model_stage(config, progress=False, log=messages.append)
    assert "tiny built-in Llama" in result.model
    assert any("SmolLM2-135M not found" in m for m in messages)
    assert 1 < result.ppl_dense < 97 and result.ppl_pruned > 1
