"""ReLUfication as in ProSparse: ReLU activations, a progressive L1 penalty on them, FATReLU.

Song et al. 2024, "ProSparse: Introducing and Enhancing Intrinsic Activation Sparsity within
Large Language Models" (arXiv:2402.13516), Section 3.2, in three steps:

1. Activation function substitution (``relufy``): the MLP activation (SiLU/Swish, GELU) becomes
   ReLU, followed by continual training.
2. Progressive sparsity regularization (``ActivationL1`` with a ``ProSparseSchedule``): the
   training loss gets lambda(t) * L1 of the MLP's intermediate activation outputs, with lambda
   held at a small constant during a warm-up stage and then raised along a sine curve in each of
   several incremental stages, so the activation distribution shifts gradually and the model
   keeps its quality.
3. Activation threshold shifting (``shift_threshold``): ReLU becomes FATReLU (Kurtz et al. 2020,
   "Inducing and Exploiting Activation Sparsity for Fast Inference on Deep Neural Networks"),
   x if x >= T else 0 with a positive T, which drops the small remaining activations.

Which tensor is regularised: the output of the activation module. In a gated MLP (Llama,
Mistral, Qwen2: down(act(gate(x)) * up(x))) that is act(gate(x)), whose zeros are exactly the
zeros ProSparse reports and the down projection can skip; in a plain MLP (GPT-2, OPT:
down(act(up(x)))) it is the down projection's input itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.activation.topk import (
    ACTIVATION_TYPES,
    TopKActivation,
    activation_modules,
    is_hf_decoder,
)
from sparsecraft.utils import replace_module

#: model_type -> the config field naming the MLP activation (so a saved relufied model reloads with ReLU).
_ACT_CONFIG_FIELD = {"llama": "hidden_act", "mistral": "hidden_act", "qwen2": "hidden_act",
                     "gpt2": "activation_function", "opt": "activation_function"}

REDUCTIONS = ("mean", "sum")


class FATReLU(nn.Module):
    """Forced-activation-threshold ReLU (Kurtz et al. 2020): x where x >= threshold, else 0.

    Unlike a shifted ReLU, kept values are not reduced by the threshold. ProSparse's step 3 uses a
    small positive threshold; 0 gives ReLU.
    """

    def __init__(self, threshold: float) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
            raise SparsecraftError(f"FATReLU: threshold={threshold!r} must be a finite number >= 0 (ProSparse uses a small positive one)")
        self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x >= self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def _no_parameters(targets: dict[str, nn.Module], what: str) -> None:
    for name, module in targets.items():
        if any(True for _ in module.parameters()):
            raise SparsecraftError(
                f"{name}: a {type(module).__name__} with parameters is not an activation function; {what} replaces "
                "activation modules only, name the activation (e.g. 'model.layers.0.mlp.act_fn')"
            )


def relufy(model: nn.Module, modules: Sequence[str] | None = None) -> list[str]:
    """ProSparse step 1: replace activations by ``nn.ReLU``; returns the names replaced.

    Without ``modules``: the MLP activation of every block of a Hugging Face decoder (its config is
    updated too, ``hidden_act`` / ``activation_function = "relu"``, so ``save_pretrained`` reloads
    as ReLU), or every activation module of another model. ReLUs stay as they are (not listed);
    in a ``TopKActivation`` the wrapped activation is replaced. Then fine-tune: ReLU alone gives
    some sparsity, ``ActivationL1`` much more.
    """
    targets = activation_modules(model, modules, types=(*ACTIVATION_TYPES, TopKActivation, FATReLU))
    _no_parameters(targets, "relufy")
    replaced = []
    for name, module in targets.items():
        inner = module.act if isinstance(module, TopKActivation) else module
        if isinstance(inner, (nn.ReLU, FATReLU)) or inner is None:
            continue
        if isinstance(module, TopKActivation):
            module.act = nn.ReLU()
        else:
            replace_module(model, name, nn.ReLU())
        replaced.append(name)
    if modules is None and is_hf_decoder(model):
        setattr(model.config, _ACT_CONFIG_FIELD[model.config.model_type], "relu")
    return replaced


def shift_threshold(model: nn.Module, threshold: float, modules: Sequence[str] | None = None) -> list[str]:
    """ProSparse step 3: replace ReLU (or FATReLU) activations by ``FATReLU(threshold)``.

    The same modules as ``relufy`` (default: every MLP activation); each must already be a ReLU,
    since FATReLU is a ReLU with a threshold, not a replacement for SiLU/GELU. Returns the names.
    A Hugging Face config cannot name FATReLU: a saved and reloaded model has plain ReLU again.
    """
    template = FATReLU(threshold)  # validates the threshold before any change
    targets = activation_modules(model, modules, types=(*ACTIVATION_TYPES, TopKActivation, FATReLU))
    for name, module in targets.items():
        inner = module.act if isinstance(module, TopKActivation) else module
        if not isinstance(inner, (nn.ReLU, FATReLU)):
            raise SparsecraftError(
                f"{name}: is {type(inner).__name__}; shift_threshold turns a ReLU into FATReLU (ProSparse step 3): "
                "call relufy(model) and fine-tune first"
            )
    for name, module in targets.items():
        if isinstance(module, TopKActivation):
            module.act = FATReLU(template.threshold)
        else:
            replace_module(model, name, FATReLU(template.threshold))
    return list(targets)


class ProSparseSchedule:
    """The regularization factor lambda(t) of ProSparse's progressive sparsity regularization.

    ``warmup_steps`` at the constant ``initial`` (eta_0, ProSparse's small warm-up factor), then
    the incremental stages ``stages = [(T_1, eta_1), (T_2, eta_2), ...]``: during stage i, at step
    t in [0, T_i) counted from the stage's start,

        lambda = eta_{i-1} + (eta_i - eta_{i-1}) * sin(pi * t / (2 * T_i)),

    which rises smoothly from eta_{i-1} and reaches eta_i at the stage's end (the paper's
    multi-stage sine curve, Section 3.2); after the last stage lambda stays at its eta. The
    factors must not decrease: the regularization only ever tightens.
    """

    def __init__(self, stages: Sequence[Sequence[float]], initial: float = 0.0, warmup_steps: int = 0) -> None:
        if not stages:
            raise SparsecraftError("stages: give at least one (steps, lambda) stage, e.g. [(1000, 1e-3)]")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise SparsecraftError(f"warmup_steps={warmup_steps!r} must be an int >= 0")
        previous = _factor(initial, "initial")
        parsed: list[tuple[int, float]] = []
        for i, stage in enumerate(stages):
            if not isinstance(stage, Sequence) or isinstance(stage, str) or len(stage) != 2:
                raise SparsecraftError(f"stages[{i}]: {stage!r} should be a pair (steps, lambda)")
            steps, lam = stage
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise SparsecraftError(f"stages[{i}]: steps={steps!r} must be an int >= 1")
            lam = _factor(lam, f"stages[{i}] lambda")
            if lam < previous:
                raise SparsecraftError(
                    f"stages[{i}]: lambda {lam} is below the previous {previous}; ProSparse's factor only increases"
                )
            parsed.append((steps, lam))
            previous = lam
        self.stages, self.initial, self.warmup_steps = parsed, float(initial), warmup_steps

    @property
    def total_steps(self) -> int:
        """Steps until lambda reaches its final value."""
        return self.warmup_steps + sum(steps for steps, _ in self.stages)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise SparsecraftError(f"ProSparseSchedule: step {step} is negative")
        if step < self.warmup_steps:
            return self.initial
        t, previous = step - self.warmup_steps, self.initial
        for steps, lam in self.stages:
            if t < steps:
                return previous + (lam - previous) * math.sin(math.pi * t / (2 * steps))
            t -= steps
            previous = lam
        return previous

    def __repr__(self) -> str:
        return f"ProSparseSchedule(stages={self.stages}, initial={self.initial}, warmup_steps={self.warmup_steps})"


def _factor(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SparsecraftError(f"{field}: {value!r} must be a finite number >= 0")
    return float(value)


class ActivationL1:
    """lambda(t) * L1 of the activation outputs of the current forward, as a loss term.

    Forward hooks on the activation modules (default: every MLP activation of a Hugging Face
    decoder, or every activation module of another model; see ``activation_modules``) record
    their outputs; each forward of ``model`` starts a fresh record. ``penalty()`` is

        lambda(t) * sum over recorded outputs a of reduce(|a|),

    ``reduction="mean"`` (default): the mean of |a| over all its elements (batch, positions,
    width), so lambda does not depend on batch size, sequence length or MLP width; ``"sum"``: the
    plain sum, ProSparse's ||A||_1. Summed over layers (and over calls, if a module runs twice in
    one forward). Padding positions are not masked out. Factors are therefore not those published
    for ProSparse's runs: with ``"mean"``, lambda of order 0.1 to 1 weighs against a cross-entropy
    of order 1. ``step()`` advances t (call it after each
    optimizer step, like a sparsifier's); ``schedule`` is a ``ProSparseSchedule``, any callable
    step -> lambda, or a constant.

        l1 = ActivationL1(model, ProSparseSchedule([(1000, 1e-2), (1000, 5e-2)]))
        fit(model, x, y, opt, epochs, extra_loss=l1.penalty, on_step=lambda step: l1.step())
    """

    def __init__(self, model: nn.Module, schedule: ProSparseSchedule | Callable[[int], float] | float,
                 modules: Sequence[str] | None = None, reduction: str = "mean") -> None:
        if reduction not in REDUCTIONS:
            raise SparsecraftError(f"reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
        if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
            constant = _factor(schedule, "schedule")
            schedule = lambda step: constant  # noqa: E731
        if not callable(schedule):
            raise SparsecraftError(f"schedule: {schedule!r} is neither a ProSparseSchedule, a callable step -> lambda nor a number")
        self.schedule, self.reduction, self.t = schedule, reduction, 0
        self.targets = activation_modules(model, modules, types=(*ACTIVATION_TYPES, TopKActivation, FATReLU))
        self.records: list[tuple[str, Tensor]] = []
        self._handles = [model.register_forward_pre_hook(lambda module, args: self.records.clear())]
        self._handles += [module.register_forward_hook(self._recorder(name)) for name, module in self.targets.items()]

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise SparsecraftError(f"{name}: ActivationL1 needs a module that returns one tensor, got {type(output).__name__}")
            self.records.append((name, output))

        return record

    @property
    def lam(self) -> float:
        """lambda at the current step."""
        return float(self.schedule(self.t))

    def l1(self) -> Tensor:
        """The unscaled regularizer: sum over recorded outputs of mean (or sum) |a|."""
        if not self.records:
            raise SparsecraftError(
                "ActivationL1: no activations recorded; call penalty() after a forward of the model it was built on "
                "(and before remove())"
            )
        reduce = Tensor.mean if self.reduction == "mean" else Tensor.sum
        return torch.stack([reduce(a.abs().float()) for _, a in self.records]).sum()

    def penalty(self) -> Tensor:
        """lambda(t) * l1(): add it to the task loss before ``backward()``."""
        return self.lam * self.l1()

    def step(self) -> None:
        self.t += 1

    @torch.no_grad()
    def zero_fraction(self) -> float:
        """Fraction of exact zeros among the recorded activations (of the last forward)."""
        total = sum(a.numel() for _, a in self.records)
        return sum(int((a == 0).sum()) for _, a in self.records) / max(total, 1)

    def state_dict(self) -> dict[str, int]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.t = int(state["t"])

    def remove(self) -> None:
        """Remove the hooks and drop the recorded tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.records = [], []

    def __enter__(self) -> ActivationL1:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


__all__ = ["ActivationL1", "FATReLU", "ProSparseSchedule", "relufy", "shift_threshold"]
