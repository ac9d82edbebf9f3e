"""A Hugging Face ``transformers`` ``TrainerCallback`` that steps a sparsecraft Sparsifier.

    from sparsecraft.integrations.hf_trainer import SparsifierCallback
    sparsifier = GradualMagnitudePruning(model, None, final_sparsity=0.5, frequency=50, n_prunes=10)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SparsifierCallback(sparsifier)])

The Trainer builds its optimizer itself; masks stay in force through it anyway (sparsecraft's
optimizer guard watches every optimizer). ``transformers`` is needed only when this module is used.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from sparsecraft.core.sparsifier import Sparsifier


class SparsifierCallback(TrainerCallback):
    """Calls ``sparsifier.step()`` after every optimizer step; logs the sparsity with the metrics."""

    def __init__(self, sparsifier: Sparsifier, finalize_at_end: bool = False) -> None:
        self.sparsifier = sparsifier
        self.finalize_at_end = finalize_at_end
        self.history: list[tuple[int, float]] = []  # (global step, sparsity) at each logging step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sparsifier.step()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        sparsity = round(self.sparsifier.sparsity, 6)
        self.history.append((state.global_step, sparsity))
        if logs is not None:  # shown in the Trainer's printed logs and sent to its reporters
            logs["sparsity"] = sparsity

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.finalize_at_end:
            self.sparsifier.finalize()
