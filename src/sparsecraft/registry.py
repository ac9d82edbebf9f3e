"""One registry for everything that is chosen by name: patterns, scores, distributions, models.

The CLI, recipes and docs all list names from here, so there is no second table to keep in sync.
Later methods (Wanda, SparseGPT, SNIP, RigL ...) plug in with ``@SCORES.register("wanda")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from sparsecraft.errors import SparsecraftError

T = TypeVar("T")


class UnknownNameError(KeyError, SparsecraftError):
    """A name that is not in a registry; the message lists what is (a KeyError and a SparsecraftError)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """A named table of objects of one kind, with a one-line summary each."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._summaries: dict[str, str] = {}

    def register(self, name: str, summary: str = "") -> Callable[[T], T]:
        """Decorator: ``@REG.register("name", "what it does")``."""

        def add(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = obj
            doc = summary or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._summaries[key] = doc
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name.lower()]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def summary(self, name: str) -> str:
        return self._summaries[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


PATTERNS: Registry[Any] = Registry("pattern")
SCORES: Registry[Any] = Registry("score")
DISTRIBUTIONS: Registry[Any] = Registry("distribution")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")

ALL: dict[str, Registry[Any]] = {
    "patterns": PATTERNS,
    "scores": SCORES,
    "distributions": DISTRIBUTIONS,
    "models": MODELS,
    "datasets": DATASETS,
}
