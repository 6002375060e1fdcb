"""Run a merge method over modules, one module at a time.

`merge` resolves the sources (headers only), checks that they can be merged, validates every parameter before any
tensor is read, then streams: for each module it reads that module's factors from each adapter, calls the method,
keeps the (small) output factors and lets the inputs go. Peak memory is one module's working set plus the output.
The engine parses no flags and writes no files; the writer does that.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import torch

from . import __version__
from .adapter import LoraAdapter, ModuleFactors
from .base_weights import BaseWeights
from .distributed import current_shard, gather_shards, is_main_process
from .linalg import EXACT_SVD_LIMIT, OVERSAMPLING
from .runtime import thread_limit
from .errors import (
    DegenerateMergeWarning,
    IncompatibleAdaptersError,
    InvalidParameterError,
    NonFiniteError,
    SourceNotFoundError,
)
from .methods import MergeParams, MethodSpec, ModuleGroup, ModuleStats, get_method
from .recipe import SourceEntry
from .formats.peft import check_scale_fits
from .hub import is_repo_id
from .sources import load_adapter
from .spec import AdapterConfig, MemoryStore, ModuleSpec, all_finite

Source = str | Path | LoraAdapter | SourceEntry
T = TypeVar("T")
# Modules merged at once on the CPU, each on one thread; the dense methods' peak memory grows with it.
CPU_WORKERS = min(2, os.cpu_count() or 1)
# Below this retained energy in a module, a merge at the default rank is likely not what was meant (issue 12 §6).
LOW_RETAINED_ENERGY = 0.9


@dataclass(frozen=True)
class ModulePlan:
    """One module of a merge plan: canonical shape, input ranks, output rank (an upper bound with `energy`)."""

    name: str
    shape: tuple[int, int]
    input_ranks: tuple[int, ...]
    output_rank: int
    flops: float
    working_bytes: int


@dataclass(frozen=True)
class MergePlan:
    """What a merge would do, computed from file headers alone: `--dry-run` prints it."""

    method: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    params: Mapping[str, Any]
    modules: tuple[ModulePlan, ...]
    output_bytes: int
    peak_bytes: int
    input_bytes: int = 0
    rank_is_bound: bool = False

    @property
    def flops(self) -> float:
        return sum(m.flops for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sources": list(self.sources),
            "weights": list(self.weights),
            "params": dict(self.params),
            "modules": len(self.modules),
            "output_ranks": {m.name: m.output_rank for m in self.modules},
            "output_rank_is_upper_bound": self.rank_is_bound,
            "estimated_flops": self.flops,
            "estimated_peak_bytes": self.peak_bytes,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
        }

    def __str__(self) -> str:
        ranks = sorted({m.output_rank for m in self.modules})
        rank_text = ", ".join(map(str, ranks[:8])) + (" …" if len(ranks) > 8 else "")
        bound = " (upper bounds; the merge picks per module)" if self.rank_is_bound else ""
        lines = [
            f"method        {self.method} {' '.join(f'{k}={v}' for k, v in self.params.items() if v is not None)}".rstrip(),
            f"sources       {', '.join(f'{s} (w={w:g})' for s, w in zip(self.sources, self.weights))}",
            f"modules       {len(self.modules)}",
            f"output ranks  {rank_text}{bound}",
            f"compute       ~{_si(self.flops)}FLOP",
            f"peak memory   ~{_si(self.peak_bytes)}B (working sets of the modules merged at once + output; the inputs, "
            f"{_si(self.input_bytes)}B, are memory-mapped: counted in RSS as read, reclaimable)",
            f"output size   {_si(self.output_bytes)}B",
        ]
        return "\n".join(lines)


def _si(value: float) -> str:
    for unit in ("", "k", "M", "G", "T", "P"):
        if abs(value) < 1000:
            return f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} E"


@overload
def merge(sources: Sequence[Source], *, dry_run: Literal[False] = ..., **kwargs: Any) -> LoraAdapter: ...
@overload
def merge(sources: Sequence[Source], *, dry_run: Literal[True], **kwargs: Any) -> MergePlan: ...


def merge(
    sources: Sequence[Source],
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    scale: float | None = None,
    density: float | None = None,
    majority: str | None = None,
    gamma: float | None = None,
    seed: int | None = None,
    space: str | None = None,
    svd: str | None = None,
    common_fraction: float | None = None,
    bias: float | None = None,
    chained: bool | None = None,
    base_model: str | Path | None = None,
    fvae: str | Path | None = None,
    support: str | Path | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str = "cpu",
    distributed: bool = False,
    ignore_base_model: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
) -> LoraAdapter | MergePlan:
    """Fuse LoRA adapters module by module; exact methods never form an out×in matrix.

    Args:
        sources: Hub ids (`owner/name[@revision]`), local adapter directories or files, loaded [`LoraAdapter`]s,
            or recipe [`SourceEntry`]s (with their own revision and subfolder).
        method: a registered method name (`lora-fusion methods`), e.g. `"linear"`, `"task_arithmetic"`, `"svd"`.
        weights: one weight per source (default 1 each, i.e. the plain sum); negative weights subtract.
        rank: output rank (default: Σ rᵢ for exact sums, the merged rank for subspace methods, else the largest
            input rank of each module).
        energy: instead of `rank`, keep the smallest rank per module whose retained energy reaches this fraction.
        scale: global factor λ on the merged update (default 1).
        density: fraction kept by TIES/magnitude trims, keep probability of DARE (method defaults otherwise).
        majority: TIES sign election, `"total"` (default) or `"frequency"`.
        gamma: Breadcrumbs' fraction of largest entries removed (default 0.01).
        seed: seed of DARE's masks and of randomized SVDs (default 0); same inputs and seed give the same files.
        space: `"full"` (dense update per module, the papers' semantics) or `"core"` (Core Space merging).
        svd: how a dense merged update (full-space element-wise methods, base-aware rapf) returns to low rank:
            `"auto"` (default: exact up to 1024 rows or columns, else randomized), `"exact"` or `"randomized"`.
        common_fraction: Iso-CTS' share of the rank kept for the common subspace (default 0.8).
        bias: RAPF's mask offset b in [0, 1] (default 0.6).
        chained: RAPF: the adapters were trained in sequence, each on the previous fused weights (default False).
        base_model: the base model's weights (a local directory or file, or a Hub id `owner/name[@revision]`), for
            methods that use them (RAPF); read one module at a time, only safetensors.
        fvae, support: ICM-Fusion's trained F-VAE directory and JSONL support examples (`method="icm"`).
        revision, subfolder, token: passed to [`load_adapter`] for string sources.
        dtype: output dtype, `"float32"`, `"float16"` or `"bfloat16"` (default: the sources' dtype, float32 if they
            differ). The math is float32 (float64 for the small cores) whatever the dtype.
        device: where the math runs (`"cpu"`, `"cuda"`, `"auto"`).
        distributed: under `accelerate launch` or torchrun with several processes, split the modules between them
            (each on its own GPU with cuda/auto): every process must call `merge`, and every process returns the
            whole result; save it from the main process only. Ignored in a single process.
        ignore_base_model: merge even if the adapters' `base_model_name_or_path` differ (shapes must still agree).
        dry_run: return a [`MergePlan`] computed from headers, reading no tensors.
        progress: show a progress bar on stderr (default: when stderr is a terminal).

    Returns:
        The merged [`LoraAdapter`] (with `.stats` per module and `.provenance`), or a [`MergePlan`] if `dry_run`.

    Raises:
        UnknownMethodError, InvalidParameterError: before any download.
        IncompatibleAdaptersError: different base models, or different shapes for one module (named).
        SourceNotFoundError, NotALoraAdapterError, UnsupportedAdapterError, CorruptAdapterError, HubError: from loading.

    Example:
        ```python
        >>> merged = merge(["org/math-lora", "org/code-lora"], method="svd", weights=[0.6, 0.4], rank=16)
        >>> merged.save_pretrained("out/")
        ```
    """
    spec = get_method(method)
    params = spec.resolve(
        {"rank": rank, "energy": energy, "scale": scale, "density": density, "majority": majority,
         "gamma": gamma, "seed": seed, "space": space, "svd": svd, "common_fraction": common_fraction, "bias": bias,
         "chained": chained, "fvae": None if fvae is None else str(fvae),
         "support": None if support is None else str(support)}
    )
    if base_model is not None and not spec.uses_base:
        raise InvalidParameterError("base_model", str(base_model), expected=f"none: {spec.name} reads no base weights")
    weight_list = _weights(weights, len(sources))
    target = _device(device)
    if spec.whole_adapters:
        _check_whole(spec, params, weights=weights, dry_run=dry_run, dtype=dtype, device=device)
    shard = None if dry_run or spec.whole_adapters else current_shard(device) if distributed else None

    def open_sources() -> tuple[list[LoraAdapter], dict[str, ModuleSpec], torch.dtype]:
        adapters = [_open(s, revision=revision, subfolder=subfolder, token=token) for s in sources]
        layout = _module_layout(adapters, ignore_base_model=ignore_base_model)
        out_dtype = _dtype(dtype) if dtype is not None else _common_dtype(adapters)
        for adapter in adapters:
            for name, module in adapter.modules.items():
                check_scale_fits(name, module.scale, out_dtype, _origin(adapter))
        return adapters, layout, out_dtype

    if shard is None:
        adapters, layout, out_dtype = open_sources()
        if spec.whole_adapters:
            return spec.fn(adapters, params)  # type: ignore[call-arg, arg-type]
        if dry_run:
            return _plan(spec, params, adapters, weight_list, layout, out_dtype, with_base=base_model is not None)
        base = _open_base(base_model, token=token) if base_model is not None else None
        merged = _merge_modules(
            list(layout), spec, params, adapters, weight_list, layout, target, out_dtype, progress, base
        )
    else:
        target = torch.device(shard.device)
        opened: dict[str, Any] = {}

        def my_share() -> dict[str, ModuleOutput]:
            # Everything that can fail in one process (downloads, validation, the merge) happens in here, so that a
            # failure reaches every process through the gather instead of leaving the others waiting.
            adapters, layout, out_dtype = open_sources()
            base = _open_base(base_model, token=token) if base_model is not None else None
            opened.update(adapters=adapters, layout=layout, out_dtype=out_dtype, base=base)
            names = shard.take({name: math.prod(spec.shape) for name, spec in layout.items()})
            return _merge_modules(names, spec, params, adapters, weight_list, layout, target, out_dtype, progress, base)

        merged = {name: output for share in gather_shards(shard, my_share) for name, output in share.items()}
        adapters, layout, out_dtype, base = (opened[key] for key in ("adapters", "layout", "out_dtype", "base"))
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, ModuleSpec] = {}
    stats: dict[str, ModuleStats] = {}
    findings: dict[str, ModuleFindings] = {}
    for name in layout:
        modules[name], outputs, stats[name], findings[name] = merged[name]
        tensors.update(outputs)
    if is_main_process():  # every process of a launch holds the same result: say it once
        _warn_degenerate(adapters, findings, stats, rank_given=rank is not None or energy is not None)
    first = adapters[0].config
    config = AdapterConfig(
        base_model=first.base_model,
        task_type=first.task_type,
        r=max(s.rank for s in stats.values()),
        lora_alpha=1.0,
        fan_in_fan_out=any(a.config.fan_in_fan_out for a in adapters),
    )
    provenance = {
        "lora_fusion_version": __version__,
        "method": spec.name,
        "params": spec.recorded(params),
        "sources": [
            {**(a.source.to_dict() if a.source else {"source": "in-memory adapter"}), "weight": w}
            for a, w in zip(adapters, weight_list)
        ],
        "dtype": str(out_dtype).removeprefix("torch."),
        **({"base_model": base.source} if base is not None else {}),
    }
    # The sources' local paths stay in memory (never in the provenance): writing the result must not replace them.
    inputs = [path for adapter in adapters for path in adapter.local_inputs()]
    return LoraAdapter(
        config=config, modules=modules, store=MemoryStore(tensors), provenance=provenance, stats=stats, inputs=inputs
    )


def _check_whole(
    spec: MethodSpec, params: MergeParams, *, weights: Sequence[float] | None, dry_run: bool,
    dtype: torch.dtype | str | None, device: str,
) -> None:
    """A method on whole adapters (ICM-Fusion) learns its own combination and writes float32 from the CPU: refuse
    what it would ignore, before anything is downloaded. Under a launcher each process runs it whole."""
    for name in spec.required:
        if getattr(params, name) is None:
            raise InvalidParameterError(name, None, expected=f"a path: {spec.name} needs --{name.replace('_', '-')}")
    given = {"weights": weights, "dry_run": dry_run or None, "dtype": dtype, "device": None if device == "cpu" else device}
    for name, value in given.items():
        if value is not None:
            raise InvalidParameterError(name, value, expected=f"none: {spec.name} learns its own weights, runs on the "
                                        "CPU in one process, writes float32 and has no plan before it runs")


@dataclass(frozen=True)
class ModuleFindings:
    """What the merge of one module noticed that may make the result degenerate (reported by `_warn_degenerate`)."""

    zero_inputs: tuple[int, ...]  # positions of the sources whose update of this module is zero
    zero_output: bool


ModuleOutput = tuple[ModuleSpec, dict[str, torch.Tensor], ModuleStats, ModuleFindings]


def _is_zero(tensor: torch.Tensor) -> bool:
    return not bool(tensor.any())


def _warn_degenerate(
    adapters: Sequence[LoraAdapter],
    findings: Mapping[str, ModuleFindings],
    stats: Mapping[str, ModuleStats],
    *,
    rank_given: bool,
) -> None:
    """One `DegenerateMergeWarning` per kind of result that is probably not what was meant."""
    names = [_origin(a) for a in adapters]
    seen: dict[str, int] = {}
    for i, adapter in enumerate(adapters):
        where = adapter.source.path if adapter.source and adapter.source.path else f"object {id(adapter)}"
        key = f"{where}|{adapter.source.subfolder if adapter.source else ''}"
        if key in seen:
            _warn(f"source {i + 1} ({names[i]}) is the same adapter as source {seen[key] + 1}: its update counts "
                  "twice; give it once with a larger weight if that is what you mean.")
        seen.setdefault(key, i)
    for i, adapter in enumerate(adapters):
        zero = [m for m in adapter.modules if m in findings and i in findings[m].zero_inputs]
        if zero and len(zero) == len([m for m in adapter.modules if m in findings]):
            _warn(f"source {i + 1} ({names[i]}) is all zeros (an untrained adapter? PEFT initialises B to 0): it "
                  "adds nothing to the merge.")
    if findings and all(f.zero_output for f in findings.values()):
        _warn("the merged adapter is all zeros: the sources cancel or were trimmed away; check the weights and "
              "the method's parameters.")
    low = {name: s.retained_energy for name, s in stats.items() if s.retained_energy < LOW_RETAINED_ENERGY}
    if low and not rank_given:
        worst = min(low, key=low.__getitem__)
        _warn(f"{len(low)} module(s) keep less than {LOW_RETAINED_ENERGY:g} of the merged update's energy at the "
              f"default rank (lowest: {worst}, {low[worst]:.3f}); pass --energy 0.99 or a larger --rank.")


def _warn(message: str) -> None:
    warnings.warn(message, DegenerateMergeWarning, stacklevel=4)


def _merge_modules(
    names: Sequence[str],
    spec: MethodSpec,
    params: MergeParams,
    adapters: Sequence[LoraAdapter],
    weight_list: Sequence[float],
    layout: Mapping[str, ModuleSpec],
    target: torch.device,
    out_dtype: torch.dtype,
    progress: bool | None,
    base: BaseWeights | None,
) -> dict[str, ModuleOutput]:
    """The streaming loop over `names`: each module's inputs are read, merged, cast, checked and released.

    On the CPU every module runs on one torch thread, two modules at a time: small factored operations gain nothing
    from intra-op threads, and a module's result then never depends on the thread count (BLAS reductions split
    across threads round differently), so a merge gives the same bytes on any machine, process count or sharding.
    """

    def merge_one(name: str) -> ModuleOutput:
        present = [(i, a, w) for i, (a, w) in enumerate(zip(adapters, weight_list)) if name in a.modules]
        base_weight = None
        if base is not None:
            fan_in_fan_out = any(a.config.fan_in_fan_out for _, a, _ in present)
            base_weight = base.weight(layout[name], fan_in_fan_out=fan_in_fan_out).to(target)
        factors = [a.factors(name) for _, a, _ in present]
        zero_inputs = tuple(i for (i, _, _), f in zip(present, factors) if _is_zero(f.B) or _is_zero(f.A))
        group = ModuleGroup(
            name=name,
            factors=[_to(f, target) for f in factors],
            weights=[w for _, _, w in present],
            base=base_weight,
        )
        result = spec.fn(group, params)  # type: ignore[call-arg, arg-type]
        spec_out = layout[name].written(rank=result.stats.rank, dtype=out_dtype, bias=result.bias is not None)
        outputs = {spec_out.a_key: result.A, spec_out.b_key: result.B}
        if result.bias is not None and spec_out.bias_key:
            outputs[spec_out.bias_key] = result.bias
        outputs = {key: tensor.to(device="cpu", dtype=out_dtype) for key, tensor in outputs.items()}
        if not all(all_finite(tensor) for tensor in outputs.values()):
            raise NonFiniteError(
                f"module {name}: the merged factors do not fit in {str(out_dtype).removeprefix('torch.')}; "
                "write them in float32 (--dtype float32) or lower the weights."
            )
        zero_output = _is_zero(outputs[spec_out.a_key]) or _is_zero(outputs[spec_out.b_key])
        return spec_out, outputs, result.stats, ModuleFindings(zero_inputs, zero_output)

    on_cpu = target.type == "cpu"
    workers = CPU_WORKERS if on_cpu else 1
    with thread_limit(1 if on_cpu else None), ThreadPoolExecutor(workers) as pool:
        results = pool.map(merge_one, names) if workers > 1 else map(merge_one, names)
        return dict(zip(names, _progress(results, len(names), progress, spec.name)))


def _open_base(source: str | Path, *, token: str | None) -> BaseWeights:
    text = str(source)
    if Path(text).expanduser().exists():
        return BaseWeights(text)
    repo_id, _, revision = text.partition("@")
    if not is_repo_id(repo_id):
        raise SourceNotFoundError(
            f"--base-model {text}: no such file or directory, and not a Hub repo id (owner/name[@revision])."
        )
    return BaseWeights(repo_id, revision=revision or None, token=token)


def _is_dense(spec: MethodSpec, params: MergeParams) -> bool:
    """Whether the method forms dense m×n updates (element-wise methods in full space)."""
    return "space" in spec.params and params.space == "full"


def _open(source: Source, *, revision: str | None, subfolder: str | None, token: str | None) -> LoraAdapter:
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, (str, Path)):
        return load_adapter(source, revision=revision, subfolder=subfolder, token=token)
    return load_adapter(
        source.source, revision=source.revision or revision, subfolder=source.subfolder or subfolder, token=token
    )


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if count == 0:
        raise InvalidParameterError("sources", [], expected="at least one adapter")
    if weights is None:
        return [1.0] * count
    values = list(weights)
    if len(values) != count:
        raise InvalidParameterError(
            "weights", values, expected=f"one weight per source ({count} sources, {len(values)} weights)"
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidParameterError("weights", values, expected="finite numbers, e.g. 0.6,0.4")
    return [float(v) for v in values]


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, torch.dtype) and dtype in names.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in names:
        return names[dtype.removeprefix("torch.")]
    raise InvalidParameterError("dtype", dtype, expected="float32, float16 or bfloat16")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidParameterError("device", device, expected="cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError("device", device, expected="cpu or auto: no CUDA GPU is visible here")
    return torch.device(device)


def _module_layout(adapters: Sequence[LoraAdapter], *, ignore_base_model: bool) -> dict[str, ModuleSpec]:
    """The union of the adapters' modules, each checked to have one layout; refuses different base models."""
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1 and not ignore_base_model:
        named = "; ".join(f"{_origin(a)}: {a.base_model}" for a in adapters)
        raise IncompatibleAdaptersError(
            f"the adapters were trained on different base models ({named}). Merge adapters of one base model, or "
            "pass --ignore-base-model if these names denote the same weights."
        )
    layout: dict[str, ModuleSpec] = {}
    for adapter in adapters:
        for name, spec in adapter.modules.items():
            known = layout.setdefault(name, spec)
            if known.layout() != spec.layout():
                shapes = {_origin(a): a.modules[name].layout()[1:] for a in adapters if name in a.modules}
                raise IncompatibleAdaptersError(
                    f"module {name}: the adapters disagree on its shape {shapes}; they come from different base "
                    "models. Compare them with `lora-fusion inspect`."
                )
    return layout


def _origin(adapter: LoraAdapter) -> str:
    return adapter.source.source if adapter.source else "in-memory adapter"


def _common_dtype(adapters: Sequence[LoraAdapter]) -> torch.dtype:
    dtypes = {spec.dtype for a in adapters for spec in a.modules.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _to(factors: ModuleFactors, device: torch.device) -> ModuleFactors:
    bias = factors.bias.to(device, torch.float32) if factors.bias is not None else None
    return ModuleFactors(
        A=factors.A.to(device, torch.float32), B=factors.B.to(device, torch.float32), scale=factors.scale, bias=bias
    )


def _plan(
    spec: MethodSpec,
    params: MergeParams,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    layout: Mapping[str, ModuleSpec],
    dtype: torch.dtype,
    *,
    with_base: bool,
) -> MergePlan:
    item = torch.empty((), dtype=dtype).element_size()
    dense = _is_dense(spec, params) or (spec.uses_base and with_base)
    modules = []
    for name, template in layout.items():
        ranks = tuple(a.modules[name].rank for a in adapters if name in a.modules)
        m, n = template.shape
        k = sum(ranks)
        natural = {"sum": k, "max": max(ranks), "merged": k}[spec.output_rank]
        ceiling = min(m, n) if dense else k
        out_rank = min(ceiling, params.rank or (ceiling if params.energy else natural))
        if dense:
            # an energy target may grow the sketch up to the exact SVD: plan for that worst case
            exact = params.svd == "exact" or params.energy is not None or (
                params.svd == "auto" and min(m, n) <= EXACT_SVD_LIMIT
            )
            svd = 4.0 * m * n * min(m, n) if exact else 12.0 * m * n * (out_rank + OVERSAMPLING)
            # an exact SVD in float64: the copy, LAPACK's own copy, U and V, workspace; randomized: the sketches
            svd_bytes = (16 * m * n + 8 * (m + n) * min(m, n) + 32 * min(m, n) ** 2 if exact
                         else 8 * (m + n) * (out_rank + OVERSAMPLING))
            if spec.uses_base:
                # RAPF: one update at a time against W_o, in float64, with an SVD of W_o per step (methods/rapf.py)
                flops = 2.0 * m * n * k + len(ranks) * 4.0 * m * n * min(m, n) + svd
                working = 44 * m * n + svd_bytes + item * (m + n) * out_rank
            else:
                # element-wise: T updates streamed in row blocks, formed once (DARE) to three times (Breadcrumbs:
                # two top-k passes and the merge); only the merged update is whole (methods/elementwise.py)
                flops = 4.0 * m * n * k + 10.0 * m * n * len(ranks) + svd
                working = 4 * m * n + svd_bytes + item * (m + n) * out_rank
        else:
            # QRs of the stacked factors, SVDs of k×k cores, the output factors
            flops = 4.0 * (m + n) * k * k + 10.0 * k**3 * len(ranks) + 2.0 * (m + n) * k * out_rank
            working = 4 * (m + n) * k * 4 + 8 * k * k * (len(ranks) + 2) + item * (m + n) * out_rank
        modules.append(ModulePlan(name, (m, n), ranks, out_rank, flops, working))
    output = sum(item * (p.shape[0] + p.shape[1]) * p.output_rank for p in modules)
    peak = CPU_WORKERS * max((p.working_bytes for p in modules), default=0) + output
    return MergePlan(
        method=spec.name,
        sources=tuple(_origin(a) for a in adapters),
        weights=tuple(weights),
        params=spec.recorded(params),
        modules=tuple(modules),
        output_bytes=output,
        peak_bytes=peak,
        input_bytes=sum(
            (spec.rank * (spec.out_features + spec.in_features)) * torch.empty((), dtype=spec.dtype).element_size()
            for a in adapters
            for spec in a.modules.values()
        ),
        rank_is_bound=params.energy is not None or spec.output_rank == "merged",
    )


def _progress(items: Iterable[T], total: int, enabled: bool | None, method: str) -> Iterator[T]:
    show = (sys.stderr.isatty() if enabled is None else enabled) and is_main_process()
    if not show:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=f"merging ({method})", unit="module", file=sys.stderr, leave=False)
