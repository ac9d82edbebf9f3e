"""Synthetic sequence tasks for the built-in tiny Transformer (no download, exact labels).

``sort``: the model reads L random tokens, a separator, then writes them in ascending order, one
token per position (teacher forcing: position L + i sees the first i sorted tokens). Only the L
answer positions are scored; the others carry the label ``IGNORE`` (cross-entropy's ignore_index).
Sorting needs attention across the whole prompt, so it is a real test of a sparse Transformer.
"""

from __future__ import annotations

import torch

from sparsecraft.data.images import Split
from sparsecraft.registry import DATASETS

#: Label of positions that are not scored (``torch.nn.functional.cross_entropy``'s default ignore_index).
IGNORE = -100


@DATASETS.register("sort", "sort L random tokens (sequence task for the tiny Transformer; vocab = values + 1)")
def sort_task(n_train: int = 4000, n_test: int = 1000, length: int = 8, values: int = 16, seed: int = 0) -> Split:
    """Inputs (n, 2L) token ids in [0, values]; ``values`` is the separator. Labels (n, 2L)."""
    if length < 2 or values < 2:
        raise ValueError(f"sort task: length ({length}) and values ({values}) must be >= 2")
    gen = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = torch.randint(0, values, (n, length), generator=gen)
        answer = prompt.sort(dim=1).values
        separator = torch.full((n, 1), values)
        x = torch.cat([prompt, separator, answer[:, :-1]], dim=1)
        y = torch.cat([torch.full((n, length), IGNORE), answer], dim=1)
        return x, y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return Split(x_train, y_train, x_test, y_test)
