"""The PEFT adapter format: its file names, `adapter_config.json` (read with validation, and written), and the map
between state-dict keys (`base_model.model.<module>.lora_A.weight`, …) and module names, in both directions.

Reading checks that a config and a weights file describe a plain LoRA that merges exactly, and refuses anything else
with the reason; writing records each module's scale in the config (`alpha_pattern`, see `peft_config`), so a
file's factors are written unchanged. The reader serves
`load_adapter` and the writer's check of what it wrote alike.
"""

from __future__ import annotations

import functools
import json
import math
import re
import reprlib
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import (
    CorruptAdapterError,
    NotALoraAdapterError,
    OutputOverflowError,
    SourceNotFoundError,
    UnsupportedAdapterError,
)
from ..hub import commit_of, download_file
from ..spec import AdapterConfig, AdapterContents, ModuleSpec, all_finite, is_lora_pair, shaped
from .stores import (
    FLOAT_DTYPES,
    PendingTensor,
    PickleStore,
    SafetensorsStore,
    refuse_outside_links,
    save_safetensors,
)

if TYPE_CHECKING:
    from ..adapter import LoraAdapter

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_NAME = "adapter_model.bin"

_FACTOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)$")
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_magnitude_vector)$")
_BASE_COPY_KEY = re.compile(r"^(?:base_model\.model\.)?.+\.base_layer\.weight$")
# A module path as `nn.Module.named_modules()` spells it: dotted names, no separators, no empty or `..` segments.
_MODULE_PATH = re.compile(r"^[\w-]+(?:\.[\w-]+)*$", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# init_lora_weights values whose training changed the base weights themselves: the factors alone are not the update.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class PeftFormat:
    """PEFT's adapter folder: `adapter_config.json` and `adapter_model.safetensors` (or the legacy `.bin`)."""

    name = "peft"
    file_names = frozenset({CONFIG_NAME, SAFETENSORS_NAME, LEGACY_NAME})
    single_file = False
    library_name = "peft"
    usage = 'from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, "<this repo or folder>")'

    def detect(self, path: Path) -> bool:
        """Whether `path` is a folder with an `adapter_config.json`, or a weights file with one beside it."""
        folder = path.parent if path.is_file() else path
        return (folder / CONFIG_NAME).is_file()

    def fetch(self, repo_id: str, *, revision: str | None, subfolder: str | None, token: str | None) -> Path:
        """Download the config, then the weights of the commit the config came from (so both belong to one revision,
        even if the branch moves meanwhile): safetensors if the repo has it, else the legacy `.bin`.

        Returns:
            The cache's snapshot folder that holds both files.

        Raises:
            NotALoraAdapterError: the repo (or its `subfolder`) has no adapter config, or no weights beside it.
        """
        config = download_file(repo_id, CONFIG_NAME, revision=revision, subfolder=subfolder, token=token)
        if config is None:
            where = f"{repo_id}/{subfolder}" if subfolder else repo_id
            raise NotALoraAdapterError(
                f"{where} has no {CONFIG_NAME}: it is not a PEFT LoRA adapter (a full model?). Pass an adapter repo, "
                "or --subfolder if the adapter lives in a folder of the repo."
            )
        pinned = commit_of(config) or revision
        for name in (SAFETENSORS_NAME, LEGACY_NAME):
            weights = download_file(repo_id, name, revision=pinned, subfolder=subfolder, token=token)
            if weights is not None:
                return weights.parent
        raise NotALoraAdapterError(f"{repo_id}: has {CONFIG_NAME} but no {SAFETENSORS_NAME} or {LEGACY_NAME}.")

    def read(
        self, path: Path, *, source: str, config: Path | None = None, saved_modules: bool = False
    ) -> AdapterContents:
        """Validate a PEFT adapter and open it (headers only).

        Args:
            path: the adapter folder, or its weights file.
            source: what the user called it, for messages.
            config (*optional*): the `adapter_config.json` to use (default: the one in the folder, or beside the
                weights file).
            saved_modules (*optional*): accept `modules_to_save` and skip their whole tensors (the writer's check
                of an extracted adapter); merges refuse them.

        Raises:
            SourceNotFoundError, NotALoraAdapterError, UnsupportedAdapterError, CorruptAdapterError: as
                [`load_adapter`] documents them.
        """
        if path.is_file():
            config_path, weights_path = config or path.parent / CONFIG_NAME, path
        else:
            config_path, weights_path = config or path / CONFIG_NAME, _weights_file(path)
            for file in (weights_path, *(() if config else (config_path,))):
                refuse_outside_links(file, path, source)
        if not config_path.is_file():
            if (config_path.parent / "config.json").is_file():
                raise NotALoraAdapterError(
                    f"{source} has config.json but no {CONFIG_NAME}: it looks like a full model, not a LoRA adapter."
                )
            raise SourceNotFoundError(f"{source}: {config_path} not found; a LoRA adapter needs its {CONFIG_NAME}.")
        raw = _read_json(config_path, source)
        saved = frozenset(raw.get("modules_to_save") or ()) if saved_modules else frozenset()
        if saved_modules:
            raw = {k: v for k, v in raw.items() if k != "modules_to_save"}
        parsed = parse_config(raw, source)
        legacy = weights_path.suffix == ".bin"
        store: PickleStore | SafetensorsStore
        store = PickleStore(weights_path, source) if legacy else SafetensorsStore(weights_path, source)
        modules = _module_specs(store, parsed, source, saved=saved)
        return AdapterContents(config=parsed, modules=modules, store=store, files=(config_path, weights_path))

    def write(self, adapter: LoraAdapter, folder: Path, *, metadata: Mapping[str, str]) -> None:
        """Write `adapter_model.safetensors` (PEFT's keys, the factors as the source holds them, `metadata` in the
        header) and `adapter_config.json` ([`peft_config`], each module's scale in it) into `folder`."""
        save_safetensors(_output_tensors(adapter), folder / SAFETENSORS_NAME, metadata=metadata)
        (folder / CONFIG_NAME).write_text(json.dumps(peft_config(adapter), indent=2, sort_keys=True) + "\n")


PEFT = PeftFormat()


def state_dict_keys(spec: ModuleSpec) -> tuple[str, str, str | None]:
    """PEFT's state-dict keys of a module's A, B and lora_B bias (None when the module has none):
    `base_model.model.<name>.lora_A.weight`, `….lora_B.weight`, `….lora_B.bias`; `lora_embedding_A`/`_B` (no
    `.weight`) for embeddings. The inverse of the key patterns the reader matches."""
    prefix = f"base_model.model.{spec.name}"
    if spec.kind == "embedding":
        a_key, b_key = f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    else:
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
    return a_key, b_key, f"{prefix}.lora_B.bias" if spec.bias_key else None


def _weights_file(folder: Path) -> Path:
    for name in (SAFETENSORS_NAME, LEGACY_NAME):
        if (folder / name).is_file():
            return folder / name
    if (folder / "config.json").is_file() and not (folder / CONFIG_NAME).is_file():
        raise NotALoraAdapterError(
            f"{folder} holds config.json but no {CONFIG_NAME}: it looks like a full model, not a LoRA adapter. "
            "Pass the directory of a PEFT LoRA adapter."
        )
    raise SourceNotFoundError(f"{folder} has no {SAFETENSORS_NAME} or {LEGACY_NAME}; pass a PEFT adapter directory.")


def _read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptAdapterError(f"{source}: {path.name} is not valid JSON ({err}); re-download the adapter.") from None
    except RecursionError:  # json's decoder recurses once per `[`/`{`: ~1000 levels exhaust the interpreter stack
        raise CorruptAdapterError(
            f"{source}: {path.name} is nested too deeply to be an adapter config; the file is corrupt or hostile."
        ) from None
    if not isinstance(data, dict):
        raise CorruptAdapterError(f"{source}: {path.name} must hold a JSON object.")
    return data


def parse_config(raw: Mapping[str, Any], source: str) -> AdapterConfig:
    """Check that `raw` describes a plain LoRA the project can merge exactly, and extract what the tensors mean."""
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise NotALoraAdapterError(f"{source}: {CONFIG_NAME} has no peft_type; it is not a PEFT adapter.")
    if str(peft_type).upper() != "LORA":
        raise NotALoraAdapterError(f"{source}: peft_type is {peft_type}, not LORA; only LoRA adapters can be merged.")
    _refuse_unsupported_features(raw, source)
    r = _typed(raw, "r", int, source, minimum=1)
    alpha = _typed(raw, "lora_alpha", (int, float), source, default=8, minimum=0)
    rank_pattern = _pattern(raw, "rank_pattern", int, source)
    alpha_pattern = _pattern(raw, "alpha_pattern", (int, float), source)
    return AdapterConfig(
        base_model=_text(raw, "base_model_name_or_path", source) or None,
        task_type=_text(raw, "task_type", source),
        r=r,
        lora_alpha=float(alpha),
        use_rslora=_flag(raw, "use_rslora", source),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=_flag(raw, "fan_in_fan_out", source),
        raw=dict(raw),
    )


def _flag(raw: Mapping[str, Any], key: str, source: str) -> bool:
    # bool("false") is True: a string here would silently change the scale (rslora) or the layout.
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise CorruptAdapterError(f"{source}: {CONFIG_NAME} has {key}={_short(value)}; expected true or false.")
    return bool(value)


def _text(raw: Mapping[str, Any], key: str, source: str) -> str | None:
    # These strings reach the model card and its YAML header: a newline could inject Markdown into a published card.
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or _CONTROL.search(value)):
        raise CorruptAdapterError(f"{source}: {CONFIG_NAME} has {key}={_short(value)}; expected a name on one line.")
    return value


def _refuse_unsupported_features(raw: Mapping[str, Any], source: str) -> None:
    refusals = {
        "target_parameters": "target_parameters (LoRA on nn.Parameter)",
        "modules_to_save": "modules_to_save (full copies of modules, e.g. heads, are not low-rank updates; "
        "keep them outside the merge)",
        "trainable_token_indices": "trainable_token_indices",
        "layer_replication": "layer_replication",
        "kasa_config": "KaSA",
        "use_qalora": "QA-LoRA",
        "use_bdlora": "BD-LoRA",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
        "arrow_config": "Arrow routing",
        "monteclora_config": "MonteCLoRA",
        "megatron_config": "Megatron-parallel LoRA",
    }
    for key, feature in refusals.items():
        if raw.get(key):
            raise UnsupportedAdapterError(
                f"{source}: uses {feature}, which lora-fusion cannot merge exactly; convert it to a plain LoRA first."
            )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise UnsupportedAdapterError(
            f"{source}: init_lora_weights={init!r} changed the base weights during training, so the factors alone are "
            "not the update; convert it with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)."
        )
    if raw.get("bias", "none") != "none":
        raise UnsupportedAdapterError(
            f"{source}: bias={raw.get('bias')!r} trains the base model's biases, which are not low-rank updates; "
            "retrain with bias='none' (lora_bias=True is supported)."
        )


def _typed(raw: Mapping[str, Any], key: str, kind: Any, source: str, *, default: Any = None, minimum: float) -> Any:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, kind) or not _finite(value) or value < minimum:
        raise CorruptAdapterError(
            f"{source}: {CONFIG_NAME} has {key}={_short(value)}; expected a number >= {minimum}."
        )
    return value


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 80, 40, 80


def _short(value: object) -> str:
    """repr for messages, shortened: a hostile config can hold a 400-digit r or a megabyte-long string."""
    return _REPR.repr(value)


def _finite(value: float) -> bool:
    return not isinstance(value, float) or math.isfinite(value)  # ints are finite; 10**400 does not fit a float


def _pattern(raw: Mapping[str, Any], key: str, kind: Any, source: str) -> dict[str, Any]:
    pattern = raw.get(key) or {}
    if not isinstance(pattern, dict):
        raise CorruptAdapterError(f"{source}: {CONFIG_NAME} has {key} of type {type(pattern).__name__}; expected a map.")
    for name, value in pattern.items():
        if isinstance(value, bool) or not isinstance(value, kind) or not _finite(value) or value <= 0:
            raise CorruptAdapterError(f"{source}: {key}[{_short(name)}]={_short(value)}; expected a positive number.")
        try:
            re.compile(name)
        except re.error:
            raise CorruptAdapterError(f"{source}: {key} key {name!r} is not a valid regular expression.") from None
    return dict(pattern)


def _module_specs(
    store: SafetensorsStore | PickleStore, config: AdapterConfig, source: str, *, saved: frozenset[str] = frozenset()
) -> dict[str, ModuleSpec]:
    keys: dict[str, dict[str, str]] = {}
    base_copies = [key for key in store.keys() if _BASE_COPY_KEY.match(key)]
    if base_copies:
        # PEFT's save_embedding_layers stores the (frozen) base embeddings next to the LoRA; they are base weights,
        # not part of the update, so the merge keeps the base model's own.
        warnings.warn(
            f"{source}: ignoring {len(base_copies)} copies of base-model layers saved by PEFT "
            f"({base_copies[0]}, ...); the merged adapter uses the base model's own weights.",
            stacklevel=3,
        )
    for key in store.keys():
        if key in base_copies or key.removeprefix("base_model.model.").rpartition(".")[0] in saved:
            continue
        match = _FACTOR_KEY.match(key) or _EMBEDDING_KEY.match(key) or _MAGNITUDE_KEY.match(key)
        if match is None:
            raise UnsupportedAdapterError(
                f"{source}: {_short(key)} is a tensor that is not a LoRA factor; only LoRA (and DoRA) factors can be "
                "merged."
            )
        if not _MODULE_PATH.match(match["module"]):
            raise CorruptAdapterError(
                f"{source}: tensor {_short(key)} names module {_short(match['module'])}, which is not a module path "
                "(dotted names of letters, digits, '_' and '-'; no '/', '\\', '..' or spaces); the file is corrupt "
                "or hostile."
            )
        part = match["part"].replace("_embedding", "") + ("_bias" if match.groupdict().get("param") == "bias" else "")
        keys.setdefault(match["module"], {})[part] = key
    if not keys:
        raise NotALoraAdapterError(f"{source}: the weights file holds no LoRA factors.")
    specs = {module: _module_spec(store, config, module, found, source) for module, found in sorted(keys.items())}
    _refuse_untargeted(config.raw, specs, source)
    return specs


def _refuse_untargeted(raw: Mapping[str, Any], specs: Mapping[str, ModuleSpec], source: str) -> None:
    """Refuse tensors on modules that the config's own `target_modules` does not select.

    PEFT builds LoRA layers only where `target_modules` matches and refuses to load factors elsewhere, so such a file
    was not written by PEFT for this config (or was edited). Matching follows PEFT's `check_target_module_exists`: a
    string is a regex over the whole module name; a list matches a name equal to an entry or ending in `.entry`;
    `all-linear` selects linear (and Conv1D) layers. `exclude_modules` removes matches the same way. A missing or
    null `target_modules` selects nothing in particular and is accepted.
    """
    targets, excluded = raw.get("target_modules"), raw.get("exclude_modules")
    for key, value in (("target_modules", targets), ("exclude_modules", excluded)):
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise CorruptAdapterError(
                f"{source}: {CONFIG_NAME} has {key}={_short(value)}; expected a regex string or a list of names."
            )
    # Lists become sets once: lora-fusion's own configs list every module name.
    target_set = frozenset(targets) if isinstance(targets, list) else targets
    excluded_set = frozenset(excluded) if isinstance(excluded, list) else excluded
    for name, spec in specs.items():
        if excluded_set is not None and _selects(excluded_set, name, source):
            raise CorruptAdapterError(
                f"{source}: module {name} has LoRA tensors but exclude_modules={_short(excluded)} excludes it; PEFT "
                f"would refuse to load this adapter. Fix {CONFIG_NAME} or the weights file."
            )
        if target_set is None:
            continue
        selected = spec.kind == "linear" if targets == "all-linear" else _selects(target_set, name, source)
        if not selected:
            raise CorruptAdapterError(
                f"{source}: module {name} has LoRA tensors but target_modules={_short(targets)} does not select it; "
                f"PEFT would refuse to load this adapter. Fix {CONFIG_NAME} or the weights file."
            )


def _selects(pattern: str | list[str] | frozenset[str], module: str, source: str) -> bool:
    if isinstance(pattern, str):
        try:
            return re.fullmatch(pattern, module) is not None
        except re.error:
            raise CorruptAdapterError(
                f"{source}: {CONFIG_NAME} has the pattern {_short(pattern)}, which is not a valid regular expression."
            ) from None
    # A name equal to an entry or ending in `.entry`: one of the name's dotted suffixes is an entry (a set lookup
    # each, not a scan of a list that lora-fusion's own configs fill with every module name).
    entries = pattern if isinstance(pattern, frozenset) else frozenset(pattern)
    parts = module.split(".")
    return any(".".join(parts[i:]) in entries for i in range(len(parts)))


def _module_spec(
    store: SafetensorsStore | PickleStore, config: AdapterConfig, module: str, keys: dict[str, str], source: str
) -> ModuleSpec:
    if "lora_A" not in keys or "lora_B" not in keys:
        raise CorruptAdapterError(f"{source}: module {module} lacks lora_A or lora_B; the adapter is incomplete.")
    a_shape, a_dtype = store.header(keys["lora_A"])
    b_shape, _ = store.header(keys["lora_B"])
    embedding = "embedding" in keys["lora_A"]
    kind = "embedding" if embedding else ("conv" if len(a_shape) > 2 else "linear")
    rank = a_shape[0] if a_shape else 0
    if not is_lora_pair(a_shape, b_shape):
        raise CorruptAdapterError(
            f"{source}: module {module} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, which do not form "
            "a LoRA pair (A r×in…, B out×r…); grouped convolutions are not supported."
        )
    if a_dtype not in FLOAT_DTYPES:
        raise UnsupportedAdapterError(f"{source}: module {module} is stored as {a_dtype}; only float tensors merge.")
    expected = config.expected_rank(module)
    if rank != expected:
        raise CorruptAdapterError(
            f"{source}: module {module} has rank {rank} in the weights but {_short(expected)} in {CONFIG_NAME} "
            "(r / rank_pattern); the files do not belong together."
        )
    bias_key = keys.get("lora_B_bias")
    if bias_key is not None and store.header(bias_key)[0] != (b_shape[0],):
        raise CorruptAdapterError(f"{source}: module {module} has a lora_B bias of the wrong shape.")
    magnitude_key = _magnitude_key(store, config, module, keys, kind, b_shape[0], source)
    in_features = 1
    for d in a_shape[1:]:
        in_features *= d
    scale = config.scale_for(module, rank)
    check_scale_fits(module, scale, torch.float32, source)  # the merge's arithmetic is float32
    return ModuleSpec(
        name=module,
        kind=kind,
        out_features=b_shape[0],
        in_features=in_features,
        rank=rank,
        scale=scale,
        dtype=FLOAT_DTYPES[a_dtype],
        a_shape=a_shape,
        b_shape=b_shape,
        a_key=keys["lora_A"],
        b_key=keys["lora_B"],
        bias_key=bias_key,
        magnitude_key=magnitude_key,
    )


def _magnitude_key(
    store: SafetensorsStore | PickleStore, config: AdapterConfig, module: str, keys: dict[str, str], kind: str,
    out_features: int, source: str,
) -> str | None:
    """DoRA's magnitude vector μ of `module` (shape (out,) for Linear, (1, out, 1, 1) for Conv2d, as PEFT saves it),
    present exactly when the config says `use_dora`."""
    key = keys.get("lora_magnitude_vector")
    dora = bool(config.raw.get("use_dora"))
    if key is None:
        if dora:
            raise CorruptAdapterError(f"{source}: use_dora is set but module {module} has no lora_magnitude_vector; "
                                      "the adapter is incomplete.")
        return None
    if not dora:
        raise CorruptAdapterError(f"{source}: module {module} has a lora_magnitude_vector but {CONFIG_NAME} does not "
                                  "set use_dora; the files do not belong together.")
    if kind == "embedding" or "lora_B_bias" in keys:
        feature = "an embedding" if kind == "embedding" else "lora_bias"
        raise UnsupportedAdapterError(f"{source}: module {module} is DoRA on {feature}, which lora-fusion does not "
                                      "convert; convert it to a plain LoRA first.")
    shape = store.header(key)[0]
    if [d for d in shape if d != 1] != [out_features] or shape[-1 if kind == "linear" else 1] != out_features:
        raise CorruptAdapterError(f"{source}: module {module} has a lora_magnitude_vector of shape {list(shape)}; "
                                  f"expected one value per output row ({out_features}).")
    return key


def check_scale_fits(module: str, scale: float, dtype: torch.dtype, source: str) -> None:
    """Refuse a module whose LoRA scale (alpha/r, or alpha/√r) is not a finite number of `dtype`.

    Outputs fold the scale into the factors, so a scale `dtype` cannot hold turns the written factors into Inf: say so
    when the config is read, naming the value, rather than after the merge.

    Raises:
        CorruptAdapterError: naming the module, the scale and the largest value `dtype` holds.
    """
    largest = torch.finfo(dtype).max
    if not math.isfinite(scale) or abs(scale) > largest:
        name = str(dtype).removeprefix("torch.")
        raise CorruptAdapterError(
            f"{source}: module {module} has LoRA scale {_short(scale)} (lora_alpha / r, after alpha_pattern), "
            f"beyond the largest {name} ({largest:.4g}); fix lora_alpha in {CONFIG_NAME}"
            + ("." if dtype == torch.float32 else ", or write the merge in float32 (--dtype float32).")
        )


def records_scale(spec: ModuleSpec) -> bool:
    """Whether a format with per-module alphas in its config (PEFT, diffusers) records `spec`'s scale there instead of
    folding it into the factors: any positive scale (alpha = scale·rank, which PEFT's `alpha_pattern` holds); a
    negative or zero one is folded."""
    return spec.scale > 0


def scale_split(scale: float, *, a_is_smaller: bool = False) -> tuple[float, float]:
    """A LoRA scale s as p·q for folding it into the factors (A·p, B·q): p the power of two nearest √|s|, so that
    A·p is exact and the factors keep balanced magnitudes (no underflow of half-precision values from a small s on
    one factor), and q = s/p, the one rounding (none when s is a power of two). Zero gives (1, 0).

    Where √|s| lies midway between two powers of two (s an odd power of two, as kohya's alpha = rank/2 gives: ½),
    both are as near, and the larger share goes on the factor with fewer values (`a_is_smaller`: A), so that for
    s = ½ or 2 the larger factor is written as stored, with no arithmetic: p = 1 and B·½, or A·½ and q = 1."""
    if scale == 0.0:
        return 1.0, 0.0
    half = math.log2(abs(scale)) / 2
    if half - math.floor(half) == 0.5:
        nearer_one, farther = sorted((math.floor(half), math.ceil(half)), key=abs)
        exponent = farther if a_is_smaller else nearer_one
    else:
        exponent = round(half)
    power = 2.0 ** exponent
    return power, scale / power


def output_factors(
    adapter: LoraAdapter, name: str, *, fold_scale: bool
) -> tuple[torch.Tensor | PendingTensor, torch.Tensor | PendingTensor, torch.Tensor | PendingTensor | None]:
    """One module's A and B in stored shapes and the module's dtype, and its lora_B bias (or None). Shared by every
    writer.

    With `fold_scale` the module's scale s goes into the factors (so that the format can record scale 1), split as
    [`scale_split`] says, and s into the bias; without it they are written as the source holds them (the format
    records the scale). A factor that needs no arithmetic and no cast is the source's own tensor (a view of its
    file: no copy); one that does is a [`PendingTensor`], computed when the file is written.

    Raises:
        NonFiniteError: a factor holds NaN or Inf (naming the source), checked here, before anything is written.
        OutputOverflowError: when a pending factor is computed: a value overflows the module's dtype once scaled and
            cast (the source was finite, so nothing else makes it so).
    """
    spec = adapter.modules[name]
    factors = adapter.factors(name)
    on_a, on_b = (scale_split(spec.scale, a_is_smaller=math.prod(spec.a_shape) < math.prod(spec.b_shape))
                  if fold_scale and spec.scale != 1.0 else (1.0, 1.0))  # merges: scale 1
    on_bias = spec.scale if fold_scale else 1.0
    return (_output(shaped(factors.A, spec.a_shape), on_a, spec, name),
            _output(shaped(factors.B, spec.b_shape), on_b, spec, name),
            None if factors.bias is None else _output(factors.bias, on_bias, spec, name))


def _output(tensor: torch.Tensor, factor: float, spec: ModuleSpec, name: str) -> torch.Tensor | PendingTensor:
    if factor == 1.0 and tensor.dtype == spec.dtype:
        return tensor

    # A finite factor (checked when read) scaled by at most 1 in its own dtype stays finite: no second pass.
    may_overflow = abs(factor) > 1.0 or tensor.dtype != spec.dtype

    def compute() -> torch.Tensor:
        result = (tensor if factor == 1.0 else _times(tensor, factor)).to(spec.dtype).contiguous()
        if may_overflow and not all_finite(result):
            raise OutputOverflowError(f"module {name} does not fit in {str(spec.dtype).removeprefix('torch.')} "
                                      "(a value overflows when written)")
        return result

    return PendingTensor(tuple(tensor.shape), spec.dtype, compute)


def _times(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """`tensor * factor`, bit for bit, faster for half precision on the CPU: there torch multiplies a float16 tensor
    by a float16 0-dim tensor about twice as fast as by a Python number (a kohya → kohya convert folds 73 MB of
    factors). Either way the kernel reads the multiplier as one float32 value, multiplies in float32 and rounds
    once, so where the tensor's dtype holds `factor` exactly (a power of two, as kohya's alpha = rank/2 gives) the
    products are the same; elsewhere, and off the CPU, the number is used."""
    # Zero stays a number: -0.0 and 0.0 are one key of the cache below, and their products differ in sign.
    held = _held_exactly(factor, tensor.dtype) if factor != 0.0 and tensor.is_cpu else None
    return tensor * (factor if held is None else held)


@functools.lru_cache(maxsize=64)
def _held_exactly(factor: float, dtype: torch.dtype) -> torch.Tensor | None:
    """`factor` as a 0-dim CPU `dtype` tensor (shared: only read), or None where `dtype` rounds it. Made on the CPU
    and outside inference mode whatever the first caller's context, since every later caller shares it."""
    with torch.inference_mode(False):
        held = torch.tensor(factor, dtype=dtype, device="cpu")
    return held if held.item() == factor else None


def _output_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor | PendingTensor]:
    """PEFT-keyed tensors in stored shapes; scales recorded in the config where they can be ([`records_scale`]),
    folded in otherwise ([`output_factors`])."""
    tensors: dict[str, torch.Tensor | PendingTensor] = {}
    for name, spec in adapter.modules.items():
        a, b, bias = output_factors(adapter, name, fold_scale=not records_scale(spec))
        a_key, b_key, bias_key = state_dict_keys(spec)
        tensors[a_key], tensors[b_key] = a, b
        if bias is not None and bias_key:
            tensors[bias_key] = bias
    for key, tensor in adapter.saved_modules.items():  # PEFT's modules_to_save keys: the parameter's own name
        tensors[f"base_model.model.{key}"] = tensor.contiguous()
    return tensors


def recorded_alpha(spec: ModuleSpec) -> float | int:
    """The `lora_alpha` a config records for `spec`: scale·rank where the scale is recorded ([`records_scale`]), the
    rank (scale 1) where it was folded; an int when it is one, as PEFT writes it."""
    alpha = spec.scale * spec.rank if records_scale(spec) else float(spec.rank)
    return int(alpha) if alpha.is_integer() else alpha


def most_common(values: Mapping[str, float | int]) -> float | int:
    """The value most modules share (the larger on a tie): a config's `r` or `lora_alpha`, the others in patterns."""
    counts = Counter(values.values())
    return max(counts, key=lambda value: (counts[value], value))


def peft_config(adapter: LoraAdapter) -> dict[str, Any]:
    """`adapter_config.json` for `adapter`: plain LoRA, each module's rank and alpha in the patterns.

    A module's alpha is scale·rank where its scale is recorded rather than folded ([`records_scale`]), else its rank
    (merged adapters have scale 1 everywhere, so `lora_alpha = r`); `use_rslora` is false, so PEFT's alpha/r gives
    each module its scale. `r` and `lora_alpha` are the most common values; modules that differ are listed in
    `rank_pattern` and `alpha_pattern`, keyed by the full module name, regex-escaped, which PEFT matches as
    `(.*\\.)?(key)$`, so `layers.1.` can never match `layers.11.`.
    """
    ranks = {name: spec.rank for name, spec in adapter.modules.items()}
    alphas = {name: recorded_alpha(spec) for name, spec in adapter.modules.items()}
    rank, alpha = most_common(ranks), most_common(alphas)
    return {
        "peft_type": "LORA",
        "task_type": adapter.config.task_type,
        "base_model_name_or_path": adapter.config.base_model,
        "revision": None,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(name): r for name, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {re.escape(name): a for name, a in sorted(alphas.items()) if a != alpha},
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": any(spec.bias_key for spec in adapter.modules.values()),
        "fan_in_fan_out": adapter.config.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted({key.rpartition(".")[0] for key in adapter.saved_modules}) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


