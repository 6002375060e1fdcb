"""The merge testbed: one LoRA and one head per real task on all-MiniLM-L6-v2, and a fast evaluator.

* Tasks: the WordNet gloss tasks and the fortune topic task (``catalog``), with fixed splits
  (split seed ``SPLIT_SEED`` whatever the training seed, so every seed is scored on the same texts).
* Training: ``train_or_load`` trains a task's LoRA (query/value, r = 8) and its linear head jointly
  with the demo's training loop (``textcls.fit``: AdamW, lr 1e-3 decayed linearly to 0,
  batch 32, at most 64 tokens), and caches both in a directory keyed by everything the weights
  depend on (task, seed, steps, hyper-parameters, the training texts).  Each task gets its own
  initialisation and data order, derived from the training seed and the task name, as
  independently trained LoRAs would.  Heads are kept per task and never merged.
* Evaluation: ``Evaluator`` adds a LoRA's dense update ΔW = scale·B·A (any ``LoraAdapter``:
  loaded from disk or returned in memory by ``lora_fusion.merge``) to the frozen base weights,
  embeds every task's texts once and applies each task's head; ``peft_difference`` checks that
  path against PEFT loading the same adapter from disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from lora_fusion import load_adapter
from lora_fusion.adapter import LoraAdapter
from lora_fusion.eval.catalog import DataDirs, get_task, load_split
from lora_fusion.eval.tasks import (
    MAX_TRAIN_PER_CLASS,
    SPLITS,
    TEST_PER_CLASS,
    VAL_PER_CLASS,
    Example,
)
from lora_fusion.eval.textcls import (
    BATCH_SIZE,
    LEARNING_RATE,
    LORA_TARGET_MODULES,
    MAX_SEQ_LEN,
    MINILM_HUB_ID,
    Head,
    accuracy,
    embed,
    fit,
    load_base,
    lora_config,
)

SPLIT_SEED = 0
STEPS = 200
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lora-fusion/testbed`` (``~/.cache/lora-fusion/testbed`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lora-fusion" / "testbed"


@dataclass(frozen=True)
class TaskData:
    """A task's class names and its three fixed splits."""

    name: str
    classes: tuple[str, ...]
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def split(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)


def load_task_data(name: str, *, dirs: DataDirs | None = None, seed: int = SPLIT_SEED) -> TaskData:
    """Read a task's data once and build its train/validation/test splits."""
    train, validation, test = (load_split(name, split, dirs=dirs, seed=seed) for split in SPLITS)
    return TaskData(name, get_task(name).classes, train, validation, test)


def task_seed(seed: int, task: str) -> int:
    """The seed of one task's LoRA/head initialisation, dropout and data order (31 bits)."""
    digest = hashlib.sha256(f"lora-fusion-testbed:{seed}:{task}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def training_recipe(data: TaskData, seed: int, *, steps: int) -> dict[str, Any]:
    """Everything a trained LoRA and head depend on; its hash names the cache entry."""
    config = lora_config()
    texts = json.dumps(data.train, ensure_ascii=False).encode()
    return {
        "cache_format": CACHE_FORMAT,
        "task": data.name,
        "classes": list(data.classes),
        "seed": seed,
        "task_seed": task_seed(seed, data.name),
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "optimizer": "AdamW (torch defaults), lr decayed linearly to 0",
        "lora": {
            "r": config.r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "target_modules": sorted(LORA_TARGET_MODULES),
        },
        "max_seq_len": MAX_SEQ_LEN,
        "base_model": MINILM_HUB_ID,
        "splits": {
            "seed": SPLIT_SEED,
            "test_per_class": TEST_PER_CLASS,
            "val_per_class": VAL_PER_CLASS,
            "max_train_per_class": MAX_TRAIN_PER_CLASS,
            "n_train": len(data.train),
            "train_sha256": hashlib.sha256(texts).hexdigest(),
        },
    }


def recipe_key(recipe: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Member:
    """One task's trained LoRA (opened with ``lora_fusion.load_adapter``) and head."""

    task: str
    seed: int
    directory: Path
    adapter: LoraAdapter
    head: Head
    meta: dict[str, Any]
    cached: bool


def train_or_load(
    data: TaskData,
    seed: int,
    *,
    steps: int = STEPS,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Member:
    """The task's LoRA and head for ``seed``: from the cache if present, else trained and cached.

    The entry is ``<cache_dir>/<task>/seed<seed>-<hash of the recipe>/`` with ``adapter/`` (PEFT
    ``save_pretrained``), ``head.safetensors`` and ``meta.json`` (the recipe, training time,
    versions).  It is written to a temporary directory first and renamed, so an interrupted run
    leaves no half entry.
    """
    recipe = training_recipe(data, seed, steps=steps)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / data.name / f"seed{seed}-{recipe_key(recipe)}"
    cached = (directory / "meta.json").is_file()
    if not cached:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".training-", dir=directory.parent))
        try:
            log(f"training {data.name} seed {seed} ({steps} steps) -> {directory}")
            meta = _train(data, recipe, staging)
            (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if directory.exists():  # a concurrent run finished first: keep its entry
                shutil.rmtree(staging)
            else:
                staging.rename(directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    meta = json.loads((directory / "meta.json").read_text())
    return Member(
        task=data.name,
        seed=seed,
        directory=directory,
        adapter=load_adapter(directory / "adapter"),
        head=Head.load(directory / "head.safetensors"),
        meta=meta,
        cached=cached,
    )


def _train(data: TaskData, recipe: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Train with the demo's loop, in the demo's order of seeding (``train_task`` of
    ``experiments/train_quickstart.py``)."""
    seed = recipe["task_seed"]
    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer, base = load_base()
    config = lora_config()
    model = get_peft_model(base, config)
    head = Head.new(data.name, data.classes, base.config.hidden_size)
    fit(model, tokenizer, head, data.train, steps=recipe["steps"], seed=seed)
    seconds = time.perf_counter() - started
    config.target_modules = sorted(LORA_TARGET_MODULES)  # reproducible adapter_config.json
    model.save_pretrained(str(out / "adapter"), save_embedding_layers=False)
    head.save(out / "head.safetensors")
    return {
        "recipe": dict(recipe),
        "train_seconds": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def adapter_digest(adapter: LoraAdapter) -> str:
    """A hash of an adapter's dense-update factors: equal digests, equal adapters."""
    sha = hashlib.sha256()
    for name in sorted(adapter.modules):
        factors = adapter.factors(name)
        sha.update(name.encode())
        sha.update(repr(factors.scale).encode())
        for tensor in (factors.A, factors.B):
            sha.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()


@contextlib.contextmanager
def lora_applied(model: nn.Module, adapter: LoraAdapter | None) -> Iterator[nn.Module]:
    """``model`` with ``W + ΔW`` (ΔW = scale·B·A, float32) in every ``nn.Linear`` that ``adapter``
    names; the original weight tensors are put back on exit.  ``None`` applies nothing."""
    originals: dict[str, torch.Tensor] = {}
    try:
        for name, spec in (adapter.modules.items() if adapter is not None else ()):
            module = model.get_submodule(name)
            if spec.kind != "linear" or not isinstance(module, nn.Linear):
                raise ValueError(f"module {name}: only LoRAs of nn.Linear layers are supported")
            factors = adapter.factors(name)
            if factors.bias is not None:
                raise ValueError(f"module {name}: LoRA biases (lora_bias) are not supported")
            if spec.shape != tuple(module.weight.shape):
                raise ValueError(f"module {name}: update {spec.shape} vs weight {tuple(module.weight.shape)}")
            originals[name] = module.weight.data
            module.weight.data = originals[name] + factors.delta().to(originals[name].dtype)
        yield model
    finally:
        for name, original in originals.items():
            model.get_submodule(name).weight.data = original


class Evaluator:
    """Scores LoRAs of MiniLM on the eval splits of several tasks, one embedding pass per adapter.

    ``accuracies(adapter, heads, split)`` embeds every task's texts of ``split`` with the base
    model plus ``adapter`` (``None``: the base model alone), then applies each task's head.
    Results are memoised by (split, tasks, adapter digest, heads), so a merge that equals another
    (e.g. ``linear`` and ``task_arithmetic`` at λ = 1) is embedded once.
    """

    def __init__(self, data: Sequence[TaskData], splits: Sequence[str] = ("validation", "test")):
        self.tokenizer, self.model = load_base()
        self.model.eval()
        self.tasks = [d.name for d in data]
        self.sets = {split: {d.name: d.split(split) for d in data} for split in splits}
        self._memo: dict[tuple[Any, ...], dict[str, float]] = {}
        self.passes = 0
        self.seconds = 0.0

    def applied(self, adapter: LoraAdapter | None) -> contextlib.AbstractContextManager[nn.Module]:
        """The base model with ``adapter`` applied (``lora_applied``); restored on exit."""
        return lora_applied(self.model, adapter)

    def texts(self, split: str, tasks: Sequence[str]) -> list[str]:
        return [text for task in tasks for text, _ in self.sets[split][task]]

    def accuracies(
        self,
        adapter: LoraAdapter | None,
        heads: Mapping[str, Head],
        split: str,
        tasks: Sequence[str] | None = None,
        *,
        autocast: torch.dtype | None = None,
    ) -> dict[str, float]:
        """Accuracy per task (all tasks by default) of the base model plus ``adapter``.

        ``autocast=torch.bfloat16`` runs the encoder under CPU autocast (about 2.9 times faster on
        a CPU with AVX512-BF16; embeddings within 1.3 % relative of float32): for searches only.
        """
        tasks = list(tasks or self.tasks)
        digest = adapter_digest(adapter) if adapter is not None else "base"
        key = (split, tuple(tasks), digest, tuple(id(heads[task]) for task in tasks), autocast)
        if key not in self._memo:
            started = time.perf_counter()
            precision = (
                torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
            )
            with self.applied(adapter) as model, precision:
                embeddings = embed(model, self.tokenizer, self.texts(split, tasks)).float()
            scores, start = {}, 0
            for task in tasks:
                labels = [label for _, label in self.sets[split][task]]
                scores[task] = accuracy(heads[task], embeddings[start : start + len(labels)], labels)
                start += len(labels)
            self._memo[key] = scores
            self.passes += 1
            self.seconds += time.perf_counter() - started
        return dict(self._memo[key])

    def peft_difference(self, adapter: LoraAdapter, texts: Sequence[str]) -> float:
        """Largest |difference| between the embeddings of ``texts`` computed here and with PEFT
        loading ``adapter`` from a saved directory (``adapter.save_pretrained``)."""
        with self.applied(adapter) as model:
            ours = embed(model, self.tokenizer, texts)
        with tempfile.TemporaryDirectory(prefix="lora-fusion-check-") as tmp:
            folder = Path(tmp) / "adapter"
            adapter.save_pretrained(folder)
            peft_model = PeftModel.from_pretrained(self.model, str(folder))
            try:
                theirs = embed(peft_model, self.tokenizer, texts)
            finally:
                self.model = peft_model.unload()
        return float((ours - theirs).abs().max())
