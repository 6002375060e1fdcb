"""Errors of LoRAHub a user can act on; all are [`LoraFusionError`]s, so the CLI prints one line and exits 2."""

from __future__ import annotations

from lora_fusion.errors import LoraFusionError


class SupportDataError(LoraFusionError, ValueError):
    """A support file LoRAHub cannot fit on: missing, empty, not JSON lines, a line without the keys of its kind, a
    label the classification head does not know, or a text longer than the model's context (the line is named)."""
