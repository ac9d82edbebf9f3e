"""Training-free activation sparsity: the column-skipping kernel, threshold / CHESS / WINA, modes, save/load, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from sparsecraft.cli.main import app  # noqa: E402
from sparsecraft.data.text import char_tokenizer  # noqa: E402
from sparsecraft.errors import SparsecraftError  # noqa: E402
from sparsecraft.kernels.build import library  # noqa: E402
from sparsecraft.methods.activation import thresholds as th  # noqa: E402
from sparsecraft.methods.activation.calibrate import calibrate, measured_sparsity, sparsify_activations  # noqa: E402
from sparsecraft.methods.activation.io import TENSORS, load_activation_sparse, save_activation_sparse  # noqa: E402
from sparsecraft.methods.activation.modules import ActivationSparseLinear, ThresholdedActivation, sparsify_everywhere  # noqa: E402
from sparsecraft.models.hf import TinySpec, tiny_causal_lm  # noqa: E402
from sparsecraft.models.mlp import mlp_parts  # noqa: E402

runner = CliRunner()


def windows(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def reference(x: torch.Tensor, w_out_in: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    y = (x * keep).double() @ w_out_in.double().t()
    return y + bias.double() if bias is not None else y


# ---- the kernel: the column-skipping product equals the dense product on the same sparse input


@settings(max_examples=60, deadline=None)
@given(inp=st.integers(1, 300), out=st.integers(1, 300), rule=st.sampled_from(["threshold", "topk", "nonzero", "scaled"]),
       bias=st.booleans(), seed=st.integers(0, 10_000))
def test_column_skip_equals_the_dense_product_of_the_masked_input(inp, out, rule, bias, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    w, b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    x = torch.randn(1, 1, inp, generator=g)
    if rule == "nonzero":
        x[x.abs() < 0.7] = 0.0  # as after a ReLU: exact zeros are skipped, the rest kept
    kwargs = {"threshold": {"tau": torch.rand(inp, generator=g)}, "topk": {"k": max(1, inp // 3)},
              "scaled": {"scale": torch.rand(inp, generator=g) + 0.1, "k": max(1, inp // 2)}, "nonzero": {}}[rule]
    m = ActivationSparseLinear(lin, mode="all", **kwargs)
    with torch.no_grad():
        y = m(x)
        keep = m.keep_mask(x)
    expected = reference(x, w, b, keep)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max())))
    if library() is not None and m._plan is not None:
        assert m._plan.last_kept == int(keep.sum())  # the kernel selected exactly the inputs of the rule


def test_column_skip_reads_gpt2_conv1d_weights_as_they_are():
    model = tiny_causal_lm(TinySpec(arch="gpt2"))
    conv = model.transformer.h[0].mlp.c_proj  # Conv1D: weight (in, out)
    w_out_in, b = conv.weight.detach().t().clone(), conv.bias.detach().clone()
    m = ActivationSparseLinear(conv, tau=torch.tensor(0.5), mode="all")
    x = torch.randn(1, 1, w_out_in.shape[1])
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(y.double(), reference(x, w_out_in, b, m.keep_mask(x)), rtol=1e-5, atol=1e-5)


def test_kernel_and_torch_paths_agree_and_prefill_is_exact_in_decode_mode():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    dense_w, dense_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    m = ActivationSparseLinear(lin, tau=torch.tensor(0.6))  # mode "decode"
    prefill = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.allclose(m(prefill), prefill @ dense_w.t() + dense_b, atol=1e-6)  # untouched
        one = torch.randn(1, 1, 64)
        kernel = m(one)
        masked = (one * (one.abs() > 0.6)) @ dense_w.t() + dense_b
        assert torch.allclose(kernel, masked, atol=1e-5)
        with sparsify_everywhere(m):
            assert torch.allclose(m(prefill), (prefill * (prefill.abs() > 0.6)) @ dense_w.t() + dense_b, atol=1e-5)


def test_weights_keep_their_names_so_the_state_dict_is_the_plain_one():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    keys = set(model.state_dict())
    sparsify_activations(model, windows(), "threshold", 0.5, progress=False)
    assert set(model.state_dict()) == keys


# ---- the methods' formulas


def test_quantile_threshold_drops_the_requested_fraction():
    scores = torch.rand(10_000)
    for s in (0.0, 0.25, 0.5, 0.9):
        tau = th.quantile_threshold(scores, s)
        assert abs(float((scores <= tau).float().mean()) - s) < 1e-3


def test_chess_thresholds_equal_the_formula():
    g = torch.Generator().manual_seed(3)
    a, up = torch.randn(200, 16, generator=g).abs(), torch.rand(16, generator=g) + 0.05
    tau = th.chess_channel_thresholds(a, up, 0.5)
    importance = a * up
    t = importance.reshape(-1).kthvalue(int(0.5 * importance.numel())).values
    assert torch.allclose(tau, t / up)
    # channel-wise tau on |a| is one threshold t on |a| * E|u| (up to rounding right at t)
    differ = (a <= tau) != (importance <= t)
    assert bool(((importance[differ] - t).abs() <= 1e-5 * t).all())
    assert abs(float((a <= tau).float().mean()) - 0.5) < 0.01


def test_wina_selection_equals_its_formula():
    g = torch.Generator().manual_seed(4)
    W, x = torch.randn(8, 12, generator=g), torch.randn(5, 12, generator=g)
    norms = th.wina_column_norms(W)
    assert torch.allclose(norms, torch.sqrt((W**2).sum(0)))
    keep = th.wina_keep(x, norms, 4)
    for row, kept in zip(x, keep):
        best = set((row.abs() * norms).argsort(descending=True)[:4].tolist())
        assert set(torch.nonzero(kept).flatten().tolist()) == best
    lin = nn.Linear(12, 8, bias=False)
    lin.weight.data.copy_(W)
    m = ActivationSparseLinear(lin, scale=norms, k=4)
    assert torch.equal(m.keep_mask(x), keep)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["threshold", "chess"])
def test_calibrated_thresholds_hit_the_target_on_the_calibration_data(arch, method):
    model = tiny_causal_lm(TinySpec(arch=arch))
    calib = windows()
    sparsify_activations(model, calib, method, 0.4, progress=False)
    measured = measured_sparsity(model, calib)
    # OPT's fc2 reads a ReLU's output, already more than 40% zeros: its tau is 0 and only exact zeros are dropped
    # (and CHESS's down projections skip the zeros its thresholded activation left: at least the target)
    natural = {n for n, m in model.named_modules() if isinstance(m, ActivationSparseLinear)
               and (m.tau is None or float(m.tau.max()) <= 0.0)}
    assert measured and all(abs(v - 0.4) < 0.01 for n, v in measured.items() if n not in natural), measured
    assert all(measured[n] > 0.39 for n in natural)


def test_chess_thresholds_the_mlp_channel_wise_and_the_down_projection_only_skips_zeros():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    plan = sparsify_activations(model, windows(), "chess", 0.5, progress=False)
    parts = mlp_parts(model)
    assert isinstance(parts[0].act, ThresholdedActivation) and parts[0].act.tau.shape == (parts[0].hidden_size,)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, ActivationSparseLinear) and down.rule == "nonzero"
    assert isinstance(model.model.layers[0].self_attn.q_proj, ActivationSparseLinear)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, ActivationSparseLinear)  # keys and values stay exact
    assert {r.kind for r in plan.rules} == {"activation", "linear"}


def test_wina_keeps_exactly_k_inputs_per_token():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    sparsify_activations(model, None, "wina", 0.75, progress=False)
    measured = measured_sparsity(model, windows(2))
    assert all(abs(v - 0.75) < 1e-9 for v in measured.values())


def test_decode_mode_keeps_prefill_exact_and_sparsifies_generation():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    ids = windows(2)
    with torch.no_grad():
        dense = model(ids).logits
        sparsify_activations(model, windows(), "threshold", 0.5, progress=False)
        assert torch.equal(model(ids).logits, dense)
        with sparsify_everywhere(model):
            assert not torch.allclose(model(ids).logits, dense)
        out = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


# ---- save / load and bad input


def test_save_load_round_trip_gives_the_same_outputs_and_the_plain_model_loads(tmp_path):
    model = tiny_causal_lm(TinySpec(arch="llama"))
    dense = tiny_causal_lm(TinySpec(arch="llama"))
    plan = sparsify_activations(model, windows(), "chess", 0.5, progress=False)
    out = tmp_path / "sparse"
    save_activation_sparse(model, char_tokenizer(), plan, out)
    loaded, tokenizer, plan2 = load_activation_sparse(out)
    ids = windows(2)
    with torch.no_grad(), sparsify_everywhere(model), sparsify_everywhere(loaded):
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert plan2.method == "chess" and len(plan2.rules) == len(plan.rules)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, dense(ids).logits, atol=1e-6)  # weights unchanged


def test_damaged_or_missing_sparsity_files_are_clear_errors(tmp_path):
    model = tiny_causal_lm(TinySpec(arch="llama"))
    plan = sparsify_activations(model, windows(), "threshold", 0.5, progress=False)
    out = tmp_path / "sparse"
    save_activation_sparse(model, char_tokenizer(), plan, out)
    (out / TENSORS).write_bytes((out / TENSORS).read_bytes()[:40])
    with pytest.raises(SparsecraftError, match="damaged"):
        load_activation_sparse(out)
    (out / TENSORS).unlink()
    with pytest.raises(SparsecraftError, match="missing"):
        load_activation_sparse(out)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "threshold", "sparsity": 1.0}, r"outside \[0, 1\)"),
    ({"method": "threshold", "sparsity": -0.1}, r"outside \[0, 1\)"),
    ({"method": "dejavu", "sparsity": 0.5}, "not one of"),
    ({"method": "chess", "sparsity": 0.5, "windows": None}, "calibration text"),
    ({"method": "threshold", "sparsity": 0.5, "mode": "prefill"}, "mode"),
    ({"method": "threshold", "sparsity": 0.5, "include": ["*nothing*"]}, "no Linear layer"),
])
def test_bad_input_is_refused_before_anything_changes(kwargs, message):
    model = tiny_causal_lm(TinySpec(arch="llama"))
    args = {"windows": windows(), **kwargs}
    with pytest.raises((SparsecraftError, ValueError), match=message):
        calibrate(model, args.pop("windows"), **args, progress=False)
    assert not any(isinstance(m, ActivationSparseLinear) for m in model.modules())


def test_a_model_without_a_known_mlp_is_refused():
    with pytest.raises(SparsecraftError, match="not a Hugging Face model"):
        calibrate(nn.Sequential(nn.Linear(4, 4)), windows(), "chess", 0.5, progress=False)


def test_cli_actsparse_json_evaluates_saves_and_times(tmp_path):
    folder = tmp_path / "tiny"
    tiny_causal_lm(TinySpec(arch="llama")).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more text" for i in range(400)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["actsparse", str(folder), "--method", "wina", "--sparsity", "0.5", "--calib", str(text),
                                 "--nsamples", "4", "--seqlen", "64", "--eval", str(text), "--eval-windows", "2",
                                 "--speed", "4", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])  # transformers' loading bar may precede it
    assert data["method"] == "wina" and abs(data["measured_sparsity"] - 0.5) < 0.02
    assert data["ppl_sparse"] > 0 and data["ppl_dense"] > 0 and data["decode_tokens_per_second_sparse"] > 0
    assert (out / "activation_sparsity.json").is_file()
    bad = runner.invoke(app, ["actsparse", str(folder), "--method", "chess", "--sparsity", "0.5"])
    assert bad.exit_code == 2 and "--calib" in bad.output


def test_chess_row_skipping_mlp_equals_the_masked_product_at_one_token():
    from sparsecraft.methods.activation.modules import RowSkipGatedMLP

    model = tiny_causal_lm(TinySpec(arch="llama"))
    reference_model = tiny_causal_lm(TinySpec(arch="llama"))
    sparsify_activations(model, windows(), "chess", 0.5, progress=False)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, RowSkipGatedMLP)
    ref = reference_model.model.layers[0].mlp
    tau = mlp.act_fn.tau
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        a = ref.act_fn(ref.gate_proj(x))
        expected = ref.down_proj((a * (a.abs() > tau)) * ref.up_proj(x))
        assert torch.allclose(mlp(x), expected, atol=1e-5, rtol=1e-5)
    keys = set(reference_model.state_dict())
    assert set(model.state_dict()) == keys  # the wrapper keeps every parameter name


def test_chess_include_globs_match_block_paths_as_the_other_methods_do():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    plan = calibrate(model, windows(), "chess", 0.5, include=["mlp.*"], progress=False)
    names = [r.name for r in plan.rules]
    assert names and all(".mlp." in n for n in names)  # the MLP rules only, no attention projection
    threshold = calibrate(model, windows(), "threshold", 0.5, include=["mlp.*"], progress=False)
    assert all(".mlp." in r.name for r in threshold.rules)
