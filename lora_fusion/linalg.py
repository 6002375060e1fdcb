"""Linear algebra on factored updates: the SVD of B·A without forming it, core-space bases, randomized SVD of dense
updates, and the choice of output rank.

docs/methods.md. All functions are pure and work on whatever device their inputs are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ._lazy import torch

if TYPE_CHECKING:
    import torch  # noqa: F811

# Above this min(m, n), a dense update goes back to low rank by randomized SVD instead of an exact one (b.4).
EXACT_SVD_LIMIT = 1024
# The randomized SVD's extra sketch columns p and power iterations q (b.4; HMT 2011 §4.3, §4.5). p = 20 rather than
# 10 costs 5–8% more SVD time (~2% of a full-space TIES merge) and cuts the excess error over the optimum 2.5× on a
# flat TIES spectrum and 10× to 10⁴× on decaying ones; q = 4 as well would cut the flat excess 2.7× more for 60–70%
# more SVD time (docs/randomized_svd.md).
OVERSAMPLING = 20
POWER_ITERATIONS = 2
# A sketch this share of min(m, n) wide costs a quarter (1100²) to an eighth (2048²) of the exact float64 SVD on one
# core, and the doublings that led to it about as much again: past it, the exact SVD is the cheaper way to an
# energy target.
SKETCH_SHARE = 0.25

SvdChoice = Literal["auto", "exact", "randomized"]


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


@dataclass(frozen=True)
class RankRule:
    """How many singular components a low-rank output keeps: at most one of the rules below, optionally capped.

    - `rank` R: R components (at most the number computed).
    - `energy` e: the smallest R with Σ_{j≤R} σⱼ² ≥ e·‖ΔW‖_F² (retained energy E(R) ≥ e).
    - `sv_fro` f: the smallest R with ‖ΔW_R‖_F ≥ f·‖ΔW‖_F, i.e. `energy` f² (kohya sd-scripts
      `networks/resize_lora.py`, `--dynamic_method sv_fro`).
    - `sv_ratio` x: the components with σⱼ > σ₁/x (kohya's `sv_ratio`: the largest singular value is at most x times
      the smallest kept one).
    - `sv_cumulative` c: the smallest R with Σ_{j≤R} σⱼ ≥ c·Σⱼ σⱼ, a share of the nuclear norm (kohya's
      `sv_cumulative`). It needs the whole spectrum, so a dense update is then decomposed exactly.
    - `max_rank` M: a cap on whatever the rule gives (e.g. a serving engine's largest LoRA rank).

    Unlike kohya, which never keeps the last singular value (its index is capped at len(S) − 1), a rule here may
    keep every computed component; and zero singular values are never kept by `sv_ratio`. With no rule, the
    method's default rank applies (then the cap).
    """

    rank: int | None = None
    energy: float | None = None
    sv_fro: float | None = None
    sv_ratio: float | None = None
    sv_cumulative: float | None = None
    max_rank: int | None = None

    @property
    def adaptive(self) -> bool:
        """The rank depends on the spectrum (any rule but `rank`)."""
        return any(v is not None for v in (self.energy, self.sv_fro, self.sv_ratio, self.sv_cumulative))

    @property
    def needs_whole_spectrum(self) -> bool:
        """The rule compares against Σσ, which only the whole spectrum gives (a partial SVD knows ‖ΔW‖_F² only)."""
        return self.sv_cumulative is not None

    def resolve(self, S: torch.Tensor, *, default: int, total: float | None = None) -> int | None:
        """The rank this rule keeps of the singular values S (descending; ‖ΔW‖_F² = `total`, Σσ² unless given), or
        None when the computed values do not settle it (a partial spectrum whose tail may still matter)."""
        complete = total is None or float((S.double() ** 2).sum()) >= total * (1 - 1e-9)
        if self.energy is not None or self.sv_fro is not None:
            target = self.energy if self.energy is not None else self.sv_fro**2  # type: ignore[operator]
            chosen = energy_rank(S, target, total)
        elif self.sv_ratio is not None:
            kept = int((S > S[0] / self.sv_ratio).sum()) if S.numel() else 0
            chosen = kept if kept < S.numel() or complete else None
        elif self.sv_cumulative is not None:
            chosen = _nuclear_rank(S, self.sv_cumulative) if complete else None
        else:
            chosen = min(self.rank if self.rank is not None else default, S.numel())
        if chosen is None:
            return None
        if self.max_rank is not None:
            chosen = min(chosen, self.max_rank)
        return max(1, chosen)


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


def dense_svd(
    dense: torch.Tensor,
    *,
    components: int,
    generator: torch.Generator,
    rule: RankRule = RankRule(),
    svd: SvdChoice = "auto",
) -> FactoredSVD:
    """SVD of a dense m×n update, for a rank-`components` truncation or, with an adaptive `rule` (energy, sv_fro,
    sv_ratio, sv_cumulative), for the rank that rule gives (b.3, b.4).

    `svd="exact"`: the whole SVD, in float64. `"randomized"`: the leading part by randomized SVD (Halko, Martinsson
    & Tropp 2011, arXiv:0909.4061; `OVERSAMPLING` extra columns and `POWER_ITERATIONS` power iterations with
    re-orthonormalisation; docs/randomized_svd.md has its error): `components` of them or, with an adaptive rule, a
    sketch of 4×`components` first, doubled until the rule is settled within its first half. `"auto"`: exact when
    min(m, n) ≤ EXACT_SVD_LIMIT, else randomized with the sketch capped at `SKETCH_SHARE`·min(m, n). A target the
    capped (or, for "randomized", whole-width: float32 rounding) sketch misses is reached by the exact SVD; so is a
    rule that needs the whole spectrum (sv_cumulative). The Gaussian test matrices come from `generator`, on the
    CPU, so results do not depend on the device.
    """
    m, n = dense.shape
    if svd == "exact" or (svd == "auto" and min(m, n) <= EXACT_SVD_LIMIT) or rule.needs_whole_spectrum:
        return exact_svd(dense)
    total = frobenius_energy(dense)
    ceiling = min(m, n) if svd == "randomized" else max(1, int(SKETCH_SHARE * min(m, n)))
    width = min((4 * components if rule.adaptive else components) + OVERSAMPLING, min(m, n))
    while True:
        found = randomized_svd(dense, width=width, generator=generator, total=total)
        # A sketch resolves its trailing components least well (its partial sums fall below the exact ones), so a
        # target reached there gives a rank above the exact answer's (5% above on flat spectra): it counts only
        # within the first half of the sketch, where the ranks match (docs/randomized_svd.md). A sketch of the
        # whole width is an exact basis.
        trusted = found.S if width == min(m, n) else found.S[: width // 2]
        if not rule.adaptive or rule.resolve(trusted, default=components, total=total) is not None:
            return found
        if width >= ceiling:
            return exact_svd(dense)
        width = min(2 * width, ceiling)


def exact_svd(dense: torch.Tensor) -> FactoredSVD:
    """The whole thin SVD of a dense update, in float64: ‖ΔW‖_F² = Σσ²."""
    U, S, Vh = torch.linalg.svd(dense.double(), full_matrices=False)
    return FactoredSVD.of(U.float(), S, Vh.mT.float())


def frobenius_energy(dense: torch.Tensor) -> float:
    """‖ΔW‖_F², accurate to ~1e-7 relative at any scale."""
    # row norms in float32 (a few thousand terms each, ~1e-7 relative), their squares summed in float64: one float32
    # norm of millions of entries is off by 1e-6 to 1e-3 with the spread of the values, and a float64 reduction costs
    # 30 times as much. Float32 squares overflow or lose precision outside this range: then the float64 one.
    total = float((torch.linalg.vector_norm(dense, dim=1).double() ** 2).sum())
    if not 1e-20 < total < 1e30:
        total = float(torch.linalg.vector_norm(dense, dtype=torch.float64)) ** 2
    return total


def randomized_svd(dense: torch.Tensor, *, width: int, generator: torch.Generator, total: float) -> FactoredSVD:
    """The leading `width` singular triplets of a dense m×n update by randomized subspace iteration (HMT 2011,
    Algorithms 4.4 and 5.1): Q spans (ΔW·ΔWᵀ)^q·ΔW·Ω for a Gaussian n×width Ω, then the SVD of Qᵀ·ΔW. `total` is
    ‖ΔW‖_F², so the energy of any leading part is measured against the whole update."""
    omega = torch.randn(dense.shape[1], width, generator=generator, dtype=torch.float32).to(dense.device)
    Y = torch.linalg.qr(dense @ omega).Q
    for _ in range(POWER_ITERATIONS):
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


def choose_rank(S: torch.Tensor, rule: RankRule, *, default: int, total: float | None = None) -> int:
    """The output rank `rule` gives for the singular values S (`default` without a rule), or every computed value
    (capped) when a partial spectrum falls short of an adaptive target. At least 1."""
    chosen = rule.resolve(S, default=default, total=total)
    if chosen is None:
        chosen = S.numel() if rule.max_rank is None else min(S.numel(), rule.max_rank)
    return max(1, chosen)


def _nuclear_rank(S: torch.Tensor, share: float) -> int:
    cumulative = torch.cumsum(S.double(), 0)
    whole = float(cumulative[-1]) if S.numel() else 0.0
    if whole == 0.0:
        return 1
    return int((cumulative >= share * whole * (1 - 1e-12)).nonzero()[0]) + 1


def energy_rank(S: torch.Tensor, energy: float, total: float | None = None) -> int | None:
    """The smallest R with Σ_{j≤R} σⱼ² ≥ `energy`·‖ΔW‖_F² (‖ΔW‖_F² = Σσ² unless given; 1 for an all-zero update),
    or None when the computed values fall short of it (the tail of a partial SVD holds the rest)."""
    cumulative = torch.cumsum(S.double() ** 2, 0)
    whole = total if total is not None else (float(cumulative[-1]) if S.numel() else 0.0)
    if whole == 0.0:
        return 1
    reached = (cumulative >= energy * whole * (1 - 1e-12)).nonzero()
    return int(reached[0]) + 1 if reached.numel() else None


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


def randomized_excess_bound(
    S: torch.Tensor, *, rank: int, width: int, power_iterations: int = POWER_ITERATIONS
) -> float:
    """A bound on the expected excess relative error of [`randomized_svd`]'s rank-`rank` truncation over the exact
    optimum, E‖ΔW − ΔŴ_R‖_F/‖ΔW‖_F − √(Σ_{j>R} σⱼ²/‖ΔW‖_F²), from ΔW's exact singular values S, a sketch of `width`
    columns and q power iterations (docs/randomized_svd.md derives it):

        E‖ΔW − ΔŴ_R‖_F² ≤ Σ_{j>R} σⱼ² + min_{R≤h≤width−2} (Σ_{i≤R} σᵢ^{−4q})·(Σ_{j>h} σⱼ^{4q+2}) / (width − h − 1)

    (Halko, Martinsson & Tropp 2011, Thm 9.1 and Prop 10.1, with the top-R energy the sketch misses in place of
    their projection error), then Jensen's inequality for the norm itself. It is an expectation over the Gaussian
    sketch: one draw exceeds c times the second term with probability at most 1/c (Markov). Infinite when
    width < R + 2 or σ_R = 0."""
    S = S.double()
    q = power_iterations
    if width < rank + 2 or rank > S.numel() or float(S[rank - 1]) == 0.0:
        return math.inf
    whole = float((S**2).sum())
    tail = float((S[rank:] ** 2).sum())
    head = float((S[:rank] ** (-4 * q)).sum())
    missed = min(
        head * float((S[h:] ** (4 * q + 2)).sum()) / (width - h - 1) for h in range(rank, min(width - 1, S.numel() + 1))
    )
    return (math.sqrt(tail + missed) - math.sqrt(tail)) / math.sqrt(whole)
