"""ICM-Fusion on the real testbed model: all-MiniLM-L6-v2 with the LoRA on the query/value projections of its top layer.

Every ICM-Fusion inner step needs a forward and backward pass of the model carrying the decoded LoRA. With the LoRA
on the top layer only, the lower layers are frozen and unaffected, so the hidden states entering the top layer are
computed once per text and cached: the task loss then costs one BERT layer instead of six, and is *exact*
(docs/icm.md, "Real testbed"; `check_cache_exact` verifies it against the full model). The task vector is the
mean-pooled last hidden state (docs/icm.md for an encoder) over the support examples; each task has its own
linear head trained jointly with its LoRA, as in the merge testbed (`lora_fusion.eval.testbed`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_fusion.eval.textcls import MINILM_HUB_ID, load_base, quiet

from .lora_io import Factors, LoraLayout, ModuleShape
from .worlds import Batch, TaskWorld

TOP_LAYER = 5
MAX_SEQ_LEN = 32
TARGETS = ("query", "value")


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/lora-fusion/icm` (`~/.cache/lora-fusion/icm` by default): features, snapshots, F-VAEs."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lora-fusion" / "icm"


class MiniLMTopLayerWorld(TaskWorld):
    """MiniLM whose top layer carries the LoRA; inputs are the cached hidden states entering that layer."""

    kind = "minilm_top"

    def __init__(self, tokenizer: Any, model: nn.Module, heads: Mapping[str, nn.Linear],
                 task_classes: Mapping[str, Sequence[str]], *, layer: int = TOP_LAYER,
                 max_seq_len: int = MAX_SEQ_LEN) -> None:
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.layer_index, self.max_seq_len = layer, max_seq_len
        self.layer = model.encoder.layer[layer]
        self.heads = {task: head.requires_grad_(False) for task, head in heads.items()}  # trained explicitly only
        self.task_classes = {task: tuple(classes) for task, classes in task_classes.items()}
        self.base_model = MINILM_HUB_ID

    @classmethod
    def load(cls, task_classes: Mapping[str, Sequence[str]], *, layer: int = TOP_LAYER,
             max_seq_len: int = MAX_SEQ_LEN, seed: int = 0) -> MiniLMTopLayerWorld:
        """The packaged MiniLM with fresh heads (seeded) for `task_classes`."""
        quiet()
        tokenizer, model = load_base()
        generator = torch.Generator().manual_seed(seed)
        heads = {}
        for task, classes in task_classes.items():
            head = nn.Linear(model.config.hidden_size, len(classes))
            bound = model.config.hidden_size**-0.5  # nn.Linear's default init, drawn from our generator
            with torch.no_grad():
                head.weight.uniform_(-bound, bound, generator=generator)
                head.bias.uniform_(-bound, bound, generator=generator)
            heads[task] = head
        return cls(tokenizer, model, heads, task_classes, layer=layer, max_seq_len=max_seq_len)

    def layout(self, rank: int = 8) -> LoraLayout:
        """Rank-`rank` LoRAs on the top layer's query and value (D = 2·r·(384 + 384) = 12,288 for r = 8)."""
        size = self.model.config.hidden_size
        return LoraLayout(tuple(ModuleShape(self._module_name(t), size, size, rank) for t in TARGETS))

    def _module_name(self, target: str) -> str:
        return f"encoder.layer.{self.layer_index}.attention.self.{target}"

    @property
    def condition_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def features(self, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["mask"]
        length = max(int(mask.sum(1).max()), 1)  # padding beyond the longest text changes nothing: trim it
        hidden, mask = inputs["hidden"][:, :length], mask[:, :length].to(inputs["hidden"].dtype)
        overrides = {}
        for target in TARGETS:
            name = self._module_name(target)
            if factors is not None and name in factors:
                a, b = factors[name]
                weight = getattr(self.layer.attention.self, target).weight
                overrides[f"attention.self.{target}.weight"] = weight + b @ a
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(hidden.dtype).min
        out = torch.func.functional_call(self.layer, overrides, (hidden, additive))
        out = out[0] if isinstance(out, tuple) else out
        weights = mask.unsqueeze(-1)
        return (out * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def logits(self, task: str, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.heads[task](self.features(factors, inputs))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """The hidden states entering the LoRA layer, padded to `max_seq_len`, and the attention masks."""
        hidden, masks = [], []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding="max_length", truncation=True,
                                   max_length=self.max_seq_len, return_tensors="pt")
            states = self.model(**batch, output_hidden_states=True).hidden_states
            hidden.append(states[self.layer_index])
            masks.append(batch["attention_mask"])
        return {"hidden": torch.cat(hidden), "mask": torch.cat(masks)}

    @torch.no_grad()
    def check_cache_exact(self, texts: Sequence[str]) -> float:
        """max |full model's pooled embedding − this world's| for `texts` without LoRA: the cache's exactness."""
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_seq_len,
                               return_tensors="pt")
        output = self.model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).float()
        full = (output * weights).sum(1) / weights.sum(1)
        return float((full - self.features(None, self.encode_texts(texts))).abs().max())

    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> Mapping[str, torch.Tensor]:
        return self.encode_texts([str(r.get("text", "")) for r in records])

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_model": self.base_model, "layer": self.layer_index,
                "max_seq_len": self.max_seq_len, "tasks": {k: list(v) for k, v in self.task_classes.items()}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"head.{task}.{p}": getattr(head, p).detach().contiguous()
                for task, head in self.heads.items() for p in ("weight", "bias")}

    @classmethod
    def restore(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> MiniLMTopLayerWorld:
        quiet()
        tokenizer, model = load_base()
        heads = {}
        for task in config["tasks"]:
            weight = tensors[f"head.{task}.weight"]
            head = nn.Linear(weight.shape[1], weight.shape[0])
            head.load_state_dict({"weight": weight, "bias": tensors[f"head.{task}.bias"]})
            heads[task] = head
        return cls(tokenizer, model, heads, config["tasks"], layer=config["layer"], max_seq_len=config["max_seq_len"])

    def to(self, device: torch.device | str) -> MiniLMTopLayerWorld:
        self.model.to(device)
        for head in self.heads.values():
            head.to(device)
        return self


def cached_texts(world: MiniLMTopLayerWorld, texts: Sequence[str], *, cache_dir: Path | None = None,
                 log: Any = print) -> dict[str, torch.Tensor]:
    """`world.encode_texts(texts)`, cached on disk under a hash of the texts, layer and length."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([world.layer_index, world.max_seq_len, list(texts)]).encode()).hexdigest()[:16]
    path = (cache_dir or default_cache_dir()) / "features" / f"layer{world.layer_index}-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    log(f"encoding {len(texts)} texts up to layer {world.layer_index} -> {path}")
    tensors = world.encode_texts(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return tensors


def batch_of(inputs: Mapping[str, torch.Tensor], labels: Sequence[int]) -> Batch:
    return Batch(dict(inputs), torch.tensor(list(labels)))
