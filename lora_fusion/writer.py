"""The only place that writes adapters and models: stage beside the output, write the format's files (or a full
model's shards, for bake), the model card and the provenance record, check what was written by reading it back, then
rename into place; pushes go through the Hub module.

Output conventions (docs/methods.md): merged adapters have scale 1 in every module; a loaded adapter written again
(`convert`) keeps its factors as they are, its scales recorded in the PEFT or diffusers config, folded into the
factors for kohya (`.alpha` = rank); provenance names no local path. The format's own files come from [`lora_fusion.formats`] (PEFT and
diffusers folders, or one kohya file).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

from .errors import (
    CorruptAdapterError,
    InvalidParameterError,
    LoraFusionError,
    OutputExistsError,
    OutputOverflowError,
    OutputProtectedError,
    OutputWriteError,
    UnsupportedAdapterError,
)
from .formats import DEFAULT_FORMAT, FORMATS, AdapterFormat, format_named
from .formats.peft import CONFIG_NAME, SAFETENSORS_NAME
from .formats.stores import LateMetadata
from .hub import check_push_allowed, is_repo_id, push_folder
from .runtime import collection_paused, thread_limit

if TYPE_CHECKING:
    from .adapter import LoraAdapter
    from .hub import PushResult

CARD_NAME = "README.md"
# What an adapter folder holds (PEFT's save_pretrained, or this writer): the only files `overwrite` may delete.
ADAPTER_FILES = frozenset({CARD_NAME}.union(*(known.file_names for known in FORMATS)))
CARD_TITLE = "# LoRA adapter merged with lora-fusion"
# Which machine (or container: pids are per namespace) wrote a staging folder.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def write_adapter(
    adapter: LoraAdapter,
    out: str | Path,
    *,
    overwrite: bool = False,
    protected: Iterable[str | Path] = (),
    format: str | AdapterFormat = DEFAULT_FORMAT,
) -> Path:
    """Write `adapter` in `format` at `out` (a folder; one `.safetensors` file for kohya): stage beside it, validate,
    then rename into place.

    An interrupted or failed write leaves `out` as it was (absent, or the previous adapter). Before any work, and
    again just before the rename, `out` is checked with [`check_output`], protecting the adapter's own local
    inputs ([`LoraAdapter.local_inputs`]) and `protected`.

    Args:
        adapter: what to write.
        out: the adapter directory (or kohya file) to create, or replace with `overwrite`.
        overwrite (`bool`, *optional*, defaults to False): replace an existing `out` that lora-fusion could have
            written (a folder of adapter files only, or a LoRA file it wrote).
        protected (*optional*): more local paths that must not be replaced, contain `out` or lie inside it.
        format (*optional*, defaults to `"peft"`): `"peft"`, `"diffusers"` or `"kohya"`.

    Returns:
        `out`, absolute.

    Raises:
        OutputExistsError: `out` exists and `overwrite` is False.
        OutputProtectedError: `overwrite` would delete something lora-fusion did not write (see `check_output`).
        OutputWriteError: the disk refused the write.
        UnsupportedAdapterError: the format has no key for a module (named); nothing was written.
    """
    known = format_named(format) if isinstance(format, str) else format
    if adapter.saved_modules and known.name != "peft":
        raise UnsupportedAdapterError(
            f"{known.name} files have no place for whole modules ({next(iter(adapter.saved_modules))}, …); write "
            "the adapter as a PEFT folder (format 'peft')."
        )
    out = Path(out).expanduser().absolute()
    keep = [*adapter.local_inputs(), *protected]
    check_output(out, overwrite=overwrite, protected=keep, format=known)
    with staged(out) as stage, collection_paused():
        target = stage / out.name if known.single_file else stage
        with thread_limit(1):
            try:
                _fill(adapter, target, known)
            except OutputOverflowError as err:  # the inputs were finite: a value overflowed the output dtype
                raise OutputOverflowError(f"{out}: {err}; write it in float32 (--dtype float32) or lower the weights; "
                                     "nothing was saved.") from None
            _check_written(adapter, target, out, known)
        # Again: a long write leaves time for someone to put files into `out` (or create it).
        check_output(out, overwrite=overwrite, protected=keep, format=known)
        swap_into_place(target, out, overwrite=overwrite)
    return out


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new, empty staging folder beside `out`, removed when the block ends, whatever happens; a disk error in the
    block becomes one `OutputWriteError` saying nothing was written. The writer of every output (adapters, reports).

    Beside `out`, so the final rename is atomic (same filesystem); unique per call, so concurrent writers never
    collide. The pid and host in its name let a later write remove what a killed writer left (`finally` cannot run
    on SIGKILL).
    """
    stage = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}-{os.getpid()}-{_HOST}.incomplete")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_stages(out)
        stage.mkdir()
        yield stage
    except OSError as err:
        if isinstance(err, LoraFusionError):
            raise
        raise OutputWriteError(f"could not write {out}: {err.strerror or err}; nothing was written.") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_output(
    out: str | Path,
    *,
    overwrite: bool,
    protected: Iterable[str | Path] = (),
    format: str | AdapterFormat = DEFAULT_FORMAT,
) -> None:
    """[`check_output_folder`] for folder formats, [`check_output_file`] for single-file ones (kohya)."""
    known = format_named(format) if isinstance(format, str) else format
    if known.single_file:
        check_output_file(out, overwrite=overwrite, protected=protected)
    else:
        check_output_folder(out, overwrite=overwrite, protected=protected)


def check_output_file(out: str | Path, *, overwrite: bool, protected: Iterable[str | Path] = ()) -> None:
    """Refuse a single-file output (kohya) whose replacement could lose data, before any work is done.

    `out` must end in `.safetensors`. An existing `out` is replaced only with `overwrite`, and only if it is a
    regular file (not a link or a folder) that lora-fusion wrote (its header holds lora-fusion's provenance record)
    and none of `protected` (a LoRA file that is an input of the command is never replaced).

    Raises:
        InvalidParameterError: `out` does not end in `.safetensors`.
        OutputExistsError: `out` exists and `overwrite` is False.
        OutputProtectedError: the file is not one lora-fusion may replace; the message says why.
    """
    target = Path(out).expanduser().absolute()
    if target.suffix != ".safetensors":
        raise InvalidParameterError("out", str(out), expected="a file name ending in .safetensors for a kohya file")
    if not existing_output(target, overwrite=overwrite, kind="file"):
        return
    if not target.is_file():
        raise OutputProtectedError(target, "it is not a file", [], "Choose another --out.")
    reason = special_folder(target.resolve(), protected)
    if reason:
        raise OutputProtectedError(target, reason, [], "Choose an --out outside the inputs.")
    if not _written_by_us(target):
        raise OutputProtectedError(
            target, "it is a file lora-fusion did not write", [], "Choose another --out, or move the file away first."
        )


def existing_output(target: Path, *, overwrite: bool, kind: str) -> bool:
    """Whether the output `target` exists (then it needs checking); refused without `overwrite`, or as a link."""
    if not os.path.lexists(target):
        return False
    if not overwrite:
        raise OutputExistsError(f"{target} already exists; pass --overwrite (overwrite=True) or choose another --out.")
    if target.is_symlink():
        raise OutputProtectedError(
            target, f"it is a symbolic link (to {os.readlink(target)})", [], f"Remove the link, or pass a real {kind}."
        )
    return True


def _written_by_us(path: Path) -> bool:
    """Whether the safetensors file `path` carries lora-fusion's provenance record in its header."""
    try:
        with path.open("rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size <= 100_000_000:
                return False
            header = json.loads(file.read(size))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and "lora_fusion" in (header.get("__metadata__") or {})


def check_output_folder(
    out: str | Path,
    *,
    overwrite: bool,
    protected: Iterable[str | Path] = (),
    foreign: Callable[[list[str], list[Path]], list[str]] | None = None,
) -> None:
    """Refuse an output path whose replacement could lose data, before any work is done. Reads only the folder.

    Nothing to check when `out` does not exist. When it exists, `overwrite=False` refuses it; `overwrite=True`
    replaces it only if it is a real folder (not a link or a file) holding nothing but adapter files
    (`adapter_config.json`, `adapter_model.safetensors`/`.bin`, `README.md`: what lora-fusion and PEFT write; a
    `README.md` alone counts only if it is a lora-fusion card), and if it is none of: the current directory or a
    folder containing it (`/` included), the home folder or a folder containing it, a path of `protected` or a
    folder containing one or inside one. A folder that lora-fusion wrote holds exactly adapter files, so it can be
    replaced; a file added to it later cannot be told from the user's own and blocks the replacement.

    Every command that writes a folder calls this first ([`write_adapter`] does); the CLI calls it before merging,
    so that a refusal costs no merge.

    Args:
        out: the output path, as given (relative to the current directory, `~` allowed).
        overwrite: whether replacing an existing `out` was asked for (`--overwrite`).
        protected (*optional*): the inputs of the command: sources, `--base-model`, other input files. Entries that
            are not local paths (Hub ids such as `org/name@main`) are ignored, so the raw arguments can be passed.
        foreign (*optional*): which of the folder's entries (names as listed, `name/` for folders; and their paths)
            lora-fusion did not write; default: those that are not adapter files ([`check_model_folder`] passes the
            rule for model folders).

    Raises:
        OutputExistsError: `out` exists and `overwrite` is False.
        OutputProtectedError: `overwrite` is True but replacing `out` could delete something that is not an adapter
            lora-fusion may replace; the message names the folder, why, and up to three of the files at stake.

    Example:
        ```python
        >>> check_output_folder(Path("merged"), overwrite=True, protected=["org/math-lora", "./code-lora"])
        ```
    """
    target = Path(out).expanduser().absolute()
    if not existing_output(target, overwrite=overwrite, kind="folder"):
        return
    if not target.is_dir():
        raise OutputProtectedError(
            target, "it is a file, not an adapter folder", [], "Choose another --out, or delete the file yourself."
        )
    try:
        entries = sorted(target.iterdir(), key=lambda p: p.name)
    except OSError as err:
        raise OutputProtectedError(
            target, f"its content cannot be listed ({err.strerror or err})", [], "Choose another --out."
        ) from None
    listing = [f"{e.name}/" if e.is_dir() and not e.is_symlink() else e.name for e in entries]
    foreign = foreign or _non_adapter_files
    reason = special_folder(target.resolve(), protected)
    if reason:
        inputs = "input" in reason
        advice = "Choose an --out outside the inputs." if inputs else "Choose another --out, e.g. a new folder."
        raise OutputProtectedError(target, reason, listing, advice)
    others = foreign(listing, entries)
    if others:
        raise OutputProtectedError(
            target, "it holds files lora-fusion did not write", others,
            "Choose another --out, or move those files out of it first.",
        )


def special_folder(real: Path, protected: Iterable[str | Path]) -> str | None:
    """Why the resolved folder `real` must never be replaced, or None."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if real == Path(real.anchor):
        return "it is the root folder"
    if real == cwd:
        return "it is the current directory"
    if cwd.is_relative_to(real):
        return "it contains the current directory"
    if real == home:
        return "it is the home folder"
    if home.is_relative_to(real):
        return "it contains the home folder"
    for given in protected:
        try:
            path = Path(given).expanduser()
            if not path.exists():  # a Hub id, or a source that is gone: nothing of it on disk to protect
                continue
        except (OSError, ValueError):  # a name no filesystem holds (NUL byte, too long): not a local path
            continue
        path = path.resolve()
        if real == path:
            return f"it is the input {given}"
        if path.is_relative_to(real):
            return f"it contains the input {given}"
        if real.is_relative_to(path):
            return f"it lies inside the input {given}"
    return None


def _non_adapter_files(listing: list[str], entries: list[Path]) -> list[str]:
    if listing == [CARD_NAME] and not _is_our_card(entries[0]):
        return listing  # a README.md alone is no adapter: it may be the user's notes
    return [name for name, entry in zip(listing, entries) if not _is_adapter_file(entry)]


def _is_adapter_file(entry: Path) -> bool:
    return entry.name in ADAPTER_FILES and entry.is_file() and not entry.is_symlink()


def _is_our_card(path: Path, title: str = CARD_TITLE) -> bool:
    """Whether `path` is a model card lora-fusion wrote (its title line follows the YAML header)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            head = file.read(4096)
    except OSError:
        return False
    return f"\n{title}\n" in head


def _remove_dead_stages(out: Path) -> None:
    """Delete staging folders of `out` left by a writer of this host whose process no longer exists (killed)."""
    for stage in out.parent.glob(f".{glob.escape(out.name)}.*-*-*.incomplete"):
        tag, pid, host = stage.name[len(out.name) + 2 : -len(".incomplete")].split("-", 2)
        if host == _HOST and pid.isdigit() and len(tag) == 8 and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def _fill(adapter: LoraAdapter, target: Path, known: AdapterFormat) -> None:
    # The weights file's header is written last: a local source's sha256, hashed by the other core, is not waited
    # for before the data (the placeholder is as long as the hash).
    metadata = LateMetadata(
        {"lora_fusion": json.dumps(_provenance_record(adapter, hash_placeholder="0" * 64), sort_keys=True)},
        lambda: {"lora_fusion": json.dumps(_provenance_record(adapter), sort_keys=True)},
    )
    known.write(adapter, target, metadata=metadata)
    if not known.single_file:  # one file has no place for a card; its header holds the provenance
        (target / CARD_NAME).write_text(model_card(adapter, known))


def _provenance_record(adapter: LoraAdapter, *, hash_placeholder: str | None = None) -> dict[str, Any]:
    """What the safetensors metadata and the card say about the adapter's origin: no local path, ever.

    Sources come from `SourceInfo.to_dict` (a local one as its folder's name and content hash, or
    `hash_placeholder` while that is being computed); the base model and path-valued parameters (F-VAE, support
    file) are cut to their last component if they name local paths, as is any source recorded by other means.
    """
    record = dict(adapter.provenance) or {
        "method": "copy",
        "sources": [adapter.source.to_dict(hash_placeholder=hash_placeholder)] if adapter.source else [],
    }
    if "sources" in record:
        record["sources"] = [
            {**entry, **{k: _public_name(entry[k]) for k in ("source", "subfolder") if isinstance(entry.get(k), str)}}
            for entry in record["sources"]
        ]
    if isinstance(record.get("base_model"), str):
        record["base_model"] = _public_name(record["base_model"])
    if isinstance(record.get("params"), dict):
        record["params"] = {k: _public_name(v) if isinstance(v, str) else v for k, v in record["params"].items()}
    record["modules"] = {
        name: {
            "rank": s.rank,
            "retained_energy": round(s.retained_energy, 8),
            "relative_error": round(s.relative_error, 8),
            **({"exact_rank": s.exact_rank} if s.exact_rank is not None else {}),
        }
        for name, s in adapter.stats.items()
    }
    return record


def _public_name(text: str) -> str:
    """`text` if it is not a local path; else its last component (an absolute path shows user names and the
    machine's layout, and a card or metadata may be published). Hub ids and plain words are left as they are."""
    if PureWindowsPath(text).drive:  # C:\\... recorded on Windows: no posix separators
        return PureWindowsPath(text).name or text
    path = Path(text).expanduser()
    local = path.is_absolute() or ".." in path.parts or (len(path.parts) > 1 and path.exists())
    return path.name or text if local else text


# Characters that would end a table cell or line, start markup, or hide text; see `_md`.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_PUNCTUATION = re.compile(r"[!-/:-@\[-`{-~]")
_WORD = re.compile(r"\w+")
_PLAIN = re.compile(r"[^`|\\\x00-\x1f\x7f-\x9f\u2028\u2029]*")


def _md(value: object) -> str:
    """`value` as literal Markdown text, safe in a table cell: control characters shown as escapes (`\\n`), then
    every ASCII punctuation character backslash-escaped (CommonMark allows it for all of them), so a name cannot
    open a link, code span, HTML tag or new cell, or break the line."""
    visible = _CONTROL.sub(lambda m: repr(m[0])[1:-1], str(value))
    return _PUNCTUATION.sub(lambda m: "\\" + m[0], visible)


def _code(value: object) -> str:
    """`value` as a code span when that is safe (no backtick, pipe, backslash or control character), else `_md`."""
    text = str(value)
    return f"`{text}`" if text and _PLAIN.fullmatch(text) else _md(text)


def _card_base_model(name: str | None) -> str | None:
    """The base model for the card: a Hub id as it is; a local path (PEFT records the path a base model was loaded
    from) never, since it would publish the path and is no Hub id for the metadata."""
    if not name or _public_name(name) != name or not is_repo_id(name.partition("@")[0]):
        return None
    return name


def model_card(adapter: LoraAdapter, known: AdapterFormat = DEFAULT_FORMAT) -> str:
    """A Hub model card (YAML metadata from huggingface_hub's `ModelCardData`, then markdown) with the merge's
    provenance: sources, commits, method, parameters, version, per-module retained energy where the merge
    truncated, and the modules held at full rank as their dense update (a LyCORIS module whose exact factored rank
    exceeds min(out, in)). Every value from a source is escaped ([`_md`]); no local path is written."""
    # repocard_data, not the package's ModelCard: that import pulls the HTTP client (~0.08 s of every local merge)
    from huggingface_hub.repocard_data import ModelCardData

    record = _provenance_record(adapter)
    method = record.get("method", "copy")
    base = _card_base_model(adapter.config.base_model)
    data = ModelCardData(
        library_name=known.library_name,
        base_model=base,
        tags=["lora", known.name, "lora-fusion", "merge", str(method)],
    )
    lines = [
        CARD_TITLE,
        "",
        f"Method: {_code(method)} · lora-fusion {record.get('lora_fusion_version', 'unknown')} · "
        f"{len(adapter.modules)} modules · output dtype {record.get('dtype', 'as input')}",
        "",
        *_provenance_tables(record),
    ]
    truncated = {n: s for n, s in adapter.stats.items() if s.truncated}
    if truncated:
        lines += [
            "",
            "## Truncated modules",
            "",
            "Retained energy E(R) = Σ_{j≤R} σⱼ² / Σ σⱼ²; relative error ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F = √(1 − E(R)).",
            "",
            "| module | rank | retained energy | relative error |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {_code(n)} | {s.rank} | {s.retained_energy:.6f} | {s.relative_error:.2e} |"
            for n, s in truncated.items()
        ]
    dense = {n: s for n, s in adapter.stats.items() if s.exact_rank is not None}
    if dense:
        lines += [
            "",
            "## Modules at full rank",
            "",
            "Their exact factored rank (LyCORIS) exceeds min(out, in): each is its dense update, exactly, at full "
            "rank.",
            "",
            "| module | rank | exact factored rank |",
            "|---|---|---|",
        ]
        lines += [f"| {_code(n)} | {s.rank} | {s.exact_rank} |" for n, s in dense.items()]
    # In a code block nothing is markup, and a fence cannot close mid-line; only line breaks need removing.
    shown_base = _CONTROL.sub("?", _public_name(adapter.config.base_model or "None"))
    lines += [
        "",
        "## Use",
        "",
        "```python",
        *known.usage.splitlines()[:-1],
        f"{known.usage.splitlines()[-1]}  # base: {shown_base}",
        "```",
        "",
        "The same provenance is stored in the safetensors metadata under `lora_fusion`.",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def _provenance_tables(record: Mapping[str, Any]) -> list[str]:
    """The card's "Sources" and "Parameters" sections (markdown lines) from a provenance record, every value
    escaped."""
    lines = [
        "## Sources",
        "",
        f"Local sources are named by their folder and identified by the sha256 of `{CONFIG_NAME}` followed by "
        f"the weights file (`cat {CONFIG_NAME} {SAFETENSORS_NAME} | sha256sum`).",
        "",
        "| source | revision | subfolder | resolved commit or sha256 | weight |",
        "|---|---|---|---|---|",
    ]
    for source in record.get("sources", []):
        cells = [source.get(k) for k in ("source", "revision", "subfolder")]
        cells += [source.get("commit") or source.get("sha256"), source.get("weight")]
        lines.append("| " + " | ".join("" if c is None else _code(c) for c in cells) + " |")
    params = record.get("params", {})
    lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k if _WORD.fullmatch(k) else _md(k)} | {_code(v)} |" for k, v in params.items()] or [
        "| (none) | |"
    ]
    return lines


def _check_written(adapter: LoraAdapter, target: Path, out: Path, known: AdapterFormat) -> None:
    """Reopen what was written (the staging `target`), as a user would, and compare its modules, ranks and shapes
    with what was meant to be written to `out`. The values were checked finite in memory after their cast
    (`lora_fusion.formats.peft.output_factors`), so the headers suffice. A kohya file may hold a module at a higher rank, and extra
    all-zero parts, where Flux's fused q/k/v hold several modules in one."""
    extra = {"saved_modules": True} if adapter.saved_modules else {}  # only PEFT writes them (write_adapter)
    written = known.read(target, source=str(target), **extra)
    fused = known.single_file
    for name, spec in adapter.modules.items():
        got = written.modules.get(name)
        rank_ok = got is not None and (got.rank == spec.rank or (fused and got.rank > spec.rank))
        if got is None or not rank_ok or got.layout() != spec.layout():
            raise CorruptAdapterError(f"internal error: module {name} was not written as planned; nothing was saved.")
    if not fused and set(written.modules) != set(adapter.modules):
        raise CorruptAdapterError("internal error: the written adapter has extra modules; nothing was saved.")


def swap_into_place(stage: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the staged folder or file `stage` to `out`; a previous `out` is moved aside first and restored if the
    rename fails."""
    if not out.exists():
        os.replace(stage, out)
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite or choose another --out.")
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:  # a disk error, or Ctrl-C during the rename: the previous output goes back in place
        os.replace(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def push_adapter(
    adapter: LoraAdapter,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    format: str | AdapterFormat = DEFAULT_FORMAT,
) -> PushResult:
    """Write `adapter` in `format` to a temporary folder and upload it with [`push_folder`]; returns its
    [`PushResult`] (a `str`: the commit URL). A kohya file is uploaded as `<repo name>.safetensors`."""
    check_push_allowed(repo_id)  # before the write, which costs time for nothing if the upload cannot happen
    known = format_named(format) if isinstance(format, str) else format
    with tempfile.TemporaryDirectory(prefix="lora-fusion-push-") as tmp:
        if known.single_file:
            folder = Path(tmp) / "adapter"
            folder.mkdir()
            write_adapter(adapter, folder / f"{repo_id.rsplit('/', 1)[-1]}.safetensors", format=known)
        else:
            folder = write_adapter(adapter, Path(tmp) / "adapter", format=known)
        return push_folder(
            folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
        )


# ------------------------------------------------------------------------------------------ full models (bake)

MODEL_CARD_TITLE = "# Model baked with lora-fusion"
MODEL_INDEX_NAME = "model.safetensors.index.json"
# The small files of a model folder that bake copies beside the weights (and that `overwrite` may replace): config,
# generation config, tokenizer. Never code: a model folder's Python files run when a loader trusts remote code.
MODEL_SUPPORT_FILES = (
    "config.json", "generation_config.json", "tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "vocab*",
    "merges.txt", "chat_template*",
)


def is_model_support_file(name: str) -> bool:
    """Whether `name` is one of the small files ([`MODEL_SUPPORT_FILES`]) that a baked model folder holds."""
    import fnmatch

    return not name.endswith(".py") and any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_SUPPORT_FILES)


def check_model_folder(out: str | Path, *, overwrite: bool, protected: Iterable[str | Path] = ()) -> None:
    """[`check_output_folder`] for a full model (bake): an existing `out` is replaced, with `overwrite` only, if it
    holds lora-fusion's model card and otherwise only files a bake writes: safetensors files whose header carries
    lora-fusion's provenance, the shard index and the copied config and tokenizer files. Anything else (another
    model, code, a folder) is refused, as are the inputs (the base model, local sources) and the folders around them.

    Raises:
        OutputExistsError, OutputProtectedError: as [`check_output_folder`].
    """
    check_output_folder(out, overwrite=overwrite, protected=protected, foreign=_non_model_files)


def _non_model_files(listing: list[str], entries: list[Path]) -> list[str]:
    if CARD_NAME not in listing or not _is_our_card(entries[listing.index(CARD_NAME)], MODEL_CARD_TITLE):
        return listing  # without our card, even a config.json and shards may be the user's own model

    def ours(entry: Path) -> bool:
        if not entry.is_file() or entry.is_symlink():
            return False
        if entry.suffix == ".safetensors":
            return _written_by_us(entry)
        return entry.name in (CARD_NAME, MODEL_INDEX_NAME) or is_model_support_file(entry.name)

    return [name for name, entry in zip(listing, entries) if not ours(entry)]


# One output shard, as bake hands it to `write_model`: its file name, every tensor's (safetensors dtype name, shape) in
# the file's order, and the tensors themselves, computed one at a time, in that order.
ShardStream = tuple[str, Mapping[str, tuple[str, tuple[int, ...]]], Iterable[tuple[str, Any]]]


def write_model(
    out: str | Path,
    shards: Iterable[ShardStream],
    *,
    adapter: LoraAdapter,
    bake: Mapping[str, Any],
    files: Mapping[str, bytes],
    sharded: bool,
    overwrite: bool = False,
    protected: Iterable[str | Path] = (),
) -> Path:
    """Write a full model (the output of [`lora_fusion.bake`]) at the folder `out`: stage beside it, write each
    shard as it comes, the index, the small `files` and a model card, check what was written, rename into place.

    Each shard is streamed ([`write_streamed_safetensors`]): its header is written from the announced layout, then
    each tensor as the bake computes it, so memory holds one tensor, never a shard. Every shard has `{"format": "pt"}`
    and lora-fusion's provenance (the merge's record, plus `bake`) in its header. An interrupted or failed write (a
    full disk) leaves `out` as it was.

    Args:
        out: the model folder to create, or replace with `overwrite` ([`check_model_folder`]).
        shards: per output shard, in order: its file name, its layout (tensor key -> safetensors dtype and shape, in
            the file's order) and an iterable of `(key, tensor)` in that order.
        adapter: the merged adapter whose update the shards hold (its provenance and stats go to the card).
        bake: what the card and metadata say about the bake (base model, revision, commit, dtype, …; no local path).
        files: small files to write as they are (config.json, tokenizer files), by name.
        sharded: write `model.safetensors.index.json` (its `total_size` is the sum of the tensors' bytes).
        overwrite, protected: as [`write_adapter`].

    Returns:
        `out`, absolute.

    Raises:
        OutputExistsError, OutputProtectedError: `out` may not be replaced.
        OutputWriteError: the disk refused the write; nothing was written.
    """
    out = Path(out).expanduser().absolute()
    keep = [*adapter.local_inputs(), *protected]
    check_model_folder(out, overwrite=overwrite, protected=keep)
    with staged(out) as stage:
        record = _provenance_record(adapter)
        record["bake"] = {k: _public_name(v) if isinstance(v, str) else v for k, v in bake.items()}
        metadata = {"lora_fusion": json.dumps(record, sort_keys=True)}
        weight_map: dict[str, str] = {}
        total_size = 0
        for name, layout, tensors in shards:
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise CorruptAdapterError(f"internal error: shard name {name!r} is not a file name; nothing was saved.")
            total_size += write_streamed_safetensors(stage / name, layout, tensors, metadata=metadata)
            weight_map.update(dict.fromkeys(layout, name))
        _check_model_written(stage, weight_map)
        if sharded:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (stage / MODEL_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for name, content in files.items():
            if not is_model_support_file(name) or Path(name).name != name:
                raise CorruptAdapterError(f"internal error: {name!r} is not a model support file; nothing was saved.")
            (stage / name).write_bytes(content)
        (stage / CARD_NAME).write_text(baked_model_card(record))
        check_model_folder(out, overwrite=overwrite, protected=keep)  # again: the write took time
        swap_into_place(stage, out, overwrite=overwrite)
    return out


def write_streamed_safetensors(
    path: Path,
    layout: Mapping[str, tuple[str, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Any]],
    *,
    metadata: Mapping[str, str],
) -> int:
    """Write a safetensors file whose tensors arrive one at a time: the header (from `layout`, offsets in its order,
    `{"format": "pt"}` plus `metadata`, padded to 8 bytes as safetensors does) first, then each tensor's bytes as
    `tensors` yields it, so only one tensor is ever in memory. Returns the bytes of tensor data written.

    Raises:
        CorruptAdapterError: a tensor arrives out of order, or with another dtype or shape than announced (a bug).
        OSError: the disk refused the write.
    """
    from .formats.stores import SAFETENSORS_DTYPES

    entries, offset = {}, 0
    for key, (dtype, shape) in layout.items():
        size = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        entries[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt", **metadata}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    expected = iter(layout.items())
    with path.open("wb") as file:
        file.write(len(header).to_bytes(8, "little") + header)
        for key, tensor in tensors:
            want_key, (dtype, shape) = next(expected, (None, ("", ())))
            if key != want_key or tensor.dtype != SAFETENSORS_DTYPES[dtype] or tuple(tensor.shape) != tuple(shape):
                raise CorruptAdapterError(f"internal error: {key} was not written as planned; nothing was saved.")
            _write_tensor(file, tensor)
        if next(expected, None) is not None:
            raise CorruptAdapterError(f"internal error: {path.name} is missing tensors; nothing was saved.")
    return offset


def _write_tensor(file: Any, tensor: Any) -> None:
    """The tensor's bytes, as stored in memory (little-endian, row-major), without a copy when it is contiguous."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    file.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")


def _check_model_written(stage: Path, weight_map: Mapping[str, str]) -> None:
    """Reopen every written shard's header, as a loader would, and compare its tensor names with what was meant."""
    from safetensors import safe_open

    expected: dict[str, set[str]] = {}
    for key, name in weight_map.items():
        expected.setdefault(name, set()).add(key)
    for name, keys in expected.items():
        with safe_open(str(stage / name), framework="pt") as file:
            if set(file.keys()) != keys:
                raise CorruptAdapterError(f"internal error: {name} was not written as planned; nothing was saved.")


def baked_model_card(record: Mapping[str, Any]) -> str:
    """The model card of a baked model (YAML metadata, then markdown): the base model with its revision and commit,
    the merge's sources, method and parameters, and how the update was added (dtype rounding, tied embeddings,
    NF4). Every value is escaped; no local path is written."""
    from huggingface_hub.repocard_data import ModelCardData

    bake = record.get("bake", {})
    method = record.get("method", "copy")
    base = bake.get("base_model")
    data = ModelCardData(
        library_name="transformers",
        base_model=_card_base_model(base) if isinstance(base, str) and bake.get("commit") else None,  # Hub only
        tags=["lora-fusion", "merge", "bake", str(method)],
    )
    lines = [
        MODEL_CARD_TITLE,
        "",
        f"The base model with a merge of LoRA adapters added into its weights: W = W₀ + ΔW, computed in float32 and "
        f"rounded once to the output dtype. Method: {_code(method)} · lora-fusion "
        f"{record.get('lora_fusion_version', 'unknown')} · {len(record.get('modules', {}))} modules changed.",
        "",
        "## Base model and bake",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {_md(k)} | {'' if v is None else _code(v)} |" for k, v in bake.items()),
        "",
        *_provenance_tables(record),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM  # or the Auto class of config.json's architecture",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "The same provenance is stored in every safetensors file's metadata under `lora_fusion`.",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
