"""ICM-Fusion (Shao et al., AAAI 2026, arXiv:2508.04153) as interpreted in docs/icm.md: an F-VAE over flat LoRAs
conditioned on in-context task vectors, meta-trained with Algorithm 1, and latent fusion with conflict projection.

Names are imported on first use, so `import lora_fusion.icm` loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

_LAZY = {
    "icm_merge": "api",
    "read_support": "api",
    "FVAE": "fvae",
    "FVAEConfig": "fvae",
    "FusionConfig": "fusion",
    "fuse": "fusion",
    "MetaTrainConfig": "meta",
    "TaskSnapshots": "meta",
    "TrainedFVAE": "meta",
    "load_fvae": "meta",
    "meta_train": "meta",
    "LoraLayout": "lora_io",
    "Normaliser": "lora_io",
}

if TYPE_CHECKING:
    from .api import icm_merge, read_support
    from .fusion import FusionConfig, fuse
    from .fvae import FVAE, FVAEConfig
    from .lora_io import LoraLayout, Normaliser
    from .meta import MetaTrainConfig, TaskSnapshots, TrainedFVAE, load_fvae, meta_train

__all__ = sorted(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
