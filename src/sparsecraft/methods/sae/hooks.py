"""Named hook points of a Hugging Face causal LM: where an SAE reads (and, spliced, writes) activations.

Names follow the TransformerLens convention, one per decoder block ``L``:

- ``blocks.L.resid_pre``  the residual stream entering block L;
- ``blocks.L.resid_post`` the residual stream leaving block L (the usual SAE site);
- ``blocks.L.attn_out``   the attention module's output, before it is added to the residual;
- ``blocks.L.mlp_in``     the MLP's input (after its layer norm): a transcoder's input;
- ``blocks.L.mlp_out``    the MLP's output, before it is added to the residual: a transcoder's target.

:func:`capture` reads a point, :func:`splice` replaces it with a function of itself (an SAE's
reconstruction, zeros), and both stop the forward pass early when nothing later is needed.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.models.hf import decoder_blocks

#: model_type -> (attention module, module whose input is mlp_in, module whose output is mlp_out), in a block.
_BLOCK_PARTS: dict[str, tuple[str, str, str]] = {
    "llama": ("self_attn", "mlp", "mlp"),
    "mistral": ("self_attn", "mlp", "mlp"),
    "qwen2": ("self_attn", "mlp", "mlp"),
    "gpt2": ("attn", "mlp", "mlp"),
    "opt": ("self_attn", "fc1", "fc2"),  # OPT's MLP is two Linears in the block, not a submodule
}
SITES = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")
_NAME = re.compile(r"^blocks\.(\d+)\.(\w+)$")


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point: the module to hook and whether the tensor is its input or its output."""

    name: str
    block: int
    module: nn.Module
    reads_input: bool


def hook_names(model: nn.Module) -> list[str]:
    """Every valid hook-point name of ``model``, block by block."""
    return [f"blocks.{i}.{site}" for i in range(len(decoder_blocks(model))) for site in SITES]


def resolve(model: nn.Module, name: str) -> HookPoint:
    """The hook point called ``name``; an unknown name raises listing the nearest valid ones."""
    blocks = decoder_blocks(model)  # raises for unsupported architectures
    match = _NAME.match(name)
    if not match or match.group(2) not in SITES or int(match.group(1)) >= len(blocks):
        near = difflib.get_close_matches(name, hook_names(model), n=5, cutoff=0.5) or hook_names(model)[:5]
        raise SparsecraftError(
            f"hook: {name!r} is not a hook point of this {len(blocks)}-block model; nearest: {', '.join(near)} "
            f"(sites: {', '.join(SITES)})")
    index, site = int(match.group(1)), match.group(2)
    block = blocks[index]
    attn, mlp_in, mlp_out = _BLOCK_PARTS[model.config.model_type]
    module, reads_input = {
        "resid_pre": (block, True), "resid_post": (block, False), "attn_out": (block.get_submodule(attn), False),
        "mlp_in": (block.get_submodule(mlp_in), True), "mlp_out": (block.get_submodule(mlp_out), False),
    }[site]
    return HookPoint(name, index, module, reads_input)


class _Stop(Exception):
    """Raised inside a hook to end the forward pass once every wanted tensor is captured."""


def _first(value: object) -> Tensor:
    return value[0] if isinstance(value, tuple) else value  # type: ignore[return-value, index]


def _replace_first(value: object, new: Tensor) -> object:
    return (new, *value[1:]) if isinstance(value, tuple) else new  # type: ignore[index]


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def capture(model: nn.Module, names: list[str], stop_early: bool = True) -> Iterator[dict[str, Tensor]]:
    """Within the block, each forward of ``model`` fills the yielded dict with ``name -> tensor``
    ([batch, seq, d], detached). With ``stop_early`` the forward ends after the last point
    (call it through :func:`run_captured`, which swallows the early stop)."""
    points = [resolve(model, name) for name in names]
    found: dict[str, Tensor] = {}
    last = max(p.block for p in points)
    handles = []

    def keep(point: HookPoint, value: Tensor) -> None:
        found[point.name] = value.detach()
        if stop_early and len(found) == len(points) and point.block == last and all(p.name in found for p in points):
            raise _Stop

    for point in points:
        if point.reads_input:
            handles.append(point.module.register_forward_pre_hook(
                lambda m, args, kwargs, p=point: keep(p, _input_of(args, kwargs)), with_kwargs=True))
        else:
            handles.append(point.module.register_forward_hook(lambda m, args, out, p=point: keep(p, _first(out))))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def run_captured(model: nn.Module, input_ids: Tensor, names: list[str]) -> dict[str, Tensor]:
    """One forward of ``model`` on ``input_ids``, returning the tensors at ``names`` (stops early)."""
    with capture(model, names) as found:
        with contextlib.suppress(_Stop):
            model(input_ids=input_ids, use_cache=False)
    missing = [n for n in names if n not in found]
    if missing:
        raise SparsecraftError(f"hook: {', '.join(missing)} never ran in the forward pass")
    return dict(found)


@contextlib.contextmanager
def splice(model: nn.Module, name: str, replace: Callable[[Tensor], Tensor],
           source: str | None = None, keep: Callable[[Tensor], Tensor] | None = None) -> Iterator[None]:
    """Within the block, the tensor at ``name`` is replaced by ``replace(x)``, where ``x`` is the
    tensor at ``source`` (default: ``name`` itself; a transcoder reads mlp_in and writes mlp_out),
    except at the positions where ``keep(original)`` (a [batch, seq] mask) is True."""
    point = resolve(model, name)
    src = resolve(model, source) if source and source != name else None
    seen: dict[str, Tensor] = {}
    handles = []
    if src is not None:
        if src.reads_input:
            handles.append(src.module.register_forward_pre_hook(
                lambda m, args, kwargs: seen.__setitem__("x", _input_of(args, kwargs)), with_kwargs=True))
        else:
            handles.append(src.module.register_forward_hook(lambda m, args, out: seen.__setitem__("x", _first(out))))

    def new_value(own: Tensor) -> Tensor:
        new = replace(seen.pop("x") if src is not None else own).to(own.dtype)
        return new if keep is None else torch.where(keep(own).unsqueeze(-1), own, new)

    if point.reads_input:
        def pre(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (new_value(args[0]), *args[1:]), kwargs
            return args, kwargs | {"hidden_states": new_value(kwargs["hidden_states"])}
        handles.append(point.module.register_forward_pre_hook(pre, with_kwargs=True))
    else:
        handles.append(point.module.register_forward_hook(lambda m, args, out: _replace_first(out, new_value(_first(out)))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
