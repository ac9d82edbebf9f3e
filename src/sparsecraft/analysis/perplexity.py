"""Perplexity of a causal language model on non-overlapping token windows.

ppl = exp(total next-token negative log-likelihood / number of predicted tokens), each window
predicting its own tokens 2..L from the ones before (Wanda / SparseGPT protocol, no sliding context).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.utils import progress_bar


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Perplexity over ``windows`` (n, seqlen) of token ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for s in progress_bar(starts, "perplexity", enabled=progress):
        batch = windows[s : s + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
        del logits
    model.train(was_training)
    value = math.exp(nll / count)
    return value if math.isfinite(value) else float("inf")
