"""Frozen image features, computed once and cached on disk (docs/rapf.md).

Caching is exact for RAPF: the encoders are frozen, the preprocessing is deterministic (no augmentation), the
adapter acts after the encoder, and the class statistics and pseudo-features live in the same frozen feature space.
A cache entry is keyed by the encoder fingerprint (weights and preprocessing) and the split's content fingerprint,
so changing any of them computes new features. Entries live outside the repository, in
`$XDG_CACHE_HOME/lora-fusion/cil` (`~/.cache/lora-fusion/cil` by default). Extraction is split across Accelerate
processes and gathered in order.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .data import ImageSplit
from .encoders import FrozenEncoders


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/lora-fusion/cil` (`~/.cache/lora-fusion/cil` by default), like the project's other caches."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lora-fusion" / "cil"


# Part of every key: bump it when the stored features of an unchanged input would change (v2: rows of multi-process
# extraction kept in order).
CACHE_FORMAT = 2


def cache_key(encoders: FrozenEncoders, split: ImageSplit, *, precision: str = "no") -> str:
    """The entry name: a digest of the encoder fingerprint (weights + preprocessing), the split's content, the
    precision the features were computed in (`mixed_precision`) and the cache format."""
    identity = f"{encoders.fingerprint()}|{split.fingerprint}|{precision}|v{CACHE_FORMAT}"
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def extract_features(encoders: FrozenEncoders, split: ImageSplit, *, accelerator: Any, batch_size: int = 64,
                     desc: str = "features") -> torch.Tensor:
    """g(x) for every image of `split`, in order, as float32 on the CPU.

    Process r encodes the contiguous chunk [r·c, (r+1)·c) with c = ⌈n / N⌉, padded at its end to c rows (only the
    last chunks can be short), so gathering the chunks in process order and cutting to n keeps every row in place.
    (Accelerate's `split_between_processes(apply_padding=True)` gives the longer shares to the first processes and
    pads the short ones in the middle of the gathered order.) Runs under the accelerator's autocast, so
    `mixed_precision="fp16"`/`"bf16"` encodes in half precision as the official code does.
    """
    from tqdm.auto import tqdm

    count = len(split)
    chunk = -(-count // accelerator.num_processes)
    mine = list(range(accelerator.process_index * chunk, min(count, (accelerator.process_index + 1) * chunk)))
    encoders.to(accelerator.device)
    rows = []
    batches = range(0, len(mine), batch_size)
    for start in tqdm(batches, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        pixels = encoders.preprocessing(split.load(mine[start : start + batch_size]))
        with accelerator.autocast():
            rows.append(encoders.encode_images(pixels.to(accelerator.device)).float())
    local = torch.cat(rows) if rows else torch.empty(0, encoders.image_dim, device=accelerator.device)
    padding = local.new_zeros(chunk - local.shape[0], local.shape[1])
    return accelerator.gather(torch.cat([local, padding]).contiguous())[:count].cpu()


def cached_features(encoders: FrozenEncoders, split: ImageSplit, *, accelerator: Any, cache_dir: Path | None = None,
                    batch_size: int = 64, desc: str = "features") -> tuple[torch.Tensor, dict[str, Any]]:
    """The split's features from the cache, computing and storing them on a miss.

    Returns:
        (features N×d float32, info) with info = {"key", "hit", "seconds"}; `seconds` is the extraction time on a
        miss and the load time on a hit.
    """
    folder = cache_dir or default_cache_dir()
    key = cache_key(encoders, split, precision=str(accelerator.mixed_precision))
    path = folder / f"{key}.safetensors"
    start = time.perf_counter()
    if path.is_file():
        stored = load_file(path)
        if stored["features"].shape[0] == len(split) and torch.equal(stored["labels"], split.labels):
            return stored["features"].float(), {"key": key, "hit": True, "seconds": time.perf_counter() - start}
    features = extract_features(encoders, split, accelerator=accelerator, batch_size=batch_size, desc=desc)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        # A unique temporary name and one rename: a concurrent reader never sees half a file.
        staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.incomplete")
        try:
            save_file({"features": features.contiguous(), "labels": split.labels.contiguous()}, str(staging),
                      metadata={"encoder": encoders.fingerprint(), "split": split.fingerprint})
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return features, {"key": key, "hit": False, "seconds": time.perf_counter() - start}
