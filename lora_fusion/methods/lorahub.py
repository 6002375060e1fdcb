"""LoRAHub as a merge method: `lora-fusion merge A B C --method lorahub --base-model M --support FILE`.

Like ICM-Fusion it needs every adapter at once and data, so it is a method of the "adapters" kind; it also runs the
base model, so it receives the base model's name (not its tensors) from `merge`. The fit lives in
`lora_fusion.lorahub` (imported only when the method runs); the result is assembled here, as the exact weighted sum
of the LoRAs with the found weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidParameterError
from ..params import SEED, SUPPORT, MethodParams, Param, is_int, is_real, one_of
from .base import ModuleGroup, ModuleStats, register_method
from .exact import concatenated

if TYPE_CHECKING:
    from ..adapter import LoraAdapter
    from ..lorahub import LorahubFit, LorahubPlan

BUDGET = Param(
    "LoRAHub: loss evaluations of the gradient-free search, or Adam steps of the gradient one (LoRAHub's 40).",
    "a positive integer, e.g. 40", lambda value: is_int(value) and value >= 1, default=40,
)
OPTIMIZER = Param(
    "LoRAHub: 'gradient-free' (CMA-ES, as LoRAHub's nevergrad search) or 'gradient' (Adam on the weights).",
    "'gradient-free' or 'gradient'", one_of("gradient-free", "gradient"), default="gradient-free",
)
PER_GROUP = Param(
    "LoRAHub: one weight per source and layer (LoRA Soups' CAT) instead of one per source.", "true or false",
    lambda value: isinstance(value, bool), default=False, flag=True,
)
PENALTY = Param(
    "LoRAHub: α of the L1 penalty α·mean|w| added to the support loss (LoRAHub's 0.05).", "a number ≥ 0, e.g. 0.05",
    lambda value: is_real(value) and value >= 0, default=0.05,
)


@dataclass(frozen=True)
class LorahubParams(MethodParams):
    """The support examples (required), the search's budget, optimiser, grouping, seed and L1 penalty α."""

    support: str | None = SUPPORT.field()
    budget: int = BUDGET.field()
    optimizer: str = OPTIMIZER.field()
    per_group: bool = PER_GROUP.field()
    seed: int = SEED.field()
    penalty: float = PENALTY.field()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.support is None:
            raise InvalidParameterError("support", None, expected="a path: lorahub needs --support FILE.jsonl")


@register_method(
    "lorahub",
    kind="adapters",
    output_rank="sum",
    uses_base=True,
    summary="LoRAHub: weights of the LoRAs (per layer with --per-group) fitted on support examples; exact weighted sum.",
    formula="ΔW = Σᵢ w[g,i]·sᵢ·Bᵢ·Aᵢ, w = argmin_{w∈[−1.5,1.5]} L_support(w) + α·mean|w|, from w = 0",
    reference="Huang et al., LoraHub, COLM 2024 (arXiv:2307.13269); per-layer weights: Prabhakar et al., LoRA Soups "
              "(CAT), COLING 2025",
    params=LorahubParams,
)
def lorahub(adapters: Sequence[LoraAdapter], params: LorahubParams, *, base_model: str | None = None,
            device: str = "cpu", dry_run: bool = False) -> LoraAdapter | LorahubPlan:
    """LoRAHub (Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition", COLM 2024,
    arXiv:2307.13269): the weights w minimise L(w) + α·mean|w| on the support examples, where L is the cross-entropy
    of the base model carrying Σᵢ wᵢ·sᵢ·BᵢAᵢ; w ∈ [−1.5, 1.5] starts at 0 and α = 0.05, as in LoRAHub's code; the
    search is CMA-ES with `budget` evaluations, or Adam for `budget` steps. With `per_group`, one weight per source
    and layer, w[g,i], as the learned per-layer weights of concatenated LoRAs in LoRA Soups' CAT (Prabhakar et al.,
    COLING 2025). The result is the exact weighted sum with the found weights, in concatenated factors (rank Σ rᵢ),
    not LoRAHub's separately summed A and B (which add the cross terms BᵢAⱼ).

    `base_model` (a folder or Hub id loaded with transformers) is required; `device` goes to Accelerate; `dry_run`
    returns the plan without loading the model.
    """
    from ..lorahub import LorahubSettings, fit, plan

    if base_model is None:
        raise InvalidParameterError("base_model", None, expected="the base model's folder or Hub id: lorahub runs it "
                                    "on the support examples (--base-model)")
    settings = LorahubSettings(budget=params.budget, optimizer=params.optimizer,  # type: ignore[arg-type]
                               per_group=params.per_group, seed=params.seed, penalty=params.penalty, device=device)
    assert params.support is not None  # LorahubParams refuses a missing support file
    if dry_run:
        return plan(adapters, base_model=str(base_model), support=params.support, settings=settings)
    found = fit(adapters, base_model=str(base_model), support=params.support, settings=settings)
    return weighted_sum(adapters, found, params.recorded(), base_model=str(base_model))


def weighted_sum(adapters: Sequence[LoraAdapter], found: LorahubFit, recorded: dict[str, object], *,
                 base_model: str) -> LoraAdapter:
    """The exact Σᵢ w[g,i]·sᵢ·BᵢAᵢ of every module (g its layer group) as concatenated factors
    ([`concatenated`]), float32, with the fit in the provenance (per-source weights: the mean over groups)."""
    from ..adapter import LoraAdapter
    from ..lorahub import layer_groups
    from ..provenance import merge_provenance
    from ..spec import AdapterConfig, MemoryStore

    names = list(dict.fromkeys(name for adapter in adapters for name in adapter.modules))
    groups = dict.fromkeys(names, "all") if found.groups == ["all"] else layer_groups(names)
    tensors, modules, stats = {}, {}, {}
    for name in names:
        row = found.weights[found.groups.index(groups[name])]
        present = [(a, w) for a, w in zip(adapters, row) if name in a.modules]
        group = ModuleGroup(name, [a.factors(name) for a, _ in present], [w for _, w in present])
        B, A = concatenated(group)
        bias = group.scaled_bias()
        spec = present[0][0].modules[name].written(rank=A.shape[0], dtype=A.dtype, bias=bias is not None)
        tensors |= {spec.a_key: A.contiguous(), spec.b_key: B.contiguous()}
        if bias is not None and spec.bias_key:
            tensors[spec.bias_key] = bias
        modules[name], stats[name] = spec, ModuleStats(rank=A.shape[0])
    first = adapters[0].config
    config = AdapterConfig(base_model=first.base_model, task_type=first.task_type,
                           r=max(s.rank for s in stats.values()), lora_alpha=1.0)
    per_source = [round(sum(row[i] for row in found.weights) / len(found.weights), 6) for i in range(len(adapters))]
    provenance = merge_provenance("lorahub", {**recorded, **found.summary()}, adapters, per_source,
                                  dtype="float32", base_model=base_model)
    inputs = [path for adapter in adapters for path in adapter.local_inputs()]
    return LoraAdapter(config=config, modules=modules, store=MemoryStore(tensors), provenance=provenance,
                       stats=stats, inputs=inputs)
