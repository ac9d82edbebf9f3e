"""The discrete cell DARTS derives from the relaxed one, its JSON form, and the network built from it.

Derivation (Liu et al., "DARTS", ICLR 2019, section 2.4): for each intermediate node keep the two
incoming edges whose strongest non-``none`` operation has the largest softmax weight, each with
that operation; the cell's output concatenates the intermediate nodes. The network built from a
genotype uses plain nn.Conv2d / nn.Linear: a DASS sparse operation becomes its dense counterpart
(same convolutions), and its sparsity is then given by the final sparse training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.search.dass.cells import SearchNetwork, cell_layout, preprocessing, stem
from sparsecraft.methods.search.dass.ops import OPS, dense_name

Edge = tuple[str, int]  # (operation, input state: 0/1 the previous cells, 2 + i intermediate node i)
CELL_KINDS = ("normal", "reduce")
KNOWN_OPS = [op for op in OPS if op != "none"]  # a discrete cell never keeps a `none` edge


@dataclass
class Genotype:
    normal: list[Edge]  # two edges per intermediate node, node by node
    normal_concat: list[int]
    reduce: list[Edge]
    reduce_concat: list[int]


def _derive_cell(weights: Tensor, ops: list[str], nodes: int) -> list[Edge]:
    usable = torch.tensor([op != "none" for op in ops])
    w = weights.detach().cpu().masked_fill(~usable, float("-inf"))
    gene: list[Edge] = []
    start = 0
    for i in range(nodes):
        block = w[start : start + 2 + i]
        strength = block.max(dim=1).values
        # the two strongest edges (stable sort: ties go to the earlier input), listed in input order
        chosen = sorted(torch.sort(strength, descending=True, stable=True).indices[:2].tolist())
        gene += [(ops[int(block[j].argmax())], j) for j in chosen]
        start += 2 + i
    return gene


def derive(network: SearchNetwork) -> Genotype:
    """The discrete cells of a supernet's current alphas."""
    concat = list(range(2, 2 + network.nodes))
    normal = _derive_cell(F.softmax(network.alphas_normal, dim=-1), network.ops, network.nodes)
    reduce = _derive_cell(F.softmax(network.alphas_reduce, dim=-1), network.ops, network.nodes)
    return Genotype(normal, list(concat), reduce, list(concat))


def genotype_to_dict(genotype: Genotype) -> dict[str, Any]:
    """JSON-able: ``{"normal": [[op, input], ...], "normal_concat": [...], "reduce": ..., "reduce_concat": ...}``."""
    out: dict[str, Any] = {}
    for kind in CELL_KINDS:
        out[kind] = [[op, int(j)] for op, j in getattr(genotype, kind)]
        out[f"{kind}_concat"] = [int(i) for i in getattr(genotype, f"{kind}_concat")]
    return out


def _parse_cell(data: dict[str, Any], kind: str) -> tuple[list[Edge], list[int]]:
    edges = data[kind]
    if not isinstance(edges, list) or not edges:
        raise SparsecraftError(f"genotype.{kind}: expected a non-empty list of [operation, input] pairs, got {edges!r}")
    if len(edges) % 2:
        raise SparsecraftError(f"genotype.{kind}: {len(edges)} edges is an odd number; every intermediate node takes exactly 2")
    gene: list[Edge] = []
    for n, edge in enumerate(edges):
        where = f"genotype.{kind}[{n}] (node {n // 2})"
        if not isinstance(edge, (list, tuple)) or len(edge) != 2:
            raise SparsecraftError(f"{where}: expected an [operation, input] pair, got {edge!r}")
        op, j = edge
        if op not in KNOWN_OPS:
            raise SparsecraftError(f"{where}: unknown operation {op!r}; known: {', '.join(KNOWN_OPS)}")
        inputs = 2 + n // 2
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < inputs:
            raise SparsecraftError(
                f"{where}: input {j!r} is out of range; node {n // 2} can read states 0..{inputs - 1} "
                "(0 and 1 are the two previous cells, 2 + i is intermediate node i)"
            )
        gene.append((op, j))
    concat = data[f"{kind}_concat"]
    nodes = len(edges) // 2
    valid = range(2, 2 + nodes)
    if not isinstance(concat, list) or not concat or any(isinstance(i, bool) or i not in valid for i in concat):
        raise SparsecraftError(
            f"genotype.{kind}_concat: {concat!r} must be a non-empty list of intermediate nodes {valid.start}..{valid.stop - 1}"
        )
    return gene, list(concat)


def parse_genotype(data: dict[str, Any]) -> Genotype:
    """A Genotype from its dict form; SparsecraftError says what is wrong in the cell description."""
    if not isinstance(data, dict):
        raise SparsecraftError(f"genotype: expected a dict with keys normal, normal_concat, reduce, reduce_concat; got {type(data).__name__}")
    missing = [k for kind in CELL_KINDS for k in (kind, f"{kind}_concat") if k not in data]
    if missing:
        raise SparsecraftError(f"genotype: missing key(s) {', '.join(missing)}; a genotype has normal, normal_concat, reduce, reduce_concat")
    normal, normal_concat = _parse_cell(data, "normal")
    reduce, reduce_concat = _parse_cell(data, "reduce")
    return Genotype(normal, normal_concat, reduce, reduce_concat)


class DiscreteCell(nn.Module):
    def __init__(self, gene: list[Edge], concat: list[int], c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.reduction, self.concat = reduction, list(concat)
        self.inputs = [j for _, j in gene]
        self.preprocess0, self.preprocess1 = preprocessing(c_pp, c_p, c, reduction_prev, affine=True)
        self.ops = nn.ModuleList(
            OPS[dense_name(op)](c, 2 if reduction and j < 2 else 1, True, 0.0, "scores") for op, j in gene
        )

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(0, len(self.ops), 2):
            a, b = self.inputs[i], self.inputs[i + 1]
            states.append(self.ops[i](states[a]) + self.ops[i + 1](states[b]))
        return torch.cat([states[i] for i in self.concat], dim=1)


class DiscreteNetwork(nn.Module):
    """The network of a genotype: stem (conv3x3 to 3C + BN), ``cells`` cells, global pool, nn.Linear."""

    def __init__(self, genotype: Genotype, in_channels: int, C: int, classes: int, cells: int = 3) -> None:
        super().__init__()
        self.genotype = genotype
        self.stem = stem(in_channels, 3 * C)

        def concat(reduction: bool) -> list[int]:
            return genotype.reduce_concat if reduction else genotype.normal_concat

        layout = cell_layout(C, cells, lambda reduction: len(concat(reduction)))
        self.cells = nn.ModuleList(
            DiscreteCell(genotype.reduce if reduction else genotype.normal, concat(reduction), c_pp, c_p, c, reduction, reduction_prev)
            for reduction, reduction_prev, c_pp, c_p, c in layout)
        c_p = len(concat(layout[-1][0])) * layout[-1][4]
        self.classifier = nn.Linear(c_p, classes)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))
