"""Timing on this machine: interleaved medians, and a per-machine cache of what was measured."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from sparsecraft.kernels.build import _cpu_signature, cache_dir
from sparsecraft.utils import write_text_atomic


def interleaved_medians(candidates: dict[str, Callable[[], object]], budget_s: float = 0.06, rounds: int = 3,
                        min_reps: int = 5) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in alternating rounds.

    Alternating (dense, sparse, dense, ...) instead of one after the other spreads a burst of
    noise from another process over every candidate instead of penalising one.
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up: first-touch allocations, kernel compilation
    for _ in range(rounds):
        for name, fn in candidates.items():
            deadline = time.perf_counter() + budget_s / (rounds * len(candidates))
            reps = 0
            while reps < min_reps or time.perf_counter() < deadline:
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
                reps += 1
    return {name: statistics.median(values) for name, values in samples.items()}


class TimingCache:
    """Seconds per call keyed by what determines them (format, shape, density, tokens, threads, dtype).

    One JSON file per CPU model and kernel build, so a cache copied to another machine is ignored.
    """

    def __init__(self, path: Path | None = None) -> None:
        cpu = hashlib.sha256(_cpu_signature().encode()).hexdigest()[:12]
        self.path = path or cache_dir() / f"timings-{cpu}.json"
        try:
            self.entries: dict[str, float] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, seconds: float) -> None:
        self.entries[key] = seconds

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.entries, indent=0, sort_keys=True))
