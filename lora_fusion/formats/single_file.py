"""Reading the single-file LoRAs of diffusion models: diffusers (`unet.….lora_A.weight`, older `….lora.down.weight`
styles), kohya/A1111 (`lora_unet_….lora_down.weight` + `.alpha`, SDXL's `lora_te1_`/`lora_te2_` and SGM block
names, conv LoRAs, LoCon's Tucker `lora_mid`), ComfyUI (`diffusion_model.` prefix), kohya Flux (fused q/k/v) and
LyCORIS LoHa/LoKr, all into the canonical modules of [`lora_fusion.formats.keymaps`].

Headers are read when the file is opened (plus the scalar alphas); factors stay on disk until a module is used.
Modules that need arithmetic to reach the factored form (a row block of a fused up matrix, LoCon's Tucker core,
LyCORIS's face-splitting and Kronecker products) are computed on read by a [`DerivedStore`].
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CorruptAdapterError, NotALoraAdapterError, UnsupportedAdapterError
from ..spec import AdapterConfig, AdapterContents, ModuleSpec, is_lora_pair
from .keymaps import (
    COMFY_PREFIX,
    COMPONENTS,
    KOHYA_PREFIXES,
    Piece,
    diffusers_old_to_canonical,
    kohya_to_canonical,
    scalar_alpha,
)
from .lycoris import LYCORIS_SUFFIXES, LycorisShape, lycoris_factors, lycoris_kind, lycoris_shape
from .stores import FLOAT_DTYPES, SafetensorsStore

if TYPE_CHECKING:
    from ..methods.base import ModuleStats

LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
              "lora_B.bias", "down.weight", "up.weight")
UNSUPPORTED_PARTS = {
    "dora_scale": "DoRA (its update depends on the base weights; see the bake/extract issue)",
    "lora_magnitude_vector": "DoRA (its update depends on the base weights; see the bake/extract issue)",
    "diff": "a full weight difference (LyCORIS 'full'/norm diff)",
    "diff_b": "a bias difference",
    "on_input": "an IA3 vector",
    "weight": "a full weight, not a LoRA factor",
}
_PARTS = frozenset({*LORA_PARTS, *LYCORIS_SUFFIXES, *UNSUPPORTED_PARTS})
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>" + "|".join(re.escape(p) for p in sorted(_PARTS, key=len, reverse=True))
                  + r")$")
LAYOUTS = ("diffusers", "kohya")


def file_layout(keys: list[str]) -> str | None:
    """`"diffusers"`, `"kohya"` (kohya/A1111, ComfyUI, LyCORIS) or None, from a safetensors file's tensor names
    (without `__metadata__`)."""
    if not keys:
        return None
    if all(k.startswith(KOHYA_PREFIXES) or k.startswith(COMFY_PREFIX) or k.startswith("text_encoders.")
           for k in keys):
        return "kohya"
    if all(k.split(".", 1)[0] in COMPONENTS for k in keys) and any(
        k.endswith(("lora_A.weight", "down.weight")) for k in keys
    ):
        return "diffusers"
    return None


@dataclass
class _FileModule:
    """One module as the file stores it: its (kohya-normalised) name and its tensors' keys by part."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)


def _comfy_to_kohya(module: str) -> str:
    # ComfyUI keeps the original model's dotted names under `diffusion_model.`; kohya spells the same with `_`.
    if module.startswith(COMFY_PREFIX):
        return "lora_unet_" + module[len(COMFY_PREFIX):].replace(".", "_")
    if module.startswith("text_encoders.clip_l.transformer."):
        return "lora_te1_" + module[len("text_encoders.clip_l.transformer."):].replace(".", "_")
    return module


def _group(keys: list[str], source: str, *, kohya: bool) -> dict[str, _FileModule]:
    modules: dict[str, _FileModule] = {}
    renames = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"} if kohya else {}
    for key in keys:
        # kohya's module names hold no dot: the part follows the first one (what _KEY finds too, at ~3× the cost).
        module, _, part = key.partition(".")
        if not module or part not in _PARTS:
            match = _KEY.match(key)
            if match is None:
                raise UnsupportedAdapterError(
                    f"{source}: tensor {key[:120]} is not a LoRA factor lora-fusion knows (lora_down/up, lora_A/B, "
                    "alpha, LyCORIS hada_/lokr_); only those can be merged."
                )
            module, part = match["module"], match["part"]
        if part in UNSUPPORTED_PARTS:
            raise UnsupportedAdapterError(
                f"{source}: module {module} has {UNSUPPORTED_PARTS[part]} ({key[:120]}), which lora-fusion "
                "cannot merge exactly; convert it to a plain LoRA first."
            )
        name = _comfy_to_kohya(module) if kohya else module
        part = renames.get(part, part)
        entry = modules.setdefault(name, _FileModule(name))
        if part in entry.keys:
            raise CorruptAdapterError(f"{source}: module {name} has two {part} tensors ({entry.keys[part]}, {key}).")
        entry.keys[part] = key
    return modules


class DerivedStore:
    """A file's tensors plus tensors computed from them on read (row blocks, Tucker products, LyCORIS factors):
    keys of the file read through, a derived key calls its recipe."""

    def __init__(self, file: SafetensorsStore) -> None:
        self.file = file
        self._recipes: dict[str, Callable[[], torch.Tensor]] = {}

    def add(self, key: str, recipe: Callable[[], torch.Tensor]) -> str:
        self._recipes[key] = recipe
        return key

    def read(self, key: str) -> torch.Tensor:
        recipe = self._recipes.get(key)
        return recipe() if recipe is not None else self.file.read(key)

    def known_finite(self, key: str) -> bool:
        """A file key as the file knows it ([`SafetensorsStore.known_finite`]); a derived one: unknown."""
        return key not in self._recipes and self.file.known_finite(key)


def _rows(tensor: torch.Tensor, rows: tuple[tuple[int, int], ...] | None) -> torch.Tensor:
    if rows is None:
        return tensor
    return torch.cat([tensor[start:stop] for start, stop in rows]) if len(rows) > 1 else tensor[rows[0][0]:rows[0][1]]


def _row_count(rows: tuple[tuple[int, int], ...] | None, total: int) -> int:
    return total if rows is None else sum(stop - start for start, stop in rows)


class _LycorisCache:
    """The factors of the LyCORIS module read last: A and B of one module come from one computation."""

    def __init__(self, file: SafetensorsStore, source: str) -> None:
        self.file, self.source = file, source
        self._last: tuple[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None

    def factors(self, module: _FileModule) -> tuple[torch.Tensor, torch.Tensor, float]:
        # The engine merges two modules at once: read `_last` once, and return what this call computed, never what
        # another thread stored meanwhile (replacing the tuple is atomic).
        last = self._last
        if last is not None and last[0] == module.name:
            return last[1]
        tensors = {part: self.file.read(key) for part, key in module.keys.items()}
        result = lycoris_factors(tensors, module=module.name, source=self.source)
        self._last = (module.name, result)
        return result


def read_single_file(path: Path, *, source: str, layout: str | None = None) -> AdapterContents:
    """Open a diffusers or kohya-family LoRA file (headers and alphas only) as canonical modules.

    Args:
        path: the `.safetensors` file.
        source: what the user called it, for messages.
        layout (*optional*): `"diffusers"` or `"kohya"` to skip detection (`--input-format`).

    Raises:
        NotALoraAdapterError: the keys fit no known layout (three example keys and the layouts tried are named).
        UnsupportedAdapterError: DoRA, full-weight diffs, or a module diffusers' map cannot place (named).
        CorruptAdapterError: non-scalar or NaN alphas, an up/down pair of mismatched rank, missing LyCORIS factors.
    """
    file = SafetensorsStore(path, source)
    keys = file.keys()
    found = layout or file_layout(keys)
    if found not in LAYOUTS:
        examples = ", ".join(keys[:3]) or "(no tensors)"
        raise NotALoraAdapterError(
            f"{source}: the keys ({examples}, …) match no LoRA layout lora-fusion reads (PEFT, diffusers, "
            "kohya/A1111, ComfyUI, LyCORIS); pass --input-format if you know it."
        )
    modules = _group(keys, source, kohya=found == "kohya")
    store = DerivedStore(file)
    names: dict[str, str] = {}
    stats: dict[str, ModuleStats] = {}
    if found == "kohya":
        specs, names, stats = _kohya_specs(modules, file, store, source)
    else:
        specs = _diffusers_specs(modules, file, store, source)
    ranks = [spec.rank for spec in specs.values()] or [1]
    config = AdapterConfig(base_model=None, task_type=None, r=max(ranks), lora_alpha=float(max(ranks)),
                           raw={"layout": found}, kohya_names=names)
    return AdapterContents(config=config, modules=specs, store=store, files=(path,), stats=stats)


def _kohya_specs(
    modules: dict[str, _FileModule], file: SafetensorsStore, store: DerivedStore, source: str
) -> tuple[dict[str, ModuleSpec], dict[str, str], dict[str, ModuleStats]]:
    """The canonical modules of a kohya-family file, the kohya name each module outside a Flux transformer had in
    it (kohya output writes them again: `lora_fusion.formats.kohya`; a Flux transformer's modules are split from
    fused ones and written by kohya's Flux table), and the stats of the LyCORIS modules read as their dense update
    at full rank (their exact factored rank exceeds min(out, in)), which every output then records."""
    lycoris = _LycorisCache(file, source)
    shapes: dict[str, _LoraShape | LycorisShape] = {}
    for module in modules.values():
        parts = set(module.keys) - {"alpha"}
        kind = lycoris_kind(parts)
        if kind is not None:
            headers = {part: file.header(key)[0] for part, key in module.keys.items()}
            shapes[module.name] = lycoris_shape(headers, module=module.name, source=source)
        elif {"lora_down.weight", "lora_up.weight"} <= parts:
            shapes[module.name] = _lora_shapes(module, file, source)
        else:
            raise CorruptAdapterError(
                f"{source}: module {module.name} lacks lora_down or lora_up ({', '.join(sorted(parts)) or 'nothing'} "
                "found); the file is incomplete."
            )
    pieces = kohya_to_canonical({name: shape.out_features for name, shape in shapes.items()}, source=source)
    specs: dict[str, ModuleSpec] = {}
    names: dict[str, str] = {}
    stats: dict[str, ModuleStats] = {}
    for canonical, piece in sorted(pieces.items()):
        module, shape = modules[piece.module], shapes[piece.module]
        if isinstance(shape, _LoraShape):
            specs[canonical] = _lora_spec(canonical, piece, module, shape, file, store)
        else:
            specs[canonical] = _lycoris_spec(canonical, piece, module, shape, lycoris, file, store)
            if shape.dense:
                from ..methods.base import ModuleStats

                stats[canonical] = ModuleStats(rank=shape.rank, exact_rank=shape.exact_rank)
        if piece.rows is None and not canonical.startswith("transformer."):
            names[canonical] = piece.module
    return specs, names, stats


@dataclass(frozen=True)
class _LoraShape:
    """A kohya LoRA module from its headers: factor shapes (A with the Tucker core absorbed), rank, dtype, scale."""

    out_features: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    dtype: torch.dtype
    scale: float
    tucker: bool


def _lora_shapes(module: _FileModule, file: SafetensorsStore, source: str) -> _LoraShape:
    down, dtype = file.header(module.keys["lora_down.weight"])
    up, _ = file.header(module.keys["lora_up.weight"])
    mid = file.header(module.keys["lora_mid.weight"])[0] if "lora_mid.weight" in module.keys else None
    rank = down[0] if down else 0
    if mid is not None:  # LoCon with a Tucker core: down r×in×1×1, mid r×r×kh×kw, up out×r×1×1
        consistent = len(down) == 4 and len(mid) == 4 and mid[:2] == (rank, rank) and len(up) == 4 and up[1] == rank
        a_shape = (rank, down[1], *mid[2:])
    else:
        consistent, a_shape = is_lora_pair(down, up), down
    if not consistent or rank == 0:
        raise CorruptAdapterError(
            f"{source}: module {module.name} has lora_down {list(down)} and lora_up {list(up)}"
            + (f" and lora_mid {list(mid)}" if mid is not None else "")
            + ", which do not form a LoRA pair of one rank."
        )
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedAdapterError(f"{source}: module {module.name} is stored as {dtype}; only float tensors merge.")
    alpha = _file_alpha(file, module.keys["alpha"], module=module.name, source=source) \
        if "alpha" in module.keys else float(rank)
    return _LoraShape(up[0], tuple(a_shape), tuple(up), rank, FLOAT_DTYPES[dtype], alpha / rank, mid is not None)


def _file_alpha(file: SafetensorsStore, key: str, *, module: str, source: str) -> float:
    value = file.scalar(key)  # a kohya file holds an alpha per module: most are read as a number, not as a tensor
    return scalar_alpha(file.read(key) if value is None else value, module=module, source=source)


def _lora_spec(
    canonical: str, piece: Piece, module: _FileModule, shape: _LoraShape, file: SafetensorsStore, store: DerivedStore
) -> ModuleSpec:
    down_key, up_key = module.keys["lora_down.weight"], module.keys["lora_up.weight"]
    a_key, b_key, rows = down_key, up_key, piece.rows
    if shape.tucker:
        mid_key = module.keys["lora_mid.weight"]
        # ΔW[o, i, h, w] = Σ_{a,b} up[o, a]·mid[a, b, h, w]·down[b, i]: the core goes into A, rank unchanged.
        a_key = store.add(f"{canonical}.A", lambda: torch.einsum(
            "abhw,bi->aihw", file.read(mid_key).float(), file.read(down_key).flatten(1).float()))
    if rows is not None:
        b_key = store.add(f"{canonical}.B", lambda: _rows(file.read(up_key), rows))
    b_shape = (_row_count(rows, shape.out_features), *shape.b_shape[1:])
    return ModuleSpec(
        name=canonical, kind="conv" if len(shape.a_shape) > 2 else "linear", out_features=b_shape[0],
        in_features=math.prod(shape.a_shape[1:]), rank=shape.rank, scale=shape.scale, dtype=shape.dtype,
        a_shape=shape.a_shape, b_shape=b_shape, a_key=a_key, b_key=b_key,
    )


# diffusers UNet convolutions by name, for the LyCORIS convs whose factors the file stores flattened to
# [r, in·kh·kw] (LoHa and factored LoKr without Tucker): the file does not record the kernel, the architecture does.
_CONV_3X3 = re.compile(r"^unet\..*(resnets\.\d+\.conv[12]|(down|up)samplers\.\d+\.conv|conv_in|conv_out)$")
_CONV_1X1 = re.compile(r"^unet\..*resnets\.\d+\.conv_shortcut$")


def flat_conv_kernel(canonical: str, in_features: int) -> tuple[int, ...]:
    """The kernel of a UNet convolution named `canonical` (3×3 for resnets' conv1/conv2, the samplers, conv_in and
    conv_out; 1×1 for conv_shortcut), or () for a linear layer or a name the diffusers UNet does not use for a conv."""
    if _CONV_3X3.match(canonical) and in_features % 9 == 0:
        return (3, 3)
    if _CONV_1X1.match(canonical):
        return (1, 1)
    return ()


def _lycoris_spec(
    canonical: str, piece: Piece, module: _FileModule, shape: LycorisShape, lycoris: _LycorisCache,
    file: SafetensorsStore, store: DerivedStore,
) -> ModuleSpec:
    rows = piece.rows
    kernel = tuple(shape.kernel) or flat_conv_kernel(canonical, shape.in_features)
    in_channels = shape.in_features // math.prod(kernel)

    def factor_a() -> torch.Tensor:
        a, _, _ = lycoris.factors(module)
        return a.reshape(shape.rank, in_channels, *kernel)

    def factor_b() -> torch.Tensor:
        _, b, scale = lycoris.factors(module)
        # The scale is folded into B: the spec's scale is 1, as for any derived factor.
        return _rows(b * scale, rows).reshape(-1, shape.rank, *(1 for _ in kernel))

    factor_key = next(key for part, key in module.keys.items() if part != "alpha")
    dtype = FLOAT_DTYPES.get(file.header(factor_key)[1], torch.float32)
    out = _row_count(rows, shape.out_features)
    return ModuleSpec(
        name=canonical, kind="conv" if kernel else "linear", out_features=out, in_features=shape.in_features,
        rank=shape.rank, scale=1.0, dtype=dtype, a_shape=(shape.rank, in_channels, *kernel),
        b_shape=(out, shape.rank, *(1 for _ in kernel)), a_key=store.add(f"{canonical}.A", factor_a),
        b_key=store.add(f"{canonical}.B", factor_b),
    )


def _diffusers_specs(
    modules: dict[str, _FileModule], file: SafetensorsStore, store: DerivedStore, source: str
) -> dict[str, ModuleSpec]:
    old = {m.name: m for m in modules.values() if "down.weight" in m.keys or "up.weight" in m.keys}
    specs: dict[str, ModuleSpec] = {}
    configs = _component_configs(file, source)
    if old:
        rows = {name: file.header(m.keys["up.weight"])[0][0] for name, m in old.items() if "up.weight" in m.keys}
        for name, module in old.items():
            if {"down.weight", "up.weight"} - set(module.keys):
                raise CorruptAdapterError(f"{source}: module {name} lacks its down or up weight; the file is incomplete.")
        for canonical, piece in diffusers_old_to_canonical(rows, source=source).items():
            module = old[piece.module]
            keys = {"lora_A.weight": module.keys["down.weight"], "lora_B.weight": module.keys["up.weight"]}
            if "alpha" in module.keys:
                keys["alpha"] = module.keys["alpha"]
            specs[canonical] = _diffusers_spec(canonical, keys, file, configs, source)
    for module in modules.values():
        if module.name in old:
            continue
        if not {"lora_A.weight", "lora_B.weight"} <= set(module.keys):
            raise CorruptAdapterError(f"{source}: module {module.name} lacks lora_A or lora_B; the file is incomplete.")
        specs[module.name] = _diffusers_spec(module.name, module.keys, file, configs, source)
    return dict(sorted(specs.items()))


def _component_configs(file: SafetensorsStore, source: str) -> dict[str, AdapterConfig]:
    """The per-component LoraConfig that diffusers' `save_lora_weights` stores in the metadata (`unet.r`,
    `unet.lora_alpha`, …), as configs that give each module's scale."""
    raw = file.metadata().get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CorruptAdapterError(f"{source}: its lora_adapter_metadata is not valid JSON ({err}).") from None
    if not isinstance(packed, dict):
        raise CorruptAdapterError(f"{source}: its lora_adapter_metadata is not a JSON object.")
    from .peft import parse_config

    configs: dict[str, AdapterConfig] = {}
    for component in COMPONENTS:
        entries = {k[len(component) + 1:]: v for k, v in packed.items() if k.startswith(f"{component}.")}
        if entries:
            configs[component] = parse_config({"peft_type": "LORA", **entries}, f"{source} ({component})")
    return configs


def _diffusers_spec(
    name: str, keys: Mapping[str, str], file: SafetensorsStore, configs: Mapping[str, AdapterConfig], source: str
) -> ModuleSpec:
    a_shape, dtype = file.header(keys["lora_A.weight"])
    b_shape, _ = file.header(keys["lora_B.weight"])
    rank = a_shape[0] if a_shape else 0
    if not is_lora_pair(a_shape, b_shape):
        raise CorruptAdapterError(
            f"{source}: module {name} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, which do not form a "
            "LoRA pair of one rank."
        )
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedAdapterError(f"{source}: module {name} is stored as {dtype}; only float tensors merge.")
    component, _, inner = name.partition(".")
    if "alpha" in keys:
        scale = _file_alpha(file, keys["alpha"], module=name, source=source) / rank
    elif component in configs:
        scale = configs[component].scale_for(inner, rank)
    else:
        scale = 1.0  # diffusers' convention without alphas or metadata: alpha = rank in every module
    return ModuleSpec(
        name=name, kind="conv" if len(a_shape) > 2 else "linear", out_features=b_shape[0],
        in_features=math.prod(a_shape[1:]),
        rank=rank, scale=scale, dtype=FLOAT_DTYPES[dtype], a_shape=a_shape, b_shape=b_shape,
        a_key=keys["lora_A.weight"], b_key=keys["lora_B.weight"], bias_key=keys.get("lora_B.bias"),
    )
