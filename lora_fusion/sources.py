"""`load_adapter`: resolve a source (a local path, or a Hub repo id) to its files, read them through their format
([`lora_fusion.formats`]), and return a [`LoraAdapter`] whose tensors stay on disk until used.

Only the adapter's own files are ever downloaded ([`lora_fusion.hub`]), never base-model weights; no code from a
downloaded file ever runs.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from .adapter import LoraAdapter, SourceInfo
from .errors import AmbiguousSourceError, NotALoraAdapterError, SourceNotFoundError
from .formats import AdapterFormat, detect_format, format_named
from .formats.diffusers import DIFFUSERS, WEIGHT_NAME as DIFFUSERS_WEIGHT_NAME
from .formats.peft import PEFT, SAFETENSORS_NAME as PEFT_WEIGHTS
from .formats.single_file import read_single_file
from .hub import commit_of, download_file, is_repo_id, list_safetensors


def load_adapter(
    source: str | Path,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    config: str | Path | None = None,
    weight_name: str | None = None,
    input_format: str | None = None,
    hash_in_background: bool = False,
) -> LoraAdapter:
    """Open a LoRA adapter from a local directory or file, or a Hub repo; tensors stay on disk.

    PEFT folders, diffusers files (`pytorch_lora_weights.safetensors`) and kohya/A1111, ComfyUI, kohya-Flux and
    LyCORIS files are recognised from their files; diffusion LoRAs get the canonical diffusers module names
    (`unet.…`, `text_encoder.…`, `transformer.…`), so adapters of different formats merge together.

    Args:
        source: a local adapter directory, a `.safetensors`/`.bin` file, or a Hub repo id `owner/name[@revision]`.
        revision: branch, tag or commit on the Hub (overrides `@revision` in `source`).
        subfolder: folder inside the repo or directory that holds the adapter files.
        token: Hub token; by default `HF_TOKEN` or the stored login. Never written anywhere.
        config: `adapter_config.json` to use with a single weights file (default: the file next to it).
        weight_name: the LoRA file inside the folder or repo, when it holds several (`pytorch_lora_weights.
            safetensors` is preferred, and a single `.safetensors` file is taken, without it).
        input_format: `"peft"`, `"diffusers"` or `"kohya"` to skip detection.
        hash_in_background: start the local source's sha256 ([`SourceInfo.start_hashing`]) as soon as its files
            are known, for a command that records it (`convert`): a single LoRA file from before it is read.

    Returns:
        [`LoraAdapter`] whose modules are known from headers; factors are read when used.

    Raises:
        SourceNotFoundError: no such path, repo, revision or file.
        AmbiguousSourceError: several LoRA files and no `weight_name`; the message lists them.
        NotALoraAdapterError: the source is not a LoRA adapter (e.g. a full model), or its keys fit no known layout.
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
    forced = format_named(input_format) if input_format else None
    if path.exists():
        target = path if path.is_file() or not subfolder else path / subfolder
        target = _local_file(target, text, weight_name=weight_name, forced=forced)
        info = SourceInfo(source=text, subfolder=subfolder, path=str(path.resolve()))
    else:
        repo_id, _, at_revision = text.partition("@")
        if not is_repo_id(repo_id):
            raise SourceNotFoundError(
                f"{text}: no such file or directory, and not a Hub repo id (owner/name[@revision])."
            )
        revision = revision or at_revision or None
        target = _hub_file(repo_id, revision=revision, subfolder=subfolder, token=token, weight_name=weight_name,
                           forced=forced)
        info = SourceInfo(
            source=repo_id, revision=revision, subfolder=subfolder, commit=commit_of(target), path=str(target)
        )
        text = repo_id
    known = forced or detect_format(target)
    if hash_in_background and target.is_file() and known is not PEFT:
        # Every format but PEFT (which reads a config beside the weights) reads just this file: hash it while the
        # headers are read and the keys mapped.
        info = replace(info, files=(str(target),))
        info.start_hashing()
    if known is PEFT and target.suffix == ".safetensors" and target.name != PEFT_WEIGHTS and config is None:
        # A lone weights file no format recognises: say what its keys look like and which layouts were tried.
        contents = read_single_file(target, source=text)
    else:
        contents = known.read(target, source=text, config=Path(config) if config else None)
    files = tuple(str(file) for file in contents.files)
    source_info = info if info.files == files else replace(info, files=files)  # `info` keeps its hash under way
    if hash_in_background:
        source_info.start_hashing()
    return LoraAdapter(config=contents.config, modules=contents.modules, store=contents.store, source=source_info,
                       stats=contents.stats)


def _local_file(target: Path, source: str, *, weight_name: str | None, forced: AdapterFormat | None) -> Path:
    """The folder or file to read: `weight_name` inside a folder, a PEFT or diffusers folder as it is, else the
    folder's only `.safetensors` file."""
    if target.is_file():
        return target
    if weight_name:
        file = target / weight_name
        if not file.is_file():
            raise SourceNotFoundError(f"{source}: no file {weight_name} in {target}.")
        return file
    if not target.is_dir() or any(known.detect(target) for known in ([forced] if forced else [PEFT, DIFFUSERS])):
        return target  # a file, or a folder the format reads as a whole (PEFT's, diffusers')
    candidates = sorted(p.name for p in target.glob("*.safetensors") if not _FULL_MODEL_FILE.match(p.name))
    return target / _one_candidate(candidates, source) if candidates else target


# Weight files of full models (transformers, diffusers), never a LoRA: not candidates for a repo's LoRA file.
_FULL_MODEL_FILE = re.compile(r"^(model|pytorch_model|diffusion_pytorch_model)(-\d+-of-\d+)?(\.fp16)?\.safetensors$")


def _one_candidate(names: list[str], source: str) -> str:
    if DIFFUSERS_WEIGHT_NAME in names:
        return DIFFUSERS_WEIGHT_NAME
    if len(names) == 1:
        return names[0]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise AmbiguousSourceError(
        f"{source} holds {len(names)} LoRA files ({shown}); say which with --weight-name (weight_name=...)."
    )


def _hub_file(
    repo_id: str, *, revision: str | None, subfolder: str | None, token: str | None, weight_name: str | None,
    forced: AdapterFormat | None,
) -> Path:
    """Download only the adapter's files: `weight_name`, else a PEFT adapter's config and weights, else the repo's
    diffusers file or its only `.safetensors` file."""
    if weight_name is None and forced in (None, PEFT):
        try:
            return PEFT.fetch(repo_id, revision=revision, subfolder=subfolder, token=token)
        except NotALoraAdapterError:
            if forced is PEFT:
                raise
            names = [n for n in list_safetensors(repo_id, revision=revision, subfolder=subfolder, token=token)
                     if not _FULL_MODEL_FILE.match(n)]
            if not names:
                raise  # PEFT's message: no adapter config, a full model?
        weight_name = _one_candidate(names, repo_id)
    elif weight_name is None:
        names = [n for n in list_safetensors(repo_id, revision=revision, subfolder=subfolder, token=token)
                 if not _FULL_MODEL_FILE.match(n)]
        weight_name = _one_candidate(names, repo_id) if names else DIFFUSERS_WEIGHT_NAME
    file = download_file(repo_id, weight_name, revision=revision, subfolder=subfolder, token=token)
    if file is None:
        raise SourceNotFoundError(f"{repo_id}: no file {weight_name}" + (f" in {subfolder}" if subfolder else "") + ".")
    return file
