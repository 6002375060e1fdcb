"""Linear algebra on factored updates: the SVD of B·A without forming it, core-space bases, randomized SVD of dense
updates, and the choice of output rank.

docs/methods.md. All functions are pure and work on whatever device their inputs are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Above this min(m, n), a dense update goes back to low rank by randomized SVD instead of an exact one (b.4).
EXACT_SVD_LIMIT = 1024


class Basis:
    """m×k orthonormal columns Q·C, with Q either explicit or kept as Householder reflectors (`geqrf`): the columns
    are formed only for the components a merge keeps, which halves the QR cost of a factored SVD."""

    def __init__(self, rotation: torch.Tensor, *, matrix: torch.Tensor | None = None,
                 reflectors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.rotation, self.matrix, self.reflectors = rotation, matrix, reflectors

    @property
    def rows(self) -> int:
        return self.matrix.shape[0] if self.matrix is not None else self.reflectors[0].shape[0]

    def columns(self, count: int) -> torch.Tensor:
        """The first `count` columns, float32."""
        chosen = self.rotation[:, :count].float()
        if self.matrix is not None:
            return self.matrix @ chosen
        packed, tau = self.reflectors
        padded = chosen.new_zeros(packed.shape[0], count)
        padded[: chosen.shape[0]] = chosen
        return torch.ormqr(packed, tau, padded)


@dataclass(frozen=True)
class FactoredSVD:
    """ΔW ≈ U·diag(S)·Vᵀ with orthonormal columns in U (m×k) and V (n×k), S descending (float64).

    `total_energy` is ‖ΔW‖_F²; it exceeds Σσ² when only the leading part of the spectrum was computed.
    """

    left: Basis
    S: torch.Tensor
    right: Basis
    total_energy: float

    @classmethod
    def of(cls, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, total: float | None = None) -> FactoredSVD:
        """From explicit singular vectors."""
        left = Basis(torch.eye(U.shape[1], dtype=U.dtype, device=U.device), matrix=U)
        right = Basis(torch.eye(V.shape[1], dtype=V.dtype, device=V.device), matrix=V)
        return cls(left, S, right, float((S.double() ** 2).sum()) if total is None else total)

    @property
    def U(self) -> torch.Tensor:
        return self.left.columns(self.S.numel())

    @property
    def V(self) -> torch.Tensor:
        return self.right.columns(self.S.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.rows, self.right.rows)

    def cut(self, count: int) -> FactoredSVD:
        """The leading `count` components, with ‖ΔW‖_F² recomputed for them."""
        return FactoredSVD.of(self.left.columns(count), self.S[:count], self.right.columns(count))


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> FactoredSVD:
    """Exact thin SVD of the product B·A (B m×k, A k×n) without forming the m×n matrix.

    QR of B and of Aᵀ, then an SVD of the small k×k core R_B·R_Aᵀ in float64 (Householder QR keeps this exact even
    when B or A is rank-deficient; the Gram route would square the condition number). The orthonormal factors stay
    as Householder reflectors until the kept singular vectors are asked for. When k ≥ min(m, n) the product is
    small enough that the dense SVD is cheaper, and it is taken instead.
    """
    m, k = B.shape
    n = A.shape[1]
    B32, A32 = B.float(), A.float()
    if k >= min(m, n):
        U, S, Vh = torch.linalg.svd(B32.double() @ A32.double(), full_matrices=False)
        return FactoredSVD.of(U.float(), S, Vh.mT.float())
    packed_B, tau_B = torch.geqrf(B32)
    packed_A, tau_A = torch.geqrf(A32.mT.contiguous())
    R_B, R_A = packed_B[:k].triu(), packed_A[:k].triu()
    U_c, S, Vh_c = torch.linalg.svd(R_B.double() @ R_A.double().mT)
    return FactoredSVD(
        Basis(U_c, reflectors=(packed_B, tau_B)), S, Basis(Vh_c.mT, reflectors=(packed_A, tau_A)),
        float((S**2).sum()),
    )


def dense_svd(dense: torch.Tensor, *, components: int, generator: torch.Generator) -> FactoredSVD:
    """SVD of a dense m×n update: exact when min(m, n) ≤ EXACT_SVD_LIMIT, else the leading `components` by
    randomized SVD (Halko, Martinsson & Tropp 2011, arXiv:0909.4061; oversampling 10, 2 power iterations with
    re-orthonormalisation). The Gaussian test matrix comes from `generator`, on the CPU, so results do not depend
    on the device."""
    m, n = dense.shape
    if min(m, n) <= EXACT_SVD_LIMIT:
        U, S, Vh = torch.linalg.svd(dense.double(), full_matrices=False)
        return FactoredSVD.of(U.float(), S, Vh.mT.float())  # the whole spectrum: ‖ΔW‖_F² = Σσ²
    # row norms in float32 (a few thousand terms each, ~1e-7 relative), their squares summed in float64: one float32
    # norm of millions of entries is off by 1e-6 to 1e-3 with the spread of the values, and a float64 reduction costs
    # 30 times as much. Float32 squares overflow or lose precision outside this range: then the float64 one.
    total = float((torch.linalg.vector_norm(dense, dim=1).double() ** 2).sum())
    if not 1e-20 < total < 1e30:
        total = float(torch.linalg.vector_norm(dense, dtype=torch.float64)) ** 2
    width = min(components + 10, min(m, n))
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32).to(dense.device)
    Y = torch.linalg.qr(dense @ omega).Q
    for _ in range(2):
        Y = torch.linalg.qr(dense.mT @ Y).Q
        Y = torch.linalg.qr(dense @ Y).Q
    U_small, S, Vh = torch.linalg.svd((Y.mT @ dense).double(), full_matrices=False)
    return FactoredSVD.of(Y @ U_small.float(), S, Vh.mT.float(), total)


def core_bases(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Core-space bases (Panariello et al., NeurIPS 2025, arXiv:2509.17786): U_B, the left singular vectors of the
    stacked B (m×k), and V_A, the right singular vectors of the stacked A (n×k), both from float64 SVDs of the small
    triangular factors. Every task satisfies U_B·(U_Bᵀ·Bᵢ·Aᵢ·V_A)·V_Aᵀ = Bᵢ·Aᵢ exactly."""
    Q_B, R_B = torch.linalg.qr(B.float())
    Q_A, R_A = torch.linalg.qr(A.float().mT)
    U_b = torch.linalg.svd(R_B.double())[0]
    U_a = torch.linalg.svd(R_A.double())[0]
    return Q_B @ U_b.float(), Q_A @ U_a.float()


def choose_rank(S: torch.Tensor, *, rank: int | None, energy: float | None, default: int, total: float | None = None) -> int:
    """The output rank: `rank` (capped at the number of singular values), the smallest R whose retained energy
    Σ_{j≤R} σⱼ² / ‖ΔW‖_F² reaches `energy` (all computed values if none does), or `default`. At least 1."""
    available = S.numel()
    if energy is not None:
        cumulative = torch.cumsum(S.double() ** 2, 0)
        whole = total if total is not None else (float(cumulative[-1]) if available else 0.0)
        if whole == 0.0:
            return 1
        reached = (cumulative >= energy * whole * (1 - 1e-12)).nonzero()
        return max(1, int(reached[0]) + 1 if reached.numel() else available)
    return max(1, min(rank if rank is not None else default, available))


def retained_energy(S: torch.Tensor, rank: int, total: float | None = None) -> float:
    """E(R) = Σ_{j≤R} σⱼ² / ‖ΔW‖_F² (‖ΔW‖_F² = Σσ² unless given); 1 for an all-zero update."""
    whole = float((S.double() ** 2).sum()) if total is None else total
    return 1.0 if whole == 0.0 else min(1.0, float((S[:rank].double() ** 2).sum()) / whole)


def truncate(svd: FactoredSVD, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B' m×R, A' R×n) of the best rank-R approximation, with √σ on each side (keeps fp16 in range)."""
    root = svd.S[:rank].sqrt().float()
    B = svd.left.columns(rank) * root
    A = (svd.right.columns(rank) * root).mT
    return B.contiguous(), A.contiguous()


def relative_error(energy: float) -> float:
    """‖ΔW − ΔW_R‖_F / ‖ΔW‖_F = √(1 − E(R)) by Eckart–Young–Mirsky."""
    return math.sqrt(max(0.0, 1.0 - energy))
