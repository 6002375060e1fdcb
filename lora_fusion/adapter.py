"""The single in-memory form of a LoRA adapter: [`LoraAdapter`], its config and modules ([`lora_fusion.spec`]) and
their factors, read on demand; [`SourceInfo`], where it came from.

Reading files is the formats' work (through `load_adapter`); writing and pushing go through the writer, which this
module reaches only inside `save_pretrained` and `push_to_hub`: the writer never imports this module back.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import NonFiniteError, UnsupportedAdapterError
from .spec import AdapterConfig, ModuleSpec, TensorStore, all_finite, read_factors

if TYPE_CHECKING:
    from .methods.base import ModuleStats


@dataclass(frozen=True)
class ModuleFactors:
    """The factors of one module in canonical form: ΔW = scale·B·A (+ scale·bias on the output, if any).

    A DoRA module carries its magnitude vector μ (`magnitude`, one value per output row) until the base weights turn
    it into its update ([`lora_fusion.dora.dora_factors`]); that update is full-rank, and `source_rank` keeps the rank
    the adapter was trained with (what a merge defaults to). Its factors are then an identity and ΔW, and `update`
    holds that ΔW, so that methods working on dense updates take it as is instead of multiplying it by the identity.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    source_rank: int | None = None
    update: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nominal_rank(self) -> int:
        """The rank of the adapter these factors came from (for a DoRA update, the rank of its B·A, not of ΔW)."""
        return self.source_rank if self.source_rank is not None else self.rank

    def delta(self) -> torch.Tensor:
        """Dense ΔW = scale·B·A in float32, m×n: for tests, `inspect` and dense methods only."""
        if self.update is not None:
            return self.scale * self.update.float()
        return self.scale * (self.B.float() @ self.A.float())


@dataclass(frozen=True)
class SourceInfo:
    """Where an adapter came from: what the user asked for and what it resolved to.

    `path` is where the files are on this machine (the resolved local path as given, or the Hub cache snapshot), and
    `files` the files that were read, config first. Both stay in memory: [`to_dict`](SourceInfo.to_dict), the record
    that model cards and safetensors metadata carry, never holds them.
    """

    source: str
    revision: str | None = None
    subfolder: str | None = None
    commit: str | None = None
    path: str | None = None
    files: tuple[str, ...] = ()

    @property
    def local_path(self) -> Path | None:
        """The adapter's directory or file when it was read from disk; None for Hub sources and in-memory ones.

        A Hub source always has a resolved commit (the cache lays files out by commit) or a revision; a local one has
        neither.
        """
        if self.path is None or self.commit is not None or self.revision is not None:
            return None
        return Path(self.path)

    @cached_property
    def sha256(self) -> str | None:
        """sha256 of the files a local adapter was read from, config first (for PEFT: `adapter_config.json` followed
        by the weights file, as `cat adapter_config.json adapter_model.safetensors | sha256sum` prints it); None for
        Hub sources (their commit identifies them) or when the files are gone. Computed once, when first asked for
        (or in the background since [`start_hashing`](SourceInfo.start_hashing))."""
        pending = self.__dict__.get("_hashing")
        return pending.result() if pending is not None else self._digest()

    def start_hashing(self) -> None:
        """Start computing [`sha256`](SourceInfo.sha256) in a background thread (hashlib releases the GIL), so that a
        write that will record it does not wait for a pass over a large file. Nothing for Hub sources."""
        if self.local_path is None or not self.files or "_hashing" in self.__dict__ or "sha256" in self.__dict__:
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="lora-fusion-sha256")
        self.__dict__["_hashing"] = pool.submit(self._digest)
        pool.shutdown(wait=False)

    def _digest(self) -> str | None:
        if self.local_path is None or not self.files:
            return None
        digest = hashlib.sha256()
        try:
            for file in self.files:
                with open(file, "rb") as handle:
                    if os.fstat(handle.fileno()).st_size == 0:
                        continue  # nothing to hash, and an empty file cannot be mapped
                    # One update over the whole map: hashlib holds no GIL for its length, where block-wise reads
                    # took the GIL back after every block and queued behind the writing thread each time.
                    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                        digest.update(mapped)
        except (OSError, ValueError):
            return None
        return digest.hexdigest()

    def to_dict(self, *, hash_placeholder: str | None = None) -> dict[str, str | None]:
        """The record of this source in model cards and safetensors metadata, which may be published.

        A Hub source: repo id, revision, subfolder and resolved commit. A local one: its folder's name and the
        [`sha256`](SourceInfo.sha256) of its files, never its path (absolute paths show user names and the machine's
        layout; the name and hash still identify the adapter), or `hash_placeholder` instead of a hash that is still
        being computed (a provisional record, not waiting for it).
        """
        local = self.local_path
        if local is None:
            return {
                "source": self.source, "revision": self.revision, "subfolder": self.subfolder, "commit": self.commit
            }
        name = local.name if local.is_dir() or not local.parent.name else f"{local.parent.name}/{local.name}"
        pending = self.__dict__.get("_hashing")
        unfinished = hash_placeholder is not None and "sha256" not in self.__dict__ and (
            pending is None or not pending.done())
        sha256 = hash_placeholder if unfinished else self.sha256
        return {"source": name, "revision": None, "subfolder": self.subfolder, "commit": None, "sha256": sha256}


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a Hub id with a NUL byte or a too-long name: not a local path
        return False


class LoraAdapter:
    """A LoRA adapter: its config, its modules (from headers) and their factors (read on demand).

    Obtained from [`load_adapter`] or returned by [`merge`]. Tensors of a loaded adapter are read one module at a
    time, so holding many large adapters costs almost no memory until their modules are used.

    Example:
        ```python
        >>> from lora_fusion import load_adapter
        >>> adapter = load_adapter("org/math-lora")
        >>> adapter.delta("model.layers.0.self_attn.q_proj").shape
        torch.Size([4096, 4096])
        ```
    """

    def __init__(
        self,
        *,
        config: AdapterConfig,
        modules: Mapping[str, ModuleSpec],
        store: TensorStore,
        source: SourceInfo | None = None,
        provenance: Mapping[str, Any] | None = None,
        stats: Mapping[str, ModuleStats] | None = None,
        inputs: Iterable[str | Path] = (),
        saved_modules: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = config
        self.modules: dict[str, ModuleSpec] = dict(modules)
        self.source = source
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.stats: dict[str, ModuleStats] = dict(stats or {})
        # Local files this adapter was made from (a merge's sources): memory only, so that writing never replaces
        # them; the written provenance names sources without their paths.
        self.inputs: tuple[Path, ...] = tuple(Path(p) for p in inputs)
        # Whole parameters written as PEFT's `modules_to_save` (an extraction's changed norms or resized embeddings),
        # by parameter name (`model.norm.weight`): only the PEFT format writes them.
        self.saved_modules: dict[str, torch.Tensor] = dict(saved_modules or {})
        self._store = store

    def __repr__(self) -> str:
        origin = self.source.source if self.source else self.provenance.get("method", "merged")
        return f"LoraAdapter({origin!r}, modules={len(self.modules)}, base_model={self.config.base_model!r})"

    @property
    def base_model(self) -> str | None:
        return self.config.base_model

    def local_inputs(self) -> tuple[Path, ...]:
        """Files and folders on this machine that this adapter was read or made from, which writing it must never
        replace or write inside: its own local source, the local sources of a merge (`inputs`), and a local base
        model, F-VAE or support file named in its provenance. Hub sources are not listed (the cache is not the
        user's data). Used by [`write_adapter`]; never written anywhere.
        """
        paths = list(self.inputs)
        if self.source is not None and self.source.local_path is not None:
            paths.append(self.source.local_path)
        params = self.provenance.get("params") or {}
        for value in (self.provenance.get("base_model"), params.get("fvae"), params.get("support")):
            if isinstance(value, (str, Path)) and str(value) and _exists(Path(value).expanduser()):
                paths.append(Path(value).expanduser())
        return tuple(dict.fromkeys(paths))

    def factors(self, module: str, *, check_finite: bool = True, magnitude: bool = False) -> ModuleFactors:
        """Read one module's factors in canonical form (A r×n, B m×r), in the file's dtype.

        Args:
            module: the module's name.
            check_finite: refuse NaN or Inf (False: the caller checks what it computes from the factors).
            magnitude: also read a DoRA module's magnitude vector (the caller turns it into the update with the base
                weights); without it a DoRA module is refused, since its B·A alone is not its update.

        Raises:
            KeyError: if the adapter has no such module.
            NonFiniteError: if a factor holds NaN or Inf.
            UnsupportedAdapterError: a DoRA module read without `magnitude`.
        """
        spec = self.modules[module]
        where = self.source.source if self.source else "merged adapter"
        if spec.dora and not magnitude:
            raise UnsupportedAdapterError(
                f"{where}: module {module} is DoRA, whose update depends on the base weights; merge it with "
                "--base-model BASE (or bake it into the base model)."
            )
        a, b, bias = read_factors(spec, self._store, where=where, check_finite=check_finite)
        mu = None
        if spec.magnitude_key is not None:
            mu = self._store.read(spec.magnitude_key).reshape(spec.out_features)
            if check_finite and not all_finite(mu):
                raise NonFiniteError(f"{where}: module {module} has NaN or Inf in its DoRA magnitude vector; the "
                                     "adapter is corrupted or diverged in training.")
        return ModuleFactors(A=a, B=b, scale=spec.scale, bias=bias, magnitude=mu)

    def delta(self, module: str) -> torch.Tensor:
        """The dense update ΔW = scale·B·A of one module, float32, in canonical m×n form.

        For an `nn.Linear` this is the `weight` layout (out × in); for `fan_in_fan_out` layers and embeddings the base
        weight holds ΔWᵀ; for convolutions reshape to (out, in, *kernel).
        """
        return self.factors(module).delta()

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = False, format: str = "peft") -> Path:
        """Write the adapter atomically: a PEFT folder (adapter_config.json, adapter_model.safetensors, README.md
        model card), a diffusers folder (`format="diffusers"`: pytorch_lora_weights.safetensors and the card) or one
        kohya file (`format="kohya"`, `save_directory` ending in `.safetensors`).

        A PEFT folder loads with `peft.PeftModel.from_pretrained(base_model, save_directory)`, a diffusers one with
        `pipe.load_lora_weights(save_directory)`.

        With `overwrite=True` an existing folder is replaced only if it holds nothing but adapter files (as one
        lora-fusion wrote); see [`check_output_folder`] for what is refused.

        Raises:
            OutputExistsError: if `save_directory` exists and `overwrite` is False.
            OutputProtectedError: `overwrite=True` would delete something else: the current directory or a parent,
                the home folder, this adapter's local sources or base model, a folder with other files.
            OutputWriteError: the disk refused the write; nothing was written.
        """
        from .writer import write_adapter

        return write_adapter(self, Path(save_directory), overwrite=overwrite, format=format)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        format: str = "peft",
    ) -> str:
        """Upload the adapter to a Hub model repo (created if missing); returns the commit URL.

        The token comes from `token`, `HF_TOKEN` or the stored login, as in huggingface_hub; it is never written.
        """
        from .writer import push_adapter

        return push_adapter(
            self, repo_id, private=private, revision=revision, commit_message=commit_message, token=token,
            format=format,
        )
