"""Exact merges in factored form (docs/methods.md): no out×in matrix is ever formed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._lazy import torch
from ..linalg import RankRule, factored_svd
from ..params import SCALE, MethodParams, RankedParams
from .base import ModuleGroup, ModuleResult, ModuleStats, NoParams, lowrank_result, register_method

if TYPE_CHECKING:
    import torch  # noqa: F811


@dataclass(frozen=True)
class ScaledParams(MethodParams):
    """λ on the exact sum."""

    scale: float = SCALE.field()


@dataclass(frozen=True)
class LowRankParams(ScaledParams, RankedParams):
    """λ, and the output-rank rule (`rank`, `energy`, `sv_fro`, `sv_ratio`, `sv_cumulative`; `max_rank`)."""


def concatenated(group: ModuleGroup, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """B_cat = [c·w₁s₁B₁ | … | c·w_T s_T B_T] (m×k) and A_cat = [A₁; …; A_T] (k×n), so B_cat·A_cat = c·Σ wᵢ ΔWᵢ.

    Each adapter's weight and scale go into its own block of B, so ranks, alphas and rslora may all differ.
    """
    B = torch.cat([(factor * w * f.scale) * f.B.float() for f, w in zip(group.factors, group.weights)], dim=1)
    A = torch.cat([f.A.float() for f in group.factors], dim=0)
    return B, A


@register_method(
    "linear",
    output_rank="sum",
    aliases=("cat",),
    summary="Exact weighted sum of the updates; factors concatenated, output rank Σ rᵢ (no cross terms).",
    formula="ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁|…|w_T s_T B_T]·[A₁;…;A_T]",
    reference="Hu et al., LoRA, ICLR 2022 (arXiv:2106.09685); docs/methods.md",
)
def linear(group: ModuleGroup, params: NoParams) -> ModuleResult:
    """ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ exactly, as [w₁s₁B₁ | … | w_T s_T B_T]·[A₁; …; A_T] (rank Σᵢ rᵢ).

    Unlike PEFT's `linear`, which forms (Σ√(wᵢsᵢ)Bᵢ)(Σ√(wⱼsⱼ)Aⱼ) and so adds the cross terms BᵢAⱼ, this is the
    weighted sum itself. A lora_B bias is summed the same way: Σ wᵢ·sᵢ·bᵢ.
    """
    return exact_sum(group, 1.0)


@register_method(
    "task_arithmetic",
    output_rank="sum",
    summary="λ times the exact weighted sum of the task updates (factored, rank Σ rᵢ).",
    formula="ΔW = λ·Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ",
    reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    params=ScaledParams,
)
def task_arithmetic(group: ModuleGroup, params: ScaledParams) -> ModuleResult:
    """ΔW = λ·Σᵢ wᵢ·ΔWᵢ (Ilharco et al., ICLR 2023), exact in factored form; λ is `scale`, default 1."""
    return exact_sum(group, params.scale)


def exact_sum(group: ModuleGroup, factor: float) -> ModuleResult:
    """c·Σᵢ wᵢ·ΔWᵢ as concatenated factors, rank Σ rᵢ. A DoRA update is full-rank: with one among the sources the
    sum is limited to the rank Σ rᵢ the sources were trained with, by its best approximation (Eckart–Young–Mirsky),
    and the stats say what it kept."""
    B, A = concatenated(group, factor)
    bias = group.scaled_bias(factor)
    if any(f.source_rank is not None for f in group.factors):
        rank = sum(f.nominal_rank for f in group.factors)
        return lowrank_result(factored_svd(B, A), group, rule=RankRule(rank=rank), scale=factor, bias=bias)
    return ModuleResult(A=A, B=B, bias=bias, stats=ModuleStats(rank=A.shape[0]))


@register_method(
    "svd",
    summary="Best rank-R approximation of the weighted sum, via QR of the stacked factors and an SVD of the k×k core.",
    formula="ΔW_R = argmin_{rank ≤ R} ‖λ·Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ − X‖_F",
    reference="Eckart–Young–Mirsky; PEFT add_weighted_adapter(combination_type='svd'); docs/methods.md",
    params=LowRankParams,
)
def svd(group: ModuleGroup, params: LowRankParams) -> ModuleResult:
    """ΔW_R = U_R·Σ_R·V_Rᵀ, the best rank-R approximation of λ·Σᵢ wᵢ·ΔWᵢ in Frobenius and spectral norm.

    With B_cat = Q_B·R_B and A_catᵀ = Q_A·R_A, ΔW = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ; the SVD of the k×k core gives ΔW's exact
    SVD (Eckart–Young–Mirsky). R comes from the rank rule (`linalg.RankRule`; default: the largest input rank).
    The output splits √σ evenly between B' and A'. An all-zero sum is written at rank 1.
    """
    B, A = concatenated(group, params.scale)
    return lowrank_result(
        factored_svd(B, A), group, rule=params.rank_rule(), scale=params.scale,
        bias=group.scaled_bias(params.scale),
    )
