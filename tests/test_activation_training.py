"""Activation sparsity by training: TopK activations (Lazy Neuron) and ProSparse ReLUfication."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.activation import (
    ActivationL1,
    FATReLU,
    ProSparseSchedule,
    TopKActivation,
    apply_topk,
    relufy,
    shift_threshold,
)
from sparsecraft.models.hf import TinySpec, tiny_causal_lm
from sparsecraft.models.mlp import mlp_parts
from sparsecraft.recipes import RecipeError, Run, parse_recipe
from sparsecraft.train.trainer import fit, make_optimizer


def tokens(model: nn.Module, batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def outputs_of(modules: dict[str, nn.Module]):
    """Independent forward hooks: name -> list of outputs (and the handles to remove)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(out)) for name, m in modules.items()]
    return seen, handles


# -- TopK --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "k"), [((2, 5, 16), 3), ((7, 33), 1), ((1, 1, 8), 8), ((4, 3, 2, 10), 9), ((64, 5), 2)])
def test_topk_keeps_exactly_k_largest_per_token(shape, k):
    g = torch.Generator().manual_seed(sum(shape) + k)
    x = torch.randn(*shape, generator=g)
    y = TopKActivation(k)(x)
    kept = y != 0
    assert (kept.sum(-1) == k).all()
    assert torch.equal(y[kept], x[kept])  # kept values unchanged
    dropped_max = x.abs().masked_fill(kept, 0).amax(-1)
    kept_min = x.abs().masked_fill(~kept, math.inf).amin(-1)
    assert (kept_min >= dropped_max).all()
    by_value = TopKActivation(k, by="value")(x)
    assert (by_value != 0).sum(-1).eq(k).all()
    assert (by_value.masked_fill(by_value == 0, math.inf).amin(-1) >= x.masked_fill(by_value != 0, -math.inf).amax(-1)).all()


@pytest.mark.parametrize("fill", [1.0, -2.5])
def test_topk_keeps_exactly_k_under_ties(fill):
    x = torch.full((3, 4, 12), fill)
    x[0, 0, :6] = 0.5 * fill  # partial ties too
    for k in (1, 5, 11):
        assert ((TopKActivation(k)(x) != 0).sum(-1) == k).all()
    assert ((TopKActivation(keep=0.25)(x) != 0).sum(-1) == 3).all()


def test_topk_gradient_reaches_kept_entries_only():
    x = torch.randn(4, 6, 20, generator=torch.Generator().manual_seed(1), requires_grad=True)
    topk = TopKActivation(5, act=nn.SiLU())
    y = topk(x)
    y.pow(2).sum().backward()
    kept = y != 0
    assert (x.grad[~kept] == 0).all()
    assert (x.grad[kept] != 0).all()
    assert torch.allclose(y[kept], F.silu(x.detach())[kept])


def test_topk_bad_k_is_refused_clearly():
    for bad in ({"k": 0}, {"k": -3}, {"k": True}, {"k": 2.0}, {"keep": 0.0}, {"keep": 1.5}, {}, {"k": 2, "keep": 0.5}):
        with pytest.raises(SparsecraftError, match="TopKActivation"):
            TopKActivation(**bad)
    with pytest.raises(SparsecraftError, match="by="):
        TopKActivation(2, by="rank")
    with pytest.raises(SparsecraftError, match=r"blocks\.0\.act: k=9 is out of range for an activation of width 8"):
        TopKActivation(9, name="blocks.0.act")(torch.randn(2, 8))


def test_apply_topk_on_llama_sparsifies_down_proj_input():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    k = 10
    names = apply_topk(model, k=k)
    parts = mlp_parts(model)
    assert names == [p.act_path for p in parts]
    assert all(isinstance(p.act, TopKActivation) and p.act.name == p.act_path for p in parts)
    acts, h1 = outputs_of({p.act_path: p.act for p in parts})
    downs: list[torch.Tensor] = []
    h2 = [p.down.module.register_forward_pre_hook(lambda m, args: downs.append(args[0])) for p in parts]
    with torch.no_grad():
        model(tokens(model))
    for h in h1 + h2:
        h.remove()
    for out in (a for outs in acts.values() for a in outs):
        assert ((out != 0).sum(-1) == k).all()  # exactly k kept from the activation
    for inp in downs:
        assert ((inp != 0).sum(-1) <= k).all()  # up(x) may add zeros, never nonzeros
    assert apply_topk(model, keep=0.5) == names  # re-wrapping replaces, does not nest
    assert isinstance(parts[0].act, TopKActivation) and not isinstance(mlp_parts(model)[0].act.act, TopKActivation)


def test_apply_topk_refuses_bad_k_and_unknown_names_before_changing_anything():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    with pytest.raises(SparsecraftError, match=r"model\.layers\.0\.mlp\.act_fn: k=500 is out of range.*width 128"):
        apply_topk(model, k=500)
    assert not any(isinstance(m, TopKActivation) for m in model.modules())
    with pytest.raises(SparsecraftError, match=r"no module named 'model\.layers\.0\.mlp\.act'.*did you mean model\.layers\.0\.mlp\.act_fn"):
        apply_topk(model, k=4, modules=["model.layers.0.mlp.act"])
    plain = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    assert apply_topk(plain, k=4, modules=["1"]) == ["1"]
    assert ((plain[1](torch.randn(3, 16)) != 0).sum(-1) == 4).all()
    with pytest.raises(SparsecraftError, match="no activation module"):
        apply_topk(nn.Linear(4, 4), k=2)


def test_a_model_without_a_supported_mlp_is_refused():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    model.config.model_type = "bert"
    for call in (lambda: relufy(model), lambda: apply_topk(model, k=2), lambda: ActivationL1(model, 0.1)):
        with pytest.raises(SparsecraftError, match="'bert' is not supported"):
            call()


# -- ProSparse: relufy, FATReLU ---------------------------------------------------------------

@pytest.mark.parametrize(("arch", "field"), [("llama", "hidden_act"), ("gpt2", "activation_function")])
def test_relufy_swaps_the_mlp_activation_and_the_model_still_runs(arch, field):
    model = tiny_causal_lm(TinySpec(arch=arch))
    names = relufy(model)
    parts = mlp_parts(model)
    assert names == [p.act_path for p in parts]
    assert all(type(p.act) is nn.ReLU for p in parts)
    assert getattr(model.config, field) == "relu"
    acts, handles = outputs_of({p.act_path: p.act for p in parts})
    with torch.no_grad():
        logits = model(tokens(model)).logits
    for h in handles:
        h.remove()
    assert torch.isfinite(logits).all()
    assert all((out == 0).float().mean() > 0.2 for outs in acts.values() for out in outs)  # ReLU zeros
    assert relufy(model) == []  # already ReLU


def test_relufy_on_plain_models_by_type_and_by_name():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 2))
    assert relufy(model, modules=["3"]) == ["3"]
    assert isinstance(model[1], nn.GELU) and isinstance(model[3], nn.ReLU)
    assert relufy(model) == ["1"]
    with pytest.raises(SparsecraftError, match="0: a Linear with parameters is not an activation function"):
        relufy(model, modules=["0"])
    with pytest.raises(SparsecraftError, match="did you mean"):
        relufy(model, modules=["11"])


def test_fatrelu_zeros_below_threshold_and_keeps_the_rest_unshifted():
    x = torch.tensor([-1.0, 0.0, 0.05, 0.0999, 0.1, 0.2, 3.0])
    assert torch.equal(FATReLU(0.1)(x), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 3.0]))
    assert torch.equal(FATReLU(0)(x), F.relu(x))
    for bad in (-0.1, math.nan, math.inf, "0.1", True):
        with pytest.raises(SparsecraftError, match="threshold"):
            FATReLU(bad)


def test_shift_threshold_needs_relu_first():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    with pytest.raises(SparsecraftError, match="is SiLUActivation.*call relufy"):
        shift_threshold(model, 0.01)
    assert not any(isinstance(m, FATReLU) for m in model.modules())
    relufy(model)
    names = shift_threshold(model, 0.01)
    assert all(isinstance(p.act, FATReLU) and p.act.threshold == 0.01 for p in mlp_parts(model))
    assert names == [p.act_path for p in mlp_parts(model)]
    with torch.no_grad():
        assert torch.isfinite(model(tokens(model)).logits).all()


# -- ProSparse: schedule ----------------------------------------------------------------------

def reference_lambda(t: int, stages, initial: float, warmup: int) -> float:
    """ProSparse Section 3.2 written out: constant eta_0 in warm-up, then per stage
    eta_{i-1} + (eta_i - eta_{i-1}) sin(pi t / (2 T_i)), t counted from the stage's start."""
    if t < warmup:
        return initial
    start, eta_prev = warmup, initial
    for steps, eta in stages:
        if start <= t < start + steps:
            return eta_prev + (eta - eta_prev) * math.sin(math.pi * (t - start) / (2 * steps))
        start, eta_prev = start + steps, eta
    return eta_prev


def test_prosparse_schedule_equals_its_formula():
    stages, initial, warmup = [(10, 0.1), (20, 0.5), (4, 0.5), (8, 2.0)], 0.01, 5
    schedule = ProSparseSchedule(stages, initial=initial, warmup_steps=warmup)
    assert schedule.total_steps == 47
    for t in range(0, 60):
        assert schedule(t) == pytest.approx(reference_lambda(t, stages, initial, warmup), rel=1e-12, abs=1e-15)
    # stage boundaries: each stage starts at the previous factor, the last one holds
    assert schedule(4) == schedule(5) == 0.01
    assert schedule(15) == pytest.approx(0.1) and schedule(35) == pytest.approx(0.5) and schedule(39) == pytest.approx(0.5)
    assert schedule(47) == schedule(10_000) == 2.0
    assert schedule(10) == pytest.approx(0.01 + 0.09 * math.sin(math.pi * 5 / 20))  # half-way into stage 1
    no_warmup = ProSparseSchedule([(4, 1.0)])
    assert [no_warmup(t) for t in range(5)] == pytest.approx([0.0, math.sin(math.pi / 8), math.sin(math.pi / 4), math.sin(3 * math.pi / 8), 1.0])


@pytest.mark.parametrize(("args", "message"), [
    (([],), "at least one"),
    (([(10, 0.5), (10, 0.1)],), "below the previous"),
    (([(0, 0.5)],), "steps=0"),
    (([(10, -1.0)],), "must be a finite number >= 0"),
    (([(10,)],), "pair"),
    (([(10, 0.1)], 0.0, -1), "warmup_steps"),
    (([(10, 0.1)], 0.5), "below the previous"),
])
def test_prosparse_schedule_refuses_bad_stages(args, message):
    with pytest.raises(SparsecraftError, match=message):
        ProSparseSchedule(*args)


# -- ProSparse: the L1 penalty ----------------------------------------------------------------

def test_activation_l1_equals_a_direct_computation_on_a_plain_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(5, 8)
    schedule = ProSparseSchedule([(10, 0.2)], initial=0.05, warmup_steps=2)
    l1 = ActivationL1(model, schedule)
    assert list(l1.targets) == ["1", "3"]
    model(torch.randn(9, 8))  # an earlier forward is forgotten by the next one
    model(x)
    a1 = F.relu(model[0](x))
    a2 = F.relu(model[2](a1))
    for step in range(6):
        expected = schedule(step) * (a1.abs().mean() + a2.abs().mean())
        assert l1.lam == schedule(step)
        assert torch.allclose(l1.penalty(), expected)
        l1.step()
    summed = ActivationL1(model, 0.3, reduction="sum")
    model(x)
    assert torch.allclose(summed.penalty(), 0.3 * (a1.abs().sum() + a2.abs().sum()))
    assert summed.zero_fraction() == pytest.approx(float(((a1 == 0).sum() + (a2 == 0).sum()) / (a1.numel() + a2.numel())))
    summed.remove()
    l1.remove()
    with pytest.raises(SparsecraftError, match="no activations recorded"):
        l1.penalty()
    model(x)
    assert l1.records == []  # hooks gone


def test_activation_l1_on_llama_matches_hooked_activations_and_has_gradients():
    model = tiny_causal_lm(TinySpec(arch="llama"))
    relufy(model)
    parts = mlp_parts(model)
    with ActivationL1(model, ProSparseSchedule([(4, 0.1)])) as l1:
        l1.step(), l1.step()
        acts, handles = outputs_of({p.act_path: p.act for p in parts})
        model(tokens(model))
        for h in handles:
            h.remove()
        expected = ProSparseSchedule([(4, 0.1)])(2) * sum(out.abs().mean() for outs in acts.values() for out in outs)
        penalty = l1.penalty()
        assert torch.allclose(penalty, expected)
        penalty.backward()
        assert parts[0].gate.module.weight.grad.abs().sum() > 0
    assert l1.records == [] and l1._handles == []
    with pytest.raises(SparsecraftError, match="reduction"):
        ActivationL1(model, 0.1, reduction="max")
    with pytest.raises(SparsecraftError, match="no module named"):
        ActivationL1(model, 0.1, modules=["model.layers.9.mlp.act_fn"])


def _train_zero_fraction(penalised: bool) -> tuple[float, float]:
    """A tiny ReLU MLP trained 60 steps on a random task; exact-zero fraction of its hidden
    activations on held-out inputs, and the final training loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    g = torch.Generator().manual_seed(1)
    x, x_test = torch.randn(640, 16, generator=g), torch.randn(256, 16, generator=g)
    y = (x[:, :4].argmax(1))
    opt = make_optimizer(model, "adam", lr=1e-2)
    # mean |a| per layer: lambda of order 1 weighs against a cross-entropy of order 1
    l1 = ActivationL1(model, ProSparseSchedule([(20, 0.6), (20, 3.0)], initial=0.0, warmup_steps=10))
    history = fit(model, x, y, opt, epochs=6, batch_size=64, progress=False,
                  extra_loss=l1.penalty if penalised else None, on_step=lambda step: l1.step())
    assert l1.t == 60
    with torch.no_grad():
        model(x_test)
    zeros = l1.zero_fraction()
    l1.remove()
    return zeros, history[-1]


def test_training_with_the_l1_penalty_makes_more_activations_exactly_zero():
    dense_zeros, dense_loss = _train_zero_fraction(penalised=False)
    sparse_zeros, sparse_loss = _train_zero_fraction(penalised=True)
    assert sparse_zeros > dense_zeros + 0.1, (dense_zeros, sparse_zeros)  # measured: 0.37 -> 0.57
    assert sparse_loss < 0.6  # still learns the task (chance: ln 4 = 1.39)


# -- recipes ----------------------------------------------------------------------------------

TASK = (
    "import torch\n"
    "from torch import nn\n"
    "from sparsecraft.data import Split\n"
    "def blobs():\n"
    "    g = torch.Generator().manual_seed(0)\n"
    "    x = torch.randn(256, 8, generator=g)\n"
    "    y = (x[:, 0] > 0).long()\n"
    "    return Split(x[:192], y[:192], x[192:], y[192:])\n"
    "def net():\n"
    "    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 2))\n"
)


def test_a_recipe_relufies_penalises_and_shifts_the_threshold(tmp_path, monkeypatch):
    (tmp_path / "act_task.py").write_text(TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = parse_recipe(
        "model: act_task:net\ndata: act_task:blobs\ntrain: {epochs: 8, batch_size: 32, lr: 0.03}\n"
        "activation:\n  relufy: true\n  l1_stages: [[6, 0.01], [6, 0.05]]\n  l1_warmup_steps: 2\n  fatrelu: 0.01\n"
    )
    logs: list[str] = []
    result = Run(recipe, tmp_path / "out", progress=False, log=logs.append).run()
    assert result.accuracy > 0.7
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, 9))
    assert all(0.0 < row["activation_zeros"] < 1.0 for row in rows)
    assert rows[-1]["l1_lambda"] == pytest.approx(0.05)  # 48 steps: past the last stage
    assert any("1 activations replaced by ReLU" in line for line in logs)
    assert any("FATReLU: threshold 0.01 on 1 activations" in line for line in logs)


@pytest.mark.parametrize(("text", "message"), [
    ("activation:\n  l1_stages: [[10, 0.5], [10, 0.1]]\n", "r.yaml:2: activation.l1_stages: stages[1]: lambda 0.1 is below"),
    ("activation:\n  fatrelu: -1\n", "r.yaml:2: activation.fatrelu: FATReLU: threshold=-1"),
    ("activation:\n  l1_stages: [[10, 0.5]]\n  l1_reduction: max\n", "r.yaml:3: activation.l1_reduction 'max'"),
    ("activation:\n  relufy: yes please\n", "r.yaml:2: field 'activation.relufy' should be bool"),
    ("sparsity: {method: imp, sparsity: 0.5}\nactivation: {relufy: true}\n", "single-run methods, not imp"),
])
def test_bad_activation_sections_are_refused(text, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r.yaml")
    assert message in str(err.value)


def test_a_recipe_with_the_l1_penalty_resumes_exactly(tmp_path, monkeypatch):
    (tmp_path / "act_task.py").write_text(TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = parse_recipe(
        "model: act_task:net\ndata: act_task:blobs\ntrain: {epochs: 4, batch_size: 32, lr: 0.03}\n"
        "sparsity: {method: gmp, sparsity: 0.5, start: 0.0, end: 0.5, frequency: 2}\n"
        "activation: {relufy: true, l1_stages: [[6, 0.01], [6, 0.05]]}\n"
    )
    Run(recipe, tmp_path / "full", progress=False, log=lambda _: None).run()
    Run(recipe, tmp_path / "cut", progress=False, log=lambda _: None).run(stop_after_epoch=2)
    Run(recipe, tmp_path / "cut", progress=False, log=lambda _: None).run(resume=True)
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert full["activation_l1"] == cut["activation_l1"] == {"t": 24}
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
