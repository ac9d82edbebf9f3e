"""One-shot pruning of (tiny, random-weight) Hugging Face causal LMs: the engine, the methods'
defining behaviour, saving, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from sparsecraft.errors import PatternError, SparsecraftError  # noqa: E402
from sparsecraft.methods import sequential  # noqa: E402
from sparsecraft.methods.dsnot import dsnot_refine, expected_row_error  # noqa: E402
from sparsecraft.methods.oneshot import DSnoTConfig, InputStats, LayerPattern, reconstruction_error, solve_layer  # noqa: E402
from sparsecraft.methods.owl import outlier_ratio, owl_sparsities  # noqa: E402
from sparsecraft.methods.sequential import OWLConfig, prune_decoder  # noqa: E402
from sparsecraft.models.hf import TinySpec, block_linears, block_prefix, decoder_blocks, tiny_causal_lm  # noqa: E402

ARCHS = ["llama", "opt", "gpt2", "qwen2", "mistral"]


def samples(n: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def projections(model):
    return [v for i, b in enumerate(decoder_blocks(model)) for v in block_linears(b, block_prefix(model, i))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "magnitude-row", "wanda", "sparsegpt"])
def test_every_projection_is_pruned_exactly_unstructured(arch, method):
    model = tiny_causal_lm(TinySpec(arch=arch))
    result = prune_decoder(model, samples(), method, 0.6, progress=False)
    views = projections(model)
    assert len(result.layers) == len(views) > 0
    for view in views:
        W = view.weight()
        kept = int((W != 0).sum())
        if method == "magnitude":
            assert kept == math.floor(0.4 * W.numel() + 0.5), view.name
        elif method == "sparsegpt":
            assert kept == math.floor(0.4 * W.numel() + 0.5), view.name
        else:  # per output row
            assert bool(((W != 0).sum(1) == round(0.4 * W.shape[1])).all()), view.name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_every_group_of_m_keeps_exactly_n(arch, method, n, m):
    model = tiny_causal_lm(TinySpec(arch=arch))
    result = prune_decoder(model, samples(), method, n=n, m=m, progress=False)
    assert result.pattern == f"{n}:{m}"
    for view in projections(model):
        W = view.weight()  # (out, in): groups run along the input dimension, also for GPT-2's Conv1D
        groups = (W != 0).reshape(W.shape[0], -1, m).sum(-1)
        assert bool((groups == n).all()), view.name


def test_gpt2_conv1d_weights_are_pruned_along_their_input_dimension():
    model = tiny_causal_lm(TinySpec(arch="gpt2"))
    prune_decoder(model, samples(), "wanda", n=2, m=4, progress=False)
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D stores (in, out)
    assert c_attn.shape == (64, 192)
    assert bool(((c_attn != 0).reshape(16, 4, 192).sum(1) == 2).all())


def correlated_layer(seed: int = 0, rows: int = 32, cols: int = 64, tokens: int = 2048):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, cols // 4, generator=g)
    X = base @ torch.randn(cols // 4, cols, generator=g) + 0.1 * torch.randn(tokens, cols, generator=g)
    X = X * torch.logspace(-0.5, 0.5, cols)[torch.randperm(cols, generator=g)]  # features of different scale
    stats = InputStats(cols, torch.device("cpu"))
    stats.add(X.unsqueeze(0))
    return torch.randn(rows, cols, generator=g), stats


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", [LayerPattern(0.5), LayerPattern(0.7), LayerPattern(0.5, 2, 4)])
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(seed, pattern):
    W, stats = correlated_layer(seed)
    errors = {}
    for method in ("magnitude-row", "wanda", "sparsegpt"):
        new_W, keep = solve_layer(method, W, stats, pattern)
        errors[method] = reconstruction_error(W, new_W, stats)
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude-row"]


def test_reconstruction_error_matches_the_direct_product():
    W, stats = correlated_layer(3, tokens=256)
    torch.manual_seed(0)
    X = torch.randn(256, 64)
    stats = InputStats(64, torch.device("cpu"))
    stats.add(X)
    new_W = W * (torch.rand_like(W) > 0.5)
    direct = float(torch.linalg.norm(X @ W.T - X @ new_W.T) / torch.linalg.norm(X @ W.T))
    assert reconstruction_error(W, new_W, stats) == pytest.approx(direct, rel=1e-4)


def dsnot_case(seed: int, rows: int = 16, cols: int = 64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(512, cols, generator=g) * torch.rand(cols, generator=g) * 3 + torch.randn(cols, generator=g)
    stats = InputStats(cols, torch.device("cpu"))
    stats.add(X.reshape(8, 64, cols))
    return W, stats


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "m"), [(0, 0), (2, 4), (2, 8)])
def test_dsnot_never_increases_the_error_it_minimises_and_keeps_the_counts(seed, n, m):
    W, stats = dsnot_case(seed)
    keep = solve_layer("wanda", W, stats, LayerPattern(0.5, n, m))[1]
    refined = dsnot_refine(W, keep, stats.per_sample_sum, stats.var, torch.rand_like(W), n, m, threshold=0.0)
    before = expected_row_error(W, keep, stats.per_sample_sum).abs()
    after = expected_row_error(W, refined, stats.per_sample_sum).abs()
    assert bool((after <= before + 1e-4).all())
    assert torch.equal(refined.sum(1), keep.sum(1))
    if m:
        assert bool((refined.reshape(W.shape[0], -1, m).sum(-1) == n).all())
    assert float(after.sum()) < float(before.sum())  # it does something


def test_dsnot_threshold_and_cycles_bound_the_work():
    W, stats = dsnot_case(0)
    keep = solve_layer("wanda", W, stats, LayerPattern(0.5))[1]
    unchanged = dsnot_refine(W, keep, stats.per_sample_sum, stats.var, W.abs(), threshold=1e9)
    assert torch.equal(unchanged, keep)
    one = dsnot_refine(W, keep, stats.per_sample_sum, stats.var, W.abs(), max_cycles=1, threshold=0.0)
    assert int((one != keep).sum()) <= 2 * W.shape[0]  # at most one swap per row


@pytest.mark.parametrize(("n", "m"), [(0, 0), (2, 4)])
def test_dsnot_on_sparsegpt_starts_from_its_saliency_on_the_original_weights(n, m):
    """As in the DSnoT reference: W^2 / [H^-1]_jj^2 ranked per row (per group), no OBS update."""
    W, stats = dsnot_case(1)
    H = stats.hessian.double()
    H = H + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    hinv_diag = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).diagonal()
    saliency = W.double().square() / hinv_diag.square()
    if m:
        groups = saliency.reshape(W.shape[0], -1, m)
        expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True).reshape(W.shape)
    else:
        expected = torch.zeros_like(W, dtype=torch.bool).scatter_(1, saliency.topk(W.shape[1] // 2, dim=1).indices, True)
    new_W, keep = solve_layer("sparsegpt", W, stats, LayerPattern(0.5, n, m), DSnoTConfig(threshold=1e9))
    assert torch.equal(keep, expected)
    assert torch.equal(new_W, W * keep)  # the original weights, not SparseGPT's updated ones


def test_dsnot_through_the_engine_lowers_the_expected_error():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    plain = prune_decoder(model, samples(8), "wanda", 0.6, progress=False)
    model = tiny_causal_lm(TinySpec(arch="llama"))
    refined = prune_decoder(model, samples(8), "wanda", 0.6, dsnot=DSnoTConfig(threshold=0.0), progress=False)
    assert refined.sparsity == pytest.approx(plain.sparsity)
    assert [r.name for r in refined.layers] == [r.name for r in plain.layers]


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 50.0])]
    # mean = 57/8 = 7.125; only 50 exceeds 5 x mean = 35.6
    assert outlier_ratio(scores, M=5) == pytest.approx(1 / 8)


def test_owl_sparsities_average_to_the_target_and_favour_outlier_rich_blocks():
    ratios = [0.01, 0.05, 0.02, 0.08]
    s = owl_sparsities(ratios, 0.7, lam=0.08)
    assert sum(s) / len(s) == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s.index(min(s)) == ratios.index(max(ratios))
    assert owl_sparsities([0.1, 0.1], 0.5) == [pytest.approx(0.5), pytest.approx(0.5)]
    with pytest.raises(SparsecraftError, match="lambda"):
        owl_sparsities(ratios, 0.95, lam=0.2)


def test_owl_through_the_engine_averages_to_the_target():
    model = tiny_causal_lm(TinySpec(arch="llama", layers=4))
    result = prune_decoder(model, samples(), "wanda", 0.6, owl=OWLConfig(lam=0.1), progress=False)
    assert sum(result.block_sparsities) / 4 == pytest.approx(0.6)
    assert len(set(round(s, 6) for s in result.block_sparsities)) > 1
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    with pytest.raises(SparsecraftError, match="N:M"):
        prune_decoder(model, samples(), "wanda", n=2, m=4, owl=OWLConfig(), progress=False)


def test_each_block_is_calibrated_on_the_outputs_of_the_pruned_blocks_before_it(monkeypatch):
    model = tiny_causal_lm(TinySpec(arch="llama", layers=3))
    seen = []
    original = sequential.collect_input_stats

    def spy(block, calls, views, hessian, hessian_tokens=None):
        seen.append(torch.cat([c.hidden for c in calls]))
        return original(block, calls, views, hessian, hessian_tokens)

    monkeypatch.setattr(sequential, "collect_input_stats", spy)
    x = samples(4)
    prune_decoder(model, x, "wanda", 0.7, batch_size=2, progress=False)
    with torch.no_grad():
        hidden = model(input_ids=x, output_hidden_states=True).hidden_states
    for i in range(3):  # hidden_states[i] enters block i and depends only on the (pruned) blocks before it
        assert torch.allclose(seen[i], hidden[i], atol=1e-5), i


def test_include_and_exclude_choose_the_projections():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    result = prune_decoder(model, samples(), "wanda", 0.5, exclude=["*.self_attn.*"], progress=False)
    assert result.layers and all("mlp" in r.name for r in result.layers)
    assert float((model.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == 0.0
    with pytest.raises(SparsecraftError, match="matches"):
        prune_decoder(model, samples(), "wanda", 0.5, include=["nothing*"], progress=False)


def test_nm_not_dividing_the_input_names_the_layer_and_changes_nothing():
    model = tiny_causal_lm(TinySpec(arch="llama", intermediate=132))  # down_proj has 132 inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PatternError, match=r"down_proj.*multiple of 8"):
        prune_decoder(model, samples(), "wanda", n=2, m=8, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nan_after_pruning_is_reported_with_the_layer_name():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SparsecraftError, match=r"layers\.1\.mlp\.up_proj.*NaN"):
        prune_decoder(model, samples(), "magnitude", 0.5, progress=False)


def test_nan_produced_by_a_solver_is_caught_before_it_is_written(monkeypatch):
    model = tiny_causal_lm(TinySpec(arch="llama"))

    def broken(method, W, stats, pattern, dsnot=None):
        return torch.full_like(W, float("nan")), torch.ones_like(W, dtype=torch.bool)

    monkeypatch.setattr(sequential, "solve_layer", broken)
    with pytest.raises(SparsecraftError, match=r"layers\.0\.self_attn\.q_proj: NaN or Inf"):
        prune_decoder(model, samples(), "wanda", 0.5, progress=False)
    assert torch.isfinite(model.model.layers[0].self_attn.q_proj.weight).all()


def test_unsupported_architecture_lists_the_supported_ones():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = transformers.BertForMaskedLM(config)
    with pytest.raises(SparsecraftError, match="not supported; supported: gpt2, llama, mistral, opt, qwen2"):
        prune_decoder(model, samples(), "wanda", 0.5, progress=False)


def test_magnitude_needs_no_calibration_but_wanda_does():
    model = tiny_causal_lm(TinySpec(arch="opt"))
    result = prune_decoder(model, None, "magnitude-row", 0.5, progress=False)
    assert result.sparsity == pytest.approx(0.5)
    assert math.isnan(result.layers[0].error)
    with pytest.raises(SparsecraftError, match="calibration"):
        prune_decoder(model, None, "wanda", 0.5, progress=False)
