"""Errors of the class-incremental trainer; each is a [`LoraFusionError`], so the CLI prints one line and exits 2."""

from __future__ import annotations

from ..errors import InvalidParameterError, LoraFusionError, RecipeError, SourceNotFoundError

__all__ = [
    "DatasetNotFoundError",
    "EmptyTaskError",
    "EncoderNotFoundError",
    "FeatureDimensionError",
    "InvalidParameterError",
    "RecipeError",
    "UnknownClassError",
]


class DatasetNotFoundError(SourceNotFoundError):
    """The image data named by a recipe is not where it says (a missing folder, a missing Debian package, ...)."""


class UnknownClassError(LoraFusionError, ValueError):
    """A class order names a class that the dataset does not have."""

    def __init__(self, name: object, known: list[str]) -> None:
        self.name, self.known = name, known
        shown = ", ".join(known[:12]) + (f", … ({len(known)} in all)" if len(known) > 12 else "")
        super().__init__(f"unknown class {name!r} in class_order; the dataset's classes are: {shown}.")


class EmptyTaskError(LoraFusionError, ValueError):
    """A task with no classes, or a class with no training or test images."""


class FeatureDimensionError(LoraFusionError, ValueError):
    """Cached features, encoders and adapter disagree on a dimension."""


class EncoderNotFoundError(SourceNotFoundError):
    """The frozen encoders cannot be loaded: an unknown model id, no network, or a missing optional package."""
