"""Wanda's score and selection rule."""

from __future__ import annotations

import pytest
import torch

from sparsecraft.errors import PatternError
from sparsecraft.methods.wanda import wanda_mask, wanda_scores


def test_wanda_score_is_weight_magnitude_times_input_norm():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, generator=g)
    X = torch.randn(40, 7, generator=g)  # tokens x features
    norm = X.norm(dim=0)
    scores = wanda_scores(W, norm)
    for i in range(5):
        for j in range(7):
            assert scores[i, j] == pytest.approx(abs(float(W[i, j])) * float(torch.sqrt((X[:, j] ** 2).sum())), rel=1e-5)


def test_wanda_compares_within_rows_and_follows_the_input_norm():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norm = torch.tensor([10.0, 1.0, 1.0, 1.0])  # a loud first feature rescues small weights in column 0
    mask = wanda_mask(W, norm, sparsity=0.5)
    assert mask.tolist() == [[True, False, False, True], [True, True, False, False]]
    assert (mask.sum(1) == 2).all()


def test_wanda_nm_groups_are_exact():
    g = torch.Generator().manual_seed(1)
    W, norm = torch.randn(8, 16, generator=g), torch.rand(16, generator=g)
    mask = wanda_mask(W, norm, n=2, m=4)
    assert bool((mask.reshape(-1, 4).sum(1) == 2).all())
    with pytest.raises(PatternError, match="input_norm has shape"):
        wanda_scores(W, torch.ones(15))
