"""The `--dry-run` plan: what a merge would do, from file headers alone, with each method's own cost estimate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .params import RankedParams

if TYPE_CHECKING:
    from .engine import MergeInputs
    from .methods import MethodSpec


@dataclass(frozen=True)
class ModulePlan:
    """One module of a merge plan: canonical shape, input ranks, output rank (an upper bound with an adaptive rank rule)."""

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
    weights: tuple[float | str, ...]
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
            f"sources       {', '.join(f'{s} (w={w:g})' if isinstance(w, float) else f'{s} (w {w})' for s, w in zip(self.sources, self.weights))}",
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


def make_plan(
    spec: MethodSpec,
    inputs: MergeInputs,
    names: Sequence[str],
    *,
    with_base: bool,
    workers: int,
) -> MergePlan:
    """The plan of a merge of `layout`'s modules (`names`: how each source is shown, as the merge's errors name it): each module's output rank, FLOPs and working memory come from the
    method's declared cost; the peak counts `workers` modules merged at once plus the output."""
    from .methods import ModuleShape

    params, adapters, layout = inputs.params, inputs.adapters, inputs.layout
    item = inputs.dtype.itemsize
    natural = {"sum": sum, "max": max, "merged": sum}[spec.output_rank]
    modules = []
    for name, template in layout.items():
        ranks = tuple(a.modules[name].rank for a in adapters if name in a.modules)
        shape = ModuleShape(template.shape, ranks, natural(ranks), item, with_base=with_base)
        cost = spec.cost(shape, inputs.params_for(name))
        modules.append(ModulePlan(name, template.shape, ranks, cost.output_rank, cost.flops, cost.working_bytes))
    output = sum(item * (p.shape[0] + p.shape[1]) * p.output_rank for p in modules)
    peak = workers * max((p.working_bytes for p in modules), default=0) + output
    return MergePlan(
        method=spec.name,
        sources=tuple(names),
        weights=tuple(w if isinstance(w, float) else "per module" for w in inputs.weights),
        params=params.recorded(),
        modules=tuple(modules),
        output_bytes=output,
        peak_bytes=peak,
        input_bytes=sum(
            module.rank * (module.out_features + module.in_features) * module.dtype.itemsize
            for a in adapters
            for module in a.modules.values()
        ),
        rank_is_bound=(isinstance(params, RankedParams) and params.rank_rule().adaptive) or spec.output_rank == "merged",
    )
