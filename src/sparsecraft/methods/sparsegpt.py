"""SparseGPT's layer solver (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot", ICML 2023), as a pure function on tensors.

Given a weight W (rows x cols) and the Hessian of the layer-wise reconstruction loss, H = X X^T
(cols x cols, accumulated over calibration inputs), columns are pruned left to right; after each
column the remaining ones absorb the error with the optimal-brain-surgeon update computed from the
upper Cholesky factor of H^-1 (row i of that factor is the OBS row for the columns i.. that remain).
The mask is chosen per block of ``block_size`` columns by the saliency w^2 / [chol(H^-1)]_ii^2
(adaptive mask selection), or, for N:M, per group of M columns as the group is reached. Updates
inside a block are applied lazily, in one matrix product per block. Computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsecraft.core.patterns import topk_mask
from sparsecraft.errors import PatternError, check_density


def inverse_hessian_factor(H: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of (H + lambda I)^-1, dead columns); lambda = damp * mean(diag H).

    Columns whose input was always zero (diag 0) get a unit diagonal and are pruned outright.
    If the factorisation fails the dampening grows tenfold, up to five times.
    """
    H = H.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(6):
        try:
            chol = torch.linalg.cholesky(H + damp * (10**attempt) * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True), dead
        except torch.linalg.LinAlgError:
            continue
    raise PatternError("SparseGPT: the Hessian stays singular after dampening x1e5; check the calibration inputs")


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Prune W (rows x cols) given H (cols x cols); returns (new weight, bool mask of kept weights).

    Unstructured: the layer keeps exactly floor((1 - sparsity) * rows * cols + 1/2) weights, chosen block by
    block (each block its share, rounded cumulatively).
    N:M (``n``, ``m`` > 0): exactly n kept in every group of m consecutive columns of each row.
    """
    rows, cols = W.shape
    if n or m:
        if not 0 < n < m or cols % m or block_size % m:
            raise PatternError(f"SparseGPT N:M needs 0 < N < M, M dividing {cols} columns and the block size {block_size}")
    else:
        check_density(1.0 - sparsity, "1 - sparsity")
    Hinv, dead = inverse_hessian_factor(H, damp)
    W = W.detach().to(torch.float32).clone()
    W[:, dead] = 0
    keep = torch.ones_like(W, dtype=torch.bool)
    kept_before = 0
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1 = W[:, b0:b1].clone()
        Hinv1 = Hinv[b0:b1, b0:b1]
        d = torch.diag(Hinv1)
        err = torch.zeros_like(W1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if not m:
            saliency = W1**2 / d.unsqueeze(0) ** 2
            # cumulative rounding: the layer keeps exactly floor(d * rows * cols + 1/2) in total
            kept = math.floor((1.0 - sparsity) * rows * b1 + 0.5) - kept_before
            kept_before += kept
            keep1 = topk_mask(saliency.reshape(-1), kept).reshape(W1.shape)
        for i in range(b1 - b0):
            if m and i % m == 0:
                saliency = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                order = torch.sort(saliency, dim=1, descending=True, stable=True).indices[:, :n]
                keep1[:, i : i + m] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, order, True)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            e = (w - q) / d[i]
            W1[:, i:] -= e.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            err[:, i] = e
        W[:, b0:b1] = W1
        keep[:, b0:b1] = keep1
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]
    keep &= ~dead.unsqueeze(0)
    return W * keep, keep
