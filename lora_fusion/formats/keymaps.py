"""Module names of diffusion-model LoRA files, mapped to the canonical (diffusers/PEFT) names with diffusers' own
maintained converters, and back.

The canonical name of a module is its diffusers path with the pipeline component in front:
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, `text_encoder.text_model.encoder.layers.0.
self_attn.q_proj`, `transformer.transformer_blocks.0.attn.to_q`.

Reading (kohya/A1111, SDXL's original SGM block names, ComfyUI's `diffusion_model.` prefix, kohya Flux): the
file's key names are run through diffusers' converters (`StableDiffusionXLLoraLoaderMixin.lora_state_dict`,
`FluxLoraLoaderMixin.lora_state_dict`, `convert_unet_state_dict_to_peft`, `convert_state_dict_to_peft`) on a
*probe*: a state dict with the file's keys and tiny tagged tensors instead of the weights. Each probe `down` holds
the module's number and each `up` its row numbers, so the converted dict says, for every canonical module, which
file module it came from and which rows of that module's up matrix it took (a fused Flux q/k/v splits the up
matrix in row blocks; the down matrix is shared, which is exact). The weights themselves are then read lazily, and
the scale alpha/rank applied by lora-fusion: the probe carries no alphas. A file module the converters drop (they
skip a few key kinds with only a log line) is refused by name, never lost.

Writing kohya: SD/SDXL names through diffusers' `convert_state_dict_to_kohya` on a probe; Flux through
[`FLUX_KOHYA_GROUPS`] below, written here because diffusers has no Flux → kohya converter, and tested against
diffusers' reader (every name written reads back to the module it came from).

diffusers is an optional extra (`pip install "lora-fusion[diffusers]"`, pinned), imported only when such a file is
met: it imports transformers and peft, which costs seconds.
"""

from __future__ import annotations

import functools
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptAdapterError, UnsupportedAdapterError

# The pipeline components a diffusion LoRA names (diffusers' prefixes), in file order.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
COMFY_PREFIX = "diffusion_model."
# SD 1.x/2.x and SDXL UNets have 2 layers per block; the SGM → diffusers block numbering depends on it.
SGM_LAYERS_PER_BLOCK = 2
DIFFUSERS_EXTRA = 'pip install "lora-fusion[diffusers]"'


def diffusers_available() -> bool:
    from importlib.util import find_spec

    return find_spec("diffusers") is not None


def require_diffusers(source: str, what: str) -> None:
    """Refuse clearly when diffusers, whose key maps read and write `what`, is not installed."""
    if not diffusers_available():
        raise UnsupportedAdapterError(
            f"{source}: {what} needs diffusers' key maps, which are not installed; run {DIFFUSERS_EXTRA}."
        )


@dataclass(frozen=True)
class Piece:
    """Where one canonical module's factors live in a file: the file's module (its key prefix) and the row blocks
    of its up matrix (`None`: all rows, in order). The down matrix is always used whole."""

    module: str
    rows: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class _Probe:
    """A state dict of stand-ins for diffusers' converters: each down matrix holds its module's index (in `names`),
    each up matrix the row numbers 0…out−1 (one tensor shared by the modules of one width: the row numbers are all
    it says). `downs` and `rows` keep every stand-in alive for [`_read_probe`], so no tensor diffusers makes can
    reuse one's id."""

    state: dict[str, torch.Tensor]
    names: list[str]
    downs: tuple[torch.Tensor, ...]
    rows: dict[int, torch.Tensor]


def _probe(modules: Mapping[str, int], *, down: str, up: str) -> _Probe:
    names = list(modules)
    state: dict[str, torch.Tensor] = {}
    rows: dict[int, torch.Tensor] = {}
    downs = []
    for index, name in enumerate(names):
        width = modules[name]
        if width not in rows:
            rows[width] = torch.arange(width, dtype=torch.float32).reshape(-1, 1)
        downs.append(torch.full((1, 1), float(index)))
        state[f"{name}.{down}"], state[f"{name}.{up}"] = downs[-1], rows[width]
    return _Probe(state, names, tuple(downs), rows)


def _row_blocks(rows: torch.Tensor, out_features: int) -> tuple[tuple[int, int], ...] | None:
    """The runs of consecutive row numbers in the probe's up column `rows` (None: all rows in order)."""
    values = rows.flatten().to(torch.int64)
    if values.numel() == out_features and torch.equal(values, torch.arange(out_features)):
        return None
    # A new block starts wherever a row number does not follow the previous one.
    starts = torch.nonzero(torch.diff(values) != 1).flatten() + 1
    edges = [0, *starts.tolist(), values.numel()]
    return tuple((int(values[a]), int(values[b - 1]) + 1) for a, b in zip(edges, edges[1:]))


def _read_probe(converted: Mapping[str, torch.Tensor], probe: _Probe, out: Mapping[str, int]) -> dict[str, Piece]:
    # The SD maps only rename keys: a tensor that is still a stand-in itself needs no reading (a down gives its
    # module by its place; an up of the module's width, every row in order).
    indices = {id(tensor): index for index, tensor in enumerate(probe.downs)}
    untouched_rows = {id(tensor) for tensor in probe.rows.values()}
    pieces: dict[str, Piece] = {}
    for key, tensor in converted.items():
        if not key.endswith(".lora_A.weight"):
            continue
        canonical = key[: -len(".lora_A.weight")]
        index = indices.get(id(tensor))
        module = probe.names[int(tensor.flatten()[0]) if index is None else index]
        rows = converted[f"{canonical}.lora_B.weight"]
        whole = id(rows) in untouched_rows and rows.shape[0] == out[module]
        pieces[canonical] = Piece(module, None if whole else _row_blocks(rows, out[module]))
    return pieces


def _dropped(pieces: Mapping[str, Piece], names: list[str]) -> str | None:
    """What to say (after the source's name) of file modules the converters dropped; None when they placed all."""
    placed = {piece.module for piece in pieces.values()}
    dropped = [name for name in names if name not in placed]
    if not dropped:
        return None
    shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
    return (f"diffusers' key map has no place for {shown}; lora-fusion drops no module silently. Remove those "
            "modules from the file, or convert it with the tool that made it.")


def kohya_to_canonical(modules: Mapping[str, int], *, source: str) -> dict[str, Piece]:
    """Canonical name → [`Piece`] for kohya module names (`lora_unet_…`, `lora_te1_…`, `lora_unet_double_blocks_…`,
    with their up matrix's row count), through diffusers' converters.

    The map depends on the names and row counts alone, and the last few are kept: a kohya file written from a kohya
    source is read back (the writer's check) with the names the source was read with, and diffusers' converters
    cost about a tenth of a second per thousand modules.

    Raises:
        UnsupportedAdapterError: diffusers is missing, or its map drops or rejects a module (named).
    """
    require_diffusers(source, "a kohya/A1111/ComfyUI LoRA file")
    pieces, problem = _kohya_pieces(tuple(sorted(modules.items())))
    if problem is not None:
        raise UnsupportedAdapterError(f"{source}: {problem}")
    return dict(pieces)


@functools.lru_cache(maxsize=4)
def _kohya_pieces(modules: tuple[tuple[str, int], ...]) -> tuple[Mapping[str, Piece], str | None]:
    """[`kohya_to_canonical`]'s map, or what is wrong (the message after the source's name)."""
    widths = dict(modules)
    probe = _probe(widths, down="lora_down.weight", up="lora_up.weight")
    flux = any(re.match(r"lora_unet_(double|single)_blocks_", name) for name in widths)
    try:
        converted = _convert_flux(probe.state) if flux else _convert_sd(probe.state)
    except (ValueError, KeyError, IndexError, AssertionError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "Flux" if flux else "SD/SDXL"
        return {}, (f"diffusers' {kind} key map cannot read this file ({first[:200]}); example keys: "
                    f"{', '.join(probe.names[:3])}.")
    pieces = _read_probe(converted, probe, widths)
    return types.MappingProxyType(pieces), _dropped(pieces, probe.names)


def diffusers_old_to_canonical(modules: Mapping[str, int], *, source: str) -> dict[str, Piece]:
    """Canonical name → [`Piece`] for the older diffusers key styles (`….processor.to_q_lora.down.weight`,
    `….lora.down.weight`, `….lora_linear_layer.down.weight`), given as the module part before `.down.weight`."""
    require_diffusers(source, "an older diffusers LoRA file")
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    probe = _probe(modules, down="down.weight", up="up.weight")
    try:
        unet = {k: v for k, v in probe.state.items() if not k.startswith("text_encoder")}
        text = {k: v for k, v in probe.state.items() if k.startswith("text_encoder")}
        converted = {**(convert_unet_state_dict_to_peft(unet) if unet else {}),
                     **(convert_state_dict_to_peft(text) if text else {})}
    except (ValueError, KeyError) as err:
        raise UnsupportedAdapterError(f"{source}: diffusers' key map cannot read this file ({err}).") from None
    pieces = _read_probe(converted, probe, modules)
    problem = _dropped(pieces, probe.names)
    if problem is not None:
        raise UnsupportedAdapterError(f"{source}: {problem}")
    return pieces


def _convert_sd(probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    # layers_per_block is what diffusers needs from the UNet config to renumber SGM blocks; SD and SDXL share it.
    config = types.SimpleNamespace(layers_per_block=SGM_LAYERS_PER_BLOCK)
    converted, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(probe, unet_config=config)
    unet = {k: v for k, v in converted.items() if k.startswith("unet.")}
    result = dict(convert_unet_state_dict_to_peft(unet)) if unet else {}
    result.update(_text_encoders_to_peft({k: v for k, v in converted.items() if not k.startswith("unet.")}))
    return result


def _convert_flux(probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    converted = FluxLoraLoaderMixin.lora_state_dict(probe)
    # diffusers names the top-level modules it maps (x_embedder, context_embedder, time_text_embed.…, proj_out,
    # norm_out.linear) without the `transformer.` its block modules carry: every transformer module gets it.
    # kohya Flux files may train CLIP-L too (`lora_te1_…`): diffusers gives those keys in its old text-encoder style.
    result = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()
              if not k.startswith("text_encoder")}
    result.update(_text_encoders_to_peft({k: v for k, v in converted.items() if k.startswith("text_encoder")}))
    return result


def _text_encoders_to_peft(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys as diffusers' kohya converters give them, in PEFT's style (`….lora_A.weight`)."""
    if not text:
        return {}
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
    )

    # The keys mix the old style (attention: `to_q_lora`) and the new one (MLP: `lora_linear_layer`); diffusers
    # infers one style per dict from `to_out_lora`, so say both explicitly.
    text = convert_state_dict_to_diffusers(text, original_type=StateDictType.DIFFUSERS_OLD)
    return dict(convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS))


def canonical_to_kohya_sd(modules: list[str], *, text_encoder_2: bool, source: str) -> dict[str, str]:
    """kohya module name for each canonical SD/SDXL name (`unet.…`, `text_encoder.…`, `text_encoder_2.…`), through
    diffusers' `convert_state_dict_to_kohya`. With no second text encoder the first is `lora_te_` (SD 1.x/2.x, as
    kohya names it), else `lora_te1_`/`lora_te2_` (SDXL)."""
    require_diffusers(source, "writing a kohya file")
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    probe = {f"{name}.lora_A.weight": torch.full((1, 1), float(i)) for i, name in enumerate(modules)}
    converted = convert_state_dict_to_kohya(probe)
    names: dict[str, str] = {}
    for key, tensor in converted.items():
        if key.endswith(".lora_down.weight"):
            kohya = key[: -len(".lora_down.weight")]
            if not text_encoder_2:
                kohya = kohya.replace("lora_te1_", "lora_te_", 1)
            names[modules[int(tensor.flatten()[0])]] = kohya
    return names


# Flux (BFL) modules as kohya names them, and the diffusers modules each holds: a fused module's up matrix is the
# row-wise concatenation of its parts (q, k, v; single blocks add the MLP input), which share one down matrix.
FLUX_KOHYA_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"double_blocks_{i}_img_attn_qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                         "transformer_blocks.{i}.attn.to_v")),
    (r"double_blocks_{i}_img_attn_proj", ("transformer_blocks.{i}.attn.to_out.0",)),
    (r"double_blocks_{i}_img_mlp_0", ("transformer_blocks.{i}.ff.net.0.proj",)),
    (r"double_blocks_{i}_img_mlp_2", ("transformer_blocks.{i}.ff.net.2",)),
    (r"double_blocks_{i}_img_mod_lin", ("transformer_blocks.{i}.norm1.linear",)),
    (r"double_blocks_{i}_txt_attn_qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                         "transformer_blocks.{i}.attn.add_k_proj",
                                         "transformer_blocks.{i}.attn.add_v_proj")),
    (r"double_blocks_{i}_txt_attn_proj", ("transformer_blocks.{i}.attn.to_add_out",)),
    (r"double_blocks_{i}_txt_mlp_0", ("transformer_blocks.{i}.ff_context.net.0.proj",)),
    (r"double_blocks_{i}_txt_mlp_2", ("transformer_blocks.{i}.ff_context.net.2",)),
    (r"double_blocks_{i}_txt_mod_lin", ("transformer_blocks.{i}.norm1_context.linear",)),
    (r"single_blocks_{i}_linear1", ("single_transformer_blocks.{i}.attn.to_q",
                                    "single_transformer_blocks.{i}.attn.to_k",
                                    "single_transformer_blocks.{i}.attn.to_v",
                                    "single_transformer_blocks.{i}.proj_mlp")),
    (r"single_blocks_{i}_linear2", ("single_transformer_blocks.{i}.proj_out",)),
    (r"single_blocks_{i}_modulation_lin", ("single_transformer_blocks.{i}.norm.linear",)),
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer_linear", ("proj_out",)),
)


@dataclass(frozen=True)
class FusedModule:
    """A kohya Flux module to write: its name and its parts (canonical names, `None` for a part the adapter lacks,
    written as zero rows)."""

    kohya: str
    parts: tuple[str | None, ...]
    part_names: tuple[str, ...]


def canonical_to_kohya_flux(modules: list[str], *, source: str) -> list[FusedModule]:
    """Group the canonical Flux transformer modules (`transformer.…`) into kohya's fused modules.

    Raises:
        UnsupportedAdapterError: a module kohya's Flux layout has no key for (named).
    """
    wanted = {name.removeprefix("transformer."): name for name in modules}
    groups: dict[str, FusedModule] = {}
    for kohya_pattern, parts in FLUX_KOHYA_GROUPS:
        for part in parts:
            regex = re.compile("^" + re.escape(part).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
            for short in wanted:
                match = regex.match(short)
                if match is None:
                    continue
                names = tuple(p.format(i=match.groupdict().get("i")) for p in parts)
                kohya = "lora_unet_" + kohya_pattern.format(i=match.groupdict().get("i"))
                present = tuple(wanted.get(n) for n in names)
                groups[kohya] = FusedModule(kohya, present, tuple(f"transformer.{n}" for n in names))
    placed = {name for group in groups.values() for name in group.parts if name}
    missing = [name for name in modules if name not in placed]
    if missing:
        raise UnsupportedAdapterError(
            f"{source}: kohya's Flux layout has no key for module {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; write --format peft or diffusers instead."
        )
    return list(groups.values())


def scalar_alpha(value: Any, *, module: str, source: str) -> float:
    """A kohya `.alpha` tensor (or the float it holds) as a finite number, or a one-line error naming the module."""
    if isinstance(value, float):
        alpha = value
    else:
        tensor = torch.as_tensor(value)
        if tensor.numel() != 1:
            raise CorruptAdapterError(
                f"{source}: module {module} has an alpha of shape {list(tensor.shape)}; expected one number."
            )
        alpha = float(tensor.item())  # one element, whatever its shape
    if not math.isfinite(alpha):
        raise CorruptAdapterError(f"{source}: module {module} has alpha {alpha}; expected a finite number.")
    return alpha
