"""Adapter file formats: what a format is (detect, fetch, read, write) and which formats exist.

One module per format owns its file names, config and key mapping; everything else (`load_adapter`, the writer)
goes through the [`AdapterFormat`] interface: `peft` (folders), `diffusers` (folders with one safetensors file) and
`kohya` (one file; ComfyUI, kohya-Flux and LyCORIS files are read by it too). Diffusion files are read into
canonical diffusers module names ([`lora_fusion.formats.keymaps`]), so files of different formats merge together.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import InvalidParameterError
from .diffusers import DIFFUSERS
from .kohya import KOHYA
from .peft import PEFT

if TYPE_CHECKING:
    from ..adapter import LoraAdapter
    from ..spec import AdapterContents


class AdapterFormat(Protocol):
    """One adapter file format, read into the adapter model ([`lora_fusion.spec`]) and written from a [`LoraAdapter`].

    Attributes:
        name: what users call it (`peft`).
        file_names: the names of the files it reads and writes in a folder (what `--overwrite` may replace).
        single_file: whether its output is one file (kohya) rather than a folder.
        library_name: the model card's `library_name` (None: no card, e.g. a single file).
        usage: the model card's code that loads the output.
    """

    name: str
    file_names: frozenset[str]
    single_file: bool
    library_name: str | None
    usage: str

    def detect(self, path: Path) -> bool:
        """Whether the local folder or file `path` holds an adapter in this format."""
        ...

    def read(self, path: Path, *, source: str, config: Path | None = None) -> AdapterContents:
        """Validate the adapter at `path` (a folder or a weights file) and open it, headers only; `source` names it
        in errors."""
        ...

    def write(self, adapter: LoraAdapter, target: Path, *, metadata: Mapping[str, str]) -> None:
        """Write `adapter` into the existing, empty folder `target` (or, for a single-file format, the file
        `target`), `metadata` (provenance) in the weights file."""
        ...


FORMATS: tuple[AdapterFormat, ...] = (PEFT, DIFFUSERS, KOHYA)
# The format lora-fusion writes, and the one assumed where nothing tells formats apart (a Hub repo is not listed).
DEFAULT_FORMAT: AdapterFormat = PEFT


def detect_format(path: Path) -> AdapterFormat:
    """The format of the local folder or file `path`: the first that recognises it, else [`DEFAULT_FORMAT`], whose
    reader then says what such an adapter needs (its messages name the missing files)."""
    return next((known for known in FORMATS if known.detect(path)), DEFAULT_FORMAT)


def format_named(name: str) -> AdapterFormat:
    """The format called `name` (`peft`, `diffusers`, `kohya`).

    Raises:
        InvalidParameterError: no such format; the message lists them.
    """
    for known in FORMATS:
        if known.name == name:
            return known
    raise InvalidParameterError("format", name, expected="one of " + ", ".join(f.name for f in FORMATS))
