"""Whole-model speed: one forward pass, prefill and decode throughput (median of repetitions)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn


@torch.no_grad()
def forward_seconds(model: nn.Module, inputs: Tensor | dict, reps: int = 5) -> float:
    """Median seconds of one forward pass (after one warm-up)."""
    call = (lambda: model(**inputs)) if isinstance(inputs, dict) else (lambda: model(inputs))
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def decode_tokens_per_second(model: nn.Module, prompt: Tensor, new_tokens: int = 32, reps: int = 3,
                             **generate_kwargs) -> float:
    """Greedy generation at batch 1 with the KV cache: new tokens per second, prompt excluded.

    The prompt's prefill is timed separately and subtracted, so this is the one-token-at-a-time rate.
    ``generate_kwargs`` go to ``generate`` (e.g. ``cache_implementation="static"`` for a compiled model).
    """
    def generate(n: int) -> None:
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **generate_kwargs)

    generate(2)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        generate(1)  # the prefill and the first token
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        generate(new_tokens + 1)
        rates.append(new_tokens / max(time.perf_counter() - start - prefill, 1e-9))
    return statistics.median(rates)
