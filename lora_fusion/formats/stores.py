"""Adapter files opened safely and lazily, whatever the format: safetensors files (memory-mapped, one tensor per read),
legacy pickles (unpickled with `weights_only=True`, so no code from a downloaded file ever runs), links that leave an
adapter's folder refused; and safetensors files written deterministically.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CorruptAdapterError

# safetensors' names of the float dtypes a merge reads (a header says "F16"; torch says torch.float16).
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Every dtype of a safetensors header that a base model's shard may hold (bake streams them without safetensors).
SAFETENSORS_DTYPES = {
    **FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def refuse_outside_links(file: Path, folder: Path, source: str) -> None:
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

    def metadata(self) -> dict[str, str]:
        """The file header's `__metadata__` (strings; empty when there is none)."""
        return dict(self._file.metadata() or {})

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        piece = self._file.get_slice(key)
        return tuple(piece.get_shape()), piece.get_dtype()

    def read(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


class PickleStore:
    """A legacy pickled state dict (PEFT's `.bin`), unpickled with `weights_only=True` (no code runs), memory-mapped."""

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
        names = {v: k for k, v in FLOAT_DTYPES.items()}
        return tuple(tensor.shape), names.get(tensor.dtype, str(tensor.dtype))

    def read(self, key: str) -> torch.Tensor:
        return self._state[key]


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, *, metadata: Mapping[str, str]) -> None:
    """Write `tensors` to the safetensors file `path` (`"format": "pt"` plus `metadata` in its header), with the
    header's keys sorted so that equal inputs give equal bytes.

    Raises:
        OSError: the disk refused the write (safetensors' own I/O errors are re-raised as OSError with their errno).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path), metadata={"format": "pt", **metadata})
    except SafetensorError as err:  # safetensors reports a full disk as "I/O error: ... (os error 28)", not OSError
        code = re.search(r"\(os error (\d+)\)", str(err))
        raise (OSError(int(code[1]), os.strerror(int(code[1]))) if code else OSError(str(err))) from None
    _sort_header(path)


def _sort_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys, same length, so equal inputs give equal bytes.

    safetensors keeps `__metadata__` in a hash map whose order changes from run to run; the data offsets are
    relative to the end of the header, so re-serialising it in place (space-padded, as the format allows) is safe.
    """
    with path.open("r+b") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for the same content; keep the file valid rather than deterministic
            return
        file.seek(8)
        file.write(text.ljust(size, b" "))
