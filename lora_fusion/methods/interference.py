"""Element-wise interference-aware merges (METHODS.md §c.2–c.5): TIES, DARE, magnitude pruning, Breadcrumbs.

The papers define these on dense task vectors τᵢ = ΔWᵢ = sᵢ·Bᵢ·Aᵢ. With `space="full"` (the default, the papers'
semantics) each module's τᵢ are formed densely, one module at a time, and the result goes back to low rank by exact
or randomized SVD. With `space="core"` (Panariello et al., NeurIPS 2025) the same operation runs on the k×k cores
Mᵢ = U_Bᵀ·τᵢ·V_A; for these element-wise methods that gives a different (basis-dependent) result, not an
approximation of the full-space one.

Order of operations follows PEFT's `merge_utils` so results can be compared: sparsify each unweighted τᵢ, elect signs
on the unweighted sparsified tensors, then weight by wᵢ and combine, then scale by λ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from ..errors import InvalidParameterError, UnsupportedAdapterError
from ..linalg import FactoredSVD, core_bases, dense_svd
from .base import MergeParams, ModuleGroup, ModuleResult, lowrank_result, register_method

Sparsify = Callable[[torch.Tensor, MergeParams, torch.Generator], torch.Tensor]
_COMMON = ("scale", "density", "rank", "energy", "seed", "space")


def density_of(params: MergeParams) -> float:
    """The density the method resolved; every method that trims or drops registers a default, so None is a bug."""
    if params.density is None:
        raise InvalidParameterError("density", None, expected="a fraction in (0, 1], e.g. 0.2")
    return params.density


_SAMPLE = 1 << 16
_SAMPLED_SELECT_MIN = 1 << 20  # below this, topk is fast enough and the bracket would cover most entries


def magnitude_threshold(size: torch.Tensor, keep: int) -> tuple[torch.Tensor, int]:
    """The `keep`-th largest value t of the flat non-negative tensor `size`, exactly, and how many entries are ≥ t.

    `torch.topk` over millions of entries costs ~25 ns per entry on one core; instead a fixed sample of 2¹⁶ entries
    brackets the wanted quantile with a wide margin (±8 standard errors), one pass counts the entries above the
    bracket and one selects those inside it (~1–2% of them), and the answer is the right order statistic of that
    small set. If the bracket misses (ties or odd data), topk over everything decides.
    """
    count = size.numel()
    if count > _SAMPLED_SELECT_MIN:
        positions = torch.randint(count, (_SAMPLE,), generator=torch.Generator().manual_seed(0)).to(size.device)
        sample = size[positions].sort().values
        quantile = 1.0 - keep / count
        margin = 8.0 * (quantile * (1.0 - quantile) / _SAMPLE) ** 0.5 + 2.0 / _SAMPLE
        low = sample[max(0, int((quantile - margin) * _SAMPLE))]
        high = sample[min(_SAMPLE - 1, int((quantile + margin) * _SAMPLE))]
        above = int(torch.count_nonzero(size > high))
        if low == high:  # the k-th value is shared by a large share of the entries (zeros of a sparse task)
            at_or_above = int(torch.count_nonzero(size >= high))
            if above < keep <= at_or_above:
                return high, at_or_above
        band = size[(size >= low) & (size <= high)]
        if 0 < keep - above <= band.numel():
            threshold = torch.topk(band, keep - above, sorted=False).values.min()
            return threshold, above + int(torch.count_nonzero(band >= threshold))
    threshold = torch.topk(size, keep, sorted=False).values.min()
    return threshold, int(torch.count_nonzero(size >= threshold))


def keep_top_magnitude_(task: torch.Tensor, density: float) -> torch.Tensor:
    """In place: zero all but the ⌊density·numel⌋ entries of largest |value| (ties at the threshold: lower flat index
    kept); returns `task`, which must be contiguous. In place because the inputs are dense updates of up to hundreds
    of MB formed just for this, and a fresh tensor of that size costs more in page faults than the masking itself."""
    flat = task.view(-1)
    keep = int(density * flat.numel())
    if keep >= flat.numel():
        return task
    if keep == 0:
        return task.zero_()
    size = flat.abs()
    threshold, at_or_above = magnitude_threshold(size, keep)
    drop = size < threshold
    if at_or_above > keep:  # entries equal to the threshold beyond the k-th: drop those with the highest flat index
        ties = (size == threshold).nonzero().squeeze(1)
        drop[ties[ties.numel() - (at_or_above - keep) :]] = True
    return task.masked_fill_(drop.view(task.shape), 0.0)


def drop_and_rescale_(task: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """In place, DARE: keep each entry with probability `density` (a Bernoulli mask drawn on the CPU from `generator`,
    so the result does not depend on the device) and divide the kept entries by `density`; returns `task`."""
    drop = torch.rand(task.shape, generator=generator) >= density
    return task.masked_fill_(drop.to(task.device), 0.0).div_(density)


def breadcrumbs_mask(task: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: remove the fraction γ of largest |entries| and max(0, 1 − d − γ) of the smallest, keeping the
    middle; if γ ≥ 1 − d only the largest 1 − d go (mergekit's semantics, with d the fraction kept)."""
    flat = task.reshape(-1)
    count = flat.numel()
    drop_large = int(min(gamma, 1.0 - density) * count)
    drop_small = int(max(0.0, 1.0 - density - gamma) * count)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros(count, dtype=torch.bool, device=task.device)
    mask[order[drop_large : count - drop_small]] = True
    return (flat * mask).reshape(task.shape)


def consensus_mean_(tasks: Sequence[torch.Tensor], weights: Sequence[float], rule: str) -> torch.Tensor:
    """TIES election and disjoint mean on the sparsified, unweighted tensors τ̂ᵢ (overwritten):

    γ_p = sign of Σᵢ τ̂ᵢ[p] ("total") or of Σᵢ sign(τ̂ᵢ[p]) ("frequency"), +1 where the sum is zero (PEFT's rule);
    τ_m[p] = Σ_{i∈A_p} wᵢ·τ̂ᵢ[p] / max(1, |A_p|), A_p = {i : τ̂ᵢ[p] ≠ 0 and sign(τ̂ᵢ[p]) = γ_p}.
    One tensor at a time, in place: no stack of T dense updates.
    """
    votes = torch.zeros_like(tasks[0])
    for task in tasks:
        votes.add_(task if rule == "total" else task.sign())
    positive = votes >= 0
    del votes
    numerator, count = torch.zeros_like(tasks[0]), torch.zeros_like(tasks[0])
    for task, weight in zip(tasks, weights):
        agree = torch.where(positive, task > 0, task < 0)
        numerator.add_(task.masked_fill_(~agree, 0.0), alpha=weight)
        count.add_(agree)
    return numerator.div_(count.clamp_(min=1))


def seeded(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded by (seed, parts): the same masks whatever the module order, sharding or device."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def stacked(group: ModuleGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """[s₁B₁ | … | s_T B_T] and [A₁; …; A_T], unweighted: the spans the core-space bases are built from."""
    B = torch.cat([f.scale * f.B.float() for f in group.factors], dim=1)
    return B, torch.cat([f.A.float() for f in group.factors], dim=0)


def elementwise_merge(group: ModuleGroup, params: MergeParams, sparsify: Sparsify, *, consensus: bool) -> ModuleResult:
    """Sparsify each task tensor, combine (TIES consensus or weighted sum), scale by λ, and return to low rank."""
    if any(f.bias is not None for f in group.factors):
        raise UnsupportedAdapterError(
            f"module {group.name} has a lora_B bias (lora_bias=True), which element-wise methods do not define; "
            "merge such adapters with linear, task_arithmetic or svd."
        )
    if params.space == "core":
        U_B, V_A = core_bases(*stacked(group))
        tasks = [(U_B.mT @ (f.scale * f.B.float())) @ (f.A.float() @ V_A) for f in group.factors]
    else:
        tasks = [f.delta() for f in group.factors]
    sparse = [sparsify(t, params, seeded(params.seed, group.name, i)) for i, t in enumerate(tasks)]
    del tasks
    if consensus:
        merged = consensus_mean_(sparse, group.weights, params.majority)
    else:
        merged = sparse[0].mul_(group.weights[0])
        for task, weight in zip(sparse[1:], group.weights[1:]):
            merged.add_(task, alpha=weight)
    merged.mul_(params.scale)
    del sparse
    if params.space == "core":
        U_m, S, Vh_m = torch.linalg.svd(merged.double(), full_matrices=False)
        svd = FactoredSVD.of(U_B @ U_m.float(), S, V_A @ Vh_m.mT.float())
    else:
        wanted = params.rank or group.max_rank
        components = wanted if params.energy is None else 4 * wanted
        svd = dense_svd(merged, components=components, generator=seeded(params.seed, group.name, "svd"))
    return lowrank_result(svd, group, params)


def _trim(task: torch.Tensor, params: MergeParams, generator: torch.Generator) -> torch.Tensor:
    return keep_top_magnitude_(task, density_of(params))


def _drop(task: torch.Tensor, params: MergeParams, generator: torch.Generator) -> torch.Tensor:
    return drop_and_rescale_(task, density_of(params), generator)


def _crumbs(task: torch.Tensor, params: MergeParams, generator: torch.Generator) -> torch.Tensor:
    return breadcrumbs_mask(task, density_of(params), params.gamma)


def _register(
    name: str, *, summary: str, formula: str, reference: str, density: float, extra: Sequence[str] = ()
) -> Callable[[Callable[[ModuleGroup, MergeParams], ModuleResult]], Callable[[ModuleGroup, MergeParams], ModuleResult]]:
    return register_method(
        name,
        summary=summary,
        formula=formula,
        reference=reference,
        params=(*_COMMON, *extra),
        defaults={"density": density},
        spaces=("full", "core"),
    )


@_register(
    "ties",
    summary="Trim each task to its top-d magnitudes, elect a sign per entry, average the entries that agree.",
    formula="ΔW = λ·Σ_{i∈A_p} wᵢ·trim_d(τᵢ)[p] / max(1,|A_p|), A_p: entries agreeing with the elected sign",
    reference="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)",
    density=0.2,
    extra=("majority",),
)
def ties(group: ModuleGroup, params: MergeParams) -> ModuleResult:
    """TIES (Yadav et al., NeurIPS 2023): τ̂ᵢ = trim_d(τᵢ) per tensor (top ⌊d·numel⌋ |entries|, d = 0.2); γ = sign of
    Σᵢ τ̂ᵢ ("total") or of Σᵢ sign(τ̂ᵢ) ("frequency"); ΔW = λ·Σ_{i∈A_p} wᵢτ̂ᵢ[p] / max(1, |A_p|)."""
    return elementwise_merge(group, params, _trim, consensus=True)


@_register(
    "dare_linear",
    summary="Drop each entry with probability 1−d, rescale by 1/d (seeded), then the weighted sum.",
    formula="ΔW = λ·Σᵢ wᵢ·(mᵢ ⊙ τᵢ)/d, mᵢ ~ Bernoulli(d)",
    reference="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv:2311.03099)",
    density=0.5,
)
def dare_linear(group: ModuleGroup, params: MergeParams) -> ModuleResult:
    """DARE (Yu et al., ICML 2024) + task arithmetic: τ̃ᵢ = mᵢ ⊙ τᵢ / d with mᵢ ~ Bernoulli(d), seeded per
    (seed, module, adapter); ΔW = λ·Σᵢ wᵢ·τ̃ᵢ."""
    return elementwise_merge(group, params, _drop, consensus=False)


@_register(
    "dare_ties",
    summary="DARE drop-and-rescale, then TIES sign election and disjoint mean (no magnitude trim).",
    formula="ΔW = λ·Σ_{i∈A_p} wᵢ·τ̃ᵢ[p] / max(1,|A_p|), τ̃ᵢ = mᵢ ⊙ τᵢ / d",
    reference="Yu et al., DARE, ICML 2024 (arXiv:2311.03099); Yadav et al., NeurIPS 2023",
    density=0.5,
    extra=("majority",),
)
def dare_ties(group: ModuleGroup, params: MergeParams) -> ModuleResult:
    """DARE then TIES consensus (PEFT's definition): τ̃ᵢ = mᵢ ⊙ τᵢ / d; signs elected on the unweighted τ̃ᵢ;
    ΔW = λ·Σ_{i∈A_p} wᵢτ̃ᵢ[p] / max(1, |A_p|)."""
    return elementwise_merge(group, params, _drop, consensus=True)


@_register(
    "magnitude_prune",
    summary="Keep each task's top-d magnitudes (no rescale, no sign election), then the weighted sum.",
    formula="ΔW = λ·Σᵢ wᵢ·trim_d(τᵢ)",
    reference="PEFT merge_utils.magnitude_prune; Yadav et al., NeurIPS 2023 (trim step)",
    density=0.2,
)
def magnitude_prune(group: ModuleGroup, params: MergeParams) -> ModuleResult:
    """Magnitude pruning (PEFT's definition): ΔW = λ·Σᵢ wᵢ·trim_d(τᵢ), trim_d keeping the top ⌊d·numel⌋ |entries|."""
    return elementwise_merge(group, params, _trim, consensus=False)


@_register(
    "breadcrumbs",
    summary="Remove each task's largest γ and smallest 1−d−γ magnitudes, then the weighted sum.",
    formula="ΔW = λ·Σᵢ wᵢ·crumbs_{d,γ}(τᵢ)",
    reference="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795)",
    density=0.9,
    extra=("gamma",),
)
def breadcrumbs(group: ModuleGroup, params: MergeParams) -> ModuleResult:
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): per tensor, drop the fraction γ (0.01) of largest |entries|
    and max(0, 1 − d − γ) of the smallest (d = 0.9 kept); ΔW = λ·Σᵢ wᵢ·crumbs(τᵢ)."""
    return elementwise_merge(group, params, _crumbs, consensus=False)


@_register(
    "breadcrumbs_ties",
    summary="Breadcrumbs masks, then TIES sign election and disjoint mean.",
    formula="ΔW = λ·Σ_{i∈A_p} wᵢ·crumbs(τᵢ)[p] / max(1,|A_p|)",
    reference="Davari & Belilovsky, ECCV 2024 (arXiv:2312.06795); Yadav et al., NeurIPS 2023",
    density=0.9,
    extra=("gamma", "majority"),
)
def breadcrumbs_ties(group: ModuleGroup, params: MergeParams) -> ModuleResult:
    """Breadcrumbs masks, then the TIES election on the masked unweighted tensors and the weighted disjoint mean."""
    return elementwise_merge(group, params, _crumbs, consensus=True)
