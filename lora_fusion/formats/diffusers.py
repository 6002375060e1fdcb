"""The diffusers LoRA format: a folder with `pytorch_lora_weights.safetensors` (or one such file under any name),
keys `<component>.<module>.lora_A.weight` / `lora_B.weight` for the pipeline's `unet`, `transformer`,
`text_encoder` and `text_encoder_2`, and the per-component LoraConfig in the `lora_adapter_metadata` header entry.

What diffusers' `pipe.load_lora_weights(folder)` loads. Reading also takes the older diffusers key styles (through
diffusers' own converters, [`lora_fusion.formats.keymaps`]); writing needs no diffusers at all.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedAdapterError
from ..spec import AdapterContents
from .keymaps import COMPONENTS
from .peft import folded_factors
from .single_file import file_layout, read_single_file
from .stores import SafetensorsStore, save_safetensors

if TYPE_CHECKING:
    from ..adapter import LoraAdapter

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, or [] when it is not one (detection never raises)."""
    try:
        return SafetensorsStore(path, str(path)).keys()
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not this format"
        return []


def component_of(module: str) -> str | None:
    """The pipeline component a canonical module name starts with (`unet`, `text_encoder`, …), or None."""
    head = module.split(".", 1)[0]
    return head if head in COMPONENTS and "." in module else None


class DiffusersFormat:
    """diffusers' LoRA file: one safetensors file with component-prefixed PEFT keys."""

    name = "diffusers"
    file_names = frozenset({WEIGHT_NAME})
    single_file = False
    library_name = "diffusers"
    usage = (
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(base_model)\n"
        'pipe.load_lora_weights("<this repo or folder>")'
    )

    def detect(self, path: Path) -> bool:
        """A folder holding `pytorch_lora_weights.safetensors`, or a safetensors file with diffusers' keys."""
        if path.is_dir():
            return (path / WEIGHT_NAME).is_file()
        return path.suffix == ".safetensors" and file_layout(safetensors_keys(path)) == "diffusers"

    def read(self, path: Path, *, source: str, config: Path | None = None) -> AdapterContents:
        """Open a diffusers LoRA (the folder's `pytorch_lora_weights.safetensors`, or the file `path`). Some repos
        store kohya keys under diffusers' file name: the keys decide how the file is read."""
        file = path / WEIGHT_NAME if path.is_dir() else path
        return read_single_file(file, source=source)

    def write(self, adapter: LoraAdapter, folder: Path, *, metadata: Mapping[str, str]) -> None:
        """Write `pytorch_lora_weights.safetensors` into `folder`: scales folded (scale 1, recorded per component in
        `lora_adapter_metadata` as diffusers' `save_lora_weights` does), provenance in `metadata`.

        Raises:
            UnsupportedAdapterError: a module without a pipeline component in its name, or an embedding LoRA (named).
        """
        tensors: dict[str, torch.Tensor] = {}
        for name, spec in adapter.modules.items():
            if component_of(name) is None or spec.kind == "embedding":
                what = "an embedding LoRA" if spec.kind == "embedding" else "not under a pipeline component"
                raise UnsupportedAdapterError(
                    f"module {name} is {what} ({', '.join(COMPONENTS)}), so the diffusers format has no key for it; "
                    "write --format peft instead."
                )
            a, b, bias = folded_factors(adapter, name)
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
            if bias is not None:
                tensors[f"{name}.lora_B.bias"] = bias
        record = {**metadata, "lora_adapter_metadata": json.dumps(_lora_metadata(adapter), sort_keys=True)}
        save_safetensors(tensors, folder / WEIGHT_NAME, metadata=record)


def _lora_metadata(adapter: LoraAdapter) -> dict[str, Any]:
    """diffusers' packed per-component LoraConfig (`unet.r`, `unet.lora_alpha`, …): scale 1 in every module, the
    ranks that differ from the most common one in `rank_pattern` (and `alpha_pattern`), names regex-escaped."""
    packed: dict[str, Any] = {}
    by_component: dict[str, dict[str, int]] = {}
    for name, spec in adapter.modules.items():
        component = component_of(name)
        assert component is not None  # write() refused the others
        by_component.setdefault(component, {})[name[len(component) + 1:]] = spec.rank
    for component, ranks in sorted(by_component.items()):
        counts = Counter(ranks.values())
        common = max(counts, key=lambda r: (counts[r], r))
        pattern = {re.escape(n): r for n, r in sorted(ranks.items()) if r != common}
        config = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                  "target_modules": sorted(ranks), "use_dora": False, "use_rslora": False,
                  "lora_bias": any(adapter.modules[f"{component}.{n}"].bias_key for n in ranks)}
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return packed


DIFFUSERS = DiffusersFormat()
