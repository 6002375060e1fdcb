"""RAPF class-incremental training of a linear adapter on frozen encoders (METHODS.md §d), run with Accelerate.

Imports are lazy so that `lora-fusion --help` stays free of torch: `from lora_fusion.cil import run_cil`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "CILRecipe": "recipe",
    "CILResult": "trainer",
    "load_recipe": "recipe",
    "run_cil": "trainer",
    "run_recipe": "run",
}

if TYPE_CHECKING:
    from .recipe import CILRecipe, load_recipe
    from .run import run_recipe
    from .trainer import CILResult, run_cil

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lora_fusion.cil' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
