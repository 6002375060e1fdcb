"""lora-fusion: merge LoRA adapters exactly and fast, from the Hub or disk, into PEFT adapters (or bake them into
the base model).

Names are imported on first use, so `import lora_fusion` (and `lora-fusion --help`) stays free of torch.

Example:
    ```python
    >>> from lora_fusion import merge
    >>> merged = merge(["org/math-lora", "org/code-lora"], method="svd", weights=[0.6, 0.4], rank=16)
    >>> merged.save_pretrained("out/")
    ```
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

try:
    __version__ = version("lora-fusion")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# One table: public name -> submodule. A test imports every name, so the table cannot drift from the code.
_LAZY = {
    "load_adapter": "sources",
    "merge": "api",
    "bake": "baking",
    "convert": "api",
    "extract": "extraction",
    "MergePlan": "plan",
    "LoraAdapter": "adapter",
    "ModuleFactors": "adapter",
    "ModuleGroup": "methods",
    "ModuleResult": "methods",
    "ModuleStats": "methods",
    "MethodParams": "params",
    "Param": "params",
    "get_method": "methods",
    "list_methods": "methods",
    "register_method": "methods",
    "interference_report": "diagnostics",
    "load_recipe": "recipe",
    "Recipe": "recipe",
}

__all__ = ["__version__", *sorted(_LAZY)]

if TYPE_CHECKING:
    from .adapter import LoraAdapter, ModuleFactors
    from .diagnostics import interference_report
    from .api import convert, merge
    from .baking import bake
    from .extraction import extract
    from .methods import ModuleGroup, ModuleResult, ModuleStats, get_method, list_methods, register_method
    from .params import MethodParams, Param
    from .plan import MergePlan
    from .recipe import Recipe, load_recipe
    from .sources import load_adapter


__getattr__ = lazy_attributes(__name__, _LAZY)
