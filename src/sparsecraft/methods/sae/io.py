"""Saving and loading SAEs: safetensors weights + a JSON config, and an export to SAELens's format.

Our folder: ``sae.safetensors`` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec,
threshold) and ``sae.json`` (the SAEConfig plus what training reported). The tensors are SAELens's
own names and layout, so the export only writes SAELens's ``cfg.json`` beside the same tensors:

| our kind | SAELens architecture | notes |
|---|---|---|
| relu | standard | ``apply_b_dec_to_input`` true |
| topk | topk | ``k`` in cfg.json; no threshold tensor |
| batchtopk, feature_choice, mutual_choice | jumprelu | our per-latent threshold: at inference these are JumpReLU SAEs |
| relu transcoder | transcoder | no input-side b_dec (as SAELens's transcoder) |
| batch-kind transcoder | jumprelu_transcoder | |

A TopK transcoder has no SAELens counterpart, and the export refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparsecraft.errors import SparsecraftError
from sparsecraft.methods.sae.model import BATCH_KINDS, SAEConfig, SparseAutoencoder
from sparsecraft.utils import atomic_folder

WEIGHTS, CONFIG = "sae.safetensors", "sae.json"


def save_sae(sae: SparseAutoencoder, out: Path, extra: dict | None = None) -> None:
    """Write ``out/`` (which must not exist or be empty) atomically."""
    from safetensors.torch import save_file

    with atomic_folder(out) as tmp:
        state = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps({"config": sae.config.to_dict(), **(extra or {})}, indent=2))


def load_sae(folder: Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """The SAE saved in ``folder`` (eval mode); clear errors for missing or mismatched files."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).exists():
            raise SparsecraftError(f"sae: {folder / name} is missing; is {folder} a folder written by `sparsecraft sae train`?")
    try:
        meta = json.loads((folder / CONFIG).read_text())
        config = SAEConfig(**meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SparsecraftError(f"sae: {folder / CONFIG} is not a valid SAE config ({e})") from e
    state = load_file(str(folder / WEIGHTS))
    sae = SparseAutoencoder(config)
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        raise SparsecraftError(f"sae: {folder / WEIGHTS} holds {found}, but its config describes {expected}; "
                               "the files do not belong together")
    sae.load_state_dict(state)
    return sae.to(device).eval()


def saelens_architecture(config: SAEConfig) -> str:
    batch = config.kind in BATCH_KINDS
    if config.transcoder:
        if config.kind == "relu":
            return "transcoder"
        if batch:
            return "jumprelu_transcoder"
        raise SparsecraftError("sae export: a TopK transcoder has no SAELens architecture; export a relu or batch-kind one")
    return {"relu": "standard", "topk": "topk"}.get(config.kind, "jumprelu")


def export_saelens(sae: SparseAutoencoder, out: Path, context_size: int = 0) -> None:
    """Write ``out/cfg.json`` and ``out/sae_weights.safetensors`` loadable by SAELens v6's
    ``SAE.load_from_disk`` (loading there is strict: only the architecture's tensors are written)."""
    from safetensors.torch import save_file

    import sparsecraft

    c = sae.config
    arch = saelens_architecture(c)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if arch.startswith("jumprelu"):
        tensors["threshold"] = sae.threshold
    cfg: dict = {"architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
                 "apply_b_dec_to_input": not c.transcoder, "normalize_activations": "none",
                 "reshape_activations": "none",
                 "metadata": {"sae_lens_version": "6.0.0", "model_name": c.model, "hook_name": c.hook,
                              "context_size": context_size, "exported_by": f"sparsecraft {sparsecraft.__version__}",
                              "sparsecraft_kind": c.kind}}
    if arch == "topk":
        cfg |= {"k": c.k, "rescale_acts_by_decoder_norm": False}
    if c.transcoder:
        cfg["d_out"] = c.d_out
        cfg["metadata"]["hook_name_out"] = c.target_hook
    with atomic_folder(out) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / "sae_weights.safetensors"))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
