"""Linear algebra on factored updates: the SVD of B·A without forming it, and the choice of output rank.

METHODS.md §b.2–b.3. All functions are pure and work on whatever device their inputs are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FactoredSVD:
    """ΔW = U·diag(S)·Vᵀ with orthonormal columns in U (m×k) and V (n×k), S descending (float64)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def total_energy(self) -> float:
        return float((self.S**2).sum())


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> FactoredSVD:
    """Exact thin SVD of the product B·A (B m×k, A k×n) without forming the m×n matrix.

    QR of B and of Aᵀ, then an SVD of the small k×k core R_B·R_Aᵀ in float64 (Householder QR keeps this exact even
    when B or A is rank-deficient; the Gram route would square the condition number). When k ≥ min(m, n) the
    product is small enough that the dense SVD is cheaper, and it is taken instead.
    """
    m, k = B.shape
    n = A.shape[1]
    B32, A32 = B.float(), A.float()
    if k >= min(m, n):
        U, S, Vh = torch.linalg.svd((B32.double() @ A32.double()), full_matrices=False)
        return FactoredSVD(U=U.float(), S=S, V=Vh.mT.float())
    Q_B, R_B = torch.linalg.qr(B32)
    Q_A, R_A = torch.linalg.qr(A32.mT)
    U_c, S, Vh_c = torch.linalg.svd(R_B.double() @ R_A.double().mT)
    return FactoredSVD(U=Q_B @ U_c.float(), S=S, V=Q_A @ Vh_c.mT.float())


def choose_rank(S: torch.Tensor, *, rank: int | None, energy: float | None, default: int) -> int:
    """The output rank: `rank` (capped at the number of singular values), the smallest R whose retained energy
    Σ_{j≤R} σⱼ² / Σⱼ σⱼ² reaches `energy`, or `default`. Always at least 1."""
    available = S.numel()
    if energy is not None:
        cumulative = torch.cumsum(S.double() ** 2, 0)
        total = float(cumulative[-1]) if available else 0.0
        if total == 0.0:
            return 1
        reached = (cumulative >= energy * total * (1 - 1e-12)).nonzero()
        return max(1, int(reached[0]) + 1 if reached.numel() else available)
    return max(1, min(rank if rank is not None else default, available))


def retained_energy(S: torch.Tensor, rank: int) -> float:
    """E(R) = Σ_{j≤R} σⱼ² / Σⱼ σⱼ²; 1 for an all-zero update."""
    total = float((S.double() ** 2).sum())
    return 1.0 if total == 0.0 else float((S[:rank].double() ** 2).sum()) / total


def truncate(svd: FactoredSVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B' m×R, A' R×n) of the best rank-R approximation, with √σ on each side (keeps fp16 in range)."""
    root = svd.S[:rank].sqrt().float()
    B = svd.U[:, :rank] * root
    A = (svd.V[:, :rank] * root).mT
    return B.contiguous(), A.contiguous()


def relative_error(energy: float) -> float:
    """‖ΔW − ΔW_R‖_F / ‖ΔW‖_F = √(1 − E(R)) by Eckart–Young–Mirsky."""
    return math.sqrt(max(0.0, 1.0 - energy))
