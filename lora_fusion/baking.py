"""Bake: merge LoRA adapters with any method, add the merged update into the base model's weights, and write the full
model, streaming the base model one safetensors shard at a time.

The merge runs first ([`lora_fusion.api.merge`]) and gives a small factored result. Then each shard of the base
model is streamed: its header gives the output shard's layout, and its tensors are read one at a time with plain
reads ([`ShardReader`]); every module it holds gets W = W₀ + ΔW, computed in float32 and rounded once to the shard's
dtype (or `dtype`), and goes to the writer as soon as it is computed, so memory holds the merged factors and one
tensor. The output has the base model's shard layout and names, its index, config and tokenizer files and a model
card with provenance ([`lora_fusion.writer.write_model`]).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .base_weights import INDEX_NAME, WEIGHTS_NAME, module_key, read_config, read_index
from .errors import IncompatibleAdaptersError, InvalidParameterError, NonFiniteError, SourceNotFoundError
from .hub import commit_of, download_file, is_repo_id, list_files
from .formats.stores import SAFETENSORS_DTYPES
from .spec import all_finite
from .writer import ShardStream, check_model_folder, is_model_support_file, write_model

if TYPE_CHECKING:
    from .adapter import LoraAdapter
    from .api import Source
    from .plan import MergePlan
    from .spec import ModuleSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEQUANTIZE = ("nf4",)
# Module names of the pair that `tie_word_embeddings` ties: the input embedding and the output projection.
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
LM_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# bitsandbytes' NF4 settings of transformers' BitsAndBytesConfig defaults (blocksize 64, no double quantisation).
NF4_BLOCKSIZE = 64
# W₀ + ΔW is formed this many bytes of float32 rows at a time: small enough to stay in a core's cache.
ROW_BLOCK_BYTES = 1 << 20
T = TypeVar("T")


def bake(
    base: str | Path,
    sources: Sequence[Source],
    *,
    out: str | Path | None,
    overwrite: bool = False,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    untie_embeddings: bool = False,
    dequantize: str | None = None,
    token: str | None = None,
    progress: bool | None = None,
    dry_run: bool = False,
    **merge_kwargs: Any,
) -> Path | BakePlan:
    """Merge `sources` (any method) and add the merged update into the base model's weights; write the full model.

    The base model is streamed: shard by shard, one tensor at a time is read, updated and written, so memory holds
    a few tensors plus the merged adapter, never a shard or the model (PEFT's `merge_and_unload` loads it all). Each
    updated weight is W₀ + ΔW with ΔW = s·B·A of the merged adapter, added in float32 and rounded once to the shard's dtype
    (or `dtype`): for a bfloat16 base each changed weight is bit for bit `(W₀.float() + ΔW).to(torch.bfloat16)` (as
    PEFT's `merge_and_unload` gives with its float32 adapter), never ΔW rounded to bfloat16 and then added. Other
    tensors are copied (cast to `dtype` if given).

    Args:
        base: the base model: a local folder (`model.safetensors`, or shards with `model.safetensors.index.json`)
            or a Hub id; a pickled checkpoint (`.bin`) is refused.
        sources: the adapters, as [`merge`] takes them.
        out: the model folder to write, staged and renamed into place (None only with `dry_run`).
        overwrite: replace an `out` that lora-fusion baked (see [`check_model_folder`]); never an input.
        revision: branch, tag or commit of a Hub base.
        dtype: `"float32"`, `"float16"` or `"bfloat16"` for every floating-point tensor (default: as stored);
            `config.json`'s `torch_dtype` follows.
        untie_embeddings: for a model whose `tie_word_embeddings` is true, when the adapters change the input
            embedding or the output projection: write both tensors (the unchanged one is the original shared weight)
            and set `tie_word_embeddings` to false. Without it such a bake is refused, since changing one tied
            tensor silently changes the other.
        dequantize: `"nf4"` for QLoRA adapters: add ΔW onto the NF4 quantise–dequantise of W₀ (bitsandbytes,
            blocksize 64, no double quantisation: transformers' `BitsAndBytesConfig` defaults), the weights the
            adapter was trained against, for the Linear layers bitsandbytes quantises (not embeddings or lm_head).
            Needs the `qlora` extra (bitsandbytes).
        token: Hub token for the base model and Hub sources.
        progress: progress bars on stderr (default: when stderr is a terminal).
        dry_run: return a [`BakePlan`] (shards, tensors, bytes to write) from headers, reading and writing no tensor.
        **merge_kwargs: [`merge`]'s options: `method`, `weights`, `rank`, `include`, … (its `dtype` is float32).
            Methods that read W₀ (rapf) and DoRA sources get `base` as their `base_model`.

    Returns:
        `out`, absolute (or the [`BakePlan`] with `dry_run`).

    Raises:
        SourceNotFoundError: no safetensors weights in `base`, a missing shard, or an index naming a file outside
            the model folder.
        IncompatibleAdaptersError: a merged module that the base model lacks, or holds with another shape (named);
            a change to tied embeddings without `untie_embeddings`.
        NonFiniteError: NaN or Inf in a base weight that the merge changes (module named).
        OutputExistsError, OutputProtectedError, OutputWriteError: as for every output; nothing half-written.
        InvalidParameterError, UnsupportedAdapterError, …: from the merge, or a `dtype` / `dequantize` not known.

    Example:
        ```python
        >>> bake("HuggingFaceTB/SmolLM2-135M", ["me/math-lora", "me/code-lora"], method="linear",
        ...      weights=[0.6, 0.4], out="smollm2-math-code")
        ```
    """
    from .api import merge, open_source
    from .methods import get_method

    out_dtype = _output_dtype(dtype)
    dequantizer = _dequantizer(dequantize)
    if "dtype" in merge_kwargs or "dry_run" in merge_kwargs:  # bake's own; the merge is always float32
        raise InvalidParameterError("merge option", "dtype/dry_run", expected="bake's own dtype and dry_run")
    if out is None and not dry_run:
        raise InvalidParameterError("out", None, expected="the model folder to write (--out DIR)")
    checkpoint = BaseCheckpoint(base, revision=revision, token=token)
    target = Path(out).expanduser().absolute() if out is not None else None
    named = (getattr(s, "source", s) for s in sources)  # a recipe's SourceEntry names its source
    inputs = [str(s) for s in named if isinstance(s, (str, Path))]
    if target is not None and not dry_run:  # before the merge: a refused output costs nothing
        check_model_folder(target, overwrite=overwrite, protected=[*inputs, *checkpoint.local_paths()])
    # opened once (headers): DoRA sources, like methods that read W₀, take their base weights from BASE
    opening = {name: merge_kwargs.pop(name) for name in ("subfolder", "weight_name", "input_format")
               if name in merge_kwargs}
    sources = [open_source(s, token=token, **opening) for s in sources]
    dora = any(spec.dora for adapter in sources for spec in adapter.modules.values())
    uses_base = get_method(merge_kwargs.get("method", "linear")).uses_base
    if merge_kwargs.get("base_model") is None and (uses_base or dora):
        merge_kwargs["base_model"] = f"{base}@{revision}" if revision and checkpoint.is_hub else base
    if dry_run:
        plan = merge(sources, dry_run=True, token=token, **merge_kwargs)
        return _bake_plan(checkpoint, plan, target, out_dtype, untie_embeddings)
    assert target is not None  # refused above without dry_run
    merged = merge(sources, dtype=torch.float32, token=token, progress=progress, **merge_kwargs)
    updates = _plan_updates(checkpoint, merged, untie_embeddings)
    config = checkpoint.config()
    files = checkpoint.support_files()
    if config is not None:
        files["config.json"] = _written_config(config, out_dtype, untied=updates.untied)
    shards = _baked_shards(checkpoint, merged, updates, out_dtype, dequantizer, progress)
    record = {
        "base_model": checkpoint.source,
        "revision": revision,
        "commit": checkpoint.commit,
        "dtype": "as stored" if out_dtype is None else _dtype_name(out_dtype),
        "untie_embeddings": updates.untied,
        "dequantize": dequantize,
        "rounding": "W0 + dW in float32, rounded once to the output dtype",
    }
    return write_model(target, shards, adapter=merged, bake=record, files=files, sharded=checkpoint.sharded,
                       overwrite=overwrite, protected=[*inputs, *checkpoint.local_paths()])


@dataclass(frozen=True)
class BakeShard:
    """One output shard of a bake plan: its file name, tensor count, bytes and the merged modules it changes."""

    name: str
    tensors: int
    bytes: int
    modules: tuple[str, ...]


@dataclass(frozen=True)
class BakePlan:
    """What a bake would write, from headers alone: `lora-fusion bake --dry-run` prints it."""

    base: str
    out: str | None
    merge: MergePlan
    shards: tuple[BakeShard, ...]
    dtype: str | None
    untied: bool

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "out": self.out,
            "merge": self.merge.to_dict(),
            "dtype": self.dtype,
            "untie_embeddings": self.untied,
            "shards": [{"name": s.name, "tensors": s.tensors, "bytes": s.bytes, "modules": list(s.modules)}
                       for s in self.shards],
            "bytes": self.bytes,
        }

    def __str__(self) -> str:
        lines = [f"bake {self.base} -> {self.out or '(no --out)'}: {len(self.shards)} shard(s), {self.bytes:,} bytes "
                 f"(dtype {self.dtype or 'as stored'}); shapes are checked when baking", str(self.merge)]
        lines += [f"  {s.name}: {s.tensors} tensors, {s.bytes:,} bytes, {len(s.modules)} module(s) changed"
                  for s in self.shards]
        return "\n".join(lines)


class BaseCheckpoint:
    """A base model's safetensors checkpoint (a local folder or a Hub repo): its shards, index and small files.

    Nothing is read beyond the index (or the single file's header) until asked; on the Hub each shard is
    downloaded when [`shard_path`](BaseCheckpoint.shard_path) asks for it.
    """

    def __init__(self, source: str | Path, *, revision: str | None = None, token: str | None = None) -> None:
        self.source = str(source)
        self._revision, self._token = revision, token
        path = Path(self.source).expanduser()
        self.commit: str | None = None
        if path.is_dir():
            self._folder: Path | None = path
            self.weight_map = self._local_map(path)
        elif path.exists():
            raise SourceNotFoundError(f"{path}: bake needs the base model's folder (with {WEIGHTS_NAME} or "
                                      f"{INDEX_NAME}), not a file.")
        elif is_repo_id(self.source):
            self._folder = None
            self.weight_map = self._hub_map()
        else:
            raise SourceNotFoundError(f"{self.source}: no such folder, and not a Hub repo id (owner/name).")
        self.shards = tuple(sorted(set(self.weight_map.values())))
        if self._folder is not None:
            missing = [s for s in self.shards if not (self._folder / s).is_file()]
            if missing:
                raise SourceNotFoundError(f"{self._folder}: shard {missing[0]} named by {INDEX_NAME} is missing; "
                                          "download the model again.")

    @property
    def is_hub(self) -> bool:
        return self._folder is None

    @property
    def sharded(self) -> bool:
        return self.shards != (WEIGHTS_NAME,)

    def local_paths(self) -> list[Path]:
        """The local base model folder, which no output may replace."""
        return [self._folder] if self._folder is not None else []

    def shard_path(self, name: str) -> Path:
        """The file of shard `name` (downloaded into the Hub cache for a Hub base)."""
        if self._folder is not None:
            return self._folder / name
        path = download_file(self.source, name, revision=self._revision, token=self._token)
        if path is None:
            raise SourceNotFoundError(f"{self.source}: shard {name} named by {INDEX_NAME} is missing from the repo.")
        return path

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape in shard `name`, from its header."""
        return {key: shape for key, (_, shape, _) in ShardReader(self.shard_path(name), self.source).entries.items()}

    def config(self) -> dict[str, Any] | None:
        """`config.json` as a mapping, or None if the model has none."""
        path = self._small_file("config.json")
        return read_config(path, self.source) if path is not None else None

    def support_files(self) -> dict[str, bytes]:
        """The config, generation config and tokenizer files ([`is_model_support_file`]), by name; never code."""
        if self._folder is not None:
            names = [p.name for p in self._folder.iterdir() if p.is_file()]
        else:
            names = list_files(self.source, revision=self._revision, token=self._token)
        found = {name: self._small_file(name) for name in sorted(names) if is_model_support_file(name)}
        return {name: path.read_bytes() for name, path in found.items() if path is not None}

    def _small_file(self, name: str) -> Path | None:
        if self._folder is not None:
            path = self._folder / name
            return path if path.is_file() else None
        return download_file(self.source, name, revision=self._revision, token=self._token)

    def _local_map(self, folder: Path) -> dict[str, str]:
        if (folder / INDEX_NAME).is_file():
            return read_index(folder / INDEX_NAME, self.source)
        if (folder / WEIGHTS_NAME).is_file():
            return dict.fromkeys(self._header_keys(folder / WEIGHTS_NAME), WEIGHTS_NAME)
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise SourceNotFoundError(_no_safetensors(str(folder), pickled))

    def _hub_map(self) -> dict[str, str]:
        index = download_file(self.source, INDEX_NAME, revision=self._revision, token=self._token)
        if index is not None:
            self.commit = commit_of(index)
            return read_index(index, self.source)
        single = download_file(self.source, WEIGHTS_NAME, revision=self._revision, token=self._token)
        if single is None:
            names = list_files(self.source, revision=self._revision, token=self._token)
            raise SourceNotFoundError(_no_safetensors(self.source, [n for n in names if n.endswith(".bin")]))
        self.commit = commit_of(single)
        return dict.fromkeys(self._header_keys(single), WEIGHTS_NAME)

    def _header_keys(self, path: Path) -> list[str]:
        return list(ShardReader(path, self.source).entries)


def _no_safetensors(source: str, pickled: list[str]) -> str:
    if pickled:
        return (f"{source} holds a pickled checkpoint ({pickled[0]}); bake reads only safetensors (unpickling can run "
                "code): convert the model to safetensors first, e.g. save_pretrained(..., safe_serialization=True).")
    return f"{source} has no {WEIGHTS_NAME} or {INDEX_NAME}; bake needs the base model as safetensors."


@dataclass
class _Update:
    """One base tensor that the bake changes: `module`'s weight (or bias), read from `source_key`."""

    module: str
    part: str  # "weight" or "bias"
    source_key: str


@dataclass
class _Updates:
    """Which tensor of which shard each merged module changes, and the tensors an untie adds."""

    by_shard: dict[str, dict[str, _Update]] = field(default_factory=dict)
    # output key -> (shard it is written to, key of the shared weight it starts from)
    added: dict[str, tuple[str, str]] = field(default_factory=dict)
    untied: bool = False


def _plan_updates(checkpoint: BaseCheckpoint, merged: LoraAdapter, untie: bool) -> _Updates:
    """Match every merged module to its base tensor (named errors for a missing module, another shape, a tied
    embedding) before anything is computed; headers of local shards are read to check the shapes now."""
    modules = {key.removesuffix(".weight"): key for key in checkpoint.weight_map if key.endswith(".weight")}
    tied = _tied_pair(checkpoint, modules)
    updates = _Updates(untied=bool(untie and tied))
    for name in merged.modules:
        key = _base_key(checkpoint, modules, name, tied)
        if tied and key in tied and not untie:
            raise IncompatibleAdaptersError(
                f"{checkpoint.source}: the adapters change {name}, whose weight is tied to "
                f"{tied[1] if key == tied[0] else tied[0]} (tie_word_embeddings); pass --untie-embeddings "
                "(untie_embeddings=True) to write both tensors and untie them, or leave the module out (--exclude)."
            )
        if tied and key == tied[1] and key not in checkpoint.weight_map:  # lm_head of a tied checkpoint: new tensor
            shard = checkpoint.weight_map[tied[0]]
            updates.added[key] = (shard, tied[0])
        else:
            shard = checkpoint.weight_map[key]
        source = tied[0] if key in updates.added else key
        updates.by_shard.setdefault(shard, {})[key] = _Update(name, "weight", source)
        if merged.modules[name].bias_key is not None:
            bias = key.removesuffix(".weight") + ".bias"
            if bias not in checkpoint.weight_map:
                raise IncompatibleAdaptersError(f"{checkpoint.source}: the adapters add a bias to {name}, which has "
                                                "none in the base model; pass the base model they were trained on.")
            updates.by_shard.setdefault(checkpoint.weight_map[bias], {})[bias] = _Update(name, "bias", bias)
    if updates.untied and tied[1] not in checkpoint.weight_map and tied[1] not in updates.added:
        updates.added[tied[1]] = (checkpoint.weight_map[tied[0]], tied[0])  # untied but unchanged: a plain copy
    if checkpoint.local_paths():
        for shard, changed in updates.by_shard.items():
            shapes = checkpoint.shapes(shard)
            for key, update in changed.items():
                _check_shape(checkpoint.source, merged.modules[update.module], update, shapes[update.source_key],
                             merged.config.fan_in_fan_out)
    return updates


def _tied_pair(checkpoint: BaseCheckpoint, modules: Mapping[str, str]) -> tuple[str, str] | None:
    """(input embedding key, output projection key) when config.json ties them (`tie_word_embeddings`, true unless
    set false, as in transformers' `PretrainedConfig`); the output key may be absent from the checkpoint, which
    then stores the shared weight once, under the input key. None for a model without an output layer."""
    config = checkpoint.config() or {}
    if not config.get("tie_word_embeddings", True):
        return None
    inputs = [key for name, key in modules.items() if name.rsplit(".", 1)[-1] in INPUT_EMBEDDINGS]
    if len(inputs) != 1:
        return None
    outputs = [key for name, key in modules.items() if name.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS]
    if len(outputs) == 1:
        return inputs[0], outputs[0]
    # Stored once: the output layer is transformers' `lm_head` of a language-model head class; an encoder (BertModel)
    # has no output layer for its embedding to be tied to.
    heads = [a for a in config.get("architectures") or [] if isinstance(a, str) and a.endswith(LM_HEAD_CLASSES)]
    return (inputs[0], f"{OUTPUT_EMBEDDINGS[0]}.weight") if heads else None


def _base_key(checkpoint: BaseCheckpoint, modules: Mapping[str, str], name: str,
              tied: tuple[str, str] | None) -> str:
    if tied and name.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS and tied[1] not in checkpoint.weight_map:
        return tied[1]
    return module_key(name, dict(modules), checkpoint.source)


def _stored_shape(spec: ModuleSpec, fan_in_fan_out: bool) -> tuple[int, ...] | None:
    """The shape the base checkpoint stores `spec`'s weight in (None for a convolution: any kernel of n inputs)."""
    m, n = spec.shape
    if spec.kind == "embedding" or (spec.kind == "linear" and fan_in_fan_out):
        return (n, m)  # nn.Embedding and GPT-2's Conv1D store in × out
    if spec.kind == "conv":
        return None
    return (m, n)


def _check_shape(source: str, spec: ModuleSpec, update: _Update, shape: tuple[int, ...], fan_in_fan_out: bool) -> None:
    m, n = spec.shape
    if update.part == "bias":
        ok = shape == (m,)
    elif spec.kind == "conv":
        ok = len(shape) >= 2 and shape[0] == m and math.prod(shape[1:]) == n and tuple(shape[2:]) == spec.kernel
    else:
        ok = shape == _stored_shape(spec, fan_in_fan_out)
    if not ok:
        raise IncompatibleAdaptersError(
            f"{source}: {update.source_key} has shape {list(shape)} but the adapters' {spec.name} needs "
            f"{list(_stored_shape(spec, fan_in_fan_out) or (m, n))}; pass the base model the adapters were trained on."
        )


def _baked_shards(
    checkpoint: BaseCheckpoint,
    merged: LoraAdapter,
    updates: _Updates,
    out_dtype: torch.dtype | None,
    dequantizer: Any,
    progress: bool | None,
) -> Iterator[ShardStream]:
    """Each output shard in turn, for [`write_model`]: its layout from the base shard's header, then its tensors one
    at a time, each read from the file alone (no memory map, so a shard is never resident), changed ones replaced by
    W₀ + ΔW (float32, rounded once), the others cast to `out_dtype` if given."""
    names: Any = checkpoint.shards
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm.auto import tqdm

        names = tqdm(names, desc="baking", unit="shard", file=sys.stderr, leave=False)
    fan_in_fan_out = merged.config.fan_in_fan_out
    for shard in names:
        reader = ShardReader(checkpoint.shard_path(shard), checkpoint.source)
        changed = updates.by_shard.get(shard, {})
        sources = {key: key for key in reader.entries}
        sources.update({key: shared for key, (target, shared) in updates.added.items() if target == shard})
        sources.update({key: update.source_key for key, update in changed.items()})
        for key, update in changed.items():  # every shape of the shard before any of its bytes is written
            _check_shape(checkpoint.source, merged.modules[update.module], update,
                         reader.entries[update.source_key][1], fan_in_fan_out)
        layout = {}
        for key in sorted(sources):
            dtype, shape, _ = reader.entries[sources[key]]
            floating = SAFETENSORS_DTYPES[dtype].is_floating_point
            layout[key] = (_safetensors_name(out_dtype) if out_dtype is not None and floating else dtype, shape)

        def tensors(reader: ShardReader = reader, changed: dict[str, _Update] = changed,
                    sources: dict[str, str] = sources, layout: dict[str, Any] = layout) -> Iterator[tuple[str, Any]]:
            for key in layout:
                original = reader.read(sources[key])
                update = changed.get(key)
                if update is None:
                    yield key, original if out_dtype is None or not original.is_floating_point() \
                        else original.to(out_dtype)
                    continue
                if not all_finite(original):
                    raise NonFiniteError(
                        f"{checkpoint.source}: {update.source_key} (base weight of {update.module}) holds NaN or Inf; "
                        "the base model is corrupt: download it again."
                    )
                yield key, _updated(original, merged, merged.modules[update.module], update.part, fan_in_fan_out,
                                    dequantizer, out_dtype or original.dtype)

        yield shard, layout, _prefetched(tensors())


def _prefetched(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """`items`, computed in a background thread on one torch thread, up to `depth` ahead of the consumer: reading
    and W₀ + ΔW of the next tensor overlap the write of this one (torch and file I/O release the GIL), and one torch
    thread per task avoids OpenMP threads spinning against each other on shared cores (see `thread_limit`). With
    depth 1 at most three tensors are alive: the one written, one queued, one being computed. An error in the thread
    is raised here; when the consumer stops early, the thread stops at its next item."""
    import queue
    import threading

    from .runtime import thread_limit

    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[str, Any]) -> bool:
        """Queue `entry` unless the consumer has stopped (then never block: nobody would take it)."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        torch.set_num_threads(1)  # this thread's own count: thread_limit below sets the consumer's (torch_thread_pool)
        try:
            for item in items:
                if not offer(("item", item)):
                    return
            offer(("done", None))
        except BaseException as err:  # handed to the consumer, which raises it
            offer(("error", err))

    with thread_limit(1):
        worker = threading.Thread(target=produce, name="lora-fusion-bake", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = ready.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            worker.join()


class ShardReader:
    """One safetensors file of a base model, read one tensor at a time with plain reads: unlike safetensors' memory
    map, whose pages stay resident (and count in the process's memory) once read, a tensor here lives only as long as
    its caller keeps it."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        size = path.stat().st_size
        problem = None
        try:
            with path.open("rb") as file:
                length = int.from_bytes(file.read(8), "little")
                header = json.loads(file.read(length)) if 0 < length <= min(size - 8, 100_000_000) else None
        except (OSError, ValueError, RecursionError) as err:
            header, problem = None, str(err)
        self.data_start = 8 + length if header is not None else 0
        self.entries: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
        if isinstance(header, dict):
            header.pop("__metadata__", None)
            for key, entry in header.items():
                try:
                    dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                    valid = (dtype in SAFETENSORS_DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
                             and 0 <= start <= end <= size - self.data_start
                             and end - start == math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize)
                except (KeyError, TypeError, ValueError):
                    valid = False
                if not valid:
                    problem = f"tensor {key} has an invalid header entry"
                    break
                self.entries[key] = (dtype, shape, (start, end))
        else:
            problem = problem or "no valid header"
        if problem:
            raise SourceNotFoundError(f"{source}: {path.name} is not a readable safetensors file ({problem}).")

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, (start, end) = self.entries[key]
        buffer = bytearray(end - start)
        with self.path.open("rb") as file:
            file.seek(self.data_start + start)
            if file.readinto(buffer) != len(buffer):
                raise SourceNotFoundError(f"{self.path.name}: {key} is cut short; the file is truncated.")
        if not buffer:
            return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
        return torch.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[dtype]).reshape(shape)


def _safetensors_name(dtype: torch.dtype) -> str:
    return next(name for name, known in SAFETENSORS_DTYPES.items() if known == dtype)


def _updated(
    original: torch.Tensor,
    merged: LoraAdapter,
    spec: ModuleSpec,
    part: str,
    fan_in_fan_out: bool,
    dequantizer: Any,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W₀ + ΔW in float32 in the stored orientation, rounded once to `dtype`: bit for bit
    `(W₀.float() + s·(B·A)).to(dtype)`. Computed a block of stored rows at a time (ΔW's rows from B·A, scaled, added
    to W₀'s, rounded into the output), so the float32 intermediate stays in cache instead of four passes over a
    whole float32 matrix; the same float operations on every element, so the same bits."""
    factors = merged.factors(spec.name)
    if part == "bias":
        return (original.float() + factors.scale * factors.bias.float()).to(dtype)
    # bitsandbytes quantises the Linear layers, never embeddings or (in transformers' default) the output layer
    quantised = spec.kind == "linear" and spec.name.rsplit(".", 1)[-1] not in OUTPUT_EMBEDDINGS
    base = dequantizer(original) if dequantizer is not None and quantised else original
    B, A = factors.B.float(), factors.A.float()
    # embeddings and GPT-2's Conv1D store ΔWᵀ (their stored rows are ΔW's columns); a conv's kernel is in its row
    transposed = spec.kind == "embedding" or (spec.kind == "linear" and fan_in_fan_out)
    stored = base.reshape(base.shape[0], -1)
    out = torch.empty(stored.shape, dtype=dtype)
    step = max(1, ROW_BLOCK_BYTES // (4 * stored.shape[1]))
    for start in range(0, stored.shape[0], step):
        rows = slice(start, start + step)
        block = (B @ A[:, rows]).T if transposed else B[rows] @ A
        if factors.scale != 1.0:  # merged adapters fold their scales: s = 1, nothing to multiply
            block.mul_(factors.scale)
        out[rows] = block.add_(stored[rows])
    return out.reshape(original.shape)


def _output_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise InvalidParameterError("dtype", str(dtype), expected="float32, float16 or bfloat16")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dequantizer(kind: str | None) -> Any:
    """The NF4 quantise–dequantise of a weight (bitsandbytes), or None; refused clearly where it cannot run."""
    if kind is None:
        return None
    if kind not in DEQUANTIZE:
        raise InvalidParameterError("dequantize", kind, expected="nf4 (QLoRA's 4-bit NormalFloat)")
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except Exception as err:  # not installed, or installed without a backend for this machine
        raise InvalidParameterError(
            "dequantize", kind,
            expected=f"bitsandbytes to be usable for the NF4 round trip, which it is not here ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else 'import failed'}); install lora-fusion[qlora]",
        ) from None

    def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
        packed, state = quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, quant_type="nf4", compress_statistics=False)
        return dequantize_4bit(packed, state)

    return nf4_round_trip


def _written_config(config: dict[str, Any], out_dtype: torch.dtype | None, *, untied: bool) -> bytes:
    """config.json for the baked model: `tie_word_embeddings` false when untied, the dtype when it changed."""
    written = dict(config)
    if untied:
        written["tie_word_embeddings"] = False
    if out_dtype is not None:
        key = "dtype" if "dtype" in written else "torch_dtype"
        written[key] = _dtype_name(out_dtype)
    return (json.dumps(written, indent=2, sort_keys=True) + "\n").encode()


def _bake_plan(checkpoint: BaseCheckpoint, plan: MergePlan, out: Path | None, out_dtype: torch.dtype | None,
               untie: bool) -> BakePlan:
    """The shards a bake would write, from the headers of the base shards (downloaded for a Hub base)."""
    modules = {key.removesuffix(".weight"): key for key in checkpoint.weight_map if key.endswith(".weight")}
    tied = _tied_pair(checkpoint, modules)
    touched: dict[str, list[str]] = {}
    for module in plan.modules:
        key = _base_key(checkpoint, modules, module.name, tied)
        shard = checkpoint.weight_map.get(key) or checkpoint.weight_map[tied[0]]  # type: ignore[index]
        touched.setdefault(shard, []).append(module.name)
    shards = []
    for name in checkpoint.shards:
        sizes = _header_sizes(checkpoint.shard_path(name), out_dtype, checkpoint.source)
        if untie and tied and tied[1] not in checkpoint.weight_map and checkpoint.weight_map[tied[0]] == name:
            sizes[tied[1]] = sizes[tied[0]]
        shards.append(BakeShard(name, len(sizes), sum(sizes.values()), tuple(touched.get(name, ()))))
    return BakePlan(checkpoint.source, None if out is None else str(out), plan, tuple(shards),
                    None if out_dtype is None else _dtype_name(out_dtype), bool(untie and tied))


def _header_sizes(path: Path, out_dtype: torch.dtype | None, source: str) -> dict[str, int]:
    """Each tensor's bytes once written, from the safetensors header (floating tensors at `out_dtype` if given)."""
    sizes = {}
    for key, (dtype, shape, (start, end)) in ShardReader(path, source).entries.items():
        floating = SAFETENSORS_DTYPES[dtype].is_floating_point
        sizes[key] = math.prod(shape) * out_dtype.itemsize if out_dtype is not None and floating else end - start
    return sizes
