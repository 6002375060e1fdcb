"""Adapter files opened safely and lazily, whatever the format: safetensors files (memory-mapped: a tensor is a view
of the file's pages, read when used), legacy pickles (unpickled with `weights_only=True`, so no code from a
downloaded file ever runs), links that leave an adapter's folder refused; and safetensors files written
deterministically, straight from the tensors' memory.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import mmap
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CorruptAdapterError, UnsupportedAdapterError
from ..spec import all_finite

# safetensors' names of the float dtypes a merge reads (a header says "F16"; torch says torch.float16).
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# The safetensors dtypes read and written (factors are floats; alphas may be integers; bake writes full models).
SAFETENSORS_DTYPES = {
    **FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_SCALAR_CODES = {"F32": "<f", "F64": "<d", "F16": "<e"}  # struct's codes, little-endian as safetensors stores
_METADATA = "__metadata__"  # the header's metadata key
# safetensors' own limit on a file's JSON header (100 MB).
MAX_HEADER_BYTES = 100_000_000


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


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """A safetensors file's JSON header (shared: never modify it) and its length in bytes, parsed once per version of
    the file: each format's detection and the store that then reads the file all ask.

    Raises:
        OSError: the file cannot be read.
        ValueError: the first bytes are no safetensors header (a length out of range, not a JSON object).
    """
    stat = path.stat()
    return _parsed_header(str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=8)
def _parsed_header(path: str, device: int, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> tuple[int, dict]:
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"a header of {length} bytes in a file of {size}")
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return length, header


class SafetensorsStore:
    """A safetensors file opened lazily: its header on open (validated by safetensors), a tensor per read as a
    zero-copy view of a private memory map of the file.

    The map is copy-on-write (`ACCESS_COPY`): a write into a returned tensor stays in this process and never reaches
    the file. Callers treat what they read as read-only, as with the other stores (their tensors are shared too).
    """

    def __init__(self, path: Path, source: str) -> None:
        from safetensors import SafetensorError, safe_open

        self.path, self.source = path, source
        try:
            # safetensors checks the header (offsets in bounds, contiguous, sizes matching shapes and dtypes) ...
            with safe_open(str(path), framework="pt", device="cpu") as checked:
                self._keys, self._metadata = list(checked.keys()), dict(checked.metadata() or {})
            # ... whose offsets, which safe_open does not expose, come from our own parse of it.
            size, header = safetensors_header(path)
            with path.open("rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptAdapterError(
                f"{source}: {path.name} is not a readable safetensors file ({err}); re-download the adapter."
            ) from None
        start = 8 + size
        self._entries = {
            key: (tuple(entry["shape"]), entry["dtype"], start + entry["data_offsets"][0])
            for key, entry in header.items() if key != _METADATA
        }
        self._header, self._data_start = header, start
        self._run_finite: dict[int, bool] = {}

    def keys(self) -> list[str]:
        return list(self._keys)

    def metadata(self) -> dict[str, str]:
        """The file header's `__metadata__` (strings; empty when there is none)."""
        return dict(self._metadata)

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        shape, dtype, _ = self._entries[key]
        return shape, dtype

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key`, a view of the file's pages (read-only by convention, see the class).

        Raises:
            UnsupportedAdapterError: its dtype is one torch does not have (named).
        """
        shape, name, offset = self._entries[key]
        dtype = SAFETENSORS_DTYPES.get(name)
        if dtype is None:
            raise UnsupportedAdapterError(f"{self.source}: tensor {key} is stored as {name}, which lora-fusion does "
                                          "not read.")
        count = math.prod(shape)
        if count == 0:  # frombuffer refuses empty views
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def scalar(self, key: str) -> float | None:
        """The value of `key` when it is one float32, float64 or float16 number (as a kohya `.alpha` is), read from
        the map without making a tensor (a file holds one per module); None for any other tensor: read it."""
        shape, name, offset = self._entries[key]
        code = _SCALAR_CODES.get(name)
        if code is None or math.prod(shape) != 1:
            return None
        return struct.unpack_from(code, self._map, offset)[0]

    @functools.cached_property
    def _runs(self) -> dict[str, tuple[int, torch.dtype, int, int]]:
        # Made on the first finiteness question: a store opened only to check what was written never asks.
        return _float_runs(self._header, self._data_start)

    def known_finite(self, key: str) -> bool:
        """Whether tensor `key` is known to hold no NaN or Inf. The file's float tensors are checked a run at a time
        (consecutive tensors of one dtype; one min-max pass over a run, on its first ask): LoRA files hold thousands
        of small factors, and a pass per factor costs several times more in fixed costs than in reading. False means
        unknown (its run holds a non-finite value somewhere, or it is no float tensor): check the tensor itself."""
        run = self._runs.get(key)
        if run is None:
            return False
        index, dtype, begin, end = run
        if index not in self._run_finite:
            values = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
            self._run_finite[index] = all_finite(values)
        return self._run_finite[index]


def _float_runs(header: Mapping[str, Any], start: int) -> dict[str, tuple[int, torch.dtype, int, int]]:
    """Each float tensor's run in a safetensors file: (run number, dtype, first and end byte of the run), a run being
    a longest stretch of consecutive non-empty tensors of one float dtype (safetensors packs the data contiguously)."""
    entries = sorted((entry["data_offsets"], entry["dtype"], key) for key, entry in header.items()
                     if key != _METADATA and entry["data_offsets"][1] > entry["data_offsets"][0])
    bounds: list[tuple[str, int, int]] = []  # each run's dtype name, first byte and end byte
    members: list[list[str]] = []  # each run's keys
    for (begin, end), name, key in entries:
        if bounds and bounds[-1][0] == name and bounds[-1][2] == begin:
            bounds[-1] = (name, bounds[-1][1], end)
            members[-1].append(key)
        else:
            bounds.append((name, begin, end))
            members.append([key])
    return {key: (index, FLOAT_DTYPES[name], start + begin, start + end)
            for index, ((name, begin, end), keys) in enumerate(zip(bounds, members)) if name in FLOAT_DTYPES
            for key in keys}


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


@dataclass(frozen=True)
class PendingTensor:
    """A tensor that [`save_safetensors`] computes when it writes it, its shape and dtype known before: a derived
    output (a folded factor) is made, written and freed one at a time instead of all waiting in fresh memory for the
    file's header."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    compute: Callable[[], torch.Tensor]


def materialized(value: torch.Tensor | PendingTensor) -> torch.Tensor:
    """`value` as a tensor: a [`PendingTensor`] computed now."""
    return value.compute() if isinstance(value, PendingTensor) else value


class LateMetadata(Mapping[str, str]):
    """Header metadata whose final values are known only once the data is written: a provenance record with a local
    source's sha256, which the other core is still hashing. `provisional` holds values that serialise at least as
    long as the final ones (the same record with a placeholder of the hash's length); [`save_safetensors`] sizes the
    header with it, writes the data, then writes the `final()` header over it. As a mapping it is the final one.
    """

    def __init__(self, provisional: Mapping[str, str], final: Callable[[], Mapping[str, str]]) -> None:
        self.provisional, self._final = dict(provisional), final

    @functools.cached_property
    def _items(self) -> dict[str, str]:
        return dict(self._final())

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def with_items(metadata: Mapping[str, str], extra: Mapping[str, str]) -> Mapping[str, str]:
    """`metadata` plus `extra` (which wins), still late if `metadata` is a [`LateMetadata`]."""
    if isinstance(metadata, LateMetadata):
        return LateMetadata({**metadata.provisional, **extra}, lambda: {**metadata, **extra})
    return {**metadata, **extra}


def save_safetensors(
    tensors: Mapping[str, torch.Tensor | PendingTensor], path: Path, *, metadata: Mapping[str, str]
) -> None:
    """Write `tensors` to the safetensors file `path`, `"format": "pt"` plus `metadata` in its header, so that equal
    inputs give equal bytes: the header's keys sorted, the data ordered by element size then name (each tensor
    aligned to its element size), the header padded with spaces to 8 bytes.

    Each tensor's bytes go to the file straight from its memory (a view of a source file's map is copied by the
    kernel from the page cache; no serialised copy is built, unlike `safetensors.torch.save_file`); a
    [`PendingTensor`] is computed just before its bytes are written. A [`LateMetadata`] is asked for its final values
    after the data is written (and padded with spaces to its provisional header's length); other metadata is read
    when the header is made.

    Raises:
        OSError: the disk refused the write (a full disk, ...).
        and what a [`PendingTensor`]'s computation raises (nothing is left but a partial file in the caller's stage).
    """
    order = sorted(tensors, key=lambda key: (-tensors[key].dtype.itemsize, key))
    entries: dict[str, str] = {}
    offset = 0
    for key in order:
        tensor = tensors[key]
        size = math.prod(tensor.shape) * tensor.dtype.itemsize
        entries[key] = _entry(key, _SAFETENSORS_NAMES[tensor.dtype], tensor.shape, offset, offset + size)
        offset += size
    late = isinstance(metadata, LateMetadata)
    header = _Header(entries)
    text = header.text(metadata.provisional if late else metadata)
    with path.open("wb") as file:
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        scalars: dict[int, bytes] = {}  # a kohya file's alphas: one shared tensor per rank, its bytes made once
        for key in order:
            value = tensors[key]
            if isinstance(value, torch.Tensor) and value.numel() == 1:  # alive until the end: its id stays its own
                data = scalars.get(id(value))
                if data is None:
                    data = scalars[id(value)] = bytes(tensor_bytes(value))
                file.write(data)
                continue
            tensor = materialized(value)
            assert tensor.shape == value.shape and tensor.dtype == value.dtype, f"{key} as declared"
            write_tensor_bytes(file, tensor)
        if not late:
            return
        final = header.text(metadata)
        if len(final) <= len(text):
            file.seek(8)
            file.write(final.ljust(len(text)))
            return
    # The final values outgrew their placeholders (not with a hash of the placeholder's length): write it again.
    save_safetensors(tensors, path, metadata=dict(metadata))


def _entry(key: str, dtype: str, shape: Iterable[int], begin: int, end: int) -> str:
    """One tensor's header member, as `json.dumps({key: {"data_offsets": …, "dtype": …, "shape": …}}, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)` writes it (made directly: a LoRA file has thousands)."""
    plain = key.isascii() and key.isprintable() and '"' not in key and "\\" not in key
    name = f'"{key}"' if plain else json.dumps(key, ensure_ascii=False)
    return f'{name}:{{"data_offsets":[{begin},{end}],"dtype":"{dtype}","shape":[{",".join(map(str, shape))}]}}'


class _Header:
    """A safetensors header: `{"__metadata__": {"format": "pt", ...}, ...entries}` as JSON with sorted keys, padded
    with spaces to 8 bytes, from each entry's member text ([`_entry`]), joined once for every metadata asked for (a
    late header is made twice); the bytes are `json.dumps(header, sort_keys=True)`'s: the metadata member goes where
    its key sorts among the entries' keys."""

    def __init__(self, entries: Mapping[str, str]) -> None:
        keys = sorted(entries)
        cut = bisect.bisect(keys, _METADATA)
        self._before, self._after = (",".join(entries[key] for key in part) for part in (keys[:cut], keys[cut:]))

    def text(self, metadata: Mapping[str, str]) -> bytes:
        middle = json.dumps({_METADATA: {"format": "pt", **metadata}}, sort_keys=True, separators=(",", ":"),
                            ensure_ascii=False)[1:-1]
        text = ("{" + ",".join(part for part in (self._before, middle, self._after) if part) + "}").encode()
        return text + b" " * (-len(text) % 8)


def write_tensor_bytes(file: BinaryIO, tensor: torch.Tensor) -> None:
    """Append `tensor`'s bytes to the open `file` ([`tensor_bytes`])."""
    file.write(tensor_bytes(tensor))


def tensor_bytes(tensor: torch.Tensor) -> Any:
    """`tensor`'s bytes (C order, native little-endian) as a C-contiguous buffer `file.write` takes (not always
    1-D: its length is no byte count), without a copy where the tensor is contiguous on the CPU (a view of a source
    file's map stays one)."""
    # A LoRA file's thousands of factors: two calls. (A contiguous tensor may have any stride on a dimension of
    # size 1, which view(uint8) refuses on the last one: rank-1 factors.)
    if tensor.is_cpu and tensor.dim() and tensor.is_contiguous() and tensor.stride(-1) == 1:
        return tensor.detach().view(torch.uint8).numpy()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()
