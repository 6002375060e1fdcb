"""The diffusers LoRA format: a folder with `pytorch_lora_weights.safetensors` (or one such file under any name),
keys `<component>.<module>.lora_A.weight` / `lora_B.weight` for the pipeline's `unet`, `transformer`,
`text_encoder` and `text_encoder_2`, and the per-component LoraConfig in the `lora_adapter_metadata` header entry.

What diffusers' `pipe.load_lora_weights(folder)` loads. Reading also takes the older diffusers key styles (through
diffusers' own converters, [`lora_fusion.formats.keymaps`]); writing needs no diffusers at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedAdapterError
from ..spec import AdapterContents
from .keymaps import COMPONENTS
from .peft import most_common, output_factors, recorded_alpha, records_scale
from .single_file import file_layout, read_single_file
from .stores import PendingTensor, safetensors_header, save_safetensors, with_items

if TYPE_CHECKING:
    from ..adapter import LoraAdapter

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, sorted, from its header alone; [] when it is not one (detection never
    raises)."""
    try:
        _, header = safetensors_header(path)
    except (OSError, ValueError, RecursionError):  # unreadable, or no JSON header: simply "not this format"
        return []
    return sorted(key for key in header if key != "__metadata__")


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
        """Write `pytorch_lora_weights.safetensors` into `folder`: the factors as the source holds them, each module's
        scale recorded in the per-component LoraConfig of `lora_adapter_metadata` (as diffusers' `save_lora_weights`
        stores it; folded into the factors where it cannot be, see `records_scale`), provenance in `metadata`.

        Raises:
            UnsupportedAdapterError: a module without a pipeline component in its name, or an embedding LoRA (named).
        """
        tensors: dict[str, torch.Tensor | PendingTensor] = {}
        for name, spec in adapter.modules.items():
            if component_of(name) is None or spec.kind == "embedding":
                what = "an embedding LoRA" if spec.kind == "embedding" else "not under a pipeline component"
                raise UnsupportedAdapterError(
                    f"module {name} is {what} ({', '.join(COMPONENTS)}), so the diffusers format has no key for it; "
                    "write --format peft instead."
                )
            a, b, bias = output_factors(adapter, name, fold_scale=not records_scale(spec))
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
            if bias is not None:
                tensors[f"{name}.lora_B.bias"] = bias
        record = with_items(metadata, {"lora_adapter_metadata": json.dumps(_lora_metadata(adapter), sort_keys=True)})
        save_safetensors(tensors, folder / WEIGHT_NAME, metadata=record)


def _lora_metadata(adapter: LoraAdapter) -> dict[str, Any]:
    """diffusers' packed per-component LoraConfig (`unet.r`, `unet.lora_alpha`, …): each module's rank and alpha
    (scale·rank, see `recorded_alpha`), the most common ones as `r` and `lora_alpha`, the others in `rank_pattern` and
    `alpha_pattern`, names regex-escaped (PEFT, which diffusers loads through, matches them as `(.*\\.)?(key)$`)."""
    packed: dict[str, Any] = {}
    by_component: dict[str, dict[str, tuple[int, float | int]]] = {}
    for name, spec in adapter.modules.items():
        component = component_of(name)
        assert component is not None  # write() refused the others
        by_component.setdefault(component, {})[name[len(component) + 1:]] = (spec.rank, recorded_alpha(spec))
    for component, modules in sorted(by_component.items()):
        ranks = {n: rank for n, (rank, _) in modules.items()}
        alphas = {n: alpha for n, (_, alpha) in modules.items()}
        rank, alpha = most_common(ranks), most_common(alphas)
        config = {"r": rank, "lora_alpha": alpha,
                  "rank_pattern": {re.escape(n): r for n, r in sorted(ranks.items()) if r != rank},
                  "alpha_pattern": {re.escape(n): a for n, a in sorted(alphas.items()) if a != alpha},
                  "target_modules": sorted(modules), "use_dora": False, "use_rslora": False,
                  "lora_bias": any(adapter.modules[f"{component}.{n}"].bias_key for n in modules)}
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return packed


DIFFUSERS = DiffusersFormat()
