"""Built-in small datasets for demos, tests and benchmarks (no downloads)."""

from sparsecraft.data.images import Split, digits, synthetic_images

__all__ = ["Split", "digits", "synthetic_images"]
