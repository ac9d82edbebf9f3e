"""One-token products that read only the weight columns of the inputs they keep (``sc_colskip``).

The weight must be stored transposed, (in, out) with unit stride along out, so that dropping an
input drops one contiguous run of memory; ``ColumnSkipPlan`` holds the fixed pointers so that a
decode step pays one ctypes call per layer and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsecraft.kernels.build import library

#: Multiply-adds below which a second thread costs more than it saves (as in kernels/ops.py).
MIN_WORK_PER_THREAD = 1 << 16


class ColumnSkipPlan:
    """y = bias + sum over kept i of x_i * wt[i], for one token, with the selection rule fixed.

    ``wt``: (in, out) float32 CPU view with ``wt.stride(1) == 1`` (e.g. a Linear weight stored
    column-major, or GPT-2's Conv1D weight as it is). Rule: ``k > 0`` keeps the k largest
    |x_i| * scale_i; ``k == 0`` keeps |x_i| * scale_i > tau_i (``tau`` None: the nonzeros).
    """

    def __init__(self, wt: Tensor, bias: Tensor | None, scale: Tensor | None, tau: Tensor | None, k: int) -> None:
        if wt.dtype != torch.float32 or (wt.stride(1) != 1 and wt.shape[1] > 1) or not wt.is_cpu:
            raise ValueError("ColumnSkipPlan needs a float32 CPU weight (in, out) with unit stride along out")
        self.lib = library()
        self.in_features, self.out_features = wt.shape
        # the plan owns references to every tensor whose pointer it holds
        self.keep = [t.contiguous().float() if t is not None else None for t in (bias, scale, tau)]
        self.wt = wt
        self.idx = torch.empty(self.in_features, dtype=torch.int32)
        self.score = torch.empty(self.in_features)
        self.k = int(k)
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        bias_p, scale_p, tau_p = (ptr(t) for t in self.keep)
        ld = wt.stride(0) if self.in_features > 1 else self.out_features  # a one-row view may report any stride
        self.args_head = (wt.data_ptr(), self.in_features, self.out_features, ld)
        self.args_mid = (scale_p, tau_p, self.k, bias_p)
        self.args_tail = (self.idx.data_ptr(), self.score.data_ptr())
        expected_kept = self.k if self.k else self.in_features // 2
        self.threads = max(1, min(torch.get_num_threads(), expected_kept * self.out_features // MIN_WORK_PER_THREAD))
        self.last_kept = 0

    def __call__(self, x: Tensor) -> Tensor:
        """x: one token, ``in`` contiguous float32 values (any leading shape of size 1)."""
        y = torch.empty(self.out_features)
        kept = self.lib.sc_colskip(*self.args_head, x.data_ptr(), *self.args_mid, y.data_ptr(), *self.args_tail, self.threads)
        if kept < 0:
            raise RuntimeError("sc_colskip rejected its arguments")
        self.last_kept = kept
        return y


def column_skip_available(x: Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.float32 and library() is not None
