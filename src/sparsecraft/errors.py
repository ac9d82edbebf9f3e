"""Errors that tell the user which layer or field is wrong and how to fix it."""

from __future__ import annotations


class SparsecraftError(ValueError):
    """Base class: bad input, raised before anything in the model changes."""


class SelectionError(SparsecraftError):
    """Include/exclude lists or module types that do not select what the user meant."""


class PatternError(SparsecraftError):
    """A pattern string that does not parse, or a pattern a layer cannot take."""


class DensityError(SparsecraftError):
    """A density or sparsity outside its range, or a distribution that cannot reach it."""


class MaskMismatchError(SparsecraftError):
    """Masks whose names or shapes do not match the model."""


def check_density(value: float, field: str = "density") -> float:
    """Density must lie in (0, 1]; a layer with no weight left is not a sparse layer."""
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise DensityError(
            f"{field}={value} is outside (0, 1]; density is the fraction of weights kept "
            "(density 0.1 = sparsity 0.9)"
        )
    return value


def density_from(sparsity: float | None, density: float | None) -> float:
    """Accept exactly one of sparsity (fraction removed) or density (fraction kept)."""
    if (sparsity is None) == (density is None):
        raise DensityError("give exactly one of sparsity= (fraction removed) or density= (fraction kept)")
    if sparsity is not None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise DensityError(f"sparsity={sparsity} is outside [0, 1); it is the fraction of weights removed")
        return check_density(1.0 - float(sparsity), "1 - sparsity")
    return check_density(density, "density")  # type: ignore[arg-type]
