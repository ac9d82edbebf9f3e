"""SparseGPT's solver against a slow, direct OBS reference (explicit inverses, one column at a time)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecraft.core.patterns import topk_mask
from sparsecraft.methods.sparsegpt import sparsegpt_prune


def correlated_inputs(cols: int, samples: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, cols // 2, generator=g, dtype=torch.float64)
    mix = torch.randn(cols // 2, cols, generator=g, dtype=torch.float64)
    return base @ mix + 0.1 * torch.randn(samples, cols, generator=g, dtype=torch.float64)


def slow_obs(W, H, sparsity=0.5, n=0, m=0, block=8, damp=0.01):
    """Column-by-column OBS with the inverse of the remaining columns' Hessian computed directly."""
    W = W.clone().double()
    H = H.clone().double()
    cols = W.shape[1]
    H = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    inv_rest = [torch.linalg.inv(H[j:, j:]) for j in range(cols)]  # H_F^-1 for F = {j, ..., cols-1}
    d = torch.tensor([inv_rest[j][0, 0] for j in range(cols)], dtype=W.dtype)
    keep = torch.ones_like(W, dtype=torch.bool)
    kept_before = 0
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        if not m:
            saliency = W[:, b0:b1] ** 2 / d[b0:b1]
            kept = math.floor((1 - sparsity) * W.shape[0] * b1 + 0.5) - kept_before  # cumulative rounding
            kept_before += kept
            keep[:, b0:b1] = topk_mask(saliency.reshape(-1), kept).reshape(saliency.shape)
        for j in range(b0, b1):
            if m and (j - b0) % m == 0:
                saliency = W[:, j : j + m] ** 2 / d[j : j + m]
                order = torch.sort(saliency, dim=1, descending=True, stable=True).indices[:, :n]
                keep[:, j : j + m] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, order, True)
            q = torch.where(keep[:, j], W[:, j], torch.zeros_like(W[:, j]))
            err = (W[:, j] - q) / inv_rest[j][0, 0]
            W[:, j:] -= err.unsqueeze(1) * inv_rest[j][0].unsqueeze(0)
            W[:, j] = q
    return W * keep, keep


@pytest.mark.parametrize(("sparsity", "n", "m"), [(0.5, 0, 0), (0.7, 0, 0), (0.5, 2, 4), (0.75, 1, 4)])
def test_sparsegpt_matches_the_slow_obs_reference(sparsity, n, m):
    torch.manual_seed(1)
    X = correlated_inputs(16)
    H = X.T @ X
    W = torch.randn(6, 16, dtype=torch.float64)
    fast, fast_keep = sparsegpt_prune(W, H, sparsity=sparsity, n=n, m=m, block_size=8)
    slow, slow_keep = slow_obs(W, H, sparsity=sparsity, n=n, m=m, block=8)
    assert torch.equal(fast_keep, slow_keep)
    assert torch.allclose(fast.double(), slow, rtol=1e-3, atol=1e-4)
    if m:
        assert bool((fast_keep.reshape(-1, m).sum(1) == n).all())
    else:
        assert int(fast_keep.sum()) == math.floor((1 - sparsity) * 6 * 16 + 0.5)  # exact for the layer


def test_sparsegpt_reconstructs_better_than_magnitude_on_correlated_inputs():
    torch.manual_seed(2)
    X = correlated_inputs(32, samples=512, seed=3).float()
    W = torch.randn(16, 32)
    pruned, keep = sparsegpt_prune(W, X.T @ X, sparsity=0.5, block_size=16)
    magnitude = W * topk_mask(W.abs().reshape(-1), W.numel() // 2).reshape(W.shape)
    error = lambda V: float(((X @ W.T) - (X @ V.T)).norm())  # noqa: E731
    assert error(pruned) < error(magnitude)
    assert int(keep.sum()) == W.numel() // 2


def test_dead_inputs_are_pruned_and_singular_hessians_are_dampened():
    X = correlated_inputs(8, samples=4).float()  # rank <= 4: singular without dampening
    X[:, 3] = 0  # an input that never fires
    W = torch.randn(4, 8)
    pruned, keep = sparsegpt_prune(W, X.T @ X, sparsity=0.25, block_size=8)
    assert not keep[:, 3].any()
    assert torch.isfinite(pruned).all()
