"""Built-in reference models and user models by ``package.module:callable``."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from sparsecraft.errors import SparsecraftError
from sparsecraft.models import zoo  # noqa: F401  (registers the built-in models)
from sparsecraft.registry import MODELS


def create(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model from a built-in name (``"cnn"``) or ``"package.module:callable"``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise SparsecraftError(f"cannot load model {spec!r}: {e}; give 'package.module:callable' importable from here") from e
    else:
        factory = MODELS.get(spec)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise SparsecraftError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
