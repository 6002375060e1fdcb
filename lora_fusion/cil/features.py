"""A feature source for the class-incremental trainer: precomputed image features and text features, served through
the trainer's existing encoder and dataset hooks (`run_cil(recipe, encoders=..., dataset=...)`).

Each "image" of a [`feature_dataset`] is one stored feature row; [`PrecomputedFeatures`] is a [`FrozenEncoders`] whose
preprocessing stacks those rows and whose image encoder returns them unchanged, and whose text encoder looks each
prompt up in a table. The trainer then caches, trains, samples and evaluates exactly as it does for real encoders;
no trainer code path differs. Used by `experiments.rapf_alignment_sweep` (docs/rapf.md §6) for synthetic CLIP-like
spaces and for ConSE features computed once from real images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

from .data import ImageDataset, ImageSplit


def _tensor_digest(*tensors: torch.Tensor, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class StackRows:
    """The "preprocessing" of stored feature rows: stack them into a float32 batch (no resizing, no normalisation)."""

    def __call__(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([row.reshape(-1) for row in rows]).float()


class PrecomputedFeatures:
    """Frozen "encoders" over precomputed features: g(x) is the stored row itself, t(prompt) a table lookup.

    Args:
        text_features: prompt → text feature (all of one size, `text_dim`).
        image_dim: the size of the stored image rows.
        name: part of the fingerprint, so that two sources with the same text table but different image spaces do
            not share cache entries (the split's own fingerprint covers the rows themselves).
    """

    def __init__(self, text_features: Mapping[str, torch.Tensor], *, image_dim: int, name: str) -> None:
        if not text_features:
            raise ValueError("text_features is empty: give the feature of every prompt the trainer will ask for")
        self.text_features = {prompt: feature.float().reshape(-1) for prompt, feature in text_features.items()}
        sizes = {feature.numel() for feature in self.text_features.values()}
        if len(sizes) != 1:
            raise ValueError(f"text features have different sizes {sorted(sizes)}")
        self.text_dim = sizes.pop()
        self.image_dim = image_dim
        self.preprocessing = StackRows()
        prompts = sorted(self.text_features)
        self._fingerprint = _tensor_digest(*(self.text_features[p] for p in prompts),
                                           extra=f"precomputed|{name}|{image_dim}|" + "\n".join(prompts))

    def fingerprint(self) -> str:
        return self._fingerprint

    def to(self, device: torch.device) -> PrecomputedFeatures:
        return self

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.image_dim:
            raise ValueError(f"stored rows are {pixels.shape[-1]}-d, not {self.image_dim}")
        return pixels.float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self.text_features]
        if missing:
            raise KeyError(f"no stored text feature for {missing[0]!r} ({len(missing)} prompts missing)")
        return torch.stack([self.text_features[t] for t in texts])


def feature_dataset(name: str, class_names: Sequence[str], train: tuple[torch.Tensor, torch.Tensor],
                    test: tuple[torch.Tensor, torch.Tensor]) -> ImageDataset:
    """A dataset whose items are feature rows (N×d float) with integer labels, for [`PrecomputedFeatures`].

    Each split's fingerprint is a digest of its rows and labels, so the feature cache never mixes two sources.
    """
    splits = []
    for which, (rows, labels) in (("train", train), ("test", test)):
        if rows.dim() != 2 or rows.shape[0] != labels.numel():
            raise ValueError(f"{which}: expected N×d rows and N labels, got {tuple(rows.shape)} and {labels.numel()}")
        rows = rows.float().contiguous()
        splits.append(ImageSplit(labels.long(), pixels=rows,
                                 fingerprint=_tensor_digest(rows, labels.long(), extra=f"{name}|{which}")))
    return ImageDataset(name, list(class_names), splits[0], splits[1])


__all__ = ["PrecomputedFeatures", "StackRows", "feature_dataset"]
