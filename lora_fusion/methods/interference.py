"""Element-wise interference-aware merges (docs/methods.md): TIES, DARE, magnitude pruning, Breadcrumbs.

The papers define these on dense task vectors τᵢ = ΔWᵢ = sᵢ·Bᵢ·Aᵢ. With `space="full"` (the default, the papers'
semantics) each module's τᵢ are streamed densely in row blocks (`elementwise`), only the merged update is formed
whole, and it goes back to low rank by exact or randomized SVD (`svd`; `linalg.dense_svd`). With `space="core"`
(Panariello et al., NeurIPS 2025) the same operation runs on the k×k cores Mᵢ = U_Bᵀ·τᵢ·V_A; for these element-wise
methods that gives a different (basis-dependent) result, not an approximation of the full-space one.

Order of operations follows PEFT's `merge_utils` so results can be compared: sparsify each unweighted τᵢ, elect signs
on the unweighted sparsified tensors, then weight by wᵢ and combine, then scale by λ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import UnsupportedAdapterError
from ..linalg import FactoredSVD, core_bases, dense_svd
from ..params import DENSITY, SCALE, SEED, SPACE, SVD, Param, RankedParams, in_range, one_of
from .base import (
    ModuleCost,
    ModuleGroup,
    ModuleResult,
    ModuleShape,
    dense_svd_cost,
    factored_cost,
    lowrank_result,
    register_method,
)
from .elementwise import Crumbs, DenseTask, Drop, Sparsifier, Trim, combine

if TYPE_CHECKING:
    import torch  # noqa: F811

MAJORITY = Param(
    "TIES sign election: 'total' (mass) or 'frequency'.", "'total' or 'frequency'", one_of("total", "frequency"),
    default="total",
)
GAMMA = Param(
    "Breadcrumbs: fraction of the largest entries removed.", "a fraction in [0, 1), e.g. 0.01",
    in_range(0.0, 1.0, high_open=True), default=0.01, per_module=True,
)


@dataclass(frozen=True)
class ElementwiseParams(RankedParams):
    """What every element-wise method takes: λ, the density d, the output rank rule, the seed, the space and the
    SVD back to low rank. d defaults to 0.2 (TIES, magnitude pruning); DARE and Breadcrumbs declare their own."""

    scale: float = SCALE.field()
    density: float = DENSITY.field(0.2)
    seed: int = SEED.field()
    space: str = SPACE.field()
    svd: str = SVD.field()


@dataclass(frozen=True)
class TiesParams(ElementwiseParams):
    majority: str = MAJORITY.field()


@dataclass(frozen=True)
class DareParams(ElementwiseParams):
    density: float = DENSITY.field(0.5)


@dataclass(frozen=True)
class DareTiesParams(DareParams):
    majority: str = MAJORITY.field()


@dataclass(frozen=True)
class CrumbsParams(ElementwiseParams):
    density: float = DENSITY.field(0.9)
    gamma: float = GAMMA.field()


@dataclass(frozen=True)
class CrumbsTiesParams(CrumbsParams):
    majority: str = MAJORITY.field()


Sparsify = Callable[[DenseTask, Any, "torch.Generator"], Sparsifier]


def elementwise_cost(module: ModuleShape, params: ElementwiseParams) -> ModuleCost:
    """In core space, a factored merge. In full space: T updates streamed in row blocks, formed once (DARE) to three
    times (Breadcrumbs: two top-k passes and the merge); only the merged m×n update is whole; then its SVD."""
    if params.space == "core":
        return factored_cost(module, params)
    (m, n), k = module.shape, sum(module.ranks)
    out = module.output_rank(params, dense=True)
    svd_flops, svd_bytes = dense_svd_cost(module, params, out)
    flops = 4.0 * m * n * k + 10.0 * m * n * len(module.ranks) + svd_flops
    return ModuleCost(out, flops, 4 * m * n + svd_bytes + module.item_bytes * (m + n) * out)


def seeded(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded by (seed, parts): the same masks whatever the module order, sharding or device."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def stacked(group: ModuleGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """[s₁B₁ | … | s_T B_T] and [A₁; …; A_T], unweighted: the spans the core-space bases are built from."""
    B = torch.cat([f.scale * f.B.float() for f in group.factors], dim=1)
    return B, torch.cat([f.A.float() for f in group.factors], dim=0)


def elementwise_merge(
    group: ModuleGroup, params: ElementwiseParams, sparsifier: Sparsify, *, majority: str | None
) -> ModuleResult:
    """Sparsify each task's dense update, combine (TIES consensus or weighted sum), scale by λ, and return to low
    rank. `majority` elects signs (TIES consensus; None: the weighted sum). The updates are streamed in row blocks
    (`elementwise.combine`); only the merged one is formed whole."""
    if any(f.bias is not None for f in group.factors):
        raise UnsupportedAdapterError(
            f"module {group.name} has a lora_B bias (lora_bias=True), which element-wise methods do not define; "
            "merge such adapters with linear, task_arithmetic or svd."
        )
    if params.space == "core":
        U_B, V_A = core_bases(*stacked(group))
        tasks = [DenseTask.product(U_B.mT @ (f.scale * f.B.float()), f.A.float() @ V_A) for f in group.factors]
    else:  # a DoRA update is given dense (`update`): its own copy, since sparsifying a given task changes it
        tasks = [DenseTask.of(f.delta()) if f.update is not None else DenseTask.product(f.scale * f.B.float(),
                                                                                        f.A.float())
                 for f in group.factors]
    sparsifiers = [sparsifier(task, params, seeded(params.seed, group.name, i)) for i, task in enumerate(tasks)]
    merged = combine(tasks, sparsifiers, group.weights, majority=majority, scale=params.scale)
    if params.space == "core":
        U_m, S, Vh_m = torch.linalg.svd(merged.double(), full_matrices=False)
        svd = FactoredSVD.of(U_B @ U_m.float(), S, V_A @ Vh_m.mT.float())
    else:
        svd = dense_svd(merged, components=params.rank or group.max_rank, rule=params.rank_rule(), svd=params.svd,
                        generator=seeded(params.seed, group.name, "svd"))
    return lowrank_result(svd, group, rule=params.rank_rule(), scale=params.scale)


def _trim(task: DenseTask, params: ElementwiseParams, generator: torch.Generator) -> Sparsifier:
    return Trim.of(task, params.density)


def _drop(task: DenseTask, params: ElementwiseParams, generator: torch.Generator) -> Sparsifier:
    return Drop(params.density, generator)


def _crumbs(task: DenseTask, params: CrumbsParams, generator: torch.Generator) -> Sparsifier:
    return Crumbs.of(task, params.density, params.gamma)


def _register(
    name: str, *, summary: str, formula: str, reference: str, params: type[ElementwiseParams]
) -> Callable[[Callable[..., ModuleResult]], Callable[..., ModuleResult]]:
    return register_method(
        name, summary=summary, formula=formula, reference=reference, params=params, spaces=("full", "core"),
        cost=elementwise_cost,
    )


@_register(
    "ties",
    summary="Trim each task to its top-d magnitudes, elect a sign per entry, average the entries that agree.",
    formula="ΔW = λ·Σ_{i∈A_p} wᵢ·trim_d(τᵢ)[p] / max(1,|A_p|), A_p: entries agreeing with the elected sign",
    reference="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)",
    params=TiesParams,
)
def ties(group: ModuleGroup, params: TiesParams) -> ModuleResult:
    """TIES (Yadav et al., NeurIPS 2023): τ̂ᵢ = trim_d(τᵢ) per tensor (top ⌊d·numel⌋ |entries|, d = 0.2); γ = sign of
    Σᵢ τ̂ᵢ ("total") or of Σᵢ sign(τ̂ᵢ) ("frequency"); ΔW = λ·Σ_{i∈A_p} wᵢτ̂ᵢ[p] / max(1, |A_p|)."""
    return elementwise_merge(group, params, _trim, majority=params.majority)


@_register(
    "dare_linear",
    summary="Drop each entry with probability 1−d, rescale by 1/d (seeded), then the weighted sum.",
    formula="ΔW = λ·Σᵢ wᵢ·(mᵢ ⊙ τᵢ)/d, mᵢ ~ Bernoulli(d)",
    reference="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
    params=DareParams,
)
def dare_linear(group: ModuleGroup, params: DareParams) -> ModuleResult:
    """DARE (Yu et al., ICML 2024) + task arithmetic: τ̃ᵢ = mᵢ ⊙ τᵢ / d with mᵢ ~ Bernoulli(d), seeded per
    (seed, module, adapter); ΔW = λ·Σᵢ wᵢ·τ̃ᵢ."""
    return elementwise_merge(group, params, _drop, majority=None)


@_register(
    "dare_ties",
    summary="DARE drop-and-rescale, then TIES sign election and disjoint mean (no magnitude trim).",
    formula="ΔW = λ·Σ_{i∈A_p} wᵢ·τ̃ᵢ[p] / max(1,|A_p|), τ̃ᵢ = mᵢ ⊙ τᵢ / d",
    reference="Yu et al., DARE, ICML 2024 (arXiv:2311.03099); Yadav et al., NeurIPS 2023",
    params=DareTiesParams,
)
def dare_ties(group: ModuleGroup, params: DareTiesParams) -> ModuleResult:
    """DARE then TIES consensus (PEFT's definition): τ̃ᵢ = mᵢ ⊙ τᵢ / d; signs elected on the unweighted τ̃ᵢ;
    ΔW = λ·Σ_{i∈A_p} wᵢτ̃ᵢ[p] / max(1, |A_p|)."""
    return elementwise_merge(group, params, _drop, majority=params.majority)


@_register(
    "magnitude_prune",
    summary="Keep each task's top-d magnitudes (no rescale, no sign election), then the weighted sum.",
    formula="ΔW = λ·Σᵢ wᵢ·trim_d(τᵢ)",
    reference="PEFT merge_utils.magnitude_prune; Yadav et al., NeurIPS 2023 (trim step)",
    params=ElementwiseParams,
)
def magnitude_prune(group: ModuleGroup, params: ElementwiseParams) -> ModuleResult:
    """Magnitude pruning (PEFT's definition): ΔW = λ·Σᵢ wᵢ·trim_d(τᵢ), trim_d keeping the top ⌊d·numel⌋ |entries|."""
    return elementwise_merge(group, params, _trim, majority=None)


@_register(
    "breadcrumbs",
    summary="Remove each task's largest γ and smallest 1−d−γ magnitudes, then the weighted sum.",
    formula="ΔW = λ·Σᵢ wᵢ·crumbs_{d,γ}(τᵢ)",
    reference="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795)",
    params=CrumbsParams,
)
def breadcrumbs(group: ModuleGroup, params: CrumbsParams) -> ModuleResult:
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): per tensor, keep ⌊d·N⌋ entries (d = 0.9) by dropping the
    ⌊γ·N⌋ largest |entries| (γ = 0.01) and the smallest of the rest (mergekit's counts); ΔW = λ·Σᵢ wᵢ·crumbs(τᵢ)."""
    return elementwise_merge(group, params, _crumbs, majority=None)


@_register(
    "breadcrumbs_ties",
    summary="Breadcrumbs masks, then TIES sign election and disjoint mean.",
    formula="ΔW = λ·Σ_{i∈A_p} wᵢ·crumbs(τᵢ)[p] / max(1,|A_p|)",
    reference="Davari & Belilovsky, ECCV 2024 (arXiv:2312.06795); Yadav et al., NeurIPS 2023",
    params=CrumbsTiesParams,
)
def breadcrumbs_ties(group: ModuleGroup, params: CrumbsTiesParams) -> ModuleResult:
    """Breadcrumbs masks, then the TIES election on the masked unweighted tensors and the weighted disjoint mean."""
    return elementwise_merge(group, params, _crumbs, majority=params.majority)
