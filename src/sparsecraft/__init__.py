"""sparsecraft: make neural networks sparse, and make the sparsity pay off.

Quick use::

    import sparsecraft as sc
    plan = sc.prune(model, sparsity=0.9, distribution="erk", optimizer=opt)
    print(sc.report(model, input_shape=(1, 3, 32, 32)))
    sc.finalize(model)   # plain nn.Module whose zeros are the masks
"""

from sparsecraft.analysis.report import SparsityReport, report
from sparsecraft.core.io import load_masks, read_masks, save_masks
from sparsecraft.core.masking import (
    apply_masks,
    dense_gradients,
    enforce_masks,
    finalize,
    load_sparse_state_dict,
    masks_of,
    remove_masks,
)
from sparsecraft.core.optimizers import bind_optimizer
from sparsecraft.core.patterns import parse_pattern
from sparsecraft.core.prune import PrunePlan, compute_masks, prune
from sparsecraft.core.scores import accumulate_gradients, register_score
from sparsecraft.core.selection import select
from sparsecraft.errors import SparsecraftError
from sparsecraft.registry import ALL as registries

__version__ = "0.1.0"

__all__ = [
    "PrunePlan",
    "SparsecraftError",
    "SparsityReport",
    "accumulate_gradients",
    "apply_masks",
    "bind_optimizer",
    "compute_masks",
    "dense_gradients",
    "enforce_masks",
    "finalize",
    "load_masks",
    "load_sparse_state_dict",
    "masks_of",
    "parse_pattern",
    "prune",
    "read_masks",
    "register_score",
    "registries",
    "remove_masks",
    "report",
    "save_masks",
    "select",
]
