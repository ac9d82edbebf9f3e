"""Top-k activations: per token, keep the k largest entries of an activation and zero the rest.

Li et al. 2023, "The Lazy Neuron Phenomenon: On Emergence of Activation Sparsity in
Transformers" (ICLR 2023) observe that trained Transformer MLPs activate few neurons per token,
and enforce it with *top-k thresholding*: after the MLP activation, only the k largest entries of
each token's hidden vector are kept. ``TopKActivation`` does exactly that on the last dimension,
keeping exactly k entries per token (indices from ``topk``, so ties never keep more or fewer);
gradients reach the kept entries only.

In a gated MLP, down(act(gate(x)) * up(x)), zeroing entries of act(gate(x)) zeros the same
entries of the down projection's input (0 * up = 0): that input then has at most k nonzeros per
token, and the down projection can skip the other columns of its weight.

This module also holds the small helpers the activation-sparsity methods share: finding the
activation modules of a model (the MLP activations of a Hugging Face decoder, activation modules
by type in any other model, or modules named by the user) and replacing a module by name.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.utils import replace_module

#: Module types taken for "an activation function" when a plain model is searched by type.
#: (Activations called as functions, ``F.relu(x)``, are not modules and cannot be found or hooked.)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish)

BY = ("magnitude", "value")


def is_hf_decoder(model: nn.Module) -> bool:
    """A Hugging Face model (it has ``config.model_type``): its MLPs are found via ``mlp_parts``."""
    return getattr(getattr(model, "config", None), "model_type", None) is not None


def _is_activation(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    # transformers' own activation classes (SiLUActivation, NewGELUActivation, ...) count too
    return isinstance(module, types) or type(module).__module__ == "transformers.activations"


def activation_modules(model: nn.Module, modules: Sequence[str] | None = None,
                       types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES) -> dict[str, nn.Module]:
    """The modules an activation method acts on, by full name, in model order.

    ``modules`` None: for a Hugging Face decoder, the MLP activation of every block
    (``sparsecraft.models.mlp.mlp_parts``; an architecture without a known MLP layout is refused);
    for any other model, every module of ``types`` (plus ``transformers.activations`` classes).
    ``modules`` given: full module names or globs (``"blocks.*.mlp.1"``); each must match a
    module, or the error lists the closest names.
    """
    named = dict(model.named_modules())
    if modules is None:
        if is_hf_decoder(model):
            from sparsecraft.models.mlp import mlp_parts  # raises for unsupported architectures

            return {part.act_path: part.act for part in mlp_parts(model)}
        found = {name: m for name, m in named.items() if name and _is_activation(m, types)}
        if not found:
            kinds = ", ".join(t.__name__ for t in types)
            raise SparsecraftError(
                f"model: {type(model).__name__} has no activation module ({kinds}); activations called as "
                "functions (F.relu) cannot be found: use activation modules (nn.ReLU()), or pass modules=[names]"
            )
        return found
    if isinstance(modules, str):
        modules = [modules]
    selected: dict[str, nn.Module] = {}
    for pattern in modules:
        hits = [name for name in named if name and (name == pattern or fnmatch.fnmatchcase(name, pattern))]
        if not hits:
            close = difflib.get_close_matches(pattern, [n for n in named if n], n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see model.named_modules() for the names"
            raise SparsecraftError(f"modules: no module named {pattern!r} in {type(model).__name__}{hint}")
        selected.update((name, named[name]) for name in hits)
    return {name: named[name] for name in named if name in selected}  # model order, no duplicates


def _check_k(k: int | None, keep: float | None) -> None:
    if (k is None) == (keep is None):
        raise SparsecraftError("TopKActivation: give exactly one of k= (entries kept per token) or keep= (fraction kept)")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise SparsecraftError(f"TopKActivation: k={k!r} must be an int >= 1 (entries kept per token)")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0):
        raise SparsecraftError(f"TopKActivation: keep={keep!r} is outside (0, 1]; it is the fraction of entries kept per token")


class TopKActivation(nn.Module):
    """act(x), then per token (last dimension) only the k entries of largest score kept.

    Top-k thresholding of Li et al. 2023 ("The Lazy Neuron Phenomenon"). ``k`` entries, or a
    fraction ``keep`` in (0, 1] of the width (``max(1, round(keep * width))``); ``by="magnitude"``
    scores |a|, ``by="value"`` scores a (the same after a ReLU). Exactly k entries are kept per
    token, ties broken by ``torch.topk``; the others are exact zeros with zero gradient. ``act``
    None applies top-k to the input itself. k is checked against the width at every forward.
    """

    def __init__(self, k: int | None = None, keep: float | None = None, act: nn.Module | None = None,
                 by: str = "magnitude", name: str = "TopKActivation") -> None:
        super().__init__()
        _check_k(k, keep)
        if by not in BY:
            raise SparsecraftError(f"TopKActivation: by={by!r} is not one of {', '.join(BY)}")
        self.k, self.keep, self.by, self.name = k, None if keep is None else float(keep), by, name
        self.act = act

    def kept(self, width: int) -> int:
        """Entries kept per token for an activation of this width; a clear error if k does not fit."""
        if self.k is None:
            return max(1, round(self.keep * width))  # type: ignore[operator]
        if not 1 <= self.k <= width:
            raise SparsecraftError(
                f"{self.name}: k={self.k} is out of range for an activation of width {width} (its last dimension); "
                f"choose 1 <= k <= {width}, or keep= as a fraction in (0, 1]"
            )
        return self.k

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(x) if self.act is not None else x
        k = self.kept(y.shape[-1])
        if k == y.shape[-1]:
            return y
        score = y.abs() if self.by == "magnitude" else y
        index = score.topk(k, dim=-1, sorted=False).indices
        # scatter of the gathered kept values: exactly k positions, gradient only through them
        return torch.zeros_like(y).scatter(-1, index, y.gather(-1, index))

    def extra_repr(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"keep={self.keep}"
        return f"{size}, by={self.by}"


def apply_topk(model: nn.Module, k: int | None = None, keep: float | None = None,
               modules: Sequence[str] | None = None, by: str = "magnitude") -> list[str]:
    """Wrap activations in ``TopKActivation``; returns the names wrapped, in model order.

    Without ``modules``: the MLP activation of every decoder block of a Hugging Face model (k
    checked against the MLP width here), or every activation module of another model. With
    ``modules``: those names or globs (any module; its output gets the top-k). An activation
    already wrapped is re-wrapped with the new k, not nested. Nothing changes when an argument is bad.
    """
    _check_k(k, keep)
    targets = activation_modules(model, modules, types=(*ACTIVATION_TYPES, TopKActivation))
    if modules is None and is_hf_decoder(model) and k is not None:
        from sparsecraft.models.mlp import mlp_parts

        for part in mlp_parts(model):
            TopKActivation(k, name=part.act_path).kept(part.hidden_size)  # raises before any change
    for name, module in targets.items():
        inner = module.act if isinstance(module, TopKActivation) else module
        replace_module(model, name, TopKActivation(k, keep, act=inner, by=by, name=name))
    return list(targets)


__all__ = ["ACTIVATION_TYPES", "TopKActivation", "activation_modules", "apply_topk"]
