"""The public merge call: resolve the sources, validate every parameter, plan or run, and return the result.

`merge` checks the method's parameters against its declaration and the options against the sources' headers before
any tensor is read, then hands the per-module work to the loop in `lora_fusion.engine` (or, for methods of the
"adapters" kind, the method itself) and assembles the merged [`LoraAdapter`] with its provenance and stats.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import torch

from . import engine
from .adapter import LoraAdapter
from .base_weights import BaseWeights
from .distributed import current_shard, is_main_process
from .errors import (
    DegenerateMergeWarning, IncompatibleAdaptersError, InvalidParameterError, SourceNotFoundError,
    UnsupportedAdapterError,
)
from .controls import ModuleControls, Rules, check_rule_values, parse_rules, rules_record, split_params
from .methods import MethodSpec, ModuleStats, get_method
from .plan import MergePlan, make_plan
from .params import RANK_RULES
from .provenance import merge_provenance
from .recipe import SourceEntry
from .formats.kohya import kohya_names
from .formats.peft import check_scale_fits
from .hub import is_repo_id
from .runtime import collection_paused
from .sources import load_adapter
from .spec import AdapterConfig, MemoryStore, ModuleSpec

Source = str | Path | LoraAdapter | SourceEntry
# Below this retained energy in a module, a merge at the default rank is likely not what was meant (issue 12 §6).
LOW_RETAINED_ENERGY = 0.9


@overload
def merge(sources: Sequence[Source], *, dry_run: Literal[False] = ..., **kwargs: Any) -> LoraAdapter: ...
@overload
def merge(sources: Sequence[Source], *, dry_run: Literal[True], **kwargs: Any) -> MergePlan: ...


def merge(
    sources: Sequence[Source],
    *,
    method: str = "linear",
    weights: Sequence[float | Sequence[Any]] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    base_model: str | Path | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    weight_name: str | None = None,
    input_format: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str = "cpu",
    distributed: bool = False,
    ignore_base_model: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
    **params: Any,
) -> LoraAdapter | MergePlan:
    """Fuse LoRA adapters module by module; exact methods never form an out×in matrix.

    Args:
        sources: Hub ids (`owner/name[@revision]`), local adapter directories or files, loaded [`LoraAdapter`]s,
            or recipe [`SourceEntry`]s (with their own revision and subfolder).
        method: a registered method name (`lora-fusion methods`), e.g. `"linear"`, `"task_arithmetic"`, `"svd"`.
        weights: one weight per source (default 1 each, i.e. the plain sum); negative weights subtract. A weight may
            also be a rule list, per module: `[{"filter": "mlp", "value": 0.2}, {"value": [0.0, 1.0]}]` (first
            matching filter wins, `re.search` on the module name; a list value is a gradient over the layer
            position; see [`lora_fusion.controls`]).
        include, exclude: regular expressions (`re.search`): merge only modules matching an `include`, and leave
            those matching an `exclude` out of the output.
        base_model: the base model's weights (a local directory or file, or a Hub id `owner/name[@revision]`), for
            methods that use them (RAPF) and for DoRA sources (each DoRA module's update
            diag(μ/‖W₀ + sBA‖)·(W₀ + sBA) − W₀ is formed from them and merged as any update; exact sums then become
            rank-limited, with their stats); read one module at a time, only safetensors. LoRAHub runs it instead
            (loaded with transformers, a folder or Hub id).
        revision, subfolder, token, weight_name, input_format: passed to [`load_adapter`] for string sources
            (adapters of different formats merge together: diffusion LoRAs are read into diffusers' module names).
        dtype: output dtype, `"float32"`, `"float16"` or `"bfloat16"` (default: the sources' dtype, float32 if they
            differ). The math is float32 (float64 for the small cores) whatever the dtype.
        device: where the math runs (`"cpu"`, `"cuda"`, `"auto"`).
        distributed: under `accelerate launch` or torchrun with several processes, split the modules between them
            (each on its own GPU with cuda/auto): every process must call `merge`, and every process returns the
            whole result; save it from the main process only. Ignored in a single process.
        ignore_base_model: merge even if the adapters' `base_model_name_or_path` differ (shapes must still agree).
        dry_run: return a [`MergePlan`] computed from headers, reading no tensors (LoRAHub: a `LorahubPlan`, the
            search's budget, without loading the model).
        progress: show a progress bar on stderr (default: when stderr is a terminal).
        **params: the method's own parameters, as it declares them (`lora-fusion methods` lists them with their
            defaults), e.g. `rank=16`, `energy=0.99`, `scale=0.5`, `density=0.2`, `seed=0`, `space="core"`; a name the
            method does not declare is an error that lists the ones it takes. Per-module parameters (rank, energy,
            scale, density, gamma) also take a rule list, as `weights` do.

    Returns:
        The merged [`LoraAdapter`] (with `.stats` per module and `.provenance`), or a [`MergePlan`] if `dry_run`.

    Raises:
        UnknownMethodError, InvalidParameterError: before any download (a parameter the method does not take, a
            value outside its domain).
        IncompatibleAdaptersError: different base models, or different shapes for one module (named).
        SourceNotFoundError, NotALoraAdapterError, UnsupportedAdapterError, CorruptAdapterError, HubError: from loading.

    Example:
        ```python
        >>> merged = merge(["org/math-lora", "org/code-lora"], method="svd", weights=[0.6, 0.4], rank=16)
        >>> merged.save_pretrained("out/")
        ```
    """
    spec = get_method(method)
    scalars, rule_params = split_params(spec.declared, params)
    resolved = spec.resolve(scalars)
    check_rule_values(resolved, rule_params)
    weight_list = _weights(weights, len(sources))
    target = resolve_device(device)
    if spec.kind == "adapters":
        _refuse_per_module_options(spec, weights=weights, dry_run=dry_run, dtype=dtype, device=device)
        if include or exclude or rule_params:
            raise InvalidParameterError("include/exclude", include or exclude or list(rule_params),
                                        expected=f"none: {spec.name} fuses whole adapters")
    shard = current_shard(device) if distributed and not dry_run and spec.kind == "module" else None

    def open_inputs(on: torch.device) -> engine.MergeInputs:
        with collection_paused():  # reading headers and key maps makes many small objects; see collection_paused
            adapters = [open_source(s, revision=revision, subfolder=subfolder, token=token, weight_name=weight_name,
                                    input_format=input_format) for s in sources]
        if not dry_run:  # the result's provenance records each local source's sha256: hashed while merging
            for adapter in adapters:
                if adapter.source is not None:
                    adapter.source.start_hashing()
        layout = _module_layout(adapters, ignore_base_model=ignore_base_model)
        controls = ModuleControls.build(layout, weights=weight_list, params=rule_params, include=include or (),
                                        exclude=exclude or ())
        if controls.unindexed and is_main_process():
            _warn(f"{len(controls.unindexed)} module(s) have no layer index, so a gradient gives them its first value "
                  f"(e.g. {controls.unindexed[0]}).")
        layout = {name: layout[name] for name in controls.selected(layout)}
        _check_base_use(spec, adapters, layout, base_model)
        out_dtype = parse_dtype(dtype) if dtype is not None else _common_dtype(adapters)
        for adapter in adapters:
            for name, module in adapter.modules.items():
                check_scale_fits(name, module.scale, out_dtype, _origin(adapter))
        opens_base = base_model is not None and not dry_run and spec.kind == "module"
        base = _open_base(base_model, token=token) if opens_base else None
        return engine.MergeInputs(spec, resolved, adapters, weight_list, layout, on, out_dtype, base,
                                  None if controls.uniform else controls)

    if shard is not None:
        inputs, merged = engine.merge_sharded(shard, open_inputs, progress)
    else:
        inputs = open_inputs(target)
        if spec.kind == "adapters" and spec.uses_base:  # it runs the base model itself (LoRAHub): named, not read
            return spec.fn(inputs.adapters, resolved, base_model=base_model, device=device,  # type: ignore[call-arg]
                           dry_run=dry_run)
        if spec.kind == "adapters":
            return spec.fn(inputs.adapters, resolved)  # type: ignore[call-arg, arg-type]
        if dry_run:
            return make_plan(spec, inputs, [_origin(a) for a in inputs.adapters], with_base=base_model is not None,
                             workers=engine.CPU_WORKERS)
        merged = engine.merge_modules(inputs, list(inputs.layout), progress)
    return _assemble(inputs, merged, rank_given=any(params.get(name) is not None for name in (*RANK_RULES, "max_rank")))


def _assemble(inputs: engine.MergeInputs, merged: Mapping[str, engine.ModuleOutput], *, rank_given: bool) -> LoraAdapter:
    """The merged adapter from every module's output, with its config, provenance and stats (in layout order)."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, ModuleSpec] = {}
    stats: dict[str, ModuleStats] = {}
    findings: dict[str, engine.ModuleFindings] = {}
    for name in inputs.layout:
        modules[name], outputs, stats[name], findings[name] = merged[name]
        tensors.update(outputs)
    adapters = inputs.adapters
    if is_main_process():  # every process of a launch holds the same result: say it once
        _warn_degenerate(adapters, findings, stats, rank_given=rank_given)
    first = adapters[0].config
    config = AdapterConfig(
        base_model=first.base_model,
        task_type=first.task_type,
        r=max(s.rank for s in stats.values()),
        lora_alpha=1.0,
        fan_in_fan_out=any(a.config.fan_in_fan_out for a in adapters),
        kohya_names=kohya_names(adapters, modules),
    )
    controls = inputs.controls
    recorded, per_module = inputs.params.recorded(), {}
    if controls is not None:  # what each module got, for the model card's readers and `lora-fusion report`
        recorded.update({name: rules_record(rules) for name, rules in controls.params.items()})
        per_module = {"include": list(controls.include), "exclude": list(controls.exclude)}
        if any(not isinstance(w, float) for w in controls.weights):
            per_module["module_weights"] = {name: controls.weights_for(name) for name in inputs.layout}
        if controls.params:
            per_module["module_params"] = {name: controls.params_for(name) for name in inputs.layout}
    provenance = merge_provenance(
        inputs.spec.name, recorded, adapters, [w if isinstance(w, float) else rules_record(w) for w in inputs.weights],
        dtype=str(inputs.dtype).removeprefix("torch."),
        **({"base_model": inputs.base.source} if inputs.base is not None else {}),
        **per_module,
    )
    # The sources' local paths stay in memory (never in the provenance): writing the result must not replace them.
    local_inputs = [path for adapter in adapters for path in adapter.local_inputs()]
    return LoraAdapter(
        config=config, modules=modules, store=MemoryStore(tensors), provenance=provenance, stats=stats,
        inputs=local_inputs,
    )


def _check_base_use(
    spec: MethodSpec, adapters: Sequence[LoraAdapter], layout: Mapping[str, ModuleSpec], base_model: object
) -> None:
    """Base weights are read by methods that use them (RAPF) and for DoRA modules, whose update depends on them: a
    DoRA module without them, or base weights nothing would read, is refused (from the headers, before any tensor)."""
    dora = next(((a, name) for a in adapters for name in layout if name in a.modules and a.modules[name].dora), None)
    if dora is not None and base_model is None:
        adapter, name = dora
        raise UnsupportedAdapterError(
            f"{_origin(adapter)}: module {name} is DoRA, whose update depends on the base weights; pass the base "
            "model (--base-model BASE, or base_model= in Python) to merge it."
        )
    if base_model is not None and not spec.uses_base and dora is None:
        raise InvalidParameterError("base_model", str(base_model),
                                    expected=f"none: {spec.name} reads no base weights and no source is DoRA")


def _refuse_per_module_options(
    spec: MethodSpec, *, weights: Sequence[float] | None, dry_run: bool, dtype: torch.dtype | str | None, device: str
) -> None:
    """A method of the "adapters" kind (ICM-Fusion) learns its own combination and writes float32 from the CPU:
    refuse what it would ignore, before anything is downloaded. Under a launcher each process runs it whole. One
    that runs the base model (LoRAHub, `uses_base`) plans a dry run and takes its device (through Accelerate)."""
    given = {"weights": weights, "dtype": dtype}
    if not spec.uses_base:
        given |= {"dry_run": dry_run or None, "device": None if device == "cpu" else device}
    for name, value in given.items():
        if value is not None:
            raise InvalidParameterError(name, value, expected=f"none: {spec.name} learns its own weights, runs on the "
                                        "CPU in one process, writes float32 and has no plan before it runs")


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


def open_source(
    source: Source, *, revision: str | None = None, subfolder: str | None = None, token: str | None = None,
    weight_name: str | None = None, input_format: str | None = None,
) -> LoraAdapter:
    """A source as `merge` takes it, opened (headers only): a loaded adapter as is, a recipe entry with its own
    revision, subfolder and weight name, a string or path through [`load_adapter`]."""
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, (str, Path)):
        return load_adapter(source, revision=revision, subfolder=subfolder, token=token, weight_name=weight_name,
                            input_format=input_format)
    return load_adapter(
        source.source, revision=source.revision or revision, subfolder=source.subfolder or subfolder, token=token,
        weight_name=source.weight_name or weight_name, input_format=input_format,
    )


def convert(
    source: str | Path | LoraAdapter,
    *,
    to: str = "peft",
    out: str | Path,
    overwrite: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | None = None,
    weight_name: str | None = None,
    input_format: str | None = None,
) -> Path:
    """Rewrite a LoRA in another format, exactly: the same update ΔW in every module (float rounding only).

    Diffusion LoRAs (diffusers, kohya/A1111, ComfyUI, kohya Flux, LyCORIS LoHa/LoKr) are read into diffusers'
    module names and written as a PEFT or diffusers folder or one kohya file; scales are folded into the factors.
    LyCORIS modules become plain LoRA of their exact rank; a fused Flux q/k/v is split (read) or fused again
    (kohya output), exactly.

    Args:
        source: a local file or folder, a Hub id `owner/name[@revision]`, or a loaded [`LoraAdapter`].
        to: `"peft"`, `"diffusers"` or `"kohya"`.
        out: the output folder (a `.safetensors` file for kohya).
        overwrite: replace an existing `out` that lora-fusion wrote.
        revision, subfolder, token, weight_name, input_format: as in [`load_adapter`].

    Returns:
        `out`, absolute.

    Raises:
        UnsupportedAdapterError: the target format has no key for a module (named); nothing is written.
        and the errors of [`load_adapter`] and [`write_adapter`].

    Example:
        ```python
        >>> convert("my_style.safetensors", to="diffusers", out="my_style/")
        >>> pipe.load_lora_weights("my_style/")
        ```
    """
    from .formats import format_named
    from .writer import write_adapter

    target = format_named(to)
    with collection_paused():
        # The provenance records a local source's sha256: the other core hashes it while this one converts.
        adapter = source if isinstance(source, LoraAdapter) else load_adapter(
            source, revision=revision, subfolder=subfolder, token=token, weight_name=weight_name,
            input_format=input_format, hash_in_background=True)
        if adapter.source is not None:
            adapter.source.start_hashing()
        return write_adapter(adapter, Path(out), overwrite=overwrite, format=target)


def _weights(weights: Sequence[float | Sequence[Any]] | None, count: int) -> list[float | Rules]:
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
        if isinstance(value, bool) or (isinstance(value, (int, float)) and not math.isfinite(value)):
            raise InvalidParameterError("weights", values, expected="finite numbers, e.g. 0.6,0.4")
    return [parse_rules(v, what=f"weights[{i}]") for i, v in enumerate(values)]


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """An output dtype given as a torch dtype or its name (`"bfloat16"`, `"torch.float16"`).

    Raises:
        InvalidParameterError: not float32, float16 or bfloat16.
    """
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, torch.dtype) and dtype in names.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in names:
        return names[dtype.removeprefix("torch.")]
    raise InvalidParameterError("dtype", dtype, expected="float32, float16 or bfloat16")


def resolve_device(device: str) -> torch.device:
    """The torch device for a user's `device` option: `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"` (CUDA if visible).

    Raises:
        InvalidParameterError: another name, or CUDA asked for where no CUDA GPU is visible.
    """
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
