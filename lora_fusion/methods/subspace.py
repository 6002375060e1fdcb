"""Merges that align tasks in an SVD subspace (docs/methods.md): KnOTS, TSV, Iso-C and Iso-CTS.

All four are computed from QRs of the factors and SVDs of matrices with at most k = Σ rᵢ columns, so nothing of size
m×n is formed. For TSV and the Iso methods this factored form equals the Core Space form (Panariello et al. 2025),
which is why they offer `space="core"` only. Where LoRA's low rank makes the papers' full-space recipe ill-defined
(arbitrary singular vectors of zero singular values), components are limited to the numerical rank — our
interpretation, documented per method. Output rank defaults to the whole merged rank (lossless); `rank`/`energy`
truncate it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._lazy import torch
from ..linalg import FactoredSVD, factored_svd
from ..params import DENSITY, SPACE, Param, in_range
from .base import ModuleGroup, ModuleResult, lowrank_result, register_method
from .elementwise import DenseTask, Trim, combine
from .exact import LowRankParams, concatenated
from .interference import MAJORITY

if TYPE_CHECKING:
    import torch  # noqa: F811

# Singular values below this fraction of the largest are numerical zeros of a low-rank update.
RANK_TOLERANCE = 1e-6
COMMON_FRACTION = Param(
    "Iso-CTS: share of the rank given to the common subspace.", "a fraction in (0, 1], e.g. 0.8",
    in_range(0.0, 1.0, low_open=True), default=0.8,
)


@dataclass(frozen=True)
class KnotsParams(LowRankParams):
    density: float = DENSITY.field(0.2)
    majority: str = MAJORITY.field()


@dataclass(frozen=True)
class CoreSpaceParams(LowRankParams):
    """TSV and Iso-C: their factored form is the core-space form, so `space` is "core" only."""

    space: str = SPACE.field("core")


@dataclass(frozen=True)
class IsoCtsParams(CoreSpaceParams):
    common_fraction: float = COMMON_FRACTION.field()


def numerical_rank(S: torch.Tensor, tolerance: float = RANK_TOLERANCE) -> int:
    """Number of σⱼ > tolerance·σ₁."""
    return int((S > tolerance * S[0]).sum()) if S.numel() and float(S[0]) > 0 else 0


def polar(X: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (Procrustes): P·Qᵀ for X = P·Σ·Qᵀ."""
    P, _, Qh = torch.linalg.svd(X.double(), full_matrices=False)
    return (P @ Qh).float()


def full_rank_result(svd: FactoredSVD, group: ModuleGroup, params: LowRankParams) -> ModuleResult:
    """Truncate only if the user asked: the default output rank is the merged update's whole (numerical) rank."""
    rule = params.rank_rule()
    if rule.rank is None and not rule.adaptive:
        rule = dataclasses.replace(rule, rank=max(1, numerical_rank(svd.S)))
    return lowrank_result(svd, group, rule=rule, scale=params.scale)


def task_svds(group: ModuleGroup) -> list[FactoredSVD]:
    """Each weighted task update wᵢ·sᵢ·Bᵢ·Aᵢ as an exact SVD, cut to its numerical rank."""
    svds = []
    for f, w in zip(group.factors, group.weights):
        svd = factored_svd(w * f.scale * f.B.float(), f.A.float())
        keep = numerical_rank(svd.S)
        svds.append(svd.cut(keep))
    return svds


def orthogonalised(parts: list[FactoredSVD], scale: float, *, isotropic: bool) -> FactoredSVD:
    """ΔW = scale·polar([U₁|…])·diag(S)·polar([V₁|…])ᵀ, with S replaced by its mean when `isotropic`."""
    U = torch.cat([p.U for p in parts], dim=1)
    V = torch.cat([p.V for p in parts], dim=1)
    S = torch.cat([p.S for p in parts])
    if isotropic:
        S = torch.full_like(S, float(S.mean()))
    return factored_svd(polar(U) * (scale * S.float()), polar(V).mT)


@register_method(
    "knots",
    output_rank="merged",
    summary="Align the tasks in the shared left singular basis of [τ₁|…|τ_T], then TIES on the aligned parts.",
    formula="[τ₁|…|τ_T] = U·S·[V₁ᵀ|…|V_Tᵀ]; ΔW = λ·U·TIES_d(S·V₁ᵀ, …, S·V_Tᵀ; w)",
    reference="Stoica et al., Model merging with SVD to tie the KnOTS, ICLR 2025 (arXiv:2410.19735)",
    params=KnotsParams,
)
def knots(group: ModuleGroup, params: KnotsParams) -> ModuleResult:
    """KnOTS (Stoica et al., ICLR 2025): with X = [τ₁|…|τ_T] = U·S·Vᵀ (σ > 1e-6·σ₁ kept) and Vᵀ split per task,
    ΔW = λ·U·TIES(S·Vᵢᵀ) (per-module top-d trim, d = 0.2, disjoint mean, weights in the mean).

    Computed in factored form: X = B_stack·blkdiag(Aᵢ) = Q_B·(R_B·blkdiag(Rᵢᵀ))·blkdiag(Qᵢ)ᵀ. The official code
    trims over all layers flattened together and cuts σ at an absolute 1e-5; per-module trimming and a relative cut
    are our choices (docs/methods.md).
    """
    B = torch.cat([f.scale * f.B.float() for f in group.factors], dim=1)
    Q_B, R_B = torch.linalg.qr(B)
    qrs = [torch.linalg.qr(f.A.float().mT) for f in group.factors]
    core = R_B.double() @ torch.block_diag(*[R.double().mT for _, R in qrs])
    U_c, S, Vh_c = torch.linalg.svd(core)
    keep = numerical_rank(S)
    if keep == 0:  # the tasks are all zero: nothing to align (written at rank 1, zero, like every zero merge)
        return lowrank_result(factored_svd(*concatenated(group)), group, rule=params.rank_rule(),
                              scale=params.scale)
    U = Q_B @ U_c[:, :keep].float()
    offsets = torch.tensor([0] + [f.rank for f in group.factors]).cumsum(0)
    # the aligned tasks (S·Vᵢᵀ, keep×n) as products, streamed like full-space updates: never T of them held whole
    tasks = [
        DenseTask.product((S[:keep, None] * Vh_c[:keep, int(offsets[i]) : int(offsets[i + 1])]).float(), Q.mT)
        for i, (Q, _) in enumerate(qrs)
    ]
    trims = [Trim.of(task, params.density) for task in tasks]
    merged = combine(tasks, trims, group.weights, majority=params.majority, scale=params.scale)
    return full_rank_result(factored_svd(U, merged), group, params)


@register_method(
    "tsv",
    output_rank="merged",
    summary="Task Singular Vectors: each task's top singular vectors, orthogonalised jointly (polar factors).",
    formula="ΔW = α·polar([U₁|…|U_T])·diag(S₁,…,S_T)·polar([V₁|…|V_T])ᵀ, top ⌊min(m,n)/T⌋ per task",
    reference="Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv:2412.00081)",
    params=CoreSpaceParams,
    spaces=("core",),
)
def tsv(group: ModuleGroup, params: CoreSpaceParams) -> ModuleResult:
    """TSV-Merge (Gargiulo et al., CVPR 2025): wᵢ·τᵢ = Uᵢ·Sᵢ·Vᵢᵀ cut to c = ⌊min(m,n)/T⌋ components (and to its
    numerical rank, our LoRA reading: null vectors are arbitrary); ΔW = α·U⊥·diag(S)·V⊥ᵀ with U⊥, V⊥ the polar
    factors of the concatenated singular vectors. Equal to TSV on the Core Space cores (docs/methods.md)."""
    m, n = group.factors[0].B.shape[0], group.factors[0].A.shape[1]
    cut = max(1, min(m, n) // len(group.factors))
    parts = [p.cut(min(cut, p.S.numel())) for p in task_svds(group)]
    parts = [p for p in parts if p.S.numel()]
    if not parts:
        return full_rank_result(factored_svd(*concatenated(group, params.scale)), group, params)
    return full_rank_result(orthogonalised(parts, params.scale, isotropic=False), group, params)


@register_method(
    "iso_c",
    output_rank="merged",
    summary="Isotropic merge: the sum's singular values all replaced by their mean (over the numerical rank).",
    formula="Σᵢ wᵢτᵢ = U·S·Vᵀ; ΔW = α·mean(S)·U·Vᵀ",
    reference="Marczak et al., No Task Left Behind (Iso-C), ICML 2025 (arXiv:2502.04959)",
    params=CoreSpaceParams,
    spaces=("core",),
)
def iso_c(group: ModuleGroup, params: CoreSpaceParams) -> ModuleResult:
    """Iso-C (Marczak et al., ICML 2025): Σᵢ wᵢτᵢ = U·S·Vᵀ, ΔW = α·mean(S)·U·Vᵀ. The mean runs over the numerical rank
    (σ > 1e-6·σ₁), our LoRA reading of the paper's full spectrum; it equals Core Space's isotropize (c.8)."""
    svd = factored_svd(*concatenated(group))
    keep = numerical_rank(svd.S)
    if keep == 0:
        return lowrank_result(svd, group, rule=params.rank_rule(), scale=params.scale)
    flat = torch.full_like(svd.S[:keep], params.scale * float(svd.S[:keep].mean()))
    return full_rank_result(FactoredSVD.of(svd.left.columns(keep), flat, svd.right.columns(keep)), group, params)


@register_method(
    "iso_cts",
    output_rank="merged",
    summary="Iso-C on a common subspace of the sum plus task-specific residual directions, orthogonalised.",
    formula="ΔW = α·mean(S)·polar([U_tasks|U_common])·polar([V_tasks|V_common])ᵀ",
    reference="Marczak et al., No Task Left Behind (Iso-CTS), ICML 2025 (arXiv:2502.04959)",
    params=IsoCtsParams,
    spaces=("core",),
)
def iso_cts(group: ModuleGroup, params: IsoCtsParams) -> ModuleResult:
    """Iso-CTS (Marczak et al., ICML 2025): keep k_c = ⌊f·D⌋ leading directions of Σᵢ wᵢτᵢ (f = 0.8, D its numerical
    rank), adjusted to k_c = D − T·t with t = round((D − ⌊f·D⌋)/T) as the official code rounds; add each task's top t
    directions of its residual wᵢτᵢ − U_c·U_cᵀ·wᵢτᵢ, orthogonalise U and V by polar factors and flatten the spectrum
    to its mean: ΔW = α·mean(S)·U⊥·V⊥ᵀ. D is the numerical rank of the LoRA sum, not min(m, n) (our reading)."""
    total = factored_svd(*concatenated(group))
    D = numerical_rank(total.S)
    if D == 0:
        return lowrank_result(total, group, rule=params.rank_rule(), scale=params.scale)
    T = len(group.factors)
    # The official code (iso.py) rounds the share to the nearest count per task: round((D − ⌊f·D⌋)/T), never more
    # than D/T so that k_c ≥ 0 (3 rank-8 LoRAs: 2 task directions each, k_c = 18; flooring gave 1 and 21).
    per_task = min(round((D - int(params.common_fraction * D)) / T), D // T)
    common = D - per_task * T
    U_c = total.left.columns(common)
    parts = []
    for f, w in zip(group.factors, group.weights):
        B = w * f.scale * f.B.float()
        residual = factored_svd(B - U_c @ (U_c.mT @ B), f.A.float())
        cut = min(per_task, numerical_rank(residual.S))
        parts.append(residual.cut(cut))
    parts.append(FactoredSVD.of(U_c, total.S[:common], total.right.columns(common)))
    return full_rank_result(orthogonalised(parts, params.scale, isotropic=True), group, params)
