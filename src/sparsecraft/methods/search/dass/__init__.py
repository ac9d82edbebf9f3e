"""DASS (Mousavi, Loni, Alibeigi, Daneshtalab, "DASS: Differentiable Architecture Search for Sparse
neural networks", arXiv:2207.06968, ACM TECS 2023) against DARTS (Liu, Simonyan, Yang, ICLR 2019).

The full DASS text was not reachable when this was written, so this implements a documented
reading: DASS's candidate operations are DARTS's non-parametric ones (none, skip_connect, 3x3
max/avg pooling) plus *sparse* versions of its parametric ones (separable and dilated convolutions
built from :class:`SparseConv2d`, masked at the target sparsity), the classifier is a
:class:`SparseLinear`, and the search objective is DARTS's bi-level one evaluated on that sparse
supernet (weights and importance scores of the masked operations on the training half, alpha on
the validation loss of the same masked network). Plain DARTS is the same search with dense
operations and a dense objective; its network is pruned afterwards by the same sparse training.
"""

from sparsecraft.methods.search.dass.cells import MixedOp, SearchCell, SearchNetwork
from sparsecraft.methods.search.dass.genotype import DiscreteNetwork, Genotype, derive, genotype_to_dict, parse_genotype
from sparsecraft.methods.search.dass.ops import DARTS_OPS, DASS_OPS, OPS, SparseConv2d, SparseLinear
from sparsecraft.methods.search.dass.search import build_dass_architecture, darts_search, run_dass

__all__ = [
    "DARTS_OPS", "DASS_OPS", "OPS", "DiscreteNetwork", "Genotype", "MixedOp", "SearchCell", "SearchNetwork",
    "SparseConv2d", "SparseLinear", "build_dass_architecture", "darts_search", "derive", "genotype_to_dict",
    "parse_genotype", "run_dass",
]
