"""The sparse autoencoder (and transcoder) module and its configuration.

Layout follows SAELens, so the weights map one to one: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae],
``W_dec`` [d_sae, d_out], ``b_dec`` [d_out]. An SAE reconstructs its input (d_out = d_in) and
subtracts ``b_dec`` before encoding (Bricken et al. 2023; Gao et al. 2024); a transcoder (Dunefsky
et al. 2024, "Transcoders Find Interpretable LLM Feature Circuits") maps the MLP's input to the
MLP's output, so nothing is subtracted and ``b_dec`` is the output bias.

Batch-level kinds (BatchTopK, Mutual Choice, Feature Choice) select over the whole batch while
training; in eval mode a token's code must not depend on its batch, so they keep every
pre-activation above ``threshold`` (a JumpReLU): for BatchTopK and Mutual Choice one value for all
latents, the mean over batches of the smallest kept value (Bussmann et al. 2024's inference rule);
for Feature Choice one per latent, the mean of that latent's smallest kept value (its m-th largest
pre-activation), so each latent keeps firing on about the m tokens per batch it was trained to.
:func:`estimate_threshold` computes them from batches with the final weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.sae import allocate

KINDS = ("relu", "topk", "batchtopk", "feature_choice", "mutual_choice")
#: kinds whose training selection is over the batch, hence a threshold at inference
BATCH_KINDS = ("batchtopk", "feature_choice", "mutual_choice")
#: kinds with unit-norm decoder rows (ReLU + L1 weights its penalty by the norms instead)
UNIT_NORM_KINDS = ("topk", "batchtopk", "feature_choice", "mutual_choice")


@dataclass
class SAEConfig:
    """Everything that defines an SAE's function (saved beside its weights as JSON)."""

    kind: str
    d_in: int
    d_sae: int
    k: int = 32  # selected features per token (topk) or on average (batch kinds)
    d_out: int | None = None  # transcoders: the target's width (default d_in)
    transcoder: bool = False
    l1_coefficient: float = 5.0  # relu only
    hook: str = ""  # where the input is read, e.g. blocks.15.resid_post
    target_hook: str = ""  # transcoders: where the target is read (and the output spliced)
    model: str = ""  # what it was trained on (informative)
    outlier_factor: float = 10.0  # tokens with norm > factor x median are not its job (activations.py)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SparsecraftError(f"sae.kind: {self.kind!r} is unknown; choose one of {', '.join(KINDS)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SparsecraftError(f"sae: d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        if self.kind != "relu" and not 0 < self.k <= self.d_sae:
            raise SparsecraftError(f"sae.k: {self.k} must be in [1, d_sae = {self.d_sae}]; lower k or raise the expansion")
        if self.d_out is None:
            self.d_out = self.d_in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sparse_decode(codes: Tensor, W_dec: Tensor) -> Tensor:
    """``codes @ W_dec`` reading only the decoder rows of non-zero codes (allocate.decode): with
    k of d_sae latents active the product costs k/d_sae of the dense one, forward and backward
    (the gradient reaches the kept codes and the rows they read)."""
    flat = codes.reshape(-1, codes.shape[-1])
    rows, cols = flat.nonzero(as_tuple=True)
    out = allocate.decode(allocate.Selection(rows, cols, flat[rows, cols]), W_dec, flat.shape[0])
    return out.reshape(*codes.shape[:-1], W_dec.shape[-1])


class SparseAutoencoder(nn.Module):
    """x -> z = select(W_enc^T (x - b_dec) + b_enc) -> x_hat = z W_dec + b_dec."""

    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.W_enc = nn.Parameter(torch.empty(c.d_in, c.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae))
        self.W_dec = nn.Parameter(torch.empty(c.d_sae, c.d_out))
        self.b_dec = nn.Parameter(torch.zeros(c.d_out))
        self.register_buffer("threshold", torch.zeros(c.d_sae))  # batch kinds, eval mode (JumpReLU)
        self.reset_parameters()

    @property
    def kind(self) -> str:
        return self.config.kind

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows random unit vectors, encoder their transpose (Gao et al.: it avoids dead
        latents at the start); for transcoders the encoder is drawn on its own."""
        with torch.no_grad():
            self.W_dec.copy_(torch.randn(self.W_dec.shape, generator=generator))
            self.normalize_decoder()
            if self.config.transcoder or self.config.d_in != self.config.d_out:
                self.W_enc.copy_(torch.randn(self.W_enc.shape, generator=generator) / self.config.d_in ** 0.5)
            else:
                self.W_enc.copy_(self.W_dec.T)
            self.b_enc.zero_()

    # -- the function --------------------------------------------------------------------------

    def pre_activations(self, x: Tensor) -> Tensor:
        if self.config.transcoder:
            return x @ self.W_enc + self.b_enc
        # (x - b_dec) W_enc + b_enc with the bias folded: the activations need no gradient, so the
        # backward pass runs one large matrix product (for W_enc), not two
        return x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)

    def allocation(self, pre: Tensor) -> allocate.Selection:
        """The training-mode selection of ``pre`` [tokens, d_sae] as kept (token, latent, value) entries."""
        kind, k = self.kind, self.config.k
        if kind == "relu":
            return allocate.select_relu(pre)
        if kind == "topk":
            return allocate.select_topk(pre, k)
        if kind == "feature_choice":
            return allocate.select_feature_choice(pre, allocate.feature_capacity(k, pre.shape[0], pre.shape[1]))
        return allocate.select_budget(pre, k * pre.shape[0])  # batchtopk and mutual_choice: the same allocation

    def select(self, pre: Tensor) -> Tensor:
        """The codes: the kind's allocation in training mode, its per-token rule in eval mode."""
        if self.kind == "relu":
            return allocate.relu(pre)
        if self.kind in BATCH_KINDS and not self.training:
            return torch.where(pre > self.threshold, pre, torch.zeros_like(pre)).relu()
        flat = pre.reshape(-1, pre.shape[-1])
        return allocate.dense(self.allocation(flat), flat).view_as(pre)

    def encode(self, x: Tensor) -> Tensor:
        return self.select(self.pre_activations(x))

    def decode(self, z: Tensor) -> Tensor:
        return sparse_decode(z, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # -- constraints ---------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each unit decoder row, so a step moves along the
        sphere and the renormalisation after it changes little (Bricken et al. 2023)."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= along * self.W_dec

    @torch.no_grad()
    def smallest_kept(self, x: Tensor) -> Tensor:
        """Per latent, the smallest value the training selection keeps on batch ``x`` (the batch
        minimum for every latent, except Feature Choice: each latent's own; 0 where nothing is kept)."""
        was_training = self.training
        self.train()
        codes = self.encode(x).reshape(-1, self.config.d_sae)
        self.train(was_training)
        masked = codes.masked_fill(codes <= 0, float("inf"))
        if self.kind == "feature_choice":
            per_latent = masked.min(dim=0).values
        else:
            per_latent = masked.min().expand(self.config.d_sae)
        return torch.where(torch.isfinite(per_latent), per_latent, torch.zeros_like(per_latent))

    @torch.no_grad()
    def fold_scales(self, input_scale: float, output_scale: float) -> None:
        """Make an SAE trained on (a x -> b y) map raw x to raw y; its codes become the trained
        codes divided by b. Every kind's selection is positively homogeneous, so dividing b_enc,
        b_dec and the threshold by b (and W_enc by b / a) does it; decoder rows keep unit norm.
        An SAE (input = target) needs a == b: its pre-encoder bias is b_dec."""
        if not self.config.transcoder and input_scale != output_scale:
            raise SparsecraftError("fold_scales: an SAE's input and target are the same tensor: one scale")
        self.W_enc *= input_scale / output_scale
        self.b_enc /= output_scale
        self.threshold /= output_scale
        self.b_dec /= output_scale
