"""The per-module loop: each module's factors are read, merged by the method, cast, checked and released.

Peak memory is the working sets of the modules merged at once plus the (small) output factors. The loop knows no
method by name, parses no options and writes no files; `lora_fusion.api` resolves, validates and assembles, and the
writer writes. Under a launcher, [`merge_sharded`] splits the modules between the processes.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from .adapter import ModuleFactors
from .distributed import gather_shards, is_main_process
from .dora import dora_factors
from .errors import NonFiniteError
from .runtime import thread_limit, torch_thread_pool
from .spec import all_finite

if TYPE_CHECKING:
    from .adapter import LoraAdapter
    from .base_weights import BaseWeights
    from .controls import ModuleControls, Rules
    from .distributed import Shard
    from .methods import MethodSpec, ModuleStats
    from .params import MethodParams
    from .spec import ModuleSpec

T = TypeVar("T")
# Modules merged at once on the CPU, each on one thread; the dense methods' peak memory grows with it.
CPU_WORKERS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class MergeInputs:
    """Everything the loop needs: the method and its parameters, the opened adapters with their weights, the module
    layout (canonical shapes), where the math runs, the output dtype, the base weights if the method reads them, and
    the per-module controls (None when every module gets the same weights and parameters)."""

    spec: MethodSpec
    params: MethodParams
    adapters: Sequence[LoraAdapter]
    weights: Sequence[float | Rules]  # numbers, or rule lists when `controls` resolves them per module
    layout: Mapping[str, ModuleSpec]
    device: torch.device
    dtype: torch.dtype
    base: BaseWeights | None = None
    controls: ModuleControls | None = None

    def weights_for(self, name: str) -> Sequence[float]:
        """Each source's weight for module `name` (per-module rules, or the one weight of each source)."""
        return self.controls.weights_for(name) if self.controls else self.weights  # type: ignore[return-value]

    def params_for(self, name: str) -> MethodParams:
        """The method's parameters for module `name` (per-module rules applied)."""
        from .controls import with_values

        return with_values(self.params, self.controls.params_for(name)) if self.controls else self.params


@dataclass(frozen=True)
class ModuleFindings:
    """What the merge of one module noticed that may make the result degenerate (reported by the API)."""

    zero_inputs: tuple[int, ...]  # positions of the sources whose update of this module is zero
    zero_output: bool


ModuleOutput = tuple["ModuleSpec", dict[str, torch.Tensor], "ModuleStats", ModuleFindings]


def merge_modules(inputs: MergeInputs, names: Sequence[str], progress: bool | None) -> dict[str, ModuleOutput]:
    """Merge the modules `names`, streaming: each module's inputs are read, merged, cast, checked and released.

    On the CPU every module runs on one torch thread, two modules at a time: small factored operations gain nothing
    from intra-op threads, and a module's result then never depends on the thread count (BLAS reductions split
    across threads round differently), so a merge gives the same bytes on any machine, process count or sharding.
    """
    from .methods import ModuleGroup

    target, out_dtype = inputs.device, inputs.dtype

    def merge_one(name: str) -> ModuleOutput:
        weights = inputs.weights_for(name)
        present = [(i, a, w) for i, (a, w) in enumerate(zip(inputs.adapters, weights)) if name in a.modules]
        factors = [_to(a.factors(name, magnitude=True), target) for _, a, _ in present]
        dora = any(f.magnitude is not None for f in factors)
        base_weight = None
        if inputs.base is not None and (inputs.spec.uses_base or dora):  # the API refuses DoRA without a base
            fan_in_fan_out = any(a.config.fan_in_fan_out for _, a, _ in present)
            base_weight = inputs.base.weight(inputs.layout[name], fan_in_fan_out=fan_in_fan_out).to(target)
        if dora:
            factors = [dora_factors(base_weight, f) if f.magnitude is not None else f for f in factors]
        zero_inputs = tuple(i for (i, _, _), f in zip(present, factors) if _is_zero(f.B) or _is_zero(f.A))
        group = ModuleGroup(
            name=name,
            factors=factors,
            weights=[w for _, _, w in present],
            base=base_weight if inputs.spec.uses_base else None,
        )
        result = inputs.spec.fn(group, inputs.params_for(name))  # type: ignore[call-arg, arg-type]
        spec_out = inputs.layout[name].written(rank=result.stats.rank, dtype=out_dtype, bias=result.bias is not None)
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
    with thread_limit(1 if on_cpu else None), torch_thread_pool(workers, 1 if on_cpu else None) as pool:
        results = pool.map(merge_one, names) if workers > 1 else map(merge_one, names)
        return dict(zip(names, _progress(results, len(names), progress, inputs.spec.name)))


def merge_sharded(
    shard: Shard, open_inputs: Callable[[torch.device], MergeInputs], progress: bool | None
) -> tuple[MergeInputs, dict[str, ModuleOutput]]:
    """Under a launcher: this process opens the inputs, merges its share of the modules on its device, and every
    process receives every share. Opening happens inside the share, so that a failure in one process (a download,
    a validation, the merge) reaches all of them through the gather instead of leaving the others waiting."""
    opened: dict[str, MergeInputs] = {}

    def my_share() -> dict[str, ModuleOutput]:
        inputs = open_inputs(torch.device(shard.device))
        opened["inputs"] = inputs
        names = shard.take({name: math.prod(module.shape) for name, module in inputs.layout.items()})
        return merge_modules(inputs, names, progress)

    merged = {name: output for share in gather_shards(shard, my_share) for name, output in share.items()}
    return opened["inputs"], merged


def _is_zero(tensor: torch.Tensor) -> bool:
    return not bool(tensor.any())


def _to(factors: ModuleFactors, device: torch.device) -> ModuleFactors:
    def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor.to(device, torch.float32) if tensor is not None else None

    return ModuleFactors(A=moved(factors.A), B=moved(factors.B), scale=factors.scale, bias=moved(factors.bias),
                         magnitude=moved(factors.magnitude))


def _progress(items: Iterable[T], total: int, enabled: bool | None, method: str) -> Iterator[T]:
    show = (sys.stderr.isatty() if enabled is None else enabled) and is_main_process()
    if not show:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=f"merging ({method})", unit="module", file=sys.stderr, leave=False)
