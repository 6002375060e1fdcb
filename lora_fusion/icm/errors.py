"""Errors of ICM-Fusion a user can act on; all are [`LoraFusionError`]s, so the CLI prints one line and exits 2."""

from __future__ import annotations

from lora_fusion.errors import LoraFusionError


class LayoutMismatchError(LoraFusionError, ValueError):
    """A LoRA whose modules, shapes or ranks differ from the layout the F-VAE was trained on."""


class UnknownSupportLabelError(LoraFusionError, ValueError):
    """A support example whose task or label the F-VAE's tasks do not have."""


class BaseModelMismatchError(LoraFusionError, ValueError):
    """An F-VAE checkpoint trained for another base model than the LoRAs to fuse."""


class FVAECheckpointError(LoraFusionError, FileNotFoundError):
    """A directory that is not an F-VAE checkpoint written by `lora-fusion icm train` (or is incomplete)."""


class SupportFileError(LoraFusionError, ValueError):
    """A support file that cannot be read as JSON lines of labelled examples."""


class TrainingDivergedError(LoraFusionError, FloatingPointError):
    """Meta-training produced a NaN or infinite loss; the message names the step and what to change."""
