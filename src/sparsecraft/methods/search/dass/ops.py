"""Candidate operations of the cell search space, dense (DARTS) and sparse (DASS).

- DARTS (Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR 2019): none,
  skip_connect, 3x3 max/avg pooling, separable convolutions 3x3/5x5 (ReLU-depthwise-pointwise-BN,
  applied twice) and dilated separable convolutions 3x3/5x5 (ReLU-depthwise(dilation 2)-pointwise-BN).
- DASS (Mousavi, Loni, Alibeigi, Daneshtalab, "DASS: Differentiable Architecture Search for Sparse
  neural networks", arXiv:2207.06968, ACM TECS 2023): the parametric operations are replaced by
  sparse ones, built from :class:`SparseConv2d` (a convolution whose weight carries a mask at the
  target sparsity); the classifier becomes a :class:`SparseLinear`.

Every factory in :data:`OPS` has the signature ``(C, stride, affine, sparsity, mask_mode) -> nn.Module``;
the dense operations ignore the last two.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.core.patterns import topk_mask, units_to_keep
from sparsecraft.errors import SparsecraftError

MASK_MODES = ("scores", "magnitude")


class _SparseWeight:
    """Shared by SparseConv2d and SparseLinear: an exact top-k mask on ``weight``, straight-through.

    ``scores`` (HYDRA, Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks",
    NeurIPS 2020): a learnable importance score per weight, the mask keeps the k largest |score|
    and the gradient reaches the scores through a straight-through estimator.
    ``magnitude``: the mask keeps the k largest |W|, recomputed at every forward; the gradient
    reaches every weight (pruned ones too), so the mask can change as the weights move.
    """

    weight: nn.Parameter
    sparsity: float
    mask_mode: str

    def _setup_sparse(self, sparsity: float, mask_mode: str, layer: str) -> None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise SparsecraftError(f"{layer}: sparsity={sparsity} is outside [0, 1); it is the fraction of weights removed")
        if mask_mode not in MASK_MODES:
            raise SparsecraftError(f"{layer}: mask_mode={mask_mode!r} is not one of {', '.join(MASK_MODES)}")
        self.sparsity, self.mask_mode = float(sparsity), mask_mode
        self.kept = units_to_keep(1.0 - self.sparsity, self.weight.numel())
        if mask_mode == "scores":
            # HYDRA's scaled initialisation: |W| rescaled to the range of a Kaiming-uniform weight
            fan_in = self.weight[0].numel()
            w = self.weight.detach().abs()
            self.scores = nn.Parameter(w * math.sqrt(6.0 / fan_in) / w.max().clamp_min(1e-12))
        else:
            self.register_parameter("scores", None)
        # non-persistent: it is recomputed from scores / weights; FLOP and sparsity counts read it
        self.register_buffer("weight_mask", torch.ones_like(self.weight), persistent=False)  # type: ignore[attr-defined]
        self._refresh_mask()

    @torch.no_grad()
    def _refresh_mask(self) -> Tensor:
        source = self.scores if self.mask_mode == "scores" else self.weight
        keep = topk_mask(source.detach().abs().reshape(-1).float(), self.kept).reshape(self.weight.shape)
        self.weight_mask.copy_(keep)  # type: ignore[operator]
        return self.weight_mask  # type: ignore[return-value]

    def masked_weight(self) -> Tensor:
        """W * mask in value; the mask's gradient goes straight through to the scores / weights."""
        mask = self._refresh_mask()
        if self.mask_mode == "scores":
            s = self.scores.abs()  # type: ignore[union-attr]
            return self.weight * (mask + (s - s.detach()))  # value: exactly the 0/1 mask
        w = self.weight
        return w + (w * mask - w).detach()  # value: W * mask; gradient: dense, to every weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity}, mask_mode={self.mask_mode}"  # type: ignore[misc]


class SparseConv2d(_SparseWeight, nn.Conv2d):
    """nn.Conv2d whose weight is masked at ``sparsity`` (DASS's sparse convolution)."""

    def __init__(self, *args, sparsity: float = 0.0, mask_mode: str = "scores", **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._setup_sparse(sparsity, mask_mode, f"SparseConv2d({self.in_channels}->{self.out_channels}, {self.kernel_size})")

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class SparseLinear(_SparseWeight, nn.Linear):
    """nn.Linear whose weight is masked at ``sparsity`` (DASS's sparse classifier)."""

    def __init__(self, *args, sparsity: float = 0.0, mask_mode: str = "scores", **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._setup_sparse(sparsity, mask_mode, f"SparseLinear({self.in_features}->{self.out_features})")

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1,
          sparsity: float | None = None, mask_mode: str = "scores") -> nn.Conv2d:
    """A bias-free conv: sparse when ``sparsity`` is given, else a plain nn.Conv2d."""
    args = (c_in, c_out, k, stride, padding, dilation, groups, False)
    return nn.Conv2d(*args) if sparsity is None else SparseConv2d(*args, sparsity=sparsity, mask_mode=mask_mode)


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv -> BN: the cells' input preprocessing."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__(nn.ReLU(), _conv(c_in, c_out, k, stride, padding), nn.BatchNorm2d(c_out, affine=affine))


class DilConv(nn.Sequential):
    """ReLU -> depthwise k x k (dilated) -> pointwise 1x1 -> BN."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int, dilation: int, affine: bool = True,
                 sparsity: float | None = None, mask_mode: str = "scores") -> None:
        super().__init__(
            nn.ReLU(),
            _conv(c_in, c_in, k, stride, padding, dilation, c_in, sparsity, mask_mode),
            _conv(c_in, c_out, 1, sparsity=sparsity, mask_mode=mask_mode),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two DilConv blocks without dilation; only the first one strides (DARTS's sep_conv)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int, affine: bool = True,
                 sparsity: float | None = None, mask_mode: str = "scores") -> None:
        super().__init__(
            DilConv(c_in, c_in, k, stride, padding, 1, affine, sparsity, mask_mode),
            DilConv(c_in, c_out, k, 1, padding, 1, affine, sparsity, mask_mode),
        )


class Zero(nn.Module):
    """The ``none`` operation: zeros of the output's shape (it lets an edge switch itself off)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convs, the second shifted by one pixel, concatenated.

    The shifted input is padded at the bottom/right so both halves have ceil(H/2) rows, as the
    3x3 stride-2 operations have, for odd sizes too.
    """

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        if c_out % 2:
            raise SparsecraftError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU()
        self.conv_1 = _conv(c_in, c_out // 2, 1, stride=2)
        self.conv_2 = _conv(c_in, c_out // 2, 1, stride=2)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


OpFactory = Callable[[int, int, bool, float, str], nn.Module]


def _skip(c: int, stride: int, affine: bool, sparsity: float, mode: str) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine)


def _sep(k: int, sparse: bool) -> OpFactory:
    return lambda c, stride, affine, sparsity, mode: SepConv(c, c, k, stride, k // 2, affine, sparsity if sparse else None, mode)


def _dil(k: int, sparse: bool) -> OpFactory:
    return lambda c, stride, affine, sparsity, mode: DilConv(c, c, k, stride, k - 1, 2, affine, sparsity if sparse else None, mode)


OPS: dict[str, OpFactory] = {
    "none": lambda c, stride, affine, sparsity, mode: Zero(stride),
    "skip_connect": _skip,
    "max_pool_3x3": lambda c, stride, affine, sparsity, mode: nn.MaxPool2d(3, stride, 1),
    "avg_pool_3x3": lambda c, stride, affine, sparsity, mode: nn.AvgPool2d(3, stride, 1, count_include_pad=False),
    "sep_conv_3x3": _sep(3, False),
    "sep_conv_5x5": _sep(5, False),
    "dil_conv_3x3": _dil(3, False),
    "dil_conv_5x5": _dil(5, False),
    "sparse_sep_conv_3x3": _sep(3, True),
    "sparse_sep_conv_5x5": _sep(5, True),
    "sparse_dil_conv_3x3": _dil(3, True),
    "sparse_dil_conv_5x5": _dil(5, True),
}

NON_PARAMETRIC = ["none", "skip_connect", "max_pool_3x3", "avg_pool_3x3"]
DARTS_OPS = NON_PARAMETRIC + ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
DASS_OPS = NON_PARAMETRIC + ["sparse_sep_conv_3x3", "sparse_sep_conv_5x5", "sparse_dil_conv_3x3", "sparse_dil_conv_5x5"]


def dense_name(op: str) -> str:
    """The dense operation with the same structure (a sparse op's name without ``sparse_``)."""
    return op.removeprefix("sparse_")


def check_ops(ops: list[str], where: str = "ops") -> list[str]:
    """Raise SparsecraftError for an empty list, a duplicate or an unknown name (listing the known ones)."""
    if not ops:
        raise SparsecraftError(f"{where}: give at least one candidate operation; known: {', '.join(OPS)}")
    for op in ops:
        if op not in OPS:
            raise SparsecraftError(f"{where}: unknown operation {op!r}; known: {', '.join(OPS)}")
    if len(set(ops)) != len(ops):
        raise SparsecraftError(f"{where}: {ops} lists an operation twice")
    if all(op == "none" for op in ops):
        raise SparsecraftError(f"{where}: 'none' alone leaves nothing to choose; add an operation")
    return list(ops)
