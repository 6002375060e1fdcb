"""JSON-lines files of examples (the support sets of LoRAHub and ICM-Fusion), read with every error naming its line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_objects(
    path: str | Path, error: type[Exception], *, hint: str
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """`(line number, "file:line", object)` for each non-blank line of `path`, each one JSON object.

    Args:
        path: the file.
        error: the exception raised for a bad file or line (the caller's own, e.g. `SupportDataError`).
        hint: what the user should pass instead of a missing file, e.g. "a JSONL file of examples (--support)".

    Raises:
        error: the file is missing or not UTF-8 text, or a line is not a JSON object (named `file:line`).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise error(f"support file {file} does not exist; pass {hint}.")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"support file {file} cannot be read as UTF-8 text ({err}).") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not JSON ({err.msg}); each line must be one object.") from None
        except RecursionError:  # json's decoder recurses once per nesting level
            raise error(f"{where}: nested too deeply; each line must be one flat object.") from None
        if not isinstance(record, dict):
            raise error(f"{where}: a JSON {type(record).__name__}, not an object; each line must be one object.")
        yield number, where, record
