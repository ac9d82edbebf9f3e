"""sparse_linear as a torch custom op, for torch.compile.

The kernels are reached through ctypes, which dynamo cannot trace: each sparse layer would break the
compiled graph in two (a 30-block decoder: 210 breaks). Registered as ``sparsecraft::sparse_linear``
with a shape function, a sparse layer is one opaque node and the rest of the model (norms, attention,
activations) compiles around it. Eager calls do not come here: the op's dispatch costs microseconds
that a one-token product cannot spare.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from sparsecraft.kernels import ops
from sparsecraft.kernels.formats import SparseWeight


#: Kernel plans by everything they are built from (format, sizes, the arrays' addresses, lengths and
#: dtypes): an equal key is an identical plan, so a hit is always valid. Bounded: plans are ~100 bytes.
_PLANS: OrderedDict[tuple, tuple] = OrderedDict()
MAX_PLANS = 4096


# Defined through torch.library.Library rather than the torch.library.custom_op decorator: its
# dispatch cost 36 us a call against 7 us here (64x64 layer), on a path that runs 210 times per token.
_LIBRARY = torch.library.Library("sparsecraft", "DEF")
_LIBRARY.define("sparse_linear(Tensor x, Tensor[] arrays, Tensor? bias, str fmt, str names, int out_features, int n, "
                "int m, int[] block) -> Tensor")


def _sparse_linear_impl(x: Tensor, arrays: list[Tensor], bias: Tensor | None, fmt: str, names: str, out_features: int,
                        n: int, m: int, block: list[int]) -> Tensor:
    """y = x W^T + b for the format ``fmt`` whose arrays (named by the comma-separated ``names``) are given."""
    key = (fmt, out_features, x.shape[-1], n, m, *block, *[(a.data_ptr(), a.numel(), a.dtype) for a in arrays])
    plan = _PLANS.get(key)
    if plan is not None and plan[3] is not None and ops._one_token_fast(x, x.shape[-1], bias):
        return ops.run_one_token(plan[3], x, out_features, bias)  # decoding: no SparseWeight to build
    sw = SparseWeight(fmt, (out_features, x.shape[-1]), dict(zip(names.split(","), arrays)), n, m, tuple(block))
    if ops.fast_path_applies(x, sw):
        if plan is None:
            plan = _PLANS[key] = ops._plan(sw)  # the one-token plan's struct lives in the tuple: kept alive here
            if len(_PLANS) > MAX_PLANS:
                _PLANS.popitem(last=False)
        sw._plan = plan
    return ops.sparse_linear(x, sw, bias)  # a new tensor: the op's output aliases no input


_LIBRARY.impl("sparse_linear", _sparse_linear_impl, "CompositeExplicitAutograd")
sparse_linear_op = torch.ops.sparsecraft.sparse_linear.default


@torch.library.register_fake("sparsecraft::sparse_linear")
def _(x: Tensor, arrays: list[Tensor], bias: Tensor | None, fmt: str, names: str, out_features: int, n: int, m: int,
      block: list[int]) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)
