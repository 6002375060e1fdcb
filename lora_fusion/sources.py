"""Find adapters on disk or on the Hub, validate them, and open their tensors lazily.

Only the adapter's own files are ever downloaded (`adapter_config.json` and `adapter_model.safetensors`, or the legacy
`adapter_model.bin`), never base-model weights. `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_ENDPOINT` and the standard cache are
honoured because all Hub traffic goes through huggingface_hub. Legacy `.bin` files are unpickled with
`torch.load(weights_only=True)`: no code from a downloaded file ever runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from .adapter import AdapterConfig, LoraAdapter, ModuleSpec, SourceInfo
from .errors import (
    CorruptAdapterError,
    HubError,
    InvalidParameterError,
    NotALoraAdapterError,
    SourceNotFoundError,
    UnsupportedAdapterError,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_NAME = "adapter_model.bin"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_NAME = re.compile(r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?", re.ASCII)
_FACTOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)$")
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_BASE_COPY_KEY = re.compile(r"^(?:base_model\.model\.)?.+\.base_layer\.weight$")
# A module path as `nn.Module.named_modules()` spells it: dotted names, no separators, no empty or `..` segments.
_MODULE_PATH = re.compile(r"^[\w-]+(?:\.[\w-]+)*$", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# init_lora_weights values whose training changed the base weights themselves: the factors alone are not the update.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def load_adapter(
    source: str | Path,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    config: str | Path | None = None,
) -> LoraAdapter:
    """Open a LoRA adapter from a local directory, a single safetensors file, or a Hub repo; tensors stay on disk.

    Args:
        source: a local adapter directory, a `.safetensors`/`.bin` file, or a Hub repo id `owner/name[@revision]`.
        revision: branch, tag or commit on the Hub (overrides `@revision` in `source`).
        subfolder: folder inside the repo or directory that holds the adapter files.
        token: Hub token; by default `HF_TOKEN` or the stored login. Never written anywhere.
        config: `adapter_config.json` to use with a single weights file (default: the file next to it).

    Returns:
        [`LoraAdapter`] whose modules are known from headers; factors are read when used.

    Raises:
        SourceNotFoundError: no such path, repo, revision or file.
        NotALoraAdapterError: the source is not a PEFT LoRA adapter (e.g. a full model).
        UnsupportedAdapterError: a LoRA variant that cannot be merged exactly (DoRA, PiSSA, ...), named.
        CorruptAdapterError: unreadable or inconsistent files.
        HubError: authentication, network or server errors, with what to do.

    Example:
        ```python
        >>> adapter = load_adapter("org/math-lora@main")
        >>> sorted(adapter.modules)[:1]
        ['model.layers.0.self_attn.q_proj']
        ```
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        info = SourceInfo(source=text, subfolder=subfolder, path=str(path.resolve()))
        if path.is_file():
            return open_adapter_files(Path(config) if config else path.parent / CONFIG_NAME, path, info)
        folder = path / subfolder if subfolder else path
        config_path, weights_path = Path(config) if config else folder / CONFIG_NAME, _weights_file(folder)
        for file in (weights_path, *(() if config else (config_path,))):
            _refuse_outside_links(file, folder, text)
        return open_adapter_files(config_path, weights_path, info)
    repo_id, _, at_revision = text.partition("@")
    if not is_repo_id(repo_id):
        raise SourceNotFoundError(f"{text}: no such file or directory, and not a Hub repo id (owner/name[@revision]).")
    return _load_from_hub(repo_id, revision=revision or at_revision or None, subfolder=subfolder, token=token)


def is_repo_id(text: str) -> bool:
    """Whether `text` can be a Hub repo id (`name` or `owner/name`)."""
    return bool(_REPO_ID.match(text))


def check_push_repo_id(repo_id: str) -> None:
    """Refuse a repo id that the Hub would reject, before any merge or upload work.

    The Hub's rules (as huggingface_hub's `validate_repo_id`): `owner/name`, each part 1–96 letters, digits, `-`, `_`
    or `.`, not starting or ending with `-` or `.`, no `--` or `..`, not ending in `.git`. An owner is required here:
    a bare name would land in whichever account the token belongs to.

    Raises:
        InvalidParameterError: naming what is wrong and giving the form to use.
    """
    owner, slash, name = repo_id.partition("/")
    problem = None
    if not slash:
        problem = "it has no owner; write owner/name (your user or organisation name, then the repo name)"
    elif not all(_HUB_NAME.fullmatch(part) for part in (owner, name)):
        problem = "owner and name may hold only letters, digits, '-', '_' and '.', not starting or ending with '-' or '.'"
    elif "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        problem = "it may not contain '--' or '..' or end with '.git'"
    if problem:
        raise InvalidParameterError("Hub repo id", repo_id, expected=f"owner/name ({problem}), e.g. me/math-code")


def _refuse_outside_links(file: Path, folder: Path, source: str) -> None:
    """Refuse an adapter file that resolves outside its directory (a symlink to ~/.ssh/id_rsa, /proc/..., ...).

    A snapshot folder of the Hugging Face cache is the one layout where links leave the folder legitimately: its
    files point into the same repo's `blobs/`, which is allowed.
    """
    if not file.exists():
        return
    root, target = folder.resolve(), file.resolve()
    if target.is_relative_to(root):
        return
    parts = root.parts
    if "snapshots" in parts:
        repo = Path(*parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
        if target.is_relative_to(repo / "blobs"):
            return
    raise CorruptAdapterError(
        f"{source}: {file.name} is a link to {target}, outside the adapter directory; refusing to read it. "
        "Copy the file into the directory if you trust it."
    )


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


def open_adapter_files(config_path: Path, weights_path: Path, info: SourceInfo) -> LoraAdapter:
    """Validate a config and a weights file and open them as a [`LoraAdapter`] (headers only)."""
    if not config_path.is_file():
        if (config_path.parent / "config.json").is_file():
            raise NotALoraAdapterError(
                f"{info.source} has config.json but no {CONFIG_NAME}: it looks like a full model, not a LoRA adapter."
            )
        raise SourceNotFoundError(f"{info.source}: {config_path} not found; a LoRA adapter needs its {CONFIG_NAME}.")
    config = parse_config(_read_json(config_path, info.source), info.source)
    store: SafetensorsStore | PickleStore
    store = SafetensorsStore(weights_path, info.source) if weights_path.suffix != ".bin" else PickleStore(weights_path, info.source)
    modules = _module_specs(store, config, info.source)
    return LoraAdapter(config=config, modules=modules, store=store, source=info)


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
        "use_dora": "DoRA: its update depends on the base weights and is not a low-rank sum",
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


class SafetensorsStore:
    """A safetensors file opened lazily: headers on open, one tensor per read (memory-mapped)."""

    def __init__(self, path: Path, source: str) -> None:
        from safetensors import SafetensorError, safe_open

        self.path, self.source = path, source
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptAdapterError(
                f"{source}: {path.name} is not a readable safetensors file ({err}); re-download the adapter."
            ) from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        piece = self._file.get_slice(key)
        return tuple(piece.get_shape()), piece.get_dtype()

    def read(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


class PickleStore:
    """A legacy `adapter_model.bin`, unpickled with `weights_only=True` (no code runs) and memory-mapped."""

    def __init__(self, path: Path, source: str) -> None:
        self.path, self.source = path, source
        try:
            # mmap needs torch's zip format; files of torch < 1.6 are read whole, still with weights_only.
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as err:  # torch raises UnpicklingError, RuntimeError or others for hostile or broken files
            raise CorruptAdapterError(
                f"{source}: {path.name} could not be read as plain tensors ({type(err).__name__}); it may be "
                "corrupted or carry code, which is never run. Ask for a safetensors version of the adapter."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CorruptAdapterError(f"{source}: {path.name} does not hold a mapping of names to tensors.")
        self._state: dict[str, torch.Tensor] = state

    def keys(self) -> list[str]:
        return list(self._state)

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        tensor = self._state[key]
        names = {v: k for k, v in _DTYPES.items()}
        return tuple(tensor.shape), names.get(tensor.dtype, str(tensor.dtype))

    def read(self, key: str) -> torch.Tensor:
        return self._state[key]


def _module_specs(store: SafetensorsStore | PickleStore, config: AdapterConfig, source: str) -> dict[str, ModuleSpec]:
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
        if key in base_copies:
            continue
        match = _FACTOR_KEY.match(key) or _EMBEDDING_KEY.match(key)
        if match is None:
            feature = "DoRA" if "lora_magnitude_vector" in key else "a tensor that is not a LoRA factor"
            raise UnsupportedAdapterError(
                f"{source}: {_short(key)} is {feature}; only plain LoRA factors can be merged."
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
    for name, spec in specs.items():
        if excluded is not None and _selects(excluded, name, source):
            raise CorruptAdapterError(
                f"{source}: module {name} has LoRA tensors but exclude_modules={_short(excluded)} excludes it; PEFT "
                f"would refuse to load this adapter. Fix {CONFIG_NAME} or the weights file."
            )
        if targets is None:
            continue
        selected = spec.kind == "linear" if targets == "all-linear" else _selects(targets, name, source)
        if not selected:
            raise CorruptAdapterError(
                f"{source}: module {name} has LoRA tensors but target_modules={_short(targets)} does not select it; "
                f"PEFT would refuse to load this adapter. Fix {CONFIG_NAME} or the weights file."
            )


def _selects(pattern: str | list[str], module: str, source: str) -> bool:
    if isinstance(pattern, str):
        try:
            return re.fullmatch(pattern, module) is not None
        except re.error:
            raise CorruptAdapterError(
                f"{source}: {CONFIG_NAME} has the pattern {_short(pattern)}, which is not a valid regular expression."
            ) from None
    return any(module == target or module.endswith(f".{target}") for target in pattern)


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
    consistent = (
        len(a_shape) >= 2
        and len(b_shape) == len(a_shape)
        and b_shape[1] == rank
        and all(d == 1 for d in b_shape[2:])
        and rank > 0
    )
    if not consistent:
        raise CorruptAdapterError(
            f"{source}: module {module} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, which do not form "
            "a LoRA pair (A r×in…, B out×r…); grouped convolutions are not supported."
        )
    if a_dtype not in _DTYPES:
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
        dtype=_DTYPES[a_dtype],
        a_shape=a_shape,
        b_shape=b_shape,
        a_key=keys["lora_A"],
        b_key=keys["lora_B"],
        bias_key=bias_key,
    )


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


def _load_from_hub(repo_id: str, *, revision: str | None, subfolder: str | None, token: str | None) -> LoraAdapter:
    config_path = _hub_file(repo_id, CONFIG_NAME, revision=revision, subfolder=subfolder, token=token)
    commit = _commit_of(config_path)
    # Pin the weights to the commit the config came from, so both files belong to one revision.
    pinned = commit or revision
    weights = _hub_file(repo_id, SAFETENSORS_NAME, revision=pinned, subfolder=subfolder, token=token, optional=True)
    if weights is None:
        weights = _hub_file(repo_id, LEGACY_NAME, revision=pinned, subfolder=subfolder, token=token, optional=True)
    if weights is None:
        raise NotALoraAdapterError(f"{repo_id}: has {CONFIG_NAME} but no {SAFETENSORS_NAME} or {LEGACY_NAME}.")
    info = SourceInfo(source=repo_id, revision=revision, subfolder=subfolder, commit=commit, path=str(weights.parent))
    return open_adapter_files(config_path, weights, info)


def _commit_of(path: Path) -> str | None:
    # The standard cache lays files out as .../snapshots/<commit>/<subfolder>/<file>.
    parts = path.parts
    if "snapshots" in parts:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


# A Hub that accepts connections but answers nothing is retried by huggingface_hub for many minutes (HEAD timeouts of
# 10 s, six attempts, backoff sleeps, then the GET's own): give up after this long without a byte arriving.
HUB_TIMEOUT_ENV = "LORA_FUSION_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT_S = 60.0
T = TypeVar("T")


def hub_timeout() -> float:
    """Seconds the Hub may stay silent before a download or upload is given up (`LORA_FUSION_HUB_TIMEOUT`, 60)."""
    text = os.environ.get(HUB_TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_HUB_TIMEOUT_S
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise InvalidParameterError(HUB_TIMEOUT_ENV, text, expected="a number of seconds > 0, e.g. 60")
    return value


def call_hub(
    fn: Callable[[], T], *, repo_id: str, progress: Callable[[], int] | None = None, limit: float | None = None
) -> T:
    """Run one huggingface_hub call, giving up once the Hub has sent nothing for `limit` seconds ([`hub_timeout`]).

    `progress` returns a number that grows while data arrives (bytes in the cache's blobs folder), so a slow but
    moving transfer of a large adapter is never cut; without it the whole call must finish within `limit`. The call
    runs in a daemon thread: when it is given up, the thread is left to huggingface_hub's own timeouts and never
    blocks the interpreter's exit.

    Raises:
        HubError: the Hub stayed silent too long (one line, with the setting that changes the limit).
    """
    limit = hub_timeout() if limit is None else limit
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # handed to the caller's thread, which re-raises it
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"lora-fusion-hub-{repo_id}", daemon=True)
    worker.start()
    seen, since = progress() if progress else None, time.monotonic()
    while True:
        worker.join(timeout=min(1.0, limit))
        if not worker.is_alive():
            break
        now, current = time.monotonic(), progress() if progress else None
        if current != seen:
            seen, since = current, now
        elif now - since >= limit:
            raise HubError(
                f"{repo_id}: the Hub did not answer for {limit:.3g} s, so lora-fusion gave up; try again later (on a "
                f"slow network set {HUB_TIMEOUT_ENV} to more seconds than its {hub_timeout():g})."
            )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def cache_progress(repo_id: str) -> Callable[[], int]:
    """Bytes in the standard cache's blobs folder of `repo_id` (growing while huggingface_hub downloads into it)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"

    def size() -> int:
        try:
            return sum(entry.stat().st_size for entry in os.scandir(blobs))
        except OSError:  # not created yet, or a blob renamed while listing
            return 0

    return size


def _hub_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None,
    subfolder: str | None,
    token: str | None,
    optional: bool = False,
) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def download() -> str:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, token=token)

    try:
        return Path(call_hub(download, repo_id=repo_id, progress=cache_progress(repo_id)))
    except HubError:
        raise
    except LocalEntryNotFoundError as err:  # a subclass of EntryNotFoundError: unreachable, not absent
        raise hub_error(err, repo_id, revision) from None
    except EntryNotFoundError:
        if optional:
            return None
        where = f"{repo_id}/{subfolder}" if subfolder else repo_id
        raise NotALoraAdapterError(
            f"{where} has no {filename}: it is not a PEFT LoRA adapter (a full model?). Pass an adapter repo, "
            "or --subfolder if the adapter lives in a folder of the repo."
        ) from None
    except Exception as err:
        raise hub_error(err, repo_id, revision) from None


def hub_error(err: Exception, repo_id: str, revision: str | None = None) -> Exception:
    """Translate a huggingface_hub exception into a one-line [`LoraFusionError`] that says what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        return HubError(f"{repo_id} is gated: accept its terms on the Hub page, then log in (HF_TOKEN).")
    if isinstance(err, RepositoryNotFoundError) and "/" not in repo_id:
        return SourceNotFoundError(
            f"{repo_id}: no such local file or directory, and no Hub repo of that name. Hub ids are owner/name "
            f"(e.g. someone/{repo_id}); only a few legacy models have no owner. Check the path or give the owner."
        )
    if isinstance(err, RepositoryNotFoundError):
        return SourceNotFoundError(
            f"{repo_id}: no such local path, and no such Hub repo (or it is private): check the id, "
            "or log in with `hf auth login` / HF_TOKEN."
        )
    if isinstance(err, RevisionNotFoundError):
        return SourceNotFoundError(f"{repo_id}: revision {revision!r} not found; check the branch, tag or commit.")
    cause = err.__cause__
    if isinstance(err, LocalEntryNotFoundError) and isinstance(cause, HfHubHTTPError):
        # hf_hub_download retried the metadata request (429, 5xx) before giving up and looking in the cache
        return _status_error(repo_id, cause, " after huggingface_hub's retries")
    if isinstance(err, LocalEntryNotFoundError) and "timeout" in type(cause).__name__.lower():
        return HubError(
            f"{repo_id}: the Hub did not answer in time ({type(cause).__name__}, after huggingface_hub's retries) and "
            "the files are not in the local cache; try again later, or raise HF_HUB_ETAG_TIMEOUT on a slow network."
        )
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return HubError(
            f"{repo_id}: cannot reach the Hub and the files are not in the local cache. Check the network, or "
            "download once online; with HF_HUB_OFFLINE=1 only cached adapters are used."
        )
    if isinstance(err, HfHubHTTPError):
        return _status_error(repo_id, err)
    if isinstance(err, OSError) or "connect" in type(err).__name__.lower():
        return HubError(
            f"{repo_id}: the Hub could not be reached ({type(err).__name__}). Check the network; with "
            "HF_HUB_OFFLINE=1 adapters already in the cache are used."
        )
    return err


def _status_error(repo_id: str, err: Exception, retried: str = "") -> HubError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return HubError(f"{repo_id}: the Hub refused the credentials (401); log in again or set HF_TOKEN.")
    if status == 403:
        return HubError(f"{repo_id}: the token lacks permission (403); use a token with write access.")
    if status == 429:
        return HubError(
            f"{repo_id}: the Hub is rate-limiting requests (429{retried}); wait a few minutes and try again, or log "
            "in (HF_TOKEN) for a higher limit."
        )
    kind = " (a server error)" if isinstance(status, int) and status >= 500 else ""
    return HubError(f"{repo_id}: the Hub answered {status}{kind}{retried}; try again later.")
