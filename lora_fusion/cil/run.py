"""`lora-fusion cil run RECIPE.yaml`: read a recipe, train, write metrics, plot and adapters; return the result."""

from __future__ import annotations

from pathlib import Path

from .recipe import load_recipe
from .trainer import CILResult, run_cil


def run_recipe(path: str | Path, *, resume: bool = True, progress: bool = True) -> CILResult:
    """Validate the recipe at `path` whole, then run it (see [`run_cil`]).

    Raises:
        RecipeError, InvalidParameterError: an invalid recipe, before anything is loaded.
        DatasetNotFoundError, UnknownClassError, EmptyTaskError, FeatureDimensionError: see [`run_cil`].
    """
    return run_cil(load_recipe(path), resume=resume, progress=progress)
