"""Sparse autoencoders: the allocation rules (TopK, BatchTopK, Feature Choice, Mutual Choice), the
auxiliary losses against their formulas, the unit-norm decoder, loss recovered at its two ends,
save/load and the SAELens export, recovery of a known sparse dictionary, hooks and splicing on
tiny HF models, the activation buffer and cache, DDP and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _ranks import process_group, save_result, spawn_ranks
from typer.testing import CliRunner

from sparsecraft.cli.main import app
from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.sae import SAEConfig, SparseAutoencoder, TrainConfig, load_sae, save_sae, train_sae
from sparsecraft.methods.sae import allocate, losses, metrics
from sparsecraft.methods.sae.activations import (Harvest, ShuffleBuffer, check_enough_text, harvest, read_cache,
                                                  repeat, write_cache)
from sparsecraft.methods.sae.hooks import resolve, run_captured, splice
from sparsecraft.methods.sae.io import export_saelens
from sparsecraft.methods.sae.train import geometric_median, lr_factor
from sparsecraft.models.hf import TinySpec, tiny_causal_lm

runner = CliRunner()
BATCH_KINDS = ("batchtopk", "feature_choice", "mutual_choice")


def positive_pre(tokens: int = 16, features: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(tokens, features, generator=torch.Generator().manual_seed(seed)) + 0.01


# --- allocation ---------------------------------------------------------------------------------


def test_topk_keeps_exactly_k_per_token_and_the_largest():
    pre = positive_pre()
    codes = allocate.topk(pre, 5)
    assert ((codes > 0).sum(dim=1) == 5).all()
    kth = pre.topk(5, dim=1).values[:, -1:]
    assert torch.equal(codes, torch.where(pre >= kth, pre, torch.zeros_like(pre)))


def test_batch_topk_and_mutual_choice_keep_exactly_the_budget_with_variable_l0():
    pre = positive_pre()
    pre[0] += 5  # one "hard" token: the batch allocation gives it more latents
    codes = allocate.batch_topk(pre, 3)
    assert int((codes > 0).sum()) == 3 * 16
    assert int((codes[0] > 0).sum()) > 3  # not a per-token rule
    threshold = pre.flatten().topk(48).values[-1]
    assert torch.equal(codes, torch.where(pre >= threshold, pre, torch.zeros_like(pre)))
    assert int((allocate.mutual_choice(pre, 37) > 0).sum()) == 37


def test_feature_choice_gives_no_feature_more_than_m_tokens():
    pre = positive_pre()
    codes = allocate.feature_choice(pre, 4)
    per_feature = (codes > 0).sum(dim=0)
    assert (per_feature <= 4).all() and (per_feature == 4).all()  # all positive: exactly m
    pre[:, 0] = -1.0  # a feature with nothing positive takes no token at all
    assert int((allocate.feature_choice(pre, 4)[:, 0] > 0).sum()) == 0
    assert allocate.feature_capacity(k=3, tokens=16, features=24) == 2  # total budget k x tokens


def test_negative_selected_values_become_zero_and_bad_k_is_refused():
    pre = -positive_pre()
    assert int((allocate.topk(pre, 3) != 0).sum()) == 0
    with pytest.raises(ValueError, match="k must be in"):
        allocate.topk(pre, 25)


def test_sparse_decode_equals_the_dense_product_with_its_gradients():
    from sparsecraft.methods.sae.model import sparse_decode

    g = torch.Generator().manual_seed(4)
    pre = torch.randn(3, 5, 20, generator=g, requires_grad=True)
    codes = torch.where(pre > 1, pre, torch.zeros_like(pre))
    codes[0, 0] = 0  # a token with no active latent
    W = torch.randn(20, 6, generator=g, requires_grad=True)
    sparse, dense = sparse_decode(codes, W), codes @ W
    assert torch.allclose(sparse, dense, atol=1e-6)
    weights = torch.randn(3, 5, 6, generator=g)
    got = torch.autograd.grad((sparse * weights).sum(), [pre, W], retain_graph=True)
    want = torch.autograd.grad((dense * weights).sum(), [pre, W])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


# --- losses -------------------------------------------------------------------------------------


def _case(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(6, 10, generator=g)
    W_dec = torch.randn(10, 4, generator=g)
    residual = torch.randn(6, 4, generator=g)
    return pre, W_dec, residual


def test_auxk_loss_equals_its_formula():
    pre, W_dec, residual = _case()
    dead = torch.tensor([True, False, True, True, False, False, True, False, False, True])
    k_aux = 2
    estimate = torch.zeros(6, 4)  # slow reference: per token, the 2 largest dead pre-activations, ReLU, decode
    for t in range(6):
        dead_ids = [j for j in range(10) if dead[j]]
        best = sorted(dead_ids, key=lambda j: -float(pre[t, j]))[:k_aux]
        for j in best:
            estimate[t] += max(float(pre[t, j]), 0.0) * W_dec[j]
    nmse = ((estimate - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    expected = min(5 / k_aux, 1.0) * nmse
    assert torch.allclose(losses.auxk_loss(pre, dead, residual, W_dec, k_aux), expected, rtol=1e-5)
    assert float(losses.auxk_loss(pre, torch.zeros(10, dtype=torch.bool), residual, W_dec, k_aux)) == 0.0
    few = torch.zeros(10, dtype=torch.bool)
    few[3] = True  # one dead latent of k_aux = 2: the loss is scaled by 1/2
    single = torch.outer(pre[:, 3].relu(), W_dec[3])
    expected_few = 0.5 * ((single - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    assert torch.allclose(losses.auxk_loss(pre, few, residual, W_dec, k_aux), expected_few, rtol=1e-5)


def test_aux_zipf_loss_equals_its_formula_and_reduces_to_auxk():
    pre, W_dec, residual = _case(2)
    deficit = torch.tensor([0.0, 0.9, 0.1, 0.0, 0.5, 1.0, 0.0, 0.3, 0.0, 0.7])
    k_aux = 3
    estimate = torch.zeros(6, 4)
    for t in range(6):
        eligible = [j for j in range(10) if deficit[j] > 0]
        best = sorted(eligible, key=lambda j: -float(deficit[j] * pre[t, j].relu()))[:k_aux]
        for j in best:
            estimate[t] += max(float(pre[t, j]), 0.0) * W_dec[j]
    expected = min(6 / k_aux, 1.0) * ((estimate - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    assert torch.allclose(losses.aux_zipf_loss(pre, deficit, residual, W_dec, k_aux), expected, rtol=1e-5)
    dead = deficit == 1.0
    dead[1] = True
    binary = dead.float()
    assert torch.allclose(losses.aux_zipf_loss(pre, binary, residual, W_dec, k_aux),
                          losses.auxk_loss(pre, dead, residual, W_dec, k_aux))


def test_zipf_target_fits_the_exponent_and_sums_to_the_expected_l0():
    ranks = torch.arange(1, 201, dtype=torch.float32)
    density = 0.3 * ranks.pow(-1.2)
    shuffled = density[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    target = losses.zipf_target(shuffled, expected_l0=8.0)
    assert float(target.sum()) == pytest.approx(8.0, rel=1e-5)
    assert torch.allclose(target / target.max(), shuffled / shuffled.max(), rtol=1e-3)  # same power law, same ranks
    deficit = losses.zipf_deficit(torch.cat([density[:199], torch.zeros(1)]), expected_l0=float(density.sum()))
    assert float(deficit[-1]) == 1.0 and float(deficit[:150].max()) < 1e-3  # dead: 1; on the curve: 0


def test_l1_penalty_weights_codes_by_decoder_norms():
    codes = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    W_dec = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    assert float(losses.l1_penalty(codes, W_dec)) == pytest.approx((1 * 5 + 2 * 1 + 3 * 2) / 2)


# --- model, training ----------------------------------------------------------------------------


def synthetic(n: int, d: int = 32, f: int = 64, k: int = 3, seed: int = 0):
    """Activations built from a known dictionary (always the same one): each row a sum of k of its
    unit directions, drawn with ``seed``."""
    D = torch.randn(f, d, generator=torch.Generator().manual_seed(1234))
    D /= D.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, f, generator=g).argsort(dim=1)[:, :k]
    codes = torch.zeros(n, f).scatter_(1, idx, torch.rand(n, k, generator=g) * 2 + 0.5)
    return codes @ D, D


def batches_of(x: torch.Tensor, size: int):
    return ((x[i:i + size], None) for i in range(0, len(x) - size + 1, size))


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "feature_choice", "mutual_choice", "relu"])
def test_trained_sae_recovers_a_known_sparse_dictionary(kind):
    x, D = synthetic(40960)
    sae = SparseAutoencoder(SAEConfig(kind=kind, d_in=32, d_sae=128, k=3, l1_coefficient=3.0))
    untrained = (D @ sae.W_dec.detach().T).max(dim=1).values.mean()
    train_sae(sae, batches_of(x, 128), TrainConfig(tokens=40960, batch_size=128, lr=1e-2, seed=3), progress=False)
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    best = (D @ W.T).max(dim=1).values  # per true feature, the closest learned decoder direction
    assert float(untrained) < 0.75 and float(best.mean()) > 0.9, best
    if kind == "topk":
        assert float((best > 0.95).float().mean()) >= 0.95  # nearly every feature found almost exactly
    held_out, _ = synthetic(2048, seed=5)
    result = metrics.reconstruction(sae, batches_of(held_out, 512))
    assert result.fvu < 0.35
    if kind != "relu":
        assert result.l0_mean == pytest.approx(3, abs=1.0)  # the batch kinds' threshold gives about k at inference
    if kind in BATCH_KINDS:
        assert float(sae.threshold.min()) > 0


def test_decoder_rows_stay_unit_norm_and_the_projected_gradient_is_tangent():
    x, _ = synthetic(4096)
    sae = SparseAutoencoder(SAEConfig(kind="topk", d_in=32, d_sae=64, k=4))
    train_sae(sae, batches_of(x, 256), TrainConfig(tokens=4096, batch_size=256, lr=1e-2), progress=False)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    sae.W_dec.grad = torch.randn(64, 32)
    sae.project_decoder_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(dim=1), torch.zeros(64), atol=1e-5)


def test_folding_the_input_scale_gives_the_same_function_on_raw_activations():
    x, _ = synthetic(64)
    for kind, transcoder in (("topk", False), ("feature_choice", False), ("relu", True)):
        sae = SparseAutoencoder(SAEConfig(kind=kind, d_in=32, d_sae=64, k=4, transcoder=transcoder)).eval()
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_()
            sae.threshold.fill_(0.2)
        a, b = 3.0, (0.5 if transcoder else 3.0)
        trained = sae(a * x) / b
        sae.fold_scales(a, b)
        assert torch.allclose(sae(x), trained, atol=1e-5)


def test_geometric_median_minimises_the_sum_of_distances_and_lr_schedule_shape():
    points = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    points[:20] += 50  # outliers pull the mean, not the median
    median = geometric_median(points)
    cost = lambda c: float((points - c).norm(dim=1).sum())
    assert cost(median) < cost(points.mean(dim=0))
    for delta in torch.eye(3) * 0.01:
        assert cost(median) <= cost(median + delta) and cost(median) <= cost(median - delta)
    factors = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[80] == 1.0 and factors[99] == pytest.approx(0.05) and factors[90] < factors[85]


def test_bad_configurations_fail_with_the_field_named():
    with pytest.raises(SparsecraftError, match="sae.k: 300 must be in"):
        SAEConfig(kind="topk", d_in=32, d_sae=256, k=300)
    with pytest.raises(SparsecraftError, match="sae.kind: 'gated' is unknown"):
        SAEConfig(kind="gated", d_in=32, d_sae=256)
    sae = SparseAutoencoder(SAEConfig(kind="topk", d_in=32, d_sae=64, k=4))
    with pytest.raises(SparsecraftError, match="activations have width 16"):
        train_sae(sae, [(torch.randn(8, 16), None)], TrainConfig(tokens=8, batch_size=8), progress=False)
    with pytest.raises(SparsecraftError, match="ran out after 1 of 4 steps"):
        train_sae(sae, [(torch.randn(8, 32), None)], TrainConfig(tokens=32, batch_size=8), progress=False)


# --- save / load / export -----------------------------------------------------------------------


@pytest.mark.parametrize("kind, transcoder", [("topk", False), ("batchtopk", False), ("relu", True), ("mutual_choice", True)])
def test_save_load_round_trip_gives_the_same_outputs(tmp_path, kind, transcoder):
    x, _ = synthetic(1024)
    sae = SparseAutoencoder(SAEConfig(kind=kind, d_in=32, d_sae=64, k=4, transcoder=transcoder, d_out=32,
                                      hook="blocks.0.mlp_in" if transcoder else "blocks.0.resid_post"))
    train_sae(sae, ((xb, xb.flip(1) if transcoder else None) for xb, _ in batches_of(x, 256)),
              TrainConfig(tokens=1024, batch_size=256), progress=False)
    save_sae(sae, tmp_path / "sae", extra={"note": "test"})
    loaded = load_sae(tmp_path / "sae")
    assert loaded.config == sae.config and torch.equal(loaded(x), sae(x))
    assert json.loads((tmp_path / "sae" / "sae.json").read_text())["note"] == "test"


def test_load_refuses_mismatched_or_missing_files(tmp_path):
    save_sae(SparseAutoencoder(SAEConfig(kind="topk", d_in=32, d_sae=64, k=4)), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "sae.json").read_text())
    meta["config"]["d_sae"] = 128
    (tmp_path / "a" / "sae.json").write_text(json.dumps(meta))
    with pytest.raises(SparsecraftError, match="the files do not belong together"):
        load_sae(tmp_path / "a")
    (tmp_path / "a" / "sae.safetensors").unlink()
    with pytest.raises(SparsecraftError, match="sae.safetensors is missing"):
        load_sae(tmp_path / "a")
    with pytest.raises(SparsecraftError, match="exists and is not empty"):
        save_sae(SparseAutoencoder(SAEConfig(kind="topk", d_in=32, d_sae=64, k=4)), tmp_path / "a")


def test_saelens_export_uses_its_names_shapes_and_architectures(tmp_path):
    from safetensors.torch import load_file

    sae = SparseAutoencoder(SAEConfig(kind="topk", d_in=32, d_sae=64, k=4, hook="blocks.3.resid_post", model="m"))
    export_saelens(sae, tmp_path / "topk")
    cfg = json.loads((tmp_path / "topk" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == "blocks.3.resid_post" and cfg["dtype"] == "float32"
    tensors = load_file(str(tmp_path / "topk" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"W_enc": (32, 64), "b_enc": (64,), "W_dec": (64, 32), "b_dec": (32,)}
    batch = SparseAutoencoder(SAEConfig(kind="batchtopk", d_in=32, d_sae=64, k=4))
    batch.threshold.fill_(0.3)
    export_saelens(batch, tmp_path / "batch")
    assert json.loads((tmp_path / "batch" / "cfg.json").read_text())["architecture"] == "jumprelu"
    exported = load_file(str(tmp_path / "batch" / "sae_weights.safetensors"))
    assert torch.equal(exported["threshold"], torch.full((64,), 0.3))
    # JumpReLU as SAELens computes it equals our eval-mode codes
    x = torch.randn(5, 32)
    pre = (x - exported["b_dec"]) @ exported["W_enc"] + exported["b_enc"]
    jump = pre.relu() * (pre > exported["threshold"])
    assert torch.allclose(jump, batch.eval().encode(x))
    with pytest.raises(SparsecraftError, match="TopK transcoder has no SAELens architecture"):
        export_saelens(SparseAutoencoder(SAEConfig(kind="topk", d_in=32, d_sae=64, k=4, transcoder=True)), tmp_path / "tc")


# --- hooks, splicing, loss recovered on tiny HF models --------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_hook_points_read_the_right_tensors(arch):
    model = tiny_causal_lm(TinySpec(arch=arch))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    found = run_captured(model, ids, [f"blocks.{i}.{s}" for i in (0, 1) for s in ("resid_pre", "resid_post", "mlp_in", "mlp_out")])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(found["blocks.0.resid_pre"], hidden[0], atol=1e-6)
    assert torch.allclose(found["blocks.1.resid_pre"], found["blocks.0.resid_post"])
    if arch != "gpt2":  # GPT-2's and OPT's last hidden state is after the final norm; block 0's output is not
        assert torch.allclose(found["blocks.0.resid_post"], hidden[1], atol=1e-6)
    mlp = resolve(model, "blocks.1.mlp_out").module
    if arch != "opt":
        assert torch.allclose(mlp(found["blocks.1.mlp_in"]), found["blocks.1.mlp_out"], atol=1e-5)


def test_unknown_hook_lists_the_nearest_names():
    model = tiny_causal_lm(TinySpec())
    with pytest.raises(SparsecraftError, match=r"'blocks\.1\.resid_pots' is not a hook point.*blocks\.1\.resid_post"):
        resolve(model, "blocks.1.resid_pots")
    with pytest.raises(SparsecraftError, match="is not a hook point of this 2-block model"):
        resolve(model, "blocks.7.resid_post")


def identity_sae(d: int, hook: str) -> SparseAutoencoder:
    """relu(x) - relu(-x) = x: an exact identity through a ReLU SAE of width 2d."""
    sae = SparseAutoencoder(SAEConfig(kind="relu", d_in=d, d_sae=2 * d, hook=hook))
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_recovered_is_one_for_identity_and_zero_for_zero_ablation(arch):
    model = tiny_causal_lm(TinySpec(arch=arch))
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    sae = identity_sae(64, "blocks.0.resid_post")
    result = metrics.loss_recovered(model, sae, ids)
    assert abs(result.ce_zero - result.ce_clean) > 1e-3  # the site matters
    assert result.loss_recovered == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        sae.W_dec.zero_()
    assert metrics.loss_recovered(model, sae, ids).loss_recovered == pytest.approx(0.0, abs=1e-4)


def test_splice_replaces_the_tensor_and_transcoder_reads_its_source():
    model = tiny_causal_lm(TinySpec())
    ids = torch.randint(0, 96, (2, 10))
    clean = model(input_ids=ids).logits
    with splice(model, "blocks.1.mlp_out", lambda x: x):
        assert torch.allclose(model(input_ids=ids).logits, clean, atol=1e-6)
    mlp = copy.deepcopy(resolve(model, "blocks.1.mlp_out").module)  # a copy: calling the hooked module would recurse
    with splice(model, "blocks.1.mlp_out", lambda x: mlp(x), source="blocks.1.mlp_in"):  # a "perfect transcoder"
        assert torch.allclose(model(input_ids=ids).logits, clean, atol=1e-5)
    with splice(model, "blocks.1.mlp_out", torch.zeros_like):
        assert not torch.allclose(model(input_ids=ids).logits, clean, atol=1e-3)
    assert torch.equal(model(input_ids=ids).logits, clean)  # hooks removed


# --- activations: buffer, cache, text checks ------------------------------------------------------


def test_shuffle_buffer_emits_every_row_once_mixed_and_reproducibly():
    chunks = [(torch.arange(i * 100, (i + 1) * 100).float()[:, None], None) for i in range(10)]
    out = torch.cat([x for x, _ in ShuffleBuffer(chunks, capacity=300, batch_size=50, seed=3)]).flatten()
    assert sorted(out.tolist()) == list(range(1000))
    assert (out[:50] < 100).float().mean() < 0.9  # the first batch mixes several chunks
    again = torch.cat([x for x, _ in ShuffleBuffer(chunks, capacity=300, batch_size=50, seed=3)]).flatten()
    assert torch.equal(out, again)


def test_repeat_cycles_a_source_to_the_requested_tokens():
    rows = list(repeat(lambda: iter([(torch.ones(4, 2), None), (torch.zeros(3, 2), None)]), 16))
    assert sum(len(x) for x, _ in rows) == 16


def test_cache_round_trip_checksums_and_atomicity(tmp_path):
    model = tiny_causal_lm(TinySpec())
    ids = torch.randint(0, 96, (6, 12))
    spec = Harvest("blocks.0.mlp_in", "blocks.0.mlp_out", batch_size=2)
    live = list(harvest(model, ids, spec))
    assert live[0][0].shape == (2 * 11, 64)  # first position of each window dropped
    meta = write_cache(iter(live), tmp_path / "cache", {"hook": spec.hook}, shard_rows=30, progress=False)
    assert meta["n_tokens"] == 66 and len(meta["shards"]) == 2
    cached = list(read_cache(tmp_path / "cache"))
    assert torch.equal(torch.cat([x for x, _ in cached]), torch.cat([x for x, _ in live]))
    assert torch.equal(torch.cat([y for _, y in cached]), torch.cat([y for _, y in live]))
    shard = tmp_path / "cache" / meta["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-8] + b"xxxxxxxx")
    with pytest.raises(SparsecraftError, match="corrupted"):
        list(read_cache(tmp_path / "cache"))

    def interrupted():
        yield live[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(interrupted(), tmp_path / "cut", {}, progress=False)
    assert not (tmp_path / "cut").exists()


def test_outlier_tokens_are_dropped_from_training_data_and_left_alone_when_spliced():
    from sparsecraft.methods.sae.activations import drop_outliers

    x = torch.randn(100, 8)
    x[17] *= 200  # a "massive activation"
    stats: dict = {}
    (kept, _), = drop_outliers([(x, None)], 10.0, stats)
    assert len(kept) == 99 and stats == {"tokens": 100, "dropped": 1} and not (kept.norm(dim=1) > 100).any()
    assert len(next(drop_outliers([(x, None)], 0.0))[0]) == 100  # 0: keep everything
    model = tiny_causal_lm(TinySpec())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    clean = model(input_ids=ids).logits
    sae = identity_sae(64, "blocks.0.resid_post")
    with torch.no_grad():
        sae.W_dec.zero_()  # a "zero" SAE: only the positions it is allowed to touch change
    sae.config.outlier_factor = 1e-6  # every position counts as an outlier: nothing may change
    with metrics.splice_sae(model, sae):
        assert torch.equal(model(input_ids=ids).logits, clean)
    sae.config.outlier_factor = 0.0
    with metrics.splice_sae(model, sae):
        spliced = model(input_ids=ids).logits
    assert torch.allclose(spliced[:, 0], clean[:, 0]) and not torch.allclose(spliced[:, 1:], clean[:, 1:])


def test_text_too_short_is_refused_before_work():
    with pytest.raises(SparsecraftError, match="1,000 tokens need 33 windows of 32, but the text gives only 4"):
        check_enough_text(4, 32, True, 1000)
    assert check_enough_text(40, 32, True, 1000) == 33


# --- DDP ------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with process_group(rank, world, init_file):
        x, _ = synthetic(2048, seed=10 + rank)  # each rank its own data
        sae = SparseAutoencoder(SAEConfig(kind="batchtopk", d_in=32, d_sae=64, k=3))
        train_sae(sae, batches_of(x, 256), TrainConfig(tokens=2048, batch_size=256, lr=3e-3), progress=False)
        save_result(sae.state_dict(), out_dir, rank)


def test_ddp_training_leaves_identical_saes_on_every_rank(tmp_path):
    spawn_ranks(_ddp_worker, 2, tmp_path)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    single = SparseAutoencoder(SAEConfig(kind="batchtopk", d_in=32, d_sae=64, k=3))
    x, _ = synthetic(2048, seed=10)
    train_sae(single, batches_of(x, 256), TrainConfig(tokens=2048, batch_size=256, lr=3e-3), progress=False)
    assert not torch.equal(single.W_dec, a["W_dec"])  # the ranks did see each other's data


# --- CLI ------------------------------------------------------------------------------------------

TEXT = " ".join(f"The {a} {b} was {c} at {d}." for a in ("old", "red", "tall", "new") for b in ("house", "ship", "cart")
                for c in ("seen", "sold", "found") for d in ("noon", "dusk")) + "\n"


@pytest.fixture
def model_dir(lm_dir):
    return lm_dir("llama")


def test_cli_train_eval_inspect_export(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 2)
    out = tmp_path / "sae"
    result = runner.invoke(app, ["sae", "train", "--model", str(model_dir), "--hook", "blocks.0.resid_post",
                                 "--text", str(text), "--kind", "mutual_choice", "--k", "4", "--expansion", "2",
                                 "--tokens", "2048", "--seqlen", "32", "--batch-size", "128", "--eval-windows", "4",
                                 "--cache", str(tmp_path / "cache"), "--out", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("fvu", "l0_mean", "l0_std", "dead_fraction", "loss_recovered", "tokens_per_second", "ce_clean", "ce_sae"):
        assert isinstance(data[key], float), key
    assert data["d_sae"] == 128 and data["train_tokens"] == 2048 and 0 < data["fvu"] < 1
    assert (out / "density.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "cache" / "meta.json").exists()
    evaluated = runner.invoke(app, ["sae", "eval", str(out), "--model", str(model_dir), "--text", str(text),
                                    "--seqlen", "32", "--windows", "4", "--json"], catch_exceptions=False)
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["fvu"] == pytest.approx(data["fvu"], rel=1e-4)  # the same held-out windows
    latent = int(load_sae(out).encode(torch.zeros(1, 64)).argmax()) if False else 0
    shown = runner.invoke(app, ["sae", "inspect", str(out), "--model", str(model_dir), "--text", str(text),
                                "--latent", str(latent), "--seqlen", "32", "--json"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    contexts = json.loads(shown.stdout)["contexts"]
    assert all("[[" in c["text"] for c in contexts)
    assert [c["activation"] for c in contexts] == sorted((c["activation"] for c in contexts), reverse=True)
    exported = runner.invoke(app, ["sae", "export", str(out), "--out", str(tmp_path / "lens")], catch_exceptions=False)
    assert exported.exit_code == 0 and (tmp_path / "lens" / "cfg.json").exists()
    table = runner.invoke(app, ["sae", "train", "--model", str(model_dir), "--hook", "blocks.0.mlp_in", "--transcoder",
                                "--text", str(text), "--kind", "relu", "--expansion", "2", "--tokens", "1024",
                                "--seqlen", "32", "--batch-size", "128", "--eval-windows", "4"], catch_exceptions=False)
    assert table.exit_code == 0, table.output
    assert "loss_recovered" in table.output and "fvu" in table.output


@pytest.mark.parametrize("args, message", [
    (["--hook", "blocks.0.resid_pots"], "nearest: blocks.0.resid_post"),
    (["--k", "999"], "sae.k: 999 must be in [1, d_sae = 128]"),
    (["--tokens", "100000"], "100,000 tokens need"),
    (["--kind", "gated"], "--kind: 'gated' is not one of"),
    (["--transcoder"], "a transcoder reads an MLP's input"),
])
def test_cli_train_bad_input_names_the_problem(model_dir, tmp_path, args, message):
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 2)
    base = {"--hook": "blocks.0.resid_post", "--k": "4", "--tokens": "1024", "--kind": "topk"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    extra = [a for a in args if a == "--transcoder"]
    argv = ["sae", "train", "--model", str(model_dir), "--text", str(text), "--expansion", "2", "--seqlen", "32",
            *[item for pair in base.items() for item in pair], *extra]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_cli_eval_refuses_an_sae_of_another_width(model_dir, tmp_path):
    save_sae(SparseAutoencoder(SAEConfig(kind="topk", d_in=48, d_sae=96, k=4, hook="blocks.0.resid_post")), tmp_path / "sae")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = runner.invoke(app, ["sae", "eval", str(tmp_path / "sae"), "--model", str(model_dir), "--text", str(text)])
    assert result.exit_code == 2 and "reads 48-wide activations" in " ".join(result.output.split())
