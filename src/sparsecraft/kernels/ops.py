"""y = x W^T + b for a packed sparse W: the compiled kernels, or plain PyTorch when they are not there.

The kernels take X transposed, (in, T) with T padded to a multiple of 8, so that each kept
weight multiplies a contiguous run of tokens; one token (decoding) uses the vector itself. The
fallback (no compiler, another device, autograd) uses torch.sparse CSR: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecraft.errors import PatternError
from sparsecraft.kernels.build import OneTokenPlan, library
from sparsecraft.kernels.formats import VALUE_DTYPES, SparseWeight


#: Multiply-adds below which one more thread costs more than it saves (measured on 2 cores).
MIN_WORK_PER_THREAD = 1 << 16
#: Bytes of X one token tile may span (see token_tile): half a core's L2 here, so the tile stays there
#: while a thread's rows pick from it at random (1 MiB tiles were 1.3x slower at 90% on 4096x4096, T=256).
TILE_BYTES = int(os.environ.get("SPARSECRAFT_TILE_BYTES", 1 << 19))


def fast_path_applies(x: Tensor, sw: SparseWeight) -> bool:
    """Compiled kernels run on CPU tensors; anything else (CUDA, no compiler) takes the fallback."""
    return x.is_cpu and sw.values.is_cpu and library() is not None


class _SparseLinearFunction(torch.autograd.Function):
    """The kernel forward with a gradient for x (and bias); the sparse weight itself is frozen."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, sw: SparseWeight) -> Tensor:  # type: ignore[override]
        ctx.sw, ctx.has_bias = sw, bias is not None
        return _kernel(x, sw, bias)  # sparse_linear already made x and bias float32

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:  # type: ignore[override]
        grad_x = torch.sparse.mm(ctx.sw.torch_csr().t(), grad.t()).t()  # dY W, from W^T
        return grad_x, grad.sum(0) if ctx.has_bias else None, None


def sparse_linear(x: Tensor, sw: SparseWeight, bias: Tensor | None = None) -> Tensor:
    plan = sw._plan
    if plan is not None and plan[3] is not None and _one_token_fast(x, sw.shape[1], bias):
        # decoding: every microsecond of Python is paid 7 times per block per token
        return run_one_token(plan[3], x, sw.shape[0], bias)
    out_features, in_features = sw.shape
    if x.shape[-1] != in_features:
        raise PatternError(f"input has {x.shape[-1]} features, the sparse weight {sw.shape} expects {in_features}")
    # a plan exists only for a CPU weight with the kernels loaded: then only x's device is left to check
    if not x.is_cpu or (sw._plan is None and not fast_path_applies(x, sw)):
        return _fallback(x, sw, bias)
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.float()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    if needs_grad(x, bias):
        y = _SparseLinearFunction.apply(x.reshape(-1, in_features), bias, sw).view(*x.shape[:-1], out_features)
    else:
        y = _kernel(x, sw, bias)  # any leading dimensions: no reshape on the decode path (microseconds count)
    return y if dtype == torch.float32 else y.to(dtype)


def run_one_token(plan_address: int, x: Tensor, out_features: int, bias: Tensor | None) -> Tensor:
    """One token through a built plan (sc_run_one); x and bias passed _one_token_fast."""
    y = torch.empty(*x.shape[:-1], out_features)
    rc = library().sc_run_one(plan_address, x.data_ptr(), y.data_ptr(), None if bias is None else bias.data_ptr())
    if rc:
        raise RuntimeError(f"one-token sparse kernel failed with code {rc}")
    return y


def _one_token_fast(x: Tensor, in_features: int, bias: Tensor | None) -> bool:
    """One contiguous float32 token on the CPU, a float32 contiguous bias or none, no gradient to record."""
    if not (x.is_cpu and x.dtype == torch.float32 and x.shape[-1] == in_features and x.numel() == in_features
            and x.is_contiguous()):
        return False
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
        return False
    return not needs_grad(x, bias)


def needs_grad(x: Tensor, bias: Tensor | None) -> bool:
    """Autograd must record this product (the kernels have no backward of their own)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def _fallback(x: Tensor, sw: SparseWeight, bias: Tensor | None) -> Tensor:
    """torch.sparse CSR on any device: slower than the kernels, never wrong."""
    x2 = x.reshape(-1, sw.shape[1])
    y = torch.sparse.mm(sw.torch_csr().to(x.device), x2.float().t()).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], sw.shape[0])


def is_half_density_nm(n: int, m: int) -> bool:
    """2:4, 4:8, 1:2: every byte of the bitmask keeps exactly 4 inputs (the sc_nm_half decode kernel)."""
    return 2 * n == m and 8 % m == 0


#: OneTokenPlan.kind per format (sc_run_one); the N:M decoder at half density is kind 2.
_KINDS = {"csr16": 0, "bitmask": 1, "nm": 1, "block": 3, "panels": 4}
#: The arrays a one-token plan points at, in the order of the format's sc_ function (the values follow).
ONE_TOKEN_ARRAYS = {"csr16": ("row_ptr", "cols"), "bitmask": ("row_ptr", "bits"), "nm": ("row_ptr", "bits"),
                    "block": ("block_row_ptr", "block_cols"), "panels": ("group_ptr", "counts", "cols")}


def one_token_kind(fmt: str, n: int, m: int, in_features: int) -> int | None:
    """The plan kind of sc_run_one, or None where one token needs Python's help
    (the bitmask decoders read x 8 columns at a time: a width that is not a multiple of 8 is padded first)."""
    if fmt in ("bitmask", "nm") and in_features % 8:
        return None
    return 2 if fmt == "nm" and is_half_density_nm(n, m) else _KINDS[fmt]


def one_token_arrays(fmt: str, tensors: dict[str, Tensor]) -> tuple[list[Tensor], int]:
    """The arrays a one-token plan points at (ONE_TOKEN_ARRAYS, then the values) and the bitmask's bytes
    per row (0 for formats without one)."""
    arrays = [tensors[name] for name in ONE_TOKEN_ARRAYS[fmt]] + [tensors["values"]]
    return arrays, tensors["bits"].shape[1] if "bits" in tensors else 0


def _one_token_plan(sw: SparseWeight, vdtype: int) -> OneTokenPlan | None:
    """The sc_run_one plan, or None (see one_token_kind)."""
    out, inp = sw.shape
    kind = one_token_kind(sw.fmt, sw.n, sw.m, inp)
    if kind is None:
        return None
    arrays, row_bytes = one_token_arrays(sw.fmt, sw.tensors)
    ptrs = [a.data_ptr() for a in arrays[:-1]]
    ptrs += [None] * (3 - len(ptrs))
    return OneTokenPlan(kind, vdtype, out, inp, sw.nnz, MIN_WORK_PER_THREAD, row_bytes, *ptrs, arrays[-1].data_ptr(), *sw.block)


def _plan(sw: SparseWeight) -> tuple:
    """The library function, its fixed leading arguments (pointers into the format's arrays), nnz and the
    one-token plan's address (or None), built once."""
    if sw._plan is None:
        lib, t, vdtype = library(), sw.tensors, VALUE_DTYPES[sw.values.dtype]
        if sw.fmt == "csr16":
            prefix = (t["row_ptr"].data_ptr(), t["cols"].data_ptr(), t["values"].data_ptr(), vdtype)
            sw._plan = (lib.sc_csr16, prefix, sw.nnz)
        elif sw.fmt == "nm" and is_half_density_nm(sw.n, sw.m):
            prefix = (t["row_ptr"].data_ptr(), t["bits"].data_ptr(), t["bits"].shape[1], t["values"].data_ptr(), vdtype)
            sw._plan = (lib.sc_nm_half, prefix, sw.nnz)
        elif sw.fmt in ("bitmask", "nm"):
            prefix = (t["row_ptr"].data_ptr(), t["bits"].data_ptr(), t["bits"].shape[1], t["values"].data_ptr(), vdtype)
            sw._plan = (lib.sc_bitmask, prefix, sw.nnz)
        elif sw.fmt == "panels":
            prefix = (t["group_ptr"].data_ptr(), t["counts"].data_ptr(), t["cols"].data_ptr(), t["values"].data_ptr(), vdtype,
                      *sw.block)
            sw._plan = (lib.sc_panels, prefix, sw.nnz)
        else:
            prefix = (t["block_row_ptr"].data_ptr(), t["block_cols"].data_ptr(), t["values"].data_ptr(), vdtype, *sw.block)
            sw._plan = (lib.sc_block, prefix, sw.nnz)
        one = _one_token_plan(sw, vdtype)  # kept in the tuple: its address is only valid while it lives
        sw._plan = (*sw._plan, None if one is None else ctypes.addressof(one), one)
    return sw._plan


def _kernel(x: Tensor, sw: SparseWeight, bias: Tensor | None) -> Tensor:
    """y (*lead, out) for x (*lead, in), float32 on CPU."""
    fn, prefix, nnz = _plan(sw)[:3]
    out_features, in_features = sw.shape
    tokens = x.numel() // in_features if in_features else 0
    y = torch.empty(x.shape[:-1] + (out_features,))
    if tokens == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand_as(y))
    # waking a second thread costs microseconds (a time slice on a busy machine): small products run on one
    threads = max(1, min(torch.get_num_threads(), nnz * max(tokens, 8) // MIN_WORK_PER_THREAD))
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # held in a local: a temporary's pointer would dangle during the call
    if not x.is_contiguous():
        x = x.contiguous()
    if tokens == 1:
        tp = tile = 1
        xt = x
        if in_features % 8 and sw.fmt in ("bitmask", "nm"):  # the bitmask kernels read x 8 columns at a time
            xt = F.pad(x.reshape(1, in_features), (0, 8 - in_features % 8))
    else:
        tp = (tokens + 7) // 8 * 8
        # panels keep one panel of X in the L1 whatever the tile's size: the widest register block always
        tile = min(64, tp) if sw.fmt == "panels" else token_tile(in_features, tp)
        xt = torch.empty(in_features * tp)  # tiles of `tile` tokens, each (in, tile) row-major
        library().sc_transpose_pad(x.data_ptr(), tokens, in_features, xt.data_ptr(), tp, tile, threads)
    rc = fn(*prefix, xt.data_ptr(), y.data_ptr(), None if bias is None else bias.data_ptr(), out_features, in_features,
            tp, tokens, tile, threads)
    if rc:
        raise RuntimeError(f"sparse kernel {sw.fmt} failed with code {rc}")
    return y


def token_tile(in_features: int, tp: int) -> int:
    """Tokens per tile of X: the largest of 64, 32, 16, 8 whose tile (in x tile floats) fits TILE_BYTES.

    Powers of two because a tile runs as 64-, 32-, 16- and 8-token register blocks: a 40-token
    tile (32 + 8) ran 1.3x slower than a 64- or a 16-token one on 768x3072 (2026-12-03).
    """
    tile = next((t for t in (64, 32, 16) if t * 4 * in_features <= TILE_BYTES), 8)
    return min(tile, tp)
