"""Fast sparse formats and CPU kernels; ``accelerate(model)`` swaps pruned layers for them."""

from sparsecraft.kernels.accelerate import AccelerationReport, LayerDecision, accelerate
from sparsecraft.kernels.build import available
from sparsecraft.kernels.formats import FORMATS, SparseWeight, pack
from sparsecraft.kernels.modules import SparseLinear
from sparsecraft.kernels.ops import sparse_linear
from sparsecraft.kernels.serialize import load_sparse, save_sparse

__all__ = [
    "FORMATS", "AccelerationReport", "LayerDecision", "SparseLinear", "SparseWeight", "accelerate", "available", "pack",
    "load_sparse", "save_sparse", "sparse_linear",
]
