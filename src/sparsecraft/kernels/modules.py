"""SparseLinear: a drop-in for nn.Linear (or GPT-2's Conv1D) whose weight lives in a sparse format."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsecraft.kernels.custom_op import compiled_sparse_linear
from sparsecraft.kernels.formats import SparseWeight, pack
from sparsecraft.kernels.ops import needs_grad, sparse_linear

#: Buffer names are the format's array names with this prefix (they appear so in state dicts).
PREFIX = "sparse_"


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def dense_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of an nn.Linear or a Conv1D (stored transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


class SparseLinear(nn.Module):
    """y = x W^T + b with W held only in its sparse format (no dense copy is kept).

    The format's arrays are buffers, so ``.to()``, ``state_dict`` and deep copies carry them;
    there is no ``weight`` attribute on purpose: code that needs the dense weight should ask for
    ``to_dense()`` and pay for it knowingly.
    """

    def __init__(self, sparse: SparseWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.fmt, self.n, self.m, self.block = sparse.fmt, sparse.n, sparse.m, sparse.block
        self.out_features, self.in_features = sparse.shape
        self._names = list(sparse.tensors)
        for name, tensor in sparse.tensors.items():
            self.register_buffer(PREFIX + name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._cached: SparseWeight | None = None

    @classmethod
    def from_dense(cls, module: nn.Module, fmt: str, dtype: torch.dtype = torch.float32, block: tuple[int, int] = (1, 1),
                   n: int = 0, m: int = 0, layer: str = "layer") -> SparseLinear:
        sparse = pack(dense_weight(module), fmt, n=n, m=m, block=block, dtype=dtype, layer=layer)
        return cls(sparse, module.bias)

    @property
    def sparse(self) -> SparseWeight:
        """The format view of the current buffers (rebuilt only after they were replaced, e.g. by .to())."""
        cached = self._cached
        buffers = self._buffers
        if cached is not None:  # a plain loop: this runs on every forward, where a generator costs a microsecond
            tensors = cached.tensors
            for name in self._names:
                if tensors[name] is not buffers[PREFIX + name]:
                    break
            else:
                return cached
        tensors = {name: buffers[PREFIX + name] for name in self._names}
        cached = self._cached = SparseWeight(self.fmt, (self.out_features, self.in_features), tensors, self.n, self.m, self.block)
        return cached

    def forward(self, x: Tensor) -> Tensor:
        # compiling: one opaque node for dynamo instead of a graph break at the C call (gradients: the eager path)
        if torch.compiler.is_compiling() and not needs_grad(x, self.bias):
            arrays = {name: self._buffers[PREFIX + name] for name in self._names}
            return compiled_sparse_linear(x, arrays, self.bias, self.fmt, self.out_features, self.n, self.m, self.block)
        return sparse_linear(x, self.sparse, self.bias)

    def to_dense(self) -> Tensor:
        return self.sparse.to_dense()

    def extra_repr(self) -> str:
        pattern = (f", {self.n}:{self.m}" if self.fmt == "nm" else f", block={self.block}" if self.fmt == "block"
                   else f", panel={self.block[0]}x{self.block[1]}" if self.fmt == "panels" else "")
        sw = self.sparse
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}{pattern}, "
                f"density={sw.density:.3f}, values={sw.values.dtype}, bias={self.bias is not None}")

    def __deepcopy__(self, memo: dict) -> SparseLinear:
        clone = SparseLinear(SparseWeight(self.fmt, (self.out_features, self.in_features),
                                          {k: v.clone() for k, v in self.sparse.tensors.items()}, self.n, self.m, self.block),
                             self.bias)
        memo[id(self)] = clone
        return clone
