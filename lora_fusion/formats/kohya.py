"""The kohya/A1111 LoRA file (and the ComfyUI, kohya-Flux and LyCORIS files that share its key style): one
`.safetensors` file, keys `lora_unet_<path>.lora_down.weight`, `.lora_up.weight` and `.alpha` (scale alpha/rank),
text encoders under `lora_te_` (SD 1.x/2.x) or `lora_te1_`/`lora_te2_` (SDXL, Flux's CLIP).

Reading goes through [`lora_fusion.formats.single_file`] (diffusers' key maps, LyCORIS expanded exactly). Writing
names the SD/SDXL modules as the kohya file(s) they came from named them (SGM or diffusers block names), else as
diffusers' `convert_state_dict_to_kohya` does; it folds every scale into the factors
(`lora_fusion.formats.peft.scale_split`; nothing to fold where alpha = rank) and records `.alpha` = rank (scale 1,
exact). Flux's attention q/k/v (and the single blocks' q/k/v/MLP input) are fused back exactly: down = [A_q; A_k;
A_v], up = blockdiag(B_q, B_k, B_v), rank r_q + r_k + r_v. A part the adapter lacks is written as zero rows (its
size taken from its siblings: q, k, v share one width, and Flux's MLP input is 4× that width).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UnsupportedAdapterError
from ..spec import AdapterContents
from .diffusers import component_of, safetensors_keys
from .keymaps import FusedModule, canonical_to_kohya_flux, canonical_to_kohya_sd
from .peft import output_factors
from .single_file import file_layout, read_single_file
from .stores import PendingTensor, materialized, save_safetensors

if TYPE_CHECKING:
    from ..adapter import LoraAdapter

# Flux's MLP input (proj_mlp) is mlp_ratio = 4 times the attention width (FluxTransformer2DModel's default).
FLUX_MLP_RATIO = 4


class KohyaFormat:
    """kohya/A1111's single LoRA file (ComfyUI, kohya Flux and LyCORIS files read too)."""

    name = "kohya"
    file_names: frozenset[str] = frozenset()
    single_file = True
    library_name = None
    usage = (
        "# A1111 / Forge / ComfyUI: put the file in models/Lora; diffusers:\n"
        'pipe.load_lora_weights("<folder>", weight_name="<this file>.safetensors")'
    )

    def detect(self, path: Path) -> bool:
        """A `.safetensors` file whose keys are kohya's, ComfyUI's or LyCORIS's."""
        return path.is_file() and path.suffix == ".safetensors" and file_layout(safetensors_keys(path)) == "kohya"

    def read(self, path: Path, *, source: str, config: Path | None = None) -> AdapterContents:
        """Open a kohya-family LoRA file (headers and alphas only)."""
        return read_single_file(path, source=source, layout="kohya")

    def write(self, adapter: LoraAdapter, file: Path, *, metadata: Mapping[str, str]) -> None:
        """Write the single kohya file `file`, `metadata` (provenance) in its header.

        Raises:
            UnsupportedAdapterError: a module kohya has no key for, an embedding LoRA or a lora_B bias (named).
        """
        for name, spec in adapter.modules.items():
            problem = ("an embedding LoRA" if spec.kind == "embedding" else "a LoRA with a lora_B bias"
                       if spec.bias_key else None if component_of(name) else "not under a pipeline component")
            if problem:
                raise UnsupportedAdapterError(
                    f"module {name} is {problem}, which the kohya format cannot hold; write --format peft instead."
                )
        flux = [n for n in adapter.modules if n.startswith("transformer.")]
        others = [n for n in adapter.modules if not n.startswith("transformer.")]
        unsupported = [n for n in others if component_of(n) not in ("unet", "text_encoder", "text_encoder_2")]
        if unsupported:
            raise UnsupportedAdapterError(
                f"module {unsupported[0]} has no kohya key; write --format peft or diffusers instead."
            )
        tensors: dict[str, torch.Tensor | PendingTensor] = {}
        if others:
            for canonical, kohya in _sd_names(adapter, others, flux=bool(flux)).items():
                a, b, _ = output_factors(adapter, canonical, fold_scale=True)
                _put(tensors, kohya, a, b)
        for group in canonical_to_kohya_flux(flux, source="kohya output") if flux else []:
            down, up = _fused(adapter, group)
            _put(tensors, group.kohya, down, up)
        save_safetensors(tensors, file, metadata=metadata)


def _sd_names(adapter: LoraAdapter, modules: list[str], *, flux: bool) -> dict[str, str]:
    """The kohya name of each SD/SDXL module (and of a Flux LoRA's CLIP-L): the names they had in the kohya file(s)
    they came from where every module has one (kohya → kohya keeps the SGM block names kohya's SDXL trainer writes),
    else diffusers' names for all of them (one file never mixes SGM and diffusers block names: diffusers' reader
    drops the SGM-named modules of a file that does), the text encoder as `lora_te1_` beside a second one or a Flux
    transformer (as kohya's SDXL and Flux trainers name it), else `lora_te_`."""
    kept = adapter.config.kohya_names
    if all(name in kept for name in modules):
        return {name: kept[name] for name in modules}
    te1 = flux or any(n.startswith("text_encoder_2.") for n in modules)
    return canonical_to_kohya_sd(modules, text_encoder_2=te1, source="kohya output")


def kohya_names(adapters: Sequence[LoraAdapter], modules: Iterable[str]) -> dict[str, str]:
    """A merge's kohya names: each module's name in its sources, where every source that holds the module read it
    from a kohya file under one and the same name (see `KohyaFormat.write`)."""
    names: dict[str, str] = {}
    for module in modules:
        given = {a.config.kohya_names.get(module) for a in adapters if module in a.modules}
        if len(given) == 1 and None not in given:
            names[module] = given.pop()
    return names


def _put(tensors: dict[str, torch.Tensor | PendingTensor], kohya: str, down: torch.Tensor | PendingTensor,
         up: torch.Tensor | PendingTensor) -> None:
    tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"] = down, up
    # The factors carry every scale, so alpha = rank gives kohya's alpha/rank = 1 exactly.
    tensors[f"{kohya}.alpha"] = _alpha(down.shape[0])


@functools.lru_cache(maxsize=64)
def _alpha(rank: int) -> torch.Tensor:
    """The scalar alpha tensor of one rank, shared by the modules of that rank (a file holds one per module, and
    they are only read)."""
    return torch.tensor(float(rank), dtype=torch.float32)


def _fused(adapter: LoraAdapter, group: FusedModule) -> tuple[torch.Tensor, torch.Tensor]:
    """down = [A_1; …; A_k], up = blockdiag(B_1, …, B_k), zero rows for absent parts: ΔW_fused = concat of the ΔW."""
    present = [name for name in group.parts if name is not None]
    factors = {}
    for name in present:
        down, up, _ = output_factors(adapter, name, fold_scale=True)
        factors[name] = materialized(down), materialized(up)
    widths = {name: adapter.modules[name].out_features for name in present}
    attention = next((widths[n] for n, full in zip(group.parts, group.part_names)
                      if n is not None and not full.endswith("proj_mlp")), None)
    rows: list[int] = []
    for name, full in zip(group.parts, group.part_names):
        if name is not None:
            rows.append(widths[name])
        elif full.endswith("proj_mlp"):
            rows.append(FLUX_MLP_RATIO * attention if attention else 0)
        else:
            rows.append(attention if attention else widths[present[0]] // FLUX_MLP_RATIO)
    rank = sum(factors[n][0].shape[0] for n in present)
    dtype = factors[present[0]][0].dtype
    down = torch.cat([factors[n][0] for n in present])
    up = torch.zeros(sum(rows), rank, dtype=dtype)
    row = column = 0
    for name, height in zip(group.parts, rows):
        if name is not None:
            b = factors[name][1]
            up[row:row + height, column:column + b.shape[1]] = b
            column += b.shape[1]
        row += height
    return down, up


KOHYA = KohyaFormat()
