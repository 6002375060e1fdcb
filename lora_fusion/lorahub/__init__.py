"""LoRAHub (Huang et al., COLM 2024, arXiv:2307.13269): one weight per LoRA (or per LoRA and layer group, as LoRA
Soups' CAT, Prabhakar et al., COLING 2025) fitted on a few support examples through the base model, gradient-free
(CMA-ES) or by gradient. `lora-fusion merge A B C --method lorahub` calls [`fit`] through the registered method
(`lora_fusion.methods.lorahub`), which writes the exact weighted sum of the LoRAs with the found weights.

Names are imported on first use, so `import lora_fusion.lorahub` loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

_LAZY = {
    "LorahubFit": "fitting",
    "LorahubPlan": "fitting",
    "LorahubSettings": "fitting",
    "fit": "fitting",
    "plan": "fitting",
    "SupportDataError": "errors",
    "SupportSet": "support",
    "read_support": "support",
    "WeightedLoras": "forward",
    "layer_groups": "forward",
    "SearchResult": "search",
    "gradient": "search",
    "gradient_free": "search",
}

if TYPE_CHECKING:
    from .errors import SupportDataError
    from .fitting import LorahubFit, LorahubPlan, LorahubSettings, fit, plan
    from .forward import WeightedLoras, layer_groups
    from .search import SearchResult, gradient, gradient_free
    from .support import SupportSet, read_support

__all__ = sorted(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
