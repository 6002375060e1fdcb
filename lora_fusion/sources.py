"""`load_adapter`: resolve a source (a local path, or a Hub repo id) to its files, read them through their format
([`lora_fusion.formats`]), and return a [`LoraAdapter`] whose tensors stay on disk until used.

Only the adapter's own files are ever downloaded ([`lora_fusion.hub`]), never base-model weights; no code from a
downloaded file ever runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .adapter import LoraAdapter, SourceInfo
from .errors import SourceNotFoundError
from .formats import DEFAULT_FORMAT, detect_format
from .hub import commit_of, is_repo_id


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
        target = path if path.is_file() or not subfolder else path / subfolder
        contents = detect_format(target).read(target, source=text, config=Path(config) if config else None)
        info = SourceInfo(source=text, subfolder=subfolder, path=str(path.resolve()))
    else:
        repo_id, _, at_revision = text.partition("@")
        if not is_repo_id(repo_id):
            raise SourceNotFoundError(
                f"{text}: no such file or directory, and not a Hub repo id (owner/name[@revision])."
            )
        revision = revision or at_revision or None
        # Nothing on the Hub says which format a repo holds without listing it: the default format fetches its files.
        folder = DEFAULT_FORMAT.fetch(repo_id, revision=revision, subfolder=subfolder, token=token)
        contents = DEFAULT_FORMAT.read(folder, source=repo_id)
        info = SourceInfo(
            source=repo_id, revision=revision, subfolder=subfolder, commit=commit_of(folder), path=str(folder)
        )
    return LoraAdapter(
        config=contents.config,
        modules=contents.modules,
        store=contents.store,
        source=replace(info, files=tuple(str(file) for file in contents.files)),
    )
