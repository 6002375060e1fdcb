"""The provenance record of a merge: what the model card and the safetensors metadata say about how it was made.

One function for every kind of method, so the per-module merges and ICM-Fusion record their sources the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import LoraAdapter


def merge_provenance(
    method: str,
    params: Mapping[str, Any],
    sources: Sequence[LoraAdapter],
    weights: Sequence[float],
    **extra: Any,
) -> dict[str, Any]:
    """The version, the method and its resolved parameters, each source (folder name or Hub id, revision, commit,
    file hash; never an absolute path) with its weight, and `extra` entries (dtype, base model, …)."""
    from . import __version__

    return {
        "lora_fusion_version": __version__,
        "method": method,
        "params": dict(params),
        "sources": [
            {**(a.source.to_dict() if a.source else {"source": "in-memory adapter"}), "weight": w}
            for a, w in zip(sources, weights)
        ],
        **extra,
    }
