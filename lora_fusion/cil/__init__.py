"""RAPF class-incremental training of a linear adapter on frozen encoders (docs/rapf.md), run with Accelerate.

Imports are lazy so that `lora-fusion --help` stays free of torch: `from lora_fusion.cil import run_cil`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

_LAZY = {
    "CILRecipe": "recipe",
    "CILResult": "trainer",
    "PrecomputedFeatures": "features",
    "feature_dataset": "features",
    "load_recipe": "recipe",
    "run_cil": "trainer",
    "run_recipe": "run",
}

if TYPE_CHECKING:
    from .features import PrecomputedFeatures, feature_dataset
    from .recipe import CILRecipe, load_recipe
    from .run import run_recipe
    from .trainer import CILResult, run_cil

__all__ = sorted(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
