"""Modules that drop small activations at inference, and read only the weights of the rest.

``ActivationSparseLinear`` replaces a Linear (or GPT-2 Conv1D) and zeros part of its *input*
per token before the product: inputs whose score |x_i| * scale_i is at most tau_i (thresholds:
TEAL, CHESS), or all but the k best scores (WINA). ``ThresholdedActivation`` does the same to an
activation function's output (CHESS's channel-wise FFN thresholds), so that the down projection
after it sees exact zeros, which it skips without changing the result.

When it applies (``mode``): ``"decode"`` (the default) sparsifies only calls with one position
per sequence, so a batched prefill is computed exactly as the dense model does, and generation
only approximates from the first new token on; ``"all"`` sparsifies every call, which is what
perplexity evaluation of the method needs (``sparsify_everywhere`` switches a model to it for a
block of code). For one token on CPU the product runs in ``sc_colskip``, which reads only the
kept inputs' weight columns; elsewhere the masked input goes through the dense product, which
gives the same result.

Parameters keep their original names (``...down_proj.weight``): ``state_dict`` and
``save_pretrained`` of a swapped model are those of the plain model, and the thresholds travel
in a file of their own (see ``methods/activation/io.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecraft.kernels.activation_ops import MIN_WORK_PER_THREAD, ColumnSkipPlan, column_skip_available
from sparsecraft.kernels.build import library
from sparsecraft.kernels.modules import is_conv1d
from sparsecraft.methods.activation.thresholds import wina_keep

MODES = ("decode", "all")


def _is_one_position(x: Tensor) -> bool:
    return x.dim() < 2 or x.shape[-2] == 1


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}; 'decode' keeps prefill exact")
    return mode


class ActivationSparseLinear(nn.Module):
    """y = W (x * keep(x)) + b with keep(x)_i = score_i > tau_i, or score_i among the k largest.

    score_i = |x_i| * scale_i (scale None: 1). ``tau`` None with ``k == 0`` keeps the nonzeros,
    which is exact: use it after an activation that produces zeros.
    """

    def __init__(self, module: nn.Module, *, tau: Tensor | None = None, scale: Tensor | None = None, k: int = 0,
                 mode: str = "decode") -> None:
        super().__init__()
        self.transposed = is_conv1d(module)  # GPT-2: weight (in, out), y = x W + b
        weight = module.weight
        self.in_features, self.out_features = (weight.shape if self.transposed else weight.shape[::-1])
        if not self.transposed and weight.stride(0) != 1:
            # store W column-major, so that each input's weights are one contiguous run (same values, same name)
            weight.data = weight.data.t().contiguous().t()
        self.weight = weight
        self.bias = module.bias
        if not 0 <= k <= self.in_features:
            raise ValueError(f"k: {k} outside 0..{self.in_features} (the layer's input width)")
        self.k = int(k)
        self.register_buffer("tau", None if tau is None else tau.detach().float().expand(self.in_features).clone(), persistent=False)
        self.register_buffer("scale", None if scale is None else scale.detach().float().reshape(self.in_features).clone(),
                             persistent=False)
        self.mode = _check_mode(mode)
        self.everywhere = False  # set by sparsify_everywhere()
        self._plan: ColumnSkipPlan | None = None
        self._plan_key = 0  # torch's thread count the plan was sized for

    @property
    def rule(self) -> str:
        return f"top-{self.k}" if self.k else ("nonzero" if self.tau is None else "threshold")

    def _wt(self) -> Tensor:
        return self.weight if self.transposed else self.weight.t()

    def dense(self, x: Tensor) -> Tensor:
        if self.transposed:
            y = x @ self.weight
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)

    def keep_mask(self, x: Tensor) -> Tensor:
        """Boolean mask of the inputs kept, per token (the rule the kernel applies)."""
        if self.k:
            return wina_keep(x, self.scale, self.k)
        score = x.abs() if self.scale is None else x.abs() * self.scale
        return score > (0.0 if self.tau is None else self.tau)

    def _column_skip(self, x: Tensor) -> ColumnSkipPlan | None:
        """The kernel plan for a one-token call, rebuilt when a tensor it points into was replaced."""
        plan = self._plan
        if plan is not None and plan.wt.data_ptr() == self.weight.data_ptr() and self._plan_key == torch.get_num_threads():
            return plan
        if not (column_skip_available(x) and self.weight.dtype == torch.float32 and self.weight.is_cpu
                and (self._wt().stride(1) == 1 or self.out_features == 1)):
            return None
        self._plan, self._plan_key = ColumnSkipPlan(self._wt(), self.bias, self.scale, self.tau, self.k), torch.get_num_threads()
        return self._plan

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == self.in_features and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
            plan = self._column_skip(x)  # one token: sparsified in every mode (decode is what "decode" means)
            if plan is not None:
                return plan(x.contiguous()).view(x.shape[:-1] + (self.out_features,))
        if not (self.mode == "all" or self.everywhere or _is_one_position(x)):
            return self.dense(x)
        return self.dense(x * self.keep_mask(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rule={self.rule}, mode={self.mode}"


class ThresholdedActivation(nn.Module):
    """act(g) with entries |act(g)_i| <= tau_i set to zero (CHESS's channel-wise thresholds)."""

    def __init__(self, act: nn.Module, tau: Tensor, mode: str = "decode") -> None:
        super().__init__()
        self.act = act
        self.register_buffer("tau", tau.detach().float().clone(), persistent=False)
        self.mode = _check_mode(mode)
        self.everywhere = False

    def forward(self, g: Tensor) -> Tensor:
        a = self.act(g)
        if not (self.mode == "all" or self.everywhere or _is_one_position(a)):
            return a
        return a * (a.abs() > self.tau)


class RowSkipGatedMLP(nn.Module):
    """A gated MLP down(act(gate(x)) * up(x)) whose activation is thresholded (CHESS): for one token
    on CPU the up projection's rows of dropped activations are not read (``sc_gated_rows``) and
    the down projection then skips the same zeros; every other call runs as the original.

    Holds the original submodules under their names (``gate_proj``, ``up_proj``, ``down_proj``,
    ``act_fn``), so parameter names do not change.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def _fast(self, x: Tensor) -> bool:
        w = self.up_proj.weight
        return (x.numel() == w.shape[1] and x.dtype == w.dtype == torch.float32 and isinstance(self.act_fn, ThresholdedActivation)
                and type(self.up_proj) is nn.Linear and w.stride(1) == 1 and not (torch.is_grad_enabled() and x.requires_grad)
                and column_skip_available(x) and w.is_cpu)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fast(x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        x = x.contiguous()
        a = self.act_fn(self.gate_proj(x)).contiguous()  # one token: thresholded in every mode
        w, bias = self.up_proj.weight, self.up_proj.bias
        bias = None if bias is None else bias.contiguous()  # a local: a temporary's pointer would dangle during the call
        hidden, width = w.shape
        h = torch.empty(a.shape)
        kept_work = hidden * width // 2
        threads = max(1, min(torch.get_num_threads(), kept_work // MIN_WORK_PER_THREAD))
        library().sc_gated_rows(w.data_ptr(), hidden, width, w.stride(0), x.data_ptr(), a.data_ptr(),
                                None if bias is None else bias.data_ptr(), h.data_ptr(), threads)
        return self.down_proj(h)


SPARSE_MODULES = (ActivationSparseLinear, ThresholdedActivation)


@contextmanager
def sparsify_everywhere(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every activation-sparse module sparsifies every call (prefill included),
    as token-by-token decoding would: how perplexity of an activation-sparse model is measured."""
    modules = [m for m in model.modules() if isinstance(m, SPARSE_MODULES)]
    for m in modules:
        m.everywhere = True
    try:
        yield model
    finally:
        for m in modules:
            m.everywhere = False
