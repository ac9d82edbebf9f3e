"""Choosing which parameters to sparsify: by module type and by fully-qualified name.

Names are matched with shell-style globs (``features.*``, ``*.fc2``) or, with an ``re:`` prefix,
regular expressions. Common practice leaves the first conv and the classifier dense; the
``keep_first_dense`` / ``keep_last_dense`` switches do that without naming them.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from sparsecraft.errors import SelectionError

# Module type names a user can ask for, and the classes they select.
MODULE_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv1d": (nn.Conv1d,),
    "conv2d": (nn.Conv2d,),
    "conv3d": (nn.Conv3d,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "embedding": (nn.Embedding,),
}
DEFAULT_TYPES: tuple[str, ...] = ("linear", "conv")


@dataclass(frozen=True)
class Target:
    """One weight to sparsify: ``model.<module_name>.<param_name>``."""

    module_name: str
    param_name: str
    kind: str
    shape: tuple[int, ...]
    module: nn.Module = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def param(self) -> nn.Parameter:
        return self.module._parameters[self.param_name]  # type: ignore[return-value]


def kind_of(module: nn.Module) -> str | None:
    """The most specific type name for a module, or None when it is not sparsifiable."""
    for name in ("linear", "conv1d", "conv2d", "conv3d", "embedding"):
        if isinstance(module, MODULE_TYPES[name]):
            return name
    return None


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _resolve_types(types: Iterable[str]) -> tuple[type[nn.Module], ...]:
    classes: list[type[nn.Module]] = []
    for t in types:
        key = t.lower()
        if key not in MODULE_TYPES:
            raise SelectionError(
                f"unknown module type {t!r} in types; choose from {', '.join(MODULE_TYPES)}"
            )
        classes.extend(MODULE_TYPES[key])
    return tuple(classes)


class Selection(Sequence[Target]):
    """The ordered list of weights chosen for sparsification; prints as a table."""

    def __init__(self, targets: list[Target]) -> None:
        self._targets = targets

    def __getitem__(self, i):  # type: ignore[override]
        return self._targets[i]

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._targets]

    def by_name(self) -> dict[str, Target]:
        return {t.name: t for t in self._targets}

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self._targets)

    def table(self, title: str = "Selected for sparsification"):
        from rich.table import Table

        table = Table(title=title)
        for col in ("#", "parameter", "type", "shape", "weights"):
            table.add_column(col, justify="right" if col in ("#", "weights") else "left")
        for i, t in enumerate(self._targets):
            table.add_row(str(i), t.name, t.kind, "x".join(map(str, t.shape)), f"{t.numel:,}")
        table.caption = f"{len(self)} parameters, {self.numel:,} weights"
        return table

    def __str__(self) -> str:
        lines = [f"{len(self)} parameters selected ({self.numel:,} weights):"]
        lines += [f"  {t.name:<40} {t.kind:<10} {'x'.join(map(str, t.shape))}" for t in self._targets]
        return "\n".join(lines)


SELECTION_KEYS = ("types", "include", "exclude", "keep_first_dense", "keep_last_dense")


def select_from_options(model: nn.Module, options: dict) -> Selection:
    """``select`` with the selection keywords taken (popped) out of a method's ``**options``."""
    picked = {k: options.pop(k) for k in SELECTION_KEYS if k in options}
    return select(model, picked.pop("types", DEFAULT_TYPES), **picked)


def select(
    model: nn.Module,
    types: Iterable[str] = DEFAULT_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
    param_name: str = "weight",
) -> Selection:
    """Select the ``weight`` of every module of the given types whose name passes the lists.

    ``include``/``exclude`` match module names (``"features.0"``, ``"*.fc*"``, ``"re:layer[12]\\..*"``).
    An include pattern that matches no module is an error (it is almost always a typo).
    Shared (tied) weights are selected once, under their first name.
    """
    classes = _resolve_types(types)
    candidates: list[tuple[str, nn.Module]] = [
        (name, m) for name, m in model.named_modules() if isinstance(m, classes) and m._parameters.get(param_name) is not None
    ]
    if not candidates:
        raise SelectionError(
            f"the model has no modules of types {list(types)} with a {param_name!r} parameter; "
            f"try types such as {', '.join(MODULE_TYPES)}"
        )
    all_names = [n for n, _ in candidates]
    for pattern in include or ():
        if not any(_matches(n, pattern) for n in all_names):
            raise SelectionError(
                f"include pattern {pattern!r} matches no {'/'.join(types)} module; "
                f"available: {', '.join(all_names[:20])}{' ...' if len(all_names) > 20 else ''}"
            )
    for pattern in exclude or ():
        if not any(_matches(n, pattern) for n in all_names):
            warnings.warn(f"exclude pattern {pattern!r} matches no module; nothing excluded by it", stacklevel=2)

    chosen = [
        (n, m)
        for n, m in candidates
        if (not include or any(_matches(n, p) for p in include)) and not any(_matches(n, p) for p in exclude or ())
    ]
    if keep_first_dense and chosen:
        chosen = [c for c in chosen if c[0] != candidates[0][0]]
    if keep_last_dense and chosen:
        chosen = [c for c in chosen if c[0] != candidates[-1][0]]

    seen: set[int] = set()
    targets: list[Target] = []
    for name, module in chosen:
        p = module._parameters[param_name]
        if id(p) in seen:
            continue  # tied weight: one mask serves every module that shares it
        seen.add(id(p))
        targets.append(Target(name, param_name, kind_of(module) or type(module).__name__, tuple(p.shape), module))
    if not targets:
        raise SelectionError("include/exclude lists leave nothing to sparsify; loosen them")
    sharded = [t.name for t in targets if type(t.module._parameters[param_name]).__name__ == "DTensor"]
    if sharded:
        raise SelectionError(
            f"{sharded[0]}{f' and {len(sharded) - 1} more' if len(sharded) > 1 else ''}: the weight is sharded (an FSDP2 "
            "DTensor); apply masks before fully_shard() (static masks then stay in force), or use DistributedDataParallel "
            "for methods that change masks during training (GMP, SET, RigL, GraNet, IMP)"
        )
    return Selection(targets)
