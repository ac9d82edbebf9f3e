"""The math of training-free activation sparsity: pure functions on tensors.

- Magnitude thresholds (TEAL: Liu et al. 2024, "Training-Free Activation Sparsity in Large
  Language Models"): each Linear's input x_i is dropped when |x_i| <= tau, tau the
  ``sparsity``-quantile of |x| over calibration tokens.
- CHESS (He et al. 2024, "CHESS: Optimizing LLM Inference via Channel-Wise Thresholding and
  Selective Sparsification"): in a gated MLP down(act(gate(x)) * up(x)), dropping a_i = act(gate)_i
  costs about |a_i| * |u_i|; with E|u_i| from calibration, a_i is dropped when
  |a_i| * E|u_i| <= t, i.e. channel-wise thresholds tau_i = t / E|u_i|, t the quantile of the
  importance |a| * E|u|. Attention: only the inputs of the query and output projections are
  thresholded (keys and values, which are cached, stay exact), tensor-wise.
- WINA (Chen et al. 2025, "WINA: Weight Informed Neuron Activation for Accelerating Large
  Language Model Inference"): per token keep the k inputs with the largest |x_i| * ||W_{:,i}||_2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsecraft.errors import SparsecraftError


def check_sparsity(sparsity: float, field: str = "sparsity") -> float:
    """Activation sparsity must lie in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise SparsecraftError(f"{field}: {sparsity} is outside [0, 1); give the fraction of activations to drop, e.g. 0.5")
    return float(sparsity)


def quantile_threshold(scores: Tensor, sparsity: float) -> float:
    """tau such that the fraction of ``scores`` <= tau is ``sparsity`` (to 1/N): drop score <= tau.

    Sparsity 0 gives a negative tau, which keeps everything (scores are magnitudes).
    """
    flat = scores.reshape(-1).float()
    drop = int(math.floor(sparsity * flat.numel()))
    if drop == 0:
        return -1.0
    return float(flat.kthvalue(drop).values)


def chess_channel_thresholds(act_abs: Tensor, up_abs_mean: Tensor, sparsity: float) -> Tensor:
    """CHESS thresholds for the activation a (tokens, hidden) given E|u| (hidden,): tau_i = t / E|u_i|."""
    return channel_thresholds(quantile_threshold(act_abs * up_abs_mean, sparsity), up_abs_mean)


def channel_thresholds(t: float, up_abs_mean: Tensor) -> Tensor:
    """tau_i = t / E|u_i|: one threshold t on the importance |a_i| * E|u_i| as thresholds on |a_i|."""
    return t / up_abs_mean.clamp_min(torch.finfo(torch.float32).tiny)


def wina_column_norms(weight_out_in: Tensor) -> Tensor:
    """||W_{:,i}||_2 for W (out, in): WINA's weight term, one per input."""
    return weight_out_in.float().norm(dim=0)


def wina_keep(x: Tensor, column_norms: Tensor | None, k: int) -> Tensor:
    """WINA's per-token selection: a boolean mask of the k largest |x_i| * ||W_{:,i}||_2
    (``column_norms`` None: the k largest |x_i|)."""
    score = x.abs() if column_norms is None else x.abs() * column_norms
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1).indices, True)


def kept_inputs(width: int, sparsity: float) -> int:
    """Inputs a top-k rule keeps per token at ``sparsity`` (at least one)."""
    return max(1, round((1.0 - sparsity) * width))
