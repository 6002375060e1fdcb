"""The only place that writes adapters: PEFT files, model card and provenance, atomically; and pushes to the Hub.

Output conventions (METHODS.md a.9): every scale is folded into the factors and the config says `lora_alpha = r`
(with `alpha_pattern` equal to `rank_pattern`), so s = 1 in every module; `use_rslora` is false. Patterns are keyed
by the full module name, regex-escaped, so `layers.1.` can never match `layers.11.`.
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
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .adapter import LoraAdapter, SourceInfo
from .errors import CorruptAdapterError, LoraFusionError, OutputExistsError, OutputWriteError
from .runtime import thread_limit
from .sources import CONFIG_NAME, SAFETENSORS_NAME, hub_error, open_adapter_files

CARD_NAME = "README.md"
# Which machine (or container: pids are per namespace) wrote a staging folder.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def write_adapter(adapter: LoraAdapter, out: Path, *, overwrite: bool = False) -> Path:
    """Write `adapter` as a PEFT adapter directory at `out`: stage beside it, validate, then rename into place.

    An interrupted or failed write leaves `out` as it was (absent, or the previous adapter).

    Raises:
        OutputExistsError: `out` exists and `overwrite` is False.
        OutputWriteError: the disk refused the write.
    """
    out = out.expanduser().absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite (overwrite=True) or choose another --out.")
    # Same filesystem as `out`, so the final rename is atomic; unique per call, so concurrent writers never collide.
    # The pid and host in the name let a later write remove what a killed writer left (`finally` cannot run on SIGKILL).
    stage = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}-{os.getpid()}-{_HOST}.incomplete")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_stages(out)
        stage.mkdir()
        with thread_limit(1):
            _fill(adapter, stage)
            _check_written(adapter, stage)
        _swap_into_place(stage, out, overwrite=overwrite)
    except OSError as err:
        if isinstance(err, LoraFusionError):
            raise
        raise OutputWriteError(f"could not write {out}: {err.strerror or err}; nothing was written.") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


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


def _fill(adapter: LoraAdapter, folder: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = _output_tensors(adapter)
    metadata = {"format": "pt", "lora_fusion": json.dumps(_provenance_record(adapter), sort_keys=True)}
    try:
        save_file(tensors, str(folder / SAFETENSORS_NAME), metadata=metadata)
    except SafetensorError as err:  # safetensors reports a full disk as "I/O error: ... (os error 28)", not OSError
        code = re.search(r"\(os error (\d+)\)", str(err))
        raise (OSError(int(code[1]), os.strerror(int(code[1]))) if code else OSError(str(err))) from None
    _sort_header(folder / SAFETENSORS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config(adapter), indent=2, sort_keys=True) + "\n")
    (folder / CARD_NAME).write_text(model_card(adapter))


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


def _output_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors in stored shapes, with each module's scale folded in as √|s| on each factor."""
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in adapter.modules.items():
        factors = adapter.factors(name)
        a, b = factors.A, factors.B
        if spec.scale != 1.0:  # merged adapters already have scale 1; loaded ones get √|s| on each factor
            root = math.sqrt(abs(spec.scale))
            a, b = a * root, b * math.copysign(root, spec.scale)
        tensors[spec.a_key] = a.reshape(spec.a_shape).to(spec.dtype).contiguous()
        tensors[spec.b_key] = b.reshape(spec.b_shape).to(spec.dtype).contiguous()
        if factors.bias is not None and spec.bias_key:
            tensors[spec.bias_key] = (factors.bias * spec.scale).to(spec.dtype).contiguous()
    return tensors


def peft_config(adapter: LoraAdapter) -> dict[str, Any]:
    """`adapter_config.json` for `adapter`: plain LoRA, scale 1 everywhere, per-module ranks in the patterns."""
    ranks = {name: spec.rank for name, spec in adapter.modules.items()}
    counts = Counter(ranks.values())
    common = max(counts, key=lambda r: (counts[r], r))
    pattern = {re.escape(name): rank for name, rank in sorted(ranks.items()) if rank != common}
    return {
        "peft_type": "LORA",
        "task_type": adapter.config.task_type,
        "base_model_name_or_path": adapter.config.base_model,
        "revision": None,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": any(spec.bias_key for spec in adapter.modules.values()),
        "fan_in_fan_out": adapter.config.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _provenance_record(adapter: LoraAdapter) -> dict[str, Any]:
    record = dict(adapter.provenance) or {
        "method": "copy",
        "sources": [adapter.source.to_dict()] if adapter.source else [],
    }
    record["modules"] = {
        name: {
            "rank": s.rank,
            "retained_energy": round(s.retained_energy, 8),
            "relative_error": round(s.relative_error, 8),
        }
        for name, s in adapter.stats.items()
    }
    return record


def model_card(adapter: LoraAdapter) -> str:
    """A Hub model card (YAML metadata from huggingface_hub's `ModelCardData`, then markdown) with the merge's
    provenance: sources, commits, method, parameters, version, and per-module retained energy where the merge
    truncated."""
    # repocard_data, not the package's ModelCard: that import pulls the HTTP client (~0.08 s of every local merge)
    from huggingface_hub.repocard_data import ModelCardData

    record = _provenance_record(adapter)
    method = record.get("method", "copy")
    data = ModelCardData(
        library_name="peft",
        base_model=adapter.config.base_model,
        tags=["lora", "peft", "lora-fusion", "merge", str(method)],
    )
    lines = [
        "# LoRA adapter merged with lora-fusion",
        "",
        f"Method: `{method}` · lora-fusion {record.get('lora_fusion_version', 'unknown')} · "
        f"{len(adapter.modules)} modules · output dtype {record.get('dtype', 'as input')}",
        "",
        "## Sources",
        "",
        "| source | revision | subfolder | resolved commit | weight |",
        "|---|---|---|---|---|",
    ]
    for source in record.get("sources", []):
        cells = [source.get(k) for k in ("source", "revision", "subfolder", "commit", "weight")]
        lines.append("| " + " | ".join("" if c is None else f"`{c}`" for c in cells) + " |")
    params = record.get("params", {})
    lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in params.items()] or ["| (none) | |"]
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
            f"| `{n}` | {s.rank} | {s.retained_energy:.6f} | {s.relative_error:.2e} |" for n, s in truncated.items()
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        f"model = PeftModel.from_pretrained(base_model, \"<this repo or folder>\")  # base: {adapter.config.base_model}",
        "```",
        "",
        "The same provenance is stored in the safetensors metadata under `lora_fusion`.",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def _check_written(adapter: LoraAdapter, folder: Path) -> None:
    """Reopen what was written, as a user would, and compare it with what was meant to be written."""
    written = open_adapter_files(folder / CONFIG_NAME, folder / SAFETENSORS_NAME, SourceInfo(source=str(folder)))
    for name, spec in adapter.modules.items():
        got = written.modules.get(name)
        if got is None or got.rank != spec.rank or got.layout() != spec.layout():
            raise CorruptAdapterError(f"internal error: module {name} was not written as planned; nothing was saved.")
        written.factors(name)  # raises NonFiniteError if a value did not survive the cast to the output dtype
    if set(written.modules) != set(adapter.modules):
        raise CorruptAdapterError("internal error: the written adapter has extra modules; nothing was saved.")


def _swap_into_place(stage: Path, out: Path, *, overwrite: bool) -> None:
    if not out.exists():
        os.replace(stage, out)
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite or choose another --out.")
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(out, old)
    try:
        os.replace(stage, out)
    except OSError:
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
) -> str:
    """Write `adapter` to a temporary folder and upload it with [`push_folder`]; returns the commit URL."""
    with tempfile.TemporaryDirectory(prefix="lora-fusion-push-") as tmp:
        folder = write_adapter(adapter, Path(tmp) / "adapter")
        return push_folder(
            folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
        )


def _refuse_outside_links(folder: Path) -> None:
    """upload_folder follows symlinks: a link in a downloaded adapter folder could publish ~/.ssh/id_rsa."""
    root = Path(folder).resolve()
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_symlink():
            continue
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # a loop (RuntimeError on Python 3.11) or a dangling link
            raise CorruptAdapterError(
                f"{folder}: {path.relative_to(folder)} is a broken or looping link; refusing to upload the folder. "
                "Remove the link."
            ) from None
        if not target.is_relative_to(root):
            raise CorruptAdapterError(
                f"{folder}: {path.relative_to(folder)} is a link to {target}, outside the folder; refusing to "
                "upload it. Replace the link by the file, or remove it."
            )


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload an adapter folder to the Hub (repo created if missing, branch `revision` too); returns the commit URL.

    Uses huggingface_hub `create_repo` + `upload_folder`; the token is passed through, never written or printed.

    Raises:
        CorruptAdapterError: the folder holds a symbolic link to something outside it (never uploaded).
        HubError / SourceNotFoundError: authentication, permission, network or server failures, with what to do.
    """
    from huggingface_hub import HfApi

    _refuse_outside_links(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message or "Upload LoRA adapter merged with lora-fusion",
        )
    except Exception as err:
        translated = hub_error(err, repo_id, revision)
        if translated is err:
            raise
        raise translated from None
    return str(info.commit_url)
