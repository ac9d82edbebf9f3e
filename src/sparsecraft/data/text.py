"""Text for language models: calibration samples and evaluation windows from a plain text file.

Calibration follows SparseGPT / Wanda: ``nsamples`` windows of ``seqlen`` tokens at random offsets
(seeded). Evaluation uses consecutive, non-overlapping windows of ``seqlen`` tokens, the protocol
of the Wanda / SparseGPT perplexity tables.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsecraft.errors import SparsecraftError

#: Characters of the built-in character tokenizer (printable ASCII and newline); others map to <unk>.
CHAR_VOCAB = "\n" + "".join(chr(i) for i in range(32, 127))


def read_text(path: str | Path, field: str = "text") -> str:
    path = Path(path)
    if not path.is_file():
        raise SparsecraftError(f"{field}: no text file at {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SparsecraftError(f"{field}: {path} is empty")
    return text


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """The whole text as one 1-D LongTensor of token ids (no truncation)."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(ids: Tensor, nsamples: int, seqlen: int, seed: int = 0, field: str = "calibration") -> Tensor:
    """(nsamples, seqlen) windows at random offsets; warns when they must overlap."""
    if nsamples < 1 or seqlen < 2:
        raise SparsecraftError(f"{field}: need nsamples >= 1 and seqlen >= 2, got {nsamples} x {seqlen}")
    if ids.numel() <= seqlen:
        raise SparsecraftError(
            f"{field}: the text has {ids.numel()} tokens, too short for one window of {seqlen}; "
            "give a longer text or a smaller --seqlen"
        )
    if nsamples * seqlen > ids.numel():
        warnings.warn(
            f"{field}: the text has {ids.numel()} tokens, fewer than {nsamples} x {seqlen}; "
            "calibration windows overlap (text reused)",
            stacklevel=2,
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: Tensor, seqlen: int, max_windows: int | None = None, field: str = "evaluation") -> Tensor:
    """(n, seqlen) consecutive non-overlapping windows (the tail shorter than seqlen is dropped)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise SparsecraftError(f"{field}: the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


def char_tokenizer() -> Any:
    """A character-level Hugging Face tokenizer (no download), for the tiny built-in models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHAR_VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
