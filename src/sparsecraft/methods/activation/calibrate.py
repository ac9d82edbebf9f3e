"""Calibrate training-free activation sparsity on text, and swap the modules that apply it.

``calibrate`` runs calibration windows through the model with hooks and returns one ``Rule`` per
module to replace; ``apply_rules`` swaps them in. ``sparsify_activations`` does both. Only the
decoder blocks are touched (embeddings and the LM head stay exact). Methods (math and papers in
``thresholds.py``):

- ``threshold`` (TEAL): the input of every Linear in the blocks, one tau each;
- ``chess``: the MLP activation channel-wise (gated MLPs; plain MLPs tensor-wise), the down
  projection then skips the exact zeros; the query and output projections' inputs tensor-wise;
- ``wina``: the input of every Linear in the blocks, top-k of |x| * column norm per token
  (no calibration needed; the text is unused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.activation import thresholds as th
from sparsecraft.methods.activation.modules import (
    ActivationSparseLinear,
    RowSkipGatedMLP,
    ThresholdedActivation,
    _check_mode,
    sparsify_everywhere,
)
from sparsecraft.models.hf import _is_conv1d, block_linears, block_prefix, decoder_blocks, selected_in_block
from sparsecraft.models.mlp import mlp_parts
from sparsecraft.utils import progress_bar, replace_module

METHODS = ("threshold", "chess", "wina")
#: model_type -> (query projection or None, attention output projection), inside a block. GPT-2
#: fuses q, k and v into c_attn, so CHESS leaves its input exact (keys and values are cached).
ATTENTION_QO: dict[str, tuple[str | None, str]] = {
    "llama": ("self_attn.q_proj", "self_attn.o_proj"),
    "mistral": ("self_attn.q_proj", "self_attn.o_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.o_proj"),
    "opt": ("self_attn.q_proj", "self_attn.out_proj"),
    "gpt2": (None, "attn.c_proj"),
}
#: Values of |x| kept per layer to estimate a quantile (a uniform sample of the calibration tokens).
MAX_SAMPLES = 1 << 20


@dataclass
class Rule:
    """How one module is made activation-sparse: ``kind`` "linear" (its input) or "activation" (its output)."""

    name: str
    kind: str
    tau: Tensor | None = None
    scale: Tensor | None = None
    k: int = 0

    def tensors(self) -> dict[str, Tensor]:
        return {f"{self.name}.{key}": t for key, t in (("tau", self.tau), ("scale", self.scale)) if t is not None}


@dataclass
class ActivationSparsityPlan:
    method: str
    sparsity: float
    mode: str
    rules: list[Rule] = field(default_factory=list)
    calibration_tokens: int = 0

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "sparsity": self.sparsity, "mode": self.mode, "calibration_tokens": self.calibration_tokens,
                "rules": [{"name": r.name, "kind": r.kind, "k": r.k, "tau": r.tau is not None, "scale": r.scale is not None}
                          for r in self.rules]}


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.act if isinstance(module, ThresholdedActivation) else module


class _Sampler:
    """A bounded uniform sample of one layer's |values| over the calibration batches."""

    def __init__(self, per_batch: int, generator: torch.Generator) -> None:
        self.per_batch, self.generator, self.parts = per_batch, generator, []

    def add(self, values: Tensor) -> None:
        flat = values.detach().reshape(-1).abs().float()
        if flat.numel() > self.per_batch:
            flat = flat[torch.randint(flat.numel(), (self.per_batch,), generator=self.generator, device=flat.device)]
        self.parts.append(flat.cpu())

    def values(self) -> Tensor:
        return torch.cat(self.parts)


def _targets(model: nn.Module, include: list[str] | None, exclude: list[str] | None) -> list[str]:
    names = []
    for i, block in enumerate(decoder_blocks(model)):
        names += [v.name for v in block_linears(block, block_prefix(model, i), include, exclude)]
    if not names:
        raise SparsecraftError(f"include/exclude: no Linear layer in the decoder blocks matches include={include} exclude={exclude}")
    return names


@torch.no_grad()
def _run(model: nn.Module, windows: Tensor, batch_size: int, progress: bool, what: str) -> None:
    device = next(model.parameters()).device
    for s in progress_bar(range(0, windows.shape[0], batch_size), what, progress, total=-(-windows.shape[0] // batch_size)):
        model(input_ids=windows[s : s + batch_size].to(device), use_cache=False)


@torch.no_grad()
def _run_hooked(model: nn.Module, handles: list, windows: Tensor, batch_size: int, progress: bool, what: str,
                everywhere: bool = False) -> None:
    """Run the windows with ``handles`` (hooks) in place, removing them whatever happens."""
    try:
        if everywhere:
            with sparsify_everywhere(model):
                _run(model, windows, batch_size, progress, what)
        else:
            _run(model, windows, batch_size, progress, what)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _input_samples(model: nn.Module, names: list[str], windows: Tensor, batch_size: int, progress: bool,
                   outputs: bool = False, scale: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A sample of |input| (or |output| * scale) of each named module over the calibration windows."""
    batches = -(-windows.shape[0] // batch_size)
    gen = torch.Generator().manual_seed(0)
    samplers = {n: _Sampler(max(1, MAX_SAMPLES // batches), gen) for n in names}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: Any = None) -> None:
            value = out if outputs else args[0]
            if scale is not None:
                value = value.abs() * scale[name].to(value.device)
            samplers[name].add(value)
        return record

    handles = [(_get(model, n).register_forward_hook(hook(n)) if outputs else _get(model, n).register_forward_pre_hook(hook(n)))
               for n in names]
    _run_hooked(model, handles, windows, batch_size, progress, "calibrating activations")
    return {n: s.values() for n, s in samplers.items()}


@torch.no_grad()
def _mean_abs_outputs(model: nn.Module, names: list[str], windows: Tensor, batch_size: int, progress: bool) -> dict[str, Tensor]:
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: Tensor) -> None:
            flat = out.detach().reshape(-1, out.shape[-1]).abs().float()
            sums[name] = sums.get(name, 0) + flat.sum(0).cpu()
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return record

    handles = [_get(model, n).register_forward_hook(hook(n)) for n in names]
    _run_hooked(model, handles, windows, batch_size, progress, "CHESS: mean |up projection|")
    return {n: sums[n] / counts[n] for n in names}


def _weight_out_in(module: nn.Module) -> Tensor:
    w = module.weight.detach()
    return w.t() if _is_conv1d(module) else w


def calibrate(model: nn.Module, windows: Tensor | None, method: str, sparsity: float, mode: str = "decode",
              include: list[str] | None = None, exclude: list[str] | None = None, batch_size: int = 4,
              progress: bool = True) -> ActivationSparsityPlan:
    """The rules of ``method`` at ``sparsity`` for ``model``, calibrated on ``windows`` (n, seqlen) token ids."""
    if method not in METHODS:
        raise SparsecraftError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    sparsity = th.check_sparsity(sparsity)
    _check_mode(mode)
    if any(isinstance(m, (ActivationSparseLinear, ThresholdedActivation)) for m in model.modules()):
        raise SparsecraftError("model: already activation-sparse; calibrate the plain model (load it again)")
    if method != "wina" and (windows is None or windows.numel() == 0):
        raise SparsecraftError(f"calib: {method} needs calibration text (give --calib FILE)")
    plan = ActivationSparsityPlan(method, sparsity, mode, calibration_tokens=0 if windows is None else int(windows.numel()))
    was_training = model.training
    model.eval()
    try:
        if method == "wina":
            for name in _targets(model, include, exclude):
                module = _get(model, name)
                norms = th.wina_column_norms(_weight_out_in(module))
                plan.rules.append(Rule(name, "linear", scale=norms, k=th.kept_inputs(norms.numel(), sparsity)))
        elif method == "threshold":
            names = _targets(model, include, exclude)
            samples = _input_samples(model, names, windows, batch_size, progress)
            plan.rules += [Rule(n, "linear", tau=torch.tensor(th.quantile_threshold(samples[n], sparsity))) for n in names]
        else:
            plan.rules += _chess_rules(model, windows, sparsity, batch_size, progress, include, exclude)
    finally:
        model.train(was_training)
    return plan


def _chess_rules(model: nn.Module, windows: Tensor, sparsity: float, batch_size: int, progress: bool,
                 include: list[str] | None, exclude: list[str] | None) -> list[Rule]:
    # the globs match as for the other methods (block_linears): full names or paths inside the block
    parts = [p for p in mlp_parts(model) if selected_in_block(p.down.name, p.down.name[len(p.prefix) + 1:], include, exclude)]
    q_path, o_path = ATTENTION_QO[model.config.model_type]
    attention = [f"{block_prefix(model, i)}.{path}" for i in range(len(decoder_blocks(model))) for path in (q_path, o_path)
                 if path and selected_in_block(f"{block_prefix(model, i)}.{path}", path, include, exclude)]
    gated = [p for p in parts if p.gate is not None]
    up_mean = _mean_abs_outputs(model, [p.up.name for p in gated], windows, batch_size, progress) if gated else {}
    scale = {p.act_path: up_mean[p.up.name] if p.gate is not None else torch.ones(p.hidden_size) for p in parts}
    act_samples = _input_samples(model, [p.act_path for p in parts], windows, batch_size, progress, outputs=True, scale=scale)
    att_samples = _input_samples(model, attention, windows, batch_size, progress) if attention else {}
    rules = []
    for p in parts:
        t = th.quantile_threshold(act_samples[p.act_path], sparsity)  # a quantile of the importance |a| * E|u|
        tau = th.channel_thresholds(t, scale[p.act_path])
        rules += [Rule(p.act_path, "activation", tau=tau, scale=scale[p.act_path]), Rule(p.down.name, "linear")]  # down: skip the zeros, exact
    rules += [Rule(n, "linear", tau=torch.tensor(th.quantile_threshold(att_samples[n], sparsity))) for n in attention]
    return rules


def apply_rules(model: nn.Module, plan: ActivationSparsityPlan) -> list[str]:
    """Swap in the plan's modules (all of them checked first, so nothing is half-applied)."""
    modules = {}
    for rule in plan.rules:
        try:
            module = _unwrap(_get(model, rule.name))
        except AttributeError:
            raise SparsecraftError(f"rule {rule.name!r}: the model has no such module; was the plan made for another model?") from None
        if rule.kind == "linear":
            if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
                raise SparsecraftError(f"rule {rule.name!r}: expected a Linear layer, found {type(module).__name__}")
            width = _weight_out_in(module).shape[1]
            for key, t in (("tau", rule.tau), ("scale", rule.scale)):
                if t is not None and t.numel() not in (1, width):
                    raise SparsecraftError(f"rule {rule.name!r}: {key} has {t.numel()} values for a layer of {width} inputs")
            modules[rule.name] = lambda m=module, r=rule: ActivationSparseLinear(m, tau=r.tau, scale=r.scale, k=r.k, mode=plan.mode)
        else:
            modules[rule.name] = lambda m=module, r=rule: ThresholdedActivation(m, r.tau, mode=plan.mode)
    for name, make in modules.items():
        replace_module(model, name, make())
    if plan.method == "chess":  # gated MLPs: also skip the up projection's rows of the dropped activations
        for part in mlp_parts(model):
            mlp_name = part.up.name.rpartition(".")[0]
            if part.gate is not None and isinstance(part.act, ThresholdedActivation) and type(_get(model, mlp_name)) is not RowSkipGatedMLP:
                replace_module(model, mlp_name, RowSkipGatedMLP(_get(model, mlp_name)))
    return list(modules)


def sparsify_activations(model: nn.Module, windows: Tensor | None, method: str, sparsity: float, mode: str = "decode",
                         include: list[str] | None = None, exclude: list[str] | None = None, batch_size: int = 4,
                         progress: bool = True, refine: int = 1) -> ActivationSparsityPlan:
    """Calibrate ``method`` at ``sparsity``, swap the modules in and ``refine`` the thresholds
    (passes of ``refine_thresholds``); returns the plan (save it with ``methods.activation.io``)."""
    plan = calibrate(model, windows, method, sparsity, mode, include, exclude, batch_size, progress)
    apply_rules(model, plan)
    for _ in range(refine if method != "wina" else 0):
        refine_thresholds(model, plan, windows, batch_size, progress)
    return plan


@torch.no_grad()
def refine_thresholds(model: nn.Module, plan: ActivationSparsityPlan, windows: Tensor, batch_size: int = 4,
                      progress: bool = True) -> None:
    """Recalibrate every threshold on what its layer sees with all thresholds in force.

    Calibrating on the dense model alone lets later layers drift from the target (their inputs
    change once earlier layers drop activations: 1-4% on tiny models); one pass of this brings
    each layer back to the target on the calibration text.
    """
    rules = [r for r in plan.rules if r.tau is not None]
    batches = -(-windows.shape[0] // batch_size)
    gen = torch.Generator().manual_seed(1)
    samplers = {r.name: _Sampler(max(1, MAX_SAMPLES // batches), gen) for r in rules}

    def hook(rule: Rule):
        def record(module: nn.Module, args: tuple, out: Any = None) -> None:
            value = (out if rule.kind == "activation" else args[0]).abs()
            samplers[rule.name].add(value if rule.scale is None else value * rule.scale.to(value.device))
        return record

    handles = []
    for r in rules:
        module = _get(model, r.name)
        handles.append(module.act.register_forward_hook(hook(r)) if r.kind == "activation"
                       else module.register_forward_pre_hook(hook(r)))
    _run_hooked(model, handles, windows, batch_size, progress, "refining thresholds", everywhere=True)
    for r in rules:
        t = th.quantile_threshold(samplers[r.name].values(), plan.sparsity)
        new = th.channel_thresholds(t, r.scale) if r.kind == "activation" else torch.tensor(t)
        r.tau = new
        module = _get(model, r.name)
        module.tau.copy_(new.expand_as(module.tau))
        if isinstance(module, ActivationSparseLinear):
            module._plan = None


@torch.no_grad()
def measured_sparsity(model: nn.Module, windows: Tensor, batch_size: int = 4) -> dict[str, float]:
    """Fraction of each activation-sparse Linear's inputs that are dropped or zero, with sparsification on everywhere."""
    dropped: dict[str, list[float]] = {}

    def hook(name: str):
        def record(module: ActivationSparseLinear, args: tuple) -> None:
            keep = module.keep_mask(args[0])
            dropped.setdefault(name, [0.0, 0.0])
            dropped[name][0] += float((~keep).sum())
            dropped[name][1] += keep.numel()
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, ActivationSparseLinear)]
    _run_hooked(model, handles, windows, batch_size, False, "", everywhere=True)
    return {n: d / max(total, 1.0) for n, (d, total) in dropped.items()}
