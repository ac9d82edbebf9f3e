"""Built-in small datasets for demos, tests and benchmarks (no downloads)."""

from sparsecraft.data.images import Split, digits, synthetic_images
from sparsecraft.data.sequences import IGNORE, sort_task

__all__ = ["IGNORE", "Split", "digits", "sort_task", "synthetic_images"]
