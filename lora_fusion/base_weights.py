"""A base model's weights, read one module at a time, for the methods that need W₀ (RAPF's decomposed fusion).

Only safetensors are read (a pickled checkpoint would have to be unpickled whole); a sharded model's index is read
first and each shard is opened, or downloaded from the Hub, only when one of its tensors is first needed. Tensors are
memory-mapped, so the whole model is never in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import IncompatibleAdaptersError, NonFiniteError, SourceNotFoundError
from .hub import commit_of, download_file
from .spec import ModuleSpec, all_finite

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class BaseWeights:
    """The weights of a base model (a local directory, a `.safetensors` file or a Hub repo id), opened lazily.

    Example:
        ```python
        >>> base = BaseWeights("HuggingFaceTB/SmolLM2-135M")
        >>> base.weight(adapter.modules["model.layers.0.self_attn.q_proj"]).shape
        torch.Size([576, 576])
        ```
    """

    def __init__(self, source: str | Path, *, revision: str | None = None, token: str | None = None) -> None:
        self.source = str(source)
        self._revision, self._token = revision, token
        self._files: dict[str, Any] = {}
        path = Path(self.source).expanduser()
        # a local folder holds every shard; on the Hub each shard is downloaded when first needed
        self._folder: Path | None = path.parent if path.is_file() else path if path.is_dir() else None
        if path.is_file():
            self._weight_map = self._single_file_map(path)
        elif path.is_dir():
            self._weight_map = self._local_map(path)
        else:
            self._weight_map = self._hub_map()
        self._modules = {key.removesuffix(".weight"): key for key in self._weight_map if key.endswith(".weight")}

    def weight(self, spec: ModuleSpec, *, fan_in_fan_out: bool = False) -> torch.Tensor:
        """The base weight W₀ of `spec`'s module as float32 in the canonical m×n orientation of ΔW.

        Raises:
            IncompatibleAdaptersError: the base model has no such module, or its shape differs from the adapters'.
        """
        key = self._key(spec.name)
        tensor = self._file(self._weight_map[key]).get_tensor(key).float()
        if spec.kind == "embedding" or fan_in_fan_out:
            tensor = tensor.T  # embeddings and GPT-2 Conv1D store in × out
        tensor = tensor.reshape(tensor.shape[0], -1)
        if tuple(tensor.shape) != spec.shape:
            raise IncompatibleAdaptersError(
                f"{self.source}: {key} has shape {list(tensor.shape)} but the adapters' {spec.name} is "
                f"{list(spec.shape)}; pass the base model the adapters were trained on."
            )
        if not all_finite(tensor):
            # an SVD of a weight with NaN/Inf fails deep in LAPACK or spreads NaN through every merged factor
            raise NonFiniteError(
                f"{self.source}: {key} (base weight of {spec.name}) holds NaN or Inf; the base model is corrupt: "
                "re-download it or pass the checkpoint the adapters were trained on."
            )
        return tensor

    @property
    def revision(self) -> str | None:
        """The Hub revision asked for (None: main, or a local model)."""
        return self._revision

    def tensor_names(self) -> list[str]:
        """Every tensor the checkpoint stores, in its index's order (headers only)."""
        return list(self._weight_map)

    def tensor(self, key: str) -> torch.Tensor:
        """The stored tensor `key` as saved (dtype and orientation), memory-mapped from its shard."""
        return self._file(self._weight_map[key]).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of the stored tensor `key`, from its shard's header."""
        return tuple(self._file(self._weight_map[key]).get_slice(key).get_shape())

    def commit(self) -> str | None:
        """The resolved commit of a Hub model (its cache snapshot's name), once a file was read; None for a local
        one."""
        if self._folder is not None or not self._files:
            return None
        path = self._download(next(iter(self._files)))
        return commit_of(path) if path is not None else None

    def config(self) -> dict[str, Any]:
        """The model's `config.json` (empty when there is none: a bare `.safetensors` file)."""
        name = "config.json"
        path = self._folder / name if self._folder is not None else self._download(name, optional=True)
        if path is None or not path.is_file():
            return {}
        return read_config(path, self.source)

    def _key(self, module: str) -> str:
        return module_key(module, self._modules, self.source)

    def _single_file_map(self, path: Path) -> dict[str, str]:
        if path.suffix != ".safetensors":
            raise SourceNotFoundError(f"{path}: a base model is read from safetensors files; convert it first.")
        return dict.fromkeys(self._file(path.name).keys(), path.name)

    def _local_map(self, folder: Path) -> dict[str, str]:
        if (folder / INDEX_NAME).is_file():
            return read_index(folder / INDEX_NAME, self.source)
        if (folder / WEIGHTS_NAME).is_file():
            return self._single_file_map(folder / WEIGHTS_NAME)
        raise SourceNotFoundError(
            f"{folder} has no {WEIGHTS_NAME} or {INDEX_NAME}; --base-model needs a model saved as safetensors."
        )

    def _hub_map(self) -> dict[str, str]:
        index = self._download(INDEX_NAME, optional=True)
        if index is not None:
            return read_index(index, self.source)
        return dict.fromkeys(self._file(WEIGHTS_NAME).keys(), WEIGHTS_NAME)

    def _file(self, name: str) -> Any:
        if name not in self._files:
            from safetensors import SafetensorError, safe_open

            path = self._folder / name if self._folder is not None else self._download(name)
            try:
                self._files[name] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as err:
                raise SourceNotFoundError(f"{self.source}: {name} is not a readable safetensors file ({err}).") from None
        return self._files[name]

    def _download(self, name: str, *, optional: bool = False) -> Path | None:
        path = download_file(self.source, name, revision=self._revision, token=self._token)
        if path is None and not optional:
            raise SourceNotFoundError(
                f"{self.source} has no {WEIGHTS_NAME} or {INDEX_NAME}; --base-model needs safetensors weights."
            )
        return path


def module_key(module: str, weights: dict[str, str], source: str) -> str:
    """The checkpoint key of `module`'s weight, from `weights` (module path -> key of its `.weight`).

    Adapters name modules from the model class they were trained with (e.g. "model.layers.0…" for a CausalLM),
    checkpoints sometimes with or without that prefix ("bert.encoder…" vs "encoder…"): match on a dotted suffix.

    Raises:
        IncompatibleAdaptersError: no weight, or several, match `module` (named).
    """
    if module in weights:
        return weights[module]
    matches = [key for name, key in weights.items() if name.endswith("." + module) or module.endswith("." + name)]
    if len(matches) != 1:
        found = "no weight" if not matches else f"{len(matches)} weights ({', '.join(matches[:3])})"
        raise IncompatibleAdaptersError(
            f"{source}: {found} for the adapters' module {module}; pass the base model the adapters were trained on."
        )
    return matches[0]


def read_config(path: Path, source: str) -> dict[str, Any]:
    """A model's `config.json` as a mapping.

    Raises:
        SourceNotFoundError: the file is not valid JSON or not a JSON object.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested ~1000 deep
        raise SourceNotFoundError(f"{source}: {path.name} is not valid JSON; re-download the model.") from None
    if not isinstance(config, dict):
        raise SourceNotFoundError(f"{source}: {path.name} must hold a JSON object; re-download the model.")
    return config


def read_index(path: Path, source: str) -> dict[str, str]:
    """The `weight_map` of a sharded safetensors checkpoint's index (tensor key -> shard file name).

    Raises:
        SourceNotFoundError: the index is not valid JSON of that form, or names a shard outside the model folder.
    """
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested ~1000 deep
        raise SourceNotFoundError(f"{source}: {path.name} is not a valid safetensors index.") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and "/" not in v and "\\" not in v and v not in ("", ".", "..") for v in weight_map.values()
    ):
        raise SourceNotFoundError(f"{source}: {path.name} names shard files outside the model folder.")
    return weight_map
