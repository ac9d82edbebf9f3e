"""A small trainer for the built-in models and datasets (the demo, benchmarks, tests)."""

from sparsecraft.train.trainer import evaluate, fit, make_optimizer, recalibrate_batchnorm

__all__ = ["evaluate", "fit", "make_optimizer", "recalibrate_batchnorm"]
