"""N:M sparse training: the mask is recomputed from the dense weights at every forward pass.

- STE (Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
  ICLR 2021): the forward uses W * m, the gradient reaches the dense W unchanged.
- SR-STE (same paper): the gradient of W is g + lambda * (1 - m) * W (lambda = 2e-4), pulling
  pruned weights towards zero so the mask settles.
- Mask-decayed gradient flow, MDGF (Bambhaniya et al., "Progressive Gradient Flow for Robust N:M
  Sparsity Training in Transformers", 2024): the forward uses W * (m + (1 - m) * alpha(t)) with
  alpha(t) = max(0, 1 - c t) (linear) or exp(-c t) (exponential), t the step since the sparse phase
  began; gradients flow through that product, so pruned weights keep learning while alpha > 0.
  The last ``finetune`` fraction of training uses the binary mask.
- Structure-decayed gradient flow, SDGF (same paper): the pattern itself walks towards the target
  across equal frames of the sparse phase, with the schedules of the authors' code:
  ``sparsify`` (SDGF-Stepwise: (M-1):M, then N halving: 1:8 -> 7:8, 4:8, 2:8, 1:8), ``densify``
  (N fixed, M growing to the target over 4 frames: 1:64, 1:32, 1:16, 1:8), ``fine`` (SDGF-Geometric:
  the target density in ever finer groups over 4 frames: 8:64, 4:32, 2:16, 1:8), or a custom list
  of (fraction of training where it starts, "N:M") ending at the target (the first pattern holds
  from the end of the dense phase).

The weights stay dense during training: each layer's Parameter lives on as ``<name>_dense`` and a
forward pre-hook sets ``<name>`` to the effective weight; :meth:`NMTraining.finalize` bakes the
binary N:M mask in and gives the Parameter its name back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sparsecraft.core.patterns import NM
from sparsecraft.core.selection import DEFAULT_TYPES, select
from sparsecraft.errors import PatternError, SparsecraftError

METHODS = ("ste", "srste", "mask_decay")
STRUCTURE_DECAYS = ("sparsify", "densify", "fine")


class _StraightThrough(torch.autograd.Function):
    """forward W * mask; backward g + lam * (1 - mask) * W (lam = 0: plain STE)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, mask: Tensor, lam: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.lam = lam
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        weight, mask = ctx.saved_tensors
        if ctx.lam:
            grad = grad + ctx.lam * (1 - mask) * weight
        return grad, None, None


class NMWeight(nn.Module):
    """Parametrization: the effective weight of one layer under the current N:M and decay."""

    def __init__(self, n: int, m: int, method: str, lam: float) -> None:
        super().__init__()
        self.n, self.m, self.method, self.lam = n, m, method, lam
        self.alpha = 0.0  # mask decay: weight given to pruned positions in the forward
        self.dense = False

    def mask(self, weight: Tensor) -> Tensor:
        return NM(self.n, self.m).mask(weight.detach().abs()).to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        if self.dense:
            return weight
        mask = self.mask(weight)
        if self.method == "mask_decay" and self.alpha > 0:
            return weight * (mask + (1 - mask) * self.alpha)
        return _StraightThrough.apply(weight, mask, self.lam if self.method == "srste" else 0.0)


DENSE_SUFFIX = "_dense"


class _SetEffectiveWeight:
    """Forward pre-hook: ``module.<name> = weight_fn(module.<name>_dense)``.

    It reads everything from the module it is called with, so a deep copy of the model (whose hooks
    are deep-copied with it) computes its own weights, not the original's.
    """

    def __init__(self, name: str, weight_fn: NMWeight) -> None:
        self.name, self.weight_fn = name, weight_fn

    def __call__(self, module: nn.Module, args: Any) -> None:
        setattr(module, self.name, self.weight_fn(getattr(module, self.name + DENSE_SUFFIX)))


class _DetachEffectiveWeight:
    """Forward hook: the attribute is detached after the forward, so the module deep-copies and pickles."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        setattr(module, self.name, getattr(module, self.name).detach())


class _Reparametrized:
    """One layer's dense Parameter kept as ``<name>_dense``; ``<name>`` is recomputed before each forward.

    Unlike ``torch.nn.utils.parametrize`` this never calls ``set_`` on the Parameter: ``set_`` gives
    it a new gradient accumulator, which silently detaches a DistributedDataParallel that already
    wraps the model (its hooks sit on the old one). The Parameter object, and so every optimizer and
    DDP reference to it, stays the same.
    """

    def __init__(self, module: nn.Module, name: str, weight_fn: NMWeight) -> None:
        self.module, self.name, self.weight_fn = module, name, weight_fn
        self.param = module._parameters.pop(name)
        module.register_parameter(name + DENSE_SUFFIX, self.param)
        self.refresh()
        self._handles: list[RemovableHandle] = [
            module.register_forward_pre_hook(_SetEffectiveWeight(name, weight_fn)),
            module.register_forward_hook(_DetachEffectiveWeight(name)),
        ]

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the effective weight outside a forward (after an optimizer step or a schedule change)."""
        setattr(self.module, self.name, self.weight_fn(self.param))

    @torch.no_grad()
    def remove(self) -> None:
        """Bake the current effective weight into the Parameter and give it its name back."""
        effective = self.weight_fn(self.param)
        for handle in self._handles:
            handle.remove()
        delattr(self.module, self.name)
        del self.module._parameters[self.name + DENSE_SUFFIX]
        self.param.copy_(effective)
        self.module.register_parameter(self.name, self.param)


def _parse_nm(text: str) -> tuple[int, int]:
    n_text, sep, m_text = str(text).partition(":")
    try:
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise SparsecraftError(f"structure_decay: {text!r} is not an N:M pattern such as 2:8") from None
    NM(n, m)
    return n, m


def structure_schedule(n: int, m: int, kind: str) -> list[tuple[int, int]]:
    """The patterns SDGF walks through before the target (the target itself excluded)."""
    if kind == "sparsify":  # (M-1):M, M/2:M, M/4:M ... down to the target's N
        frames = int(math.log2(m / n)) + 1
        walk = [(m - 1 if i == 0 else m // 2**i, m) for i in range(frames)]
        return [p for p in walk if p[0] > n][: frames - 1]
    if kind == "densify":  # N:8M, N:4M, N:2M
        return [(n, m * 2 ** (3 - i)) for i in range(3)]
    if kind == "fine":  # 8N:8M, 4N:4M, 2N:2M
        return [(n * 2 ** (3 - i), m * 2 ** (3 - i)) for i in range(3)]
    raise SparsecraftError(f"structure_decay={kind!r}: choose {', '.join(STRUCTURE_DECAYS)} or a custom list")


@dataclass
class Phase:
    start: int  # first step (1-based) of this phase
    n: int
    m: int
    dense: bool = False
    binary: bool = False  # fine-tuning: no mask decay


class NMTraining:
    """Used like a sparsifier: ``step()`` after every ``optimizer.step()``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        n: int,
        m: int,
        total_steps: int,
        method: str = "srste",
        lam: float = 2e-4,
        decay: str = "linear",
        decay_coef: float | None = None,
        dense_fraction: float = 0.0,
        finetune_fraction: float = 0.0,
        structure_decay: str | Sequence[tuple[float, str]] | None = None,
        types: Sequence[str] = DEFAULT_TYPES,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        keep_first_dense: bool = False,
        keep_last_dense: bool = False,
    ) -> None:
        if method not in METHODS:
            raise SparsecraftError(f"method={method!r}: choose one of {', '.join(METHODS)}")
        if decay not in ("linear", "exponential"):
            raise SparsecraftError(f"decay={decay!r}: choose linear or exponential")
        if total_steps < 1:
            raise SparsecraftError(f"total_steps={total_steps} must be >= 1")
        if not (0 <= dense_fraction < 1 and 0 <= finetune_fraction < 1 and dense_fraction + finetune_fraction < 1):
            raise SparsecraftError("dense_fraction and finetune_fraction must lie in [0, 1) and leave a sparse phase")
        NM(n, m)  # validates 0 < n < m
        self.model, self.optimizer = model, optimizer
        self.n, self.m, self.method, self.lam, self.decay = n, m, method, lam, decay
        self.total_steps = total_steps
        self.dense_end = round(dense_fraction * total_steps)
        self.finetune_start = total_steps - round(finetune_fraction * total_steps)
        sparse_steps = max(1, self.finetune_start - self.dense_end)
        # by default alpha reaches 0 at the start of fine-tuning (linear) or 1e-3 there (exponential)
        self.decay_coef = decay_coef if decay_coef is not None else (
            1.0 / sparse_steps if decay == "linear" else math.log(1000) / sparse_steps
        )
        self.phases = self._phases(structure_decay)
        self.selection = select(model, types, include, exclude, keep_first_dense, keep_last_dense)
        for target in self.selection:
            for phase in self.phases:
                NM(phase.n, phase.m).check(tuple(target.shape), target.name)
        self._layers = {
            t.name: _Reparametrized(t.module, t.param_name, NMWeight(n, m, method, lam)) for t in self.selection
        }
        self.step_count = 0
        self._apply(0)

    def _phases(self, structure_decay: str | Sequence[tuple[float, str]] | None) -> list[Phase]:
        """Dense phase, the patterns walked before the target, the target, binary fine-tuning."""
        sparse_start, span = self.dense_end + 1, self.finetune_start - self.dense_end
        walk: list[tuple[int, tuple[int, int]]] = []
        target_start = sparse_start
        if isinstance(structure_decay, str):
            patterns = structure_schedule(self.n, self.m, structure_decay)
            frame = span / (len(patterns) + 1)  # equal frames, the last one at the target
            walk = [(sparse_start + round(i * frame), p) for i, p in enumerate(patterns)]
            target_start = sparse_start + round(len(patterns) * frame)
        elif structure_decay is not None:
            entries = [(max(1, round(f * self.total_steps)), _parse_nm(text)) for f, text in structure_decay]
            if not entries or entries[-1][1] != (self.n, self.m):
                raise SparsecraftError(
                    f"structure_decay: a custom schedule must end at the target {self.n}:{self.m}, "
                    f"got {entries[-1][1][0]}:{entries[-1][1][1] if entries else 'nothing'}"
                )
            if any(b[0] <= a[0] for a, b in zip(entries, entries[1:])):
                raise SparsecraftError("structure_decay: the fractions of a custom schedule must increase")
            walk, target_start = entries[:-1], max(sparse_start, entries[-1][0])
            if walk:  # the first pattern holds from the end of the dense phase
                walk[0] = (sparse_start, walk[0][1])
        phases = [Phase(1, self.n, self.m, dense=True)] if self.dense_end > 0 else []
        phases += [Phase(max(step, sparse_start), n, m) for step, (n, m) in walk]
        phases.append(Phase(target_start, self.n, self.m))
        if self.finetune_start < self.total_steps:
            phases.append(Phase(self.finetune_start + 1, self.n, self.m, binary=True))
        return phases

    def phase_at(self, step: int) -> Phase:
        """The phase in force for the forward passes of training step ``step + 1``."""
        current = self.phases[0]
        for phase in self.phases:
            if phase.start <= step + 1:
                current = phase
        return current

    def alpha_at(self, step: int) -> float:
        """Mask-decay weight of pruned positions for the forward of step ``step + 1``."""
        phase = self.phase_at(step)
        if self.method != "mask_decay" or phase.dense or phase.binary:
            return 0.0
        t = step - self.dense_end
        return max(0.0, 1.0 - self.decay_coef * t) if self.decay == "linear" else math.exp(-self.decay_coef * t)

    @property
    def parametrizations(self) -> dict[str, NMWeight]:
        """The effective-weight function of each layer still in training, by parameter name."""
        return {name: layer.weight_fn for name, layer in self._layers.items()}

    def _apply(self, step: int) -> None:
        phase, alpha = self.phase_at(step), self.alpha_at(step)
        for layer in self._layers.values():
            p = layer.weight_fn
            p.n, p.m, p.dense, p.alpha = phase.n, phase.m, phase.dense, alpha
            layer.refresh()  # what model.<layer>.weight shows between steps

    def step(self) -> None:
        self.step_count += 1
        self._apply(self.step_count)

    @property
    def sparsity(self) -> float:
        """Fraction of the selected weights the forward pass currently drops (0 while dense)."""
        phase = self.phase_at(self.step_count)
        return 0.0 if phase.dense else 1.0 - phase.n / phase.m

    @property
    def pattern(self) -> str:
        phase = self.phase_at(self.step_count)
        return "dense" if phase.dense else f"{phase.n}:{phase.m}"

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply(self.step_count)

    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Bake the target N:M mask into the weights; each layer's Parameter gets its name back."""
        for layer in self._layers.values():
            p = layer.weight_fn
            p.n, p.m, p.dense, p.alpha = self.n, self.m, False, 0.0
            layer.remove()
        self._layers.clear()
        return self.model


def effective_groups_valid(weight: Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive weights along the input dimension keeps at most n nonzeros."""
    from sparsecraft.core.patterns import to_matrix

    matrix = to_matrix(weight.detach())
    if matrix.shape[1] % m:
        raise PatternError(f"input dimension {matrix.shape[1]} is not a multiple of {m}")
    return bool(((matrix != 0).reshape(matrix.shape[0], -1, m).sum(-1) <= n).all())
