"""Adapter file formats: what a format is (detect, fetch, read, write) and which formats exist.

One module per format owns its file names, config and key mapping; everything else (`load_adapter`, the writer)
goes through the [`AdapterFormat`] interface. Only PEFT exists so far.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .peft import PEFT

if TYPE_CHECKING:
    from ..adapter import LoraAdapter
    from ..spec import AdapterContents


class AdapterFormat(Protocol):
    """One adapter file format, read into the adapter model ([`lora_fusion.spec`]) and written from a [`LoraAdapter`].

    Attributes:
        name: what users call it (`peft`).
        file_names: the names of the files it reads and writes in a folder (what `--overwrite` may replace).
    """

    name: str
    file_names: frozenset[str]

    def detect(self, path: Path) -> bool:
        """Whether the local folder or file `path` holds an adapter in this format."""
        ...

    def fetch(self, repo_id: str, *, revision: str | None, subfolder: str | None, token: str | None) -> Path:
        """Download only this format's files of a Hub repo; the local folder that holds them."""
        ...

    def read(self, path: Path, *, source: str, config: Path | None = None) -> AdapterContents:
        """Validate the adapter at `path` (a folder or a weights file) and open it, headers only; `source` names it
        in errors."""
        ...

    def write(self, adapter: LoraAdapter, folder: Path, *, metadata: Mapping[str, str]) -> None:
        """Write `adapter`'s files into the existing, empty `folder`, `metadata` (provenance) in the weights file."""
        ...


FORMATS: tuple[AdapterFormat, ...] = (PEFT,)
# The format lora-fusion writes, and the one assumed where nothing tells formats apart (a Hub repo is not listed).
DEFAULT_FORMAT: AdapterFormat = PEFT


def detect_format(path: Path) -> AdapterFormat:
    """The format of the local folder or file `path`: the first that recognises it, else [`DEFAULT_FORMAT`], whose
    reader then says what such an adapter needs (its messages name the missing files)."""
    return next((known for known in FORMATS if known.detect(path)), DEFAULT_FORMAT)
