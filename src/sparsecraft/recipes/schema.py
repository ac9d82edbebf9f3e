"""A whole training run as one validated file (YAML or TOML).

Every section is a dataclass; unknown keys and wrong types are refused with the file, the line
and the dotted field named. Example (YAML)::

    model: cnn
    data: digits
    seed: 0
    train: {epochs: 20, batch_size: 64, optimizer: adam, lr: 0.003}
    sparsity:
      method: gmp
      sparsity: 0.9
      distribution: erk
      start: 0.1          # fraction of training (or an int step) where pruning starts
      end: 0.6
      frequency: 10       # steps between pruning events
    output: runs/gmp90
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional, TypeVar, Union

import yaml

from sparsecraft.errors import SparsecraftError


T = TypeVar("T")


class RecipeError(SparsecraftError):
    """A recipe that does not validate; the message names file, line and field."""


METHODS = ("dense", "static", "random", "snip", "grasp", "synflow", "gmp", "imp", "sms", "spdf", "set", "rigl", "granet", "nm")


@dataclass
class TrainSection:
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0


@dataclass
class SparsitySection:
    method: str = "dense"
    sparsity: Optional[float] = None
    pattern: str = "unstructured"
    distribution: str = "uniform"
    types: list[str] = field(default_factory=lambda: ["linear", "conv"])
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None
    keep_first_dense: bool = False
    keep_last_dense: bool = False
    # gmp: when pruning runs, as fractions of training (float) or steps (int); frequency in steps
    start: Union[int, float] = 0.1
    end: Union[int, float] = 0.6
    frequency: int = 10
    initial_sparsity: float = 0.0
    # snip / grasp: calibration batches; synflow: rounds
    batches: int = 4
    rounds: int = 3
    # imp: rewind step (0 = initialisation); sms: members per phase, greedy soups
    rewind_step: int = 0
    members: int = 3
    greedy: bool = False
    # spdf: epochs of dense fine-tuning after sparse training
    dense_epochs: int = 5
    # set / rigl / granet (+ initial_sparsity): steps between rewirings, drop fraction (zeta / alpha), when rewiring stops
    # (fraction of training or step), drop-fraction decay (default: set constant, rigl cosine)
    update_interval: int = 100
    drop_fraction: float = 0.3
    t_end: Union[int, float] = 0.75
    decay: Optional[str] = None
    # nm (pattern "N:M"): ste | srste | mask_decay, SR-STE lambda, decay coefficient, phases as
    # fractions of training, structure decay (sparsify | densify | fine)
    nm_method: str = "srste"
    lam: float = 2e-4
    decay_coef: Optional[float] = None
    dense_fraction: float = 0.0
    finetune_fraction: float = 0.0
    structure_decay: Optional[str] = None
    # Sparse-IFT: "wide" trains the Sparse Wide version of the model at the dense model's FLOPs
    # (static, random, set, rigl); the sparse layers get the iso-FLOP densities, the rest stay dense
    sift: Optional[str] = None


SIFT_METHODS = ("static", "random", "set", "rigl")


@dataclass
class ActivationSection:
    """Activation sparsity by training, ProSparse-style (``methods/activation/relufication.py``).

    ``relufy``: activations become ReLU before training; ``l1_stages`` ([[steps, lambda], ...],
    after ``l1_warmup_steps`` at ``l1_initial``): the progressive L1 penalty on the activation
    outputs during training; ``fatrelu``: the threshold of the FATReLU that replaces the ReLUs after
    training. ``modules``: which activation modules (names or globs; default all of them).
    """

    relufy: bool = False
    modules: Optional[list[str]] = None
    l1_stages: Optional[list[list[Union[int, float]]]] = None
    l1_warmup_steps: int = 0
    l1_initial: float = 0.0
    l1_reduction: str = "mean"
    fatrelu: Optional[float] = None

    @property
    def active(self) -> bool:
        return self.relufy or self.l1_stages is not None or self.fatrelu is not None


@dataclass
class Recipe:
    model: str = "cnn"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    train: TrainSection = field(default_factory=TrainSection)
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    activation: ActivationSection = field(default_factory=ActivationSection)
    output: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _line_finder(text: str, suffix: str):
    """field path -> line number (1-based) in the source text, best effort."""
    if suffix in (".yaml", ".yml"):
        root = yaml.compose(text)

        def find(path: list[str]) -> int | None:
            node, line = root, None
            for key in path:
                if not isinstance(node, yaml.MappingNode):
                    break
                for k, v in node.value:
                    if k.value == key:
                        node, line = v, k.start_mark.line + 1
                        break
                else:
                    break
            return line

        return find

    lines = text.splitlines()

    def find_toml(path: list[str]) -> int | None:
        section = ".".join(path[:-1])
        in_section = not section
        for i, line in enumerate(lines, start=1):
            header = re.match(r"\s*\[([^\]]+)\]", line)
            if header:
                in_section = header[1].strip() == section
                continue
            if in_section and re.match(rf"\s*{re.escape(path[-1])}\s*=", line):
                return i
        return None

    return find_toml


def _check_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check_type(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _build(cls: type, data: Any, path: list[str], where) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where(path)}: {'.'.join(path) or 'recipe'} must be a table/mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        raise RecipeError(f"{where(path + [key])}: unknown field {'.'.join(path + [key])!r}; known fields: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path + [key], where)
        elif not _check_type(value, hint):
            raise RecipeError(
                f"{where(path + [key])}: field {'.'.join(path + [key])!r} should be {_describe(hint)}, got {value!r}"
            )
        else:
            kwargs[key] = float(value) if hint is float else value
    return cls(**kwargs)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_validated(cls: type[T], text: str, source: str, suffix: str, check: Callable[[T, Any], None]) -> T:
    """Parse YAML/TOML ``text`` into the dataclass ``cls`` (types checked), then ``check(obj, where)``
    its values; ``where(path)`` gives ``source:line`` of a dotted field for the error messages."""
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise RecipeError(f"{source}: does not parse: {e}") from None
    find = _line_finder(text, suffix)

    def where(path: list[str]) -> str:
        line = find(path) if path else None
        return f"{source}:{line}" if line else source

    parsed = _build(cls, data or {}, [], where)
    check(parsed, where)
    return parsed


def parse_recipe(text: str, source: str = "<recipe>", suffix: str = ".yaml") -> Recipe:
    """Validate a recipe given as text; errors name ``source``, the line and the field."""
    return parse_validated(Recipe, text, source, suffix, _check_values)


def _check_values(recipe: Recipe, where) -> None:
    s = recipe.sparsity
    if s.method not in METHODS:
        raise RecipeError(f"{where(['sparsity', 'method'])}: sparsity.method {s.method!r} is not one of {', '.join(METHODS)}")
    if s.method == "nm" and ":" not in s.pattern:
        raise RecipeError(f"{where(['sparsity', 'pattern'])}: method nm needs an N:M pattern such as 2:4, got {s.pattern!r}")
    if s.method != "dense" and s.sparsity is None and ":" not in s.pattern:
        raise RecipeError(f"{where(['sparsity'])}: sparsity.sparsity is required for method {s.method!r}")
    if s.sparsity is not None and not 0.0 <= s.sparsity < 1.0:
        raise RecipeError(f"{where(['sparsity', 'sparsity'])}: sparsity.sparsity={s.sparsity} must lie in [0, 1)")
    if s.sift is not None:
        if s.sift != "wide":
            raise RecipeError(f"{where(['sparsity', 'sift'])}: sparsity.sift={s.sift!r}; the whole-model transformation is 'wide'")
        if s.method not in SIFT_METHODS or not s.sparsity or ":" in s.pattern:
            raise RecipeError(f"{where(['sparsity', 'sift'])}: sift needs an unstructured sparsity > 0 and a method among "
                              f"{', '.join(SIFT_METHODS)} (got {s.method})")
    if recipe.train.epochs < 1:
        raise RecipeError(f"{where(['train', 'epochs'])}: train.epochs must be >= 1")
    _check_activation(recipe, where)
    if s.method == "gmp" and isinstance(s.start, float) and isinstance(s.end, float) and not 0.0 <= s.start <= s.end <= 1.0:
        raise RecipeError(f"{where(['sparsity', 'end'])}: gmp needs 0 <= start <= end <= 1 as fractions of training")


def _check_activation(recipe: Recipe, where) -> None:
    a = recipe.activation
    if not a.active:
        return
    if recipe.sparsity.method in ("imp", "sms"):
        raise RecipeError(f"{where(['activation'])}: the activation section runs with single-run methods, not {recipe.sparsity.method}")
    from sparsecraft.methods.activation.relufication import REDUCTIONS, FATReLU, ProSparseSchedule

    checks = [("l1_stages", lambda: ProSparseSchedule(a.l1_stages, a.l1_initial, a.l1_warmup_steps)), ("fatrelu", lambda: FATReLU(a.fatrelu))]
    for key, check in checks:
        if getattr(a, key) is not None:
            try:
                check()
            except SparsecraftError as e:
                raise RecipeError(f"{where(['activation', key])}: activation.{key}: {e}") from None
    if a.l1_reduction not in REDUCTIONS:
        raise RecipeError(f"{where(['activation', 'l1_reduction'])}: activation.l1_reduction {a.l1_reduction!r} is not one of {', '.join(REDUCTIONS)}")


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe {p} does not exist")
    return parse_recipe(p.read_text(), str(p), p.suffix.lower())
