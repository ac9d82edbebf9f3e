"""SAE training losses: reconstruction, the decoder-norm-weighted L1, AuxK and aux_zipf_loss.

All pure functions on tensors; ``pre`` are pre-activations [tokens, d_sae], ``W_dec`` [d_sae, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalized_mse(estimate: Tensor, target: Tensor) -> Tensor:
    """sum ||estimate - target||^2 / sum ||target - mean(target)||^2 over the batch: the fraction of
    variance unexplained (FVU), scale-free so coefficients transfer between sites and models."""
    centred = target - target.mean(dim=0, keepdim=True)
    return (estimate - target).pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12)


def l1_penalty(codes: Tensor, W_dec: Tensor) -> Tensor:
    """sum_i f_i ||W_dec,i||_2, averaged over tokens (Anthropic, "Circuits Updates - April 2024"):
    weighting by the decoder norm stops the optimiser from shrinking codes by growing decoder rows,
    so no unit-norm constraint is needed."""
    return (codes * W_dec.norm(dim=1)).sum(dim=-1).mean()


def _aux_reconstruction(pre: Tensor, eligible_scores: Tensor, W_dec: Tensor, k_aux: int) -> Tensor:
    """Decode (without bias) the top ``k_aux`` latents of each token by ``eligible_scores`` (-inf:
    not eligible), using their ReLU pre-activations as codes."""
    k = min(k_aux, int(torch.isfinite(eligible_scores[0]).sum()))
    top = eligible_scores.topk(k, dim=-1, sorted=False)  # fixed-size bags: no offsets, no dense codes
    return F.embedding_bag(top.indices, W_dec, mode="sum", per_sample_weights=pre.gather(-1, top.indices).relu())


def auxk_loss(pre: Tensor, dead: Tensor, residual: Tensor, W_dec: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", Sec. A.2): the top
    ``k_aux`` *dead* latents of each token reconstruct the main reconstruction's residual
    e = x - x_hat (pass it detached); the loss is NMSE(e_hat, e), scaled by min(#dead / k_aux, 1)
    as in EleutherAI's sparsify so a handful of dead latents do not dominate. Zero when none is dead.
    Use with coefficient 1/32 (the paper's alpha)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    scores = pre.masked_fill(~dead, float("-inf"))
    estimate = _aux_reconstruction(pre, scores, W_dec, k_aux)
    return min(n_dead / k_aux, 1.0) * normalized_mse(estimate, residual)


def zipf_target(density: Tensor, expected_l0: float, head: float = 0.5) -> Tensor:
    """A Zipf profile of feature densities, per feature: p_hat(r) = C r^-alpha at the feature's
    density rank r (1 = most frequent), alpha fitted on the log-log curve of the most frequent
    ``head`` fraction (the part that follows Zipf's law in trained SAEs, per Ayonrinde 2024), and
    C such that the densities sum to ``expected_l0`` (the average L0 the budget allows)."""
    n = density.numel()
    order = density.argsort(descending=True)
    ranks = torch.empty(n, dtype=density.dtype, device=density.device)
    ranks[order] = torch.arange(1, n + 1, dtype=density.dtype, device=density.device)
    top = max(2, int(n * head))
    sorted_density = density[order][:top]
    alive = sorted_density > 0
    if int(alive.sum()) >= 2:
        log_r = torch.log(torch.arange(1, top + 1, dtype=density.dtype, device=density.device))[alive]
        log_p = torch.log(sorted_density[alive])
        slope = ((log_r - log_r.mean()) * (log_p - log_p.mean())).sum() / (log_r - log_r.mean()).pow(2).sum().clamp_min(1e-12)
        alpha = float((-slope).clamp(0.0, 3.0))
    else:
        alpha = 1.0
    profile = ranks.pow(-alpha)
    return profile * (expected_l0 / profile.sum())


def zipf_deficit(density: Tensor, expected_l0: float) -> Tensor:
    """Per feature, how far its density falls short of its Zipf target: 1 - p / p_hat clamped to
    [0, 1] (1 for a dead feature, 0 for one at or above its target)."""
    return (1 - density / zipf_target(density, expected_l0).clamp_min(1e-12)).clamp(0.0, 1.0)


def aux_zipf_loss(pre: Tensor, deficit: Tensor, residual: Tensor, W_dec: Tensor, k_aux: int) -> Tensor:
    """aux_zipf_loss (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
    Choice Sparse Autoencoders"): AuxK generalised from dead to *underutilised* features.

    The paper's exact formula could not be read here; this is our reading of "generalises
    aux_k_loss", stated so it can be checked: every feature below its Zipf density target
    (``deficit`` > 0, from :func:`zipf_deficit`) is eligible; each token's top ``k_aux`` eligible
    features, ranked by deficit x ReLU(pre), reconstruct the residual e = x - x_hat with their
    ReLU pre-activations; the loss is min(#eligible / k_aux, 1) x NMSE(e_hat, e). With a 0/1
    deficit (dead or not) it is exactly :func:`auxk_loss`."""
    eligible = deficit > 0
    n = int(eligible.sum())
    if n == 0:
        return pre.new_zeros(())
    scores = (deficit * pre.relu()).masked_fill(~eligible, float("-inf"))
    estimate = _aux_reconstruction(pre, scores, W_dec, k_aux)
    return min(n / k_aux, 1.0) * normalized_mse(estimate, residual)
