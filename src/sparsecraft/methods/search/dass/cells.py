"""The continuous relaxation of DARTS (Liu et al., ICLR 2019): mixed edges, search cells, the supernet.

A cell is a DAG with two input nodes (the outputs of the two previous cells) and ``nodes``
intermediate nodes; node i sums one MixedOp per earlier node (2 + i edges). A MixedOp's output is
the softmax(alpha)-weighted sum of every candidate operation. The cell's output concatenates the
intermediate nodes. Reduction cells sit at 1/3 and 2/3 of the depth: their edges from the inputs
stride 2 and they double the channels. With sparse candidate operations (and a SparseLinear
classifier) this is DASS's sparse supernet (Mousavi et al., arXiv:2207.06968).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.methods.search.dass.ops import DARTS_OPS, OPS, FactorizedReduce, ReLUConvBN, SparseLinear, check_ops


def reduction_cells(cells: int) -> set[int]:
    """Indices of the reduction cells: at 1/3 and 2/3 of the depth, as DARTS places them."""
    return {cells // 3, 2 * cells // 3}


def cell_layout(C: int, cells: int, outputs: Callable[[bool], int]) -> list[tuple[bool, bool, int, int, int]]:
    """(reduction, reduction_prev, c_pp, c_p, c) of every cell after a 3C-channel stem; a cell's
    output has ``outputs(reduction)`` x c channels (the nodes it concatenates); reductions double c."""
    layout, c_pp, c_p, c, reduction_prev = [], 3 * C, 3 * C, C, False
    reductions = reduction_cells(cells)
    for i in range(cells):
        reduction = i in reductions
        c = 2 * c if reduction else c
        layout.append((reduction, reduction_prev, c_pp, c_p, c))
        reduction_prev, c_pp, c_p = reduction, c_p, outputs(reduction) * c
    return layout


def preprocessing(c_pp: int, c_p: int, c: int, reduction_prev: bool, affine: bool) -> tuple[nn.Module, nn.Module]:
    """Bring both cell inputs to C channels and one resolution (s0 is twice as large after a reduction)."""
    pre0 = FactorizedReduce(c_pp, c, affine) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0, affine)
    return pre0, ReLUConvBN(c_p, c, 1, 1, 0, affine)


def stem(in_channels: int, c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


class MixedOp(nn.Module):
    """One edge: sum_o softmax(alpha)_o * o(x) over the candidate operations."""

    def __init__(self, c: int, stride: int, ops: list[str], sparsity: float = 0.0, mask_mode: str = "scores") -> None:
        super().__init__()
        self.names = list(ops)
        candidates = []
        for name in ops:
            op = OPS[name](c, stride, False, sparsity, mask_mode)
            if "pool" in name:  # DARTS: pooling gets a BN without affine so its scale matches the convs'
                op = nn.Sequential(op, nn.BatchNorm2d(c, affine=False))
            candidates.append(op)
        self.ops = nn.ModuleList(candidates)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))  # type: ignore[return-value]


class SearchCell(nn.Module):
    def __init__(self, nodes: int, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool,
                 ops: list[str], sparsity: float = 0.0, mask_mode: str = "scores") -> None:
        super().__init__()
        self.nodes, self.reduction = nodes, reduction
        self.preprocess0, self.preprocess1 = preprocessing(c_pp, c_p, c, reduction_prev, affine=False)
        # edges in order: node 0's inputs (0, 1), node 1's (0, 1, 2), ...; inputs 0/1 stride in a reduction cell
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if reduction and j < 2 else 1, ops, sparsity, mask_mode)
            for i in range(nodes) for j in range(2 + i)
        )

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.nodes):
            n = len(states)
            states.append(sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)))  # type: ignore[arg-type]
            offset += n
        return torch.cat(states[2:], dim=1)


def edges_per_cell(nodes: int) -> int:
    return sum(2 + i for i in range(nodes))


class SearchNetwork(nn.Module):
    """The DARTS / DASS supernet: stem (conv3x3 to 3C + BN), ``cells`` search cells, global pool, classifier.

    ``arch_parameters()`` are the two alpha matrices (normal, reduce), one row per edge and one
    column per operation; ``weight_parameters()`` is everything else (including sparse ops' scores).
    """

    def __init__(self, in_channels: int, C: int, classes: int, cells: int = 3, nodes: int = 3,
                 ops: list[str] | None = None, sparsity: float = 0.0, mask_mode: str = "scores",
                 sparse_classifier: bool = False) -> None:
        super().__init__()
        self.ops = check_ops(list(ops or DARTS_OPS))
        self.in_channels, self.C, self.classes, self.n_cells, self.nodes = in_channels, C, classes, cells, nodes
        self.stem = stem(in_channels, 3 * C)
        layout = cell_layout(C, cells, lambda reduction: nodes)
        self.cells = nn.ModuleList(SearchCell(nodes, c_pp, c_p, c, reduction, reduction_prev, self.ops, sparsity, mask_mode)
                                   for reduction, reduction_prev, c_pp, c_p, c in layout)
        c_p = nodes * layout[-1][4]
        self.classifier = SparseLinear(c_p, classes, sparsity=sparsity, mask_mode=mask_mode) if sparse_classifier else nn.Linear(c_p, classes)
        k, n_ops = edges_per_cell(nodes), len(self.ops)
        # DARTS initialises alpha at 1e-3 * N(0, 1): all operations start almost equally weighted
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, n_ops))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, n_ops))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def forward(self, x: Tensor) -> Tensor:
        w_normal, w_reduce = F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))
