"""sparse_linear as a torch custom op, for torch.compile.

The kernels are reached through ctypes, which dynamo cannot trace: each sparse layer would break the
compiled graph in two (a 30-block decoder: 210 breaks). Registered as ``sparsecraft::sparse_linear``
with a shape function, a sparse layer is one opaque node and the rest of the model (norms, attention,
activations) compiles around it. Eager calls do not come here: the op's dispatch costs microseconds
that a one-token product cannot spare.

One token (decoding) takes ``sparsecraft::one_token`` instead where it could be built (torch_op.cpp,
about 6 us a call against 17 for this Python op).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from sparsecraft.kernels import ops
from sparsecraft.kernels.build import torch_op
from sparsecraft.kernels.formats import PAD, VALUE_DTYPES, SparseWeight


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
# Its CPU kernel comes from torch_op.cpp (build.torch_op); nothing calls it before that is loaded.
_LIBRARY.define("one_token(Tensor x, Tensor[] arrays, Tensor? bias, int kind, int vdtype, int out, int nnz, "
                "int min_work, int row_bytes, int bh, int bw) -> Tensor")
sparse_linear_op = torch.ops.sparsecraft.sparse_linear.default


@torch.library.register_fake("sparsecraft::sparse_linear")
def _(x: Tensor, arrays: list[Tensor], bias: Tensor | None, fmt: str, names: str, out_features: int, n: int, m: int,
      block: list[int]) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@torch.compiler.assume_constant_result
def _torch_op_ready() -> bool:
    """build.torch_op() run once at trace time, its answer a constant of the graph (it compiles and loads a library)."""
    return torch_op()


def compiled_sparse_linear(x: Tensor, arrays: dict[str, Tensor], bias: Tensor | None, fmt: str, out_features: int, n: int,
                           m: int, block: tuple[int, int]) -> Tensor:
    """The op a compiled graph calls for one sparse layer: one_token for one float32 token where it was built,
    sparse_linear otherwise. Decided at trace time (shapes, dtypes and the fmt are fixed in a graph)."""
    in_features = x.shape[-1]
    kind = ops.one_token_kind(fmt, n, m, in_features)
    if (kind is not None and x.numel() == in_features and x.dtype == torch.float32 and x.is_cpu and x.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())) and _torch_op_ready()):
        ordered, row_bytes = ops.one_token_arrays(fmt, arrays)
        values = arrays["values"]
        return torch.ops.sparsecraft.one_token.default(x, ordered, bias, kind, VALUE_DTYPES[values.dtype], out_features,
                                                       values.numel() - PAD, ops.MIN_WORK_PER_THREAD, row_bytes, *block)
    return sparse_linear_op(x, list(arrays.values()), bias, fmt, ",".join(arrays), out_features, n, m, list(block))


@torch.library.register_fake("sparsecraft::one_token")
def _(x: Tensor, arrays: list[Tensor], bias: Tensor | None, kind: int, vdtype: int, out: int, nnz: int, min_work: int,
      row_bytes: int, bh: int, bw: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out)
