"""RAPF's decomposed parameter fusion (docs/rapf.md), on full weights and on LoRA adapters in sequence.

Huang, Cao, Lu, Liu, "Class-Incremental Learning with CLIP: Adaptive Representation Adjustment and Parameter
Fusion", ECCV 2024 (arXiv:2407.14143); official code `linlany/RAPF`, `mix_matrix` in `continual_clip/models.py`.

On a full weight, the task's change W_n − W_o is rotated into the left singular basis U of the old weight, each
coefficient is kept in proportion to its relative size (never less than b), and the result is rotated back:

    W = W_o + U·(M ⊙ Uᵀ(W_n − W_o)),   M = min(1, |Uᵀ(W_n − W_o)| / max|Uᵀ(W_n − W_o)| + b)

[`rapf_fuse_weights`] is that formula; the class-incremental trainer (`lora_fusion.cil`) calls it after every task.
The registered `rapf` merge method applies it to a sequence of LoRA adapters (A, then B, then C): with the base
model's weights ("base-aware", U from W_base + F) or without them ("adapter-only", U from the fused update F in the
span of the factors). docs/rapf.md describes both; neither is in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .._lazy import torch
from ..errors import UnsupportedAdapterError
from ..linalg import dense_svd, factored_svd
from ..params import SVD, Param, RankedParams, in_range
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

if TYPE_CHECKING:
    import torch  # noqa: F811

    from ..adapter import ModuleFactors

# Singular values below this fraction of the largest are numerical zeros (a rank-deficient W_o, a low-rank F).
RANK_TOLERANCE = 1e-6
BIAS = Param(
    "RAPF: offset b of the fusion mask M = min(1, D/max D + b), in [0, 1].", "a number in [0, 1], e.g. 0.6",
    in_range(0.0, 1.0), default=0.6,
)
CHAINED = Param(
    "RAPF: each adapter was trained on top of the previous fused weights (not from the base).", "true or false",
    lambda value: isinstance(value, bool), default=False, flag=True,
)


@dataclass(frozen=True)
class RapfParams(RankedParams):
    bias: float = BIAS.field()
    chained: bool = CHAINED.field()
    svd: str = SVD.field()


def rapf_cost(module: ModuleShape, params: RapfParams) -> ModuleCost:
    """Adapter-only: factored. Base-aware: one update at a time against W_o in float64, with an SVD of W_o per step
    (`fuse_update_dense`), then the SVD of the dense fused update."""
    if not module.with_base:
        return factored_cost(module, params)
    (m, n), k = module.shape, sum(module.ranks)
    out = module.output_rank(params, dense=True)
    svd_flops, svd_bytes = dense_svd_cost(module, params, out)
    flops = 2.0 * m * n * k + len(module.ranks) * 4.0 * m * n * min(m, n) + svd_flops
    return ModuleCost(out, flops, 44 * m * n + svd_bytes + module.item_bytes * (m + n) * out)


def fusion_mask(change: torch.Tensor, bias: float) -> torch.Tensor:
    """M = min(1, |C| / max|C| + b), element-wise, with one scalar max over the whole matrix (official `mix_matrix`).

    An all-zero change gives M = min(1, b) everywhere; it multiplies zeros, so the value does not matter.
    """
    magnitude = change.abs()
    peak = magnitude.max() if magnitude.numel() else magnitude.new_tensor(0.0)
    if float(peak) == 0.0:
        return torch.full_like(magnitude, min(1.0, bias))
    return torch.clamp(magnitude / peak + bias, max=1.0)


def _numerical_rank(S: torch.Tensor, reference: float) -> int:
    return int((S > RANK_TOLERANCE * reference).sum()) if reference > 0 else 0


def completed_left_basis(old: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The part of W_o's full left singular basis that the fusion needs: U = [U₁ | U₂] (m×k, orthonormal).

    U₁ are W_o's left singular vectors with σ > 1e-6·σ₁. When W_o is rank-deficient (always when m > n), the rest of
    a full m×m basis is arbitrary, and the mask would depend on that choice; completing it with U₂, the left
    singular vectors of the residual (I − U₁U₁ᵀ)·update, makes the result canonical (docs/rapf.md, step 2). The
    update has zero coefficients on every direction outside [U₁ | U₂], so those directions need not be formed. For
    a full-rank square W_o (RAPF's 512×512 adapter), U₁ is the whole basis and U₂ is empty.
    """
    U, S, _ = torch.linalg.svd(old, full_matrices=False)
    U1 = U[:, : _numerical_rank(S, float(S[0]) if S.numel() else 0.0)]
    if U1.shape[1] == old.shape[0]:  # W_o has full row rank: U₁ is already the whole basis
        return U1
    residual = update - U1 @ (U1.mT @ update)
    R, S_r, _ = torch.linalg.svd(residual, full_matrices=False)
    # Residual directions are judged against the update's own size, so rounding noise left in it is not a direction.
    U2 = R[:, : _numerical_rank(S_r, float(torch.linalg.matrix_norm(update)))]
    return torch.cat([U1, U2], dim=1)


def rapf_fuse_weights(
    old: torch.Tensor, new: torch.Tensor, *, bias: float, basis: Literal["decomposed", "raw"] = "decomposed"
) -> torch.Tensor:
    """RAPF's decomposed parameter fusion of a full weight (Huang et al., ECCV 2024; official `mix_matrix`).

        W = W_o + U·(M ⊙ C),   C = Uᵀ(W_n − W_o),   M = min(1, |C| / max|C| + b)

    with U the left singular vectors of W_o (completed canonically when W_o is rank-deficient, see
    [`completed_left_basis`]). This equals the official coefficient form R_o = S·Vᵀ, R_n = Uᵀ·W_n,
    W = U·(M ⊙ R_n + (1 − M) ⊙ R_o). `basis="raw"` is the ablation "fusion without decomposition":
    C = W_n − W_o element-wise in the raw basis (the dead line of `mix_matrix`), W = W_o + M ⊙ C.

    Args:
        old: W_o, the weight before the task (out×in, y = W·x).
        new: W_n, the weight after training the task, same shape.
        bias: b ∈ [0, 1]; coefficients are kept at least at fraction b (0.6 CIFAR-100, 0.5 ImageNet-100, 0.7
            ImageNet-R, 0.8 CUB in the official configs).
        basis: `"decomposed"` (RAPF) or `"raw"` (ablation).

    Returns:
        The fused weight, in `old`'s dtype (computed in float64).

    Raises:
        ValueError: if the shapes differ or `bias` is outside [0, 1].
    """
    if old.shape != new.shape:
        raise ValueError(f"old and new weights differ in shape: {tuple(old.shape)} vs {tuple(new.shape)}")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must be in [0, 1], got {bias}")
    W_o, change = old.double(), new.double() - old.double()
    if basis == "raw":
        return (W_o + fusion_mask(change, bias) * change).to(old.dtype)
    U = completed_left_basis(W_o, change)
    coefficients = U.mT @ change
    return (W_o + U @ (fusion_mask(coefficients, bias) * coefficients)).to(old.dtype)


def fuse_update_dense(
    base: torch.Tensor, fused: torch.Tensor, delta: torch.Tensor, *, bias: float, chained: bool = False
) -> torch.Tensor:
    """One base-aware step of RAPF over LoRA updates (docs/rapf.md, option 1): the new fused update F_t.

    W_o = W_base + F_{t−1}; the new weight is W_base + ΔW_t for independent adapters (each trained from the base),
    or W_o + ΔW_t for `chained` ones (RAPF's own regime). F_t = W − W_base with W = [`rapf_fuse_weights`](W_o, W_n).
    """
    old = base.double() + fused.double()
    new = (base.double() + delta.double()) if not chained else old + delta.double()
    return (rapf_fuse_weights(old, new, bias=bias) - base.double()).to(fused.dtype)


def fuse_update_factored(
    fused: tuple[torch.Tensor, torch.Tensor], delta: tuple[torch.Tensor, torch.Tensor], *, bias: float,
    chained: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter-only step of RAPF over LoRA updates (docs/rapf.md, option 2), exact and factored.

    With F = B_F·A_F and ΔW_t = B_t·A_t: Q spans [B_F | B_t]; in those coordinates F̂ = Qᵀ·F and D̂ = Qᵀ·D_t
    (D_t = ΔW_t − F, or ΔW_t when `chained`); Û = F̂'s left singular vectors, completed with those of the residual of
    D̂; Ĉ = Ûᵀ·D̂ and F_t = Q·(F̂ + Û·(M̂ ⊙ Ĉ)) with M̂ = min(1, |Ĉ|/max|Ĉ| + b). Every direction outside span(Q)
    has zero coefficients, so this equals the full-space fusion of W_o = F with the canonical completion.

    Returns:
        (B', A') with F_t = B'·A', cut to F_t's numerical rank.
    """
    B_F, A_F = fused[0].double(), fused[1].double()
    B_t, A_t = delta[0].double(), delta[1].double()
    Q = torch.linalg.qr(torch.cat([B_F, B_t], dim=1)).Q
    F_hat = (Q.mT @ B_F) @ A_F
    D_hat = (Q.mT @ B_t) @ A_t if chained else (Q.mT @ B_t) @ A_t - F_hat
    U = completed_left_basis(F_hat, D_hat)
    coefficients = U.mT @ D_hat
    A_new = F_hat + U @ (fusion_mask(coefficients, bias) * coefficients)
    compact = factored_svd(Q.float(), A_new.float())
    keep = max(1, _numerical_rank(compact.S, float(compact.S[0]) if compact.S.numel() else 0.0))
    compact = compact.cut(keep)
    return compact.U * compact.S.float(), compact.V.mT


def _weighted_deltas(group: ModuleGroup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # The user weight and the LoRA scale both go into B, so ΔW_t = (w_t·s_t·B_t)·A_t.
    return [((w * f.scale) * f.B.float(), f.A.float()) for f, w in zip(group.factors, group.weights)]


def _refuse_bias(factors: Sequence[ModuleFactors], name: str) -> None:
    if any(f.bias is not None for f in factors):
        raise UnsupportedAdapterError(
            f"{name}: an adapter has a lora_B bias, which RAPF's fusion of weight matrices does not define; "
            "merge these adapters with `--method linear` or train them without lora_bias."
        )


@register_method(
    "rapf",
    output_rank="max",
    summary="RAPF decomposed parameter fusion, adapters fused in the order given (base-aware with --base-model).",
    formula="W = W_o + U·(M ⊙ Uᵀ(W_n − W_o)), M = min(1, |Uᵀ(W_n − W_o)|/max + b), U from svd(W_o)",
    reference="Huang et al., RAPF, ECCV 2024 (arXiv:2407.14143); docs/rapf.md",
    params=RapfParams,
    uses_base=True,
    cost=rapf_cost,
)
def rapf(group: ModuleGroup, params: RapfParams) -> ModuleResult:
    """Fuse the adapters of one module in sequence with RAPF's decomposed parameter fusion (docs/rapf.md).

    Adapters are independent (each trained from the base): adapter t's new weight is W_base + w_t·ΔW_t; with
    `chained` (RAPF's own regime, each adapter trained on top of the previous fused weights) it is W_o + w_t·ΔW_t.

    * Base-aware (`group.base` given): F₀ = 0 and F_t = [`fuse_update_dense`](W_base, F_{t−1}, w_t·ΔW_t), so even
      the first adapter is fused against the base weight, as RAPF fuses each task into the previous weights. F is
      dense for the module; it goes back to rank R once, at the end.
    * Adapter-only: F₁ = w₁·ΔW₁ and F_t = [`fuse_update_factored`](F_{t−1}, w_t·ΔW_t), exact and factored (rank
      at most Σ rᵢ); it goes back to rank R once, at the end.

    R is `rank`, the smallest rank keeping `energy` of ‖F‖², or the largest input rank; the retained energy is
    recorded. `svd` says how the dense F of the base-aware form is truncated (`linalg.dense_svd`); the adapter-only
    F is factored and its SVD always exact. The fusion is order-dependent: with b = 1 the last adapter replaces the
    others.
    """
    _refuse_bias(group.factors, group.name)
    bias = params.bias
    deltas = _weighted_deltas(group)
    if group.base is not None:
        base = group.base.float()
        fused = torch.zeros_like(base)
        for B, A in deltas:
            fused = fuse_update_dense(base, fused, B @ A, bias=bias, chained=params.chained)
        generator = torch.Generator().manual_seed(0)  # rapf takes no seed: a randomized SVD (above 1024) draws from 0
        svd = dense_svd(fused, components=params.rank or group.max_rank, rule=params.rank_rule(), svd=params.svd,
                        generator=generator)
        return lowrank_result(svd, group, rule=params.rank_rule())
    fused_factors = deltas[0]
    for delta in deltas[1:]:
        fused_factors = fuse_update_factored(fused_factors, delta, bias=bias, chained=params.chained)
    return lowrank_result(factored_svd(*fused_factors), group, rule=params.rank_rule())


__all__ = [
    "completed_left_basis",
    "fuse_update_dense",
    "fuse_update_factored",
    "fusion_mask",
    "rapf",
    "rapf_fuse_weights",
]
