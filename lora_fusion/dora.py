"""DoRA modules as updates: with the base weight W₀, a DoRA module's factors and magnitude vector give its ΔW.

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353) rescales each output
row of W₀ + s·B·A to the trained magnitude μ, so its update is

    ΔW = diag(μ ⊘ ‖W₀ + s·B·A‖_row)·(W₀ + s·B·A) − W₀,

with the norm over each row's inputs (PEFT's `get_weight_norm`; a convolution's kernel is part of its row in the
canonical m×n form). It depends on W₀ and is generally full-rank, so it cannot be summed in factored form: a merge
forms it per module and hands it to the method as any other update (METHODS.md a.6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import torch
from .adapter import ModuleFactors

if TYPE_CHECKING:
    import torch  # noqa: F811


def dora_delta(base: torch.Tensor, factors: ModuleFactors) -> torch.Tensor:
    """ΔW = diag(μ ⊘ ‖W₀ + s·B·A‖_row)·(W₀ + s·B·A) − W₀ of one DoRA module (float32, canonical m×n; the arithmetic
    in float64, since ΔW is the small difference of two matrices the size of W₀)."""
    assert factors.magnitude is not None, "not a DoRA module"
    adapted = base.double() + factors.scale * (factors.B.double() @ factors.A.double())
    rescale = factors.magnitude.double() / torch.linalg.vector_norm(adapted, dim=1)
    return (rescale.unsqueeze(1) * adapted - base.double()).float()


def dora_factors(base: torch.Tensor, factors: ModuleFactors) -> ModuleFactors:
    """A DoRA module's update as exact factors B·A with scale 1: (I_m, ΔW) or (ΔW, I_n), whichever identity is
    smaller, so every method reads it as it reads a LoRA; `source_rank` keeps the adapter's own rank, and `update`
    the ΔW itself for the methods that work on dense updates (a product with the identity would cost m·m·n)."""
    delta = dora_delta(base, factors)
    m, n = delta.shape
    eye = torch.eye(min(m, n), dtype=delta.dtype, device=delta.device)
    B, A = (eye, delta) if m <= n else (delta, eye)
    return ModuleFactors(A=A, B=B, scale=1.0, source_rank=factors.rank, update=delta)
