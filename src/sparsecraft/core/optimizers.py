"""Keeping optimizers from reviving pruned weights, for any optimizer, bound or not.

Two process-wide hooks (``torch.optim.optimizer.register_optimizer_step_{pre,post}_hook``) look at
every optimizer step that touches a masked weight:

- before the first such step (and again after masks change) the optimizer's per-weight state at
  pruned positions is zeroed, so momentum or Adam moments saved before pruning cannot revive them;
- after each step the masks are re-applied (and that weight's state zeroed again), except where
  the step provably kept the zeros: an optimizer whose update is elementwise and exactly zero where
  gradient, state and weight are zero (SGD with momentum/Nesterov/weight decay, Adam, AdamW, ...),
  a weight untouched since it was last masked, fed exactly the gradient our hook masked. That skip
  halves the masking cost of a training step.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch import Tensor

from sparsecraft.core.masking import MASK_GENERATION, find_enforcer, masked_param_entry

# Updates are elementwise and exactly zero where weight, gradient and state are zero.
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.RMSprop, torch.optim.Rprop,
)

# optimizer -> (mask generation it was checked at, [(param, module, name, mask)])
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# optimizer -> ids of masked weights that were exactly as we last left them when its step began
_CLEAN_BEFORE_STEP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _masked_params(optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, object, str, Tensor]]:
    """The masked weights this optimizer steps; on first sight (or new masks) its state is zeroed."""
    cached = _SEEN.get(optimizer)
    if cached is not None and cached[0] == MASK_GENERATION[0]:
        return cached[1]
    entries = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            hit = masked_param_entry(param)
            if hit is not None:
                entries.append((param, *hit))
    _zero_state(optimizer, entries)
    if cached is None:  # first sight: a later optimizer.load_state_dict brings state back, so look again
        optimizer.register_load_state_dict_post_hook(_forget)
    _SEEN[optimizer] = (MASK_GENERATION[0], entries)
    return entries


def _forget(optimizer: torch.optim.Optimizer) -> None:
    _SEEN[optimizer] = (-1, [])


def _zero_state(optimizer: torch.optim.Optimizer, entries) -> None:
    with torch.no_grad():
        for param, _, _, mask in entries:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.mul_(mask)


def bind_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Zero the optimizer's state at pruned positions now (momentum, exp_avg, exp_avg_sq, ...).

    Optional: it also happens before the optimizer's first step on masked weights, and again
    whenever masks change.
    """
    _SEEN.pop(optimizer, None)
    _masked_params(optimizer)


def _before_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    entries = _masked_params(optimizer)
    clean = set()
    for param, module, name, _ in entries:
        enforcer = find_enforcer(module)  # type: ignore[arg-type]
        if enforcer is not None and enforcer.is_current(name, param):
            clean.add(id(param))
    _CLEAN_BEFORE_STEP[optimizer] = clean


def _after_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    entries = _masked_params(optimizer)
    if not entries:
        return
    clean = _CLEAN_BEFORE_STEP.pop(optimizer, set())
    elementwise = type(optimizer) in ELEMENTWISE_OPTIMIZERS
    redo = []
    for entry in entries:
        param, module, name, _ = entry
        enforcer = find_enforcer(module)  # type: ignore[arg-type]
        if enforcer is None or param.grad is None:
            continue  # not masked any more, or not stepped
        kept_zeros = elementwise and id(param) in clean and enforcer.grad_is_masked(name, param)
        if not kept_zeros:
            redo.append(entry)
        else:
            enforcer.note_version(name, param)
    if redo:
        with torch.no_grad():
            for param, module, name, mask in redo:
                param.mul_(mask)
                find_enforcer(module).note_version(name, param)  # type: ignore[arg-type, union-attr]
        _zero_state(optimizer, redo)  # a dense gradient may have reached the state: clear it again


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)


def reset_state_at(optimizer: torch.optim.Optimizer, param: Tensor, positions: Tensor) -> None:
    """Zero ``optimizer``'s per-weight state of ``param`` at ``positions`` (bool, param's shape):
    regrown weights start without the momentum or moments of their previous life."""
    if not bool(positions.any()):
        return
    with torch.no_grad():
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value.masked_fill_(positions.to(value.device), 0)
