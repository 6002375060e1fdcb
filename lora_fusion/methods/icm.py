"""ICM-Fusion as a merge method: `lora-fusion merge A B C --method icm --fvae DIR --support FILE`.

Unlike the other methods it needs every adapter at once, a trained F-VAE and labelled support examples, so it is a
method of the "adapters" kind; the F-VAE, its training and the latent fusion live in `lora_fusion.icm` (imported only
when the method runs, so the merge path of every other method stays free of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidParameterError
from ..params import SEED, SUPPORT, MethodParams, Param
from .base import register_method

if TYPE_CHECKING:
    from ..adapter import LoraAdapter

FVAE = Param(
    "ICM-Fusion: F-VAE directory from `lora-fusion icm train`.", "a path", lambda value: isinstance(value, str),
    path=True,
)


@dataclass(frozen=True)
class IcmParams(MethodParams):
    """The trained F-VAE and the support examples (both required), and the seed of the fitting."""

    fvae: str | None = FVAE.field()
    support: str | None = SUPPORT.field()
    seed: int = SEED.field()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("fvae", "support"):
            if getattr(self, name) is None:
                raise InvalidParameterError(name, None, expected=f"a path: icm needs --{name}")


@register_method(
    "icm",
    kind="adapters",
    output_rank="merged",
    summary="ICM-Fusion: encode each LoRA with an F-VAE, drop conflicting latent parts, fit weights on support data, decode.",
    formula="l_f = D([z_f; Σwᵢvᵢ]), z_f = (Σwᵢρᵢ)·normalize(Σwᵢuᵢ + δ), uᵢ conflict-projected; w, δ fitted on support",
    reference="Shao et al., ICM-Fusion, AAAI 2026 (arXiv:2508.04153); our interpretation, docs/icm.md",
    params=IcmParams,
)
def icm(adapters: Sequence[LoraAdapter], params: IcmParams) -> LoraAdapter:
    """ICM-Fusion (Shao et al., AAAI 2026, arXiv:2508.04153), as interpreted in docs/icm.md: each LoRA lᵢ is encoded
    with its task vector vᵢ to zᵢ = ρᵢ·uᵢ (norm and direction); pairwise conflicting directions (uᵢ·uⱼ < 0) are
    projected apart; w = softmax(a) and an offset δ are fitted on the union of the support sets with the decoder
    frozen; the fused LoRA is l_f = D([(Σwᵢρᵢ)·normalize(Σwᵢuᵢ + δ); Σwᵢvᵢ])."""
    from ..icm.api import icm_merge

    return icm_merge(adapters, fvae=params.fvae, support=params.support, seed=params.seed)
