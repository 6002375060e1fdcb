"""The real-model ICM-Fusion pipeline behind `lora-fusion icm train` and the evidence script.

For each task of the merge testbed (WordNet glosses and fortune topics, `lora_fusion.eval.catalog`): encode its texts
up to MiniLM's top layer (cached), train a top-layer LoRA and a head keeping the last checkpoints, draw a k-shot
support set, and meta-train an F-VAE on all tasks' checkpoints (Algorithm 1). `train_minilm_fvae` writes the F-VAE
directory, each task's final LoRA as a PEFT adapter and the support set as JSONL, so that
`lora-fusion merge …/adapters/* --method icm --fvae …/fvae --support …/support.jsonl` runs as is.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_fusion.distributed import is_main_process
from lora_fusion.errors import InvalidParameterError, RecipeError
from lora_fusion.recipe import read_recipe_file, recipe_path

from .diversity import DiversityConfig, train_diverse_loras
from .lora_io import LoraLayout, to_adapter
from .meta import MetaTrainConfig, TaskSnapshots, TrainedFVAE, meta_train
from .minilm import MiniLMTopLayerWorld, batch_of, cached_texts
from .training import train_joint_lora
from .worlds import Batch


@dataclass(frozen=True)
class ICMRecipe:
    """One ICM-Fusion setting on the MiniLM testbed; `train_per_task` and `snapshots` may be uneven (long-tailed)."""

    tasks: tuple[str, ...] = ("noun_supersense", "verb_supersense", "part_of_speech", "fortune_topic")
    train_per_task: tuple[int, ...] = (400, 400, 400, 400)
    snapshots: tuple[int, ...] = (8, 8, 8, 8)
    support_k: int = 10
    test_per_task: int = 200
    rank: int = 8
    lora_steps: int = 150
    lora_lr: float = 3e-3
    snapshot_every: int = 5
    max_seq_len: int = 32
    seed: int = 0
    meta: MetaTrainConfig = field(default_factory=lambda: MetaTrainConfig(steps=300, log_every=50))
    # extra LoRAs per task in the F-VAE's training set (`lora_fusion.icm.diversity`); none by default
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    # data source ("wordnet", "fortunes") -> its directory (`lora_fusion.eval.catalog.DataDirs`; in a recipe file a
    # relative path is taken from the recipe's folder); a source left out is read where its Debian package installs
    # it. Tests point `wordnet` at tests/data/wordnet-sample so that they need no system package.
    data_dirs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train_per_task", "snapshots"):
            if len(getattr(self, name)) != len(self.tasks):
                raise InvalidParameterError(name, getattr(self, name), expected=f"{len(self.tasks)} values (per task)")
        if max(self.snapshots) < 1 or (max(self.snapshots) - 1) * self.snapshot_every >= self.lora_steps:
            raise InvalidParameterError("snapshots", self.snapshots,
                                        expected=f"1 … {(self.lora_steps - 1) // self.snapshot_every + 1} checkpoints "
                                                 f"({self.lora_steps} steps, one every {self.snapshot_every})")
        if self.support_k < 1:
            raise InvalidParameterError("support_k", self.support_k, expected="k ≥ 1")
        from lora_fusion.eval.catalog import SOURCES

        unknown_sources = sorted(set(self.data_dirs) - set(SOURCES))
        if unknown_sources:
            raise RecipeError(f"unknown data_dirs sources {unknown_sources}; known: {sorted(SOURCES)}.")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ICMRecipe:
        """Build from a YAML mapping; `meta:` holds [`MetaTrainConfig`] fields. Unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise RecipeError(f"unknown ICM recipe keys {unknown}; known: {sorted(known)}.")
        data = dict(values)
        diversity_values = data.pop("diversity", {}) or {}
        diversity_unknown = sorted(set(diversity_values) - set(DiversityConfig.__dataclass_fields__))
        if diversity_unknown:
            known_diversity = sorted(DiversityConfig.__dataclass_fields__)
            raise RecipeError(f"unknown diversity keys {diversity_unknown}; known: {known_diversity}.")
        meta_values = data.pop("meta", {}) or {}
        meta_unknown = sorted(set(meta_values) - set(MetaTrainConfig.__dataclass_fields__))
        if meta_unknown:
            known_meta = sorted(MetaTrainConfig.__dataclass_fields__)
            raise RecipeError(f"unknown meta-training keys {meta_unknown}; known: {known_meta}.")
        for name in ("tasks", "train_per_task", "snapshots"):
            if name in data:
                data[name] = tuple(data[name])
        if "data_dirs" in data:
            data["data_dirs"] = data["data_dirs"] or {}
            if not isinstance(data["data_dirs"], Mapping):
                raise RecipeError(f"data_dirs must map a data source to its directory, got {data['data_dirs']!r}.")
            # a source given no directory (`wordnet:` or null) keeps its default
            data["data_dirs"] = {str(source): str(path) for source, path in data["data_dirs"].items() if path}
        return cls(**data, meta=MetaTrainConfig(**{"steps": 300, **meta_values}),
                   diversity=DiversityConfig(**diversity_values))

    @classmethod
    def from_file(cls, path: str | Path, *, seed: int | None = None, steps: int | None = None) -> ICMRecipe:
        """Read a YAML recipe (`lora_fusion.recipe.read_recipe_file`, the reader of every recipe kind); relative
        `data_dirs` resolve against the recipe's folder; `seed` and `steps` (meta-training) override its values."""
        values = read_recipe_file(path)
        if seed is not None:
            values["seed"] = seed
        if steps is not None:
            values["meta"] = {**(values.get("meta") or {}), "steps": steps}
        dirs = values.get("data_dirs")
        if isinstance(dirs, Mapping):
            values["data_dirs"] = {source: recipe_path(str(folder), path) if folder else folder
                                   for source, folder in dirs.items()}
        return cls.from_mapping(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaskSplit:
    """One task's encoded examples: training data, support set and test set (with their texts for the JSONL)."""

    task: str
    classes: tuple[str, ...]
    train: Batch
    support: Batch
    support_rows: list[tuple[str, int]]
    test: Batch


def load_splits(world: MiniLMTopLayerWorld, recipe: ICMRecipe, *, log: Callable[[str], None] = print
                ) -> list[TaskSplit]:
    """Each task's first `train_per_task` training examples (fixed testbed splits, shuffled with the recipe's seed),
    a k-shot support set drawn from them, and `test_per_task` test examples (the same for every seed)."""
    from lora_fusion.eval.catalog import DataDirs
    from lora_fusion.eval.testbed import load_task_data

    splits = []
    for task, n_train in zip(recipe.tasks, recipe.train_per_task):
        data = load_task_data(task, dirs=DataDirs(recipe.data_dirs))
        rng = random.Random(f"icm:{recipe.seed}:{task}")
        train = list(data.train)
        rng.shuffle(train)
        train = train[:n_train]
        support_rows = rng.sample(train, min(recipe.support_k, len(train)))
        test = data.test[: recipe.test_per_task] if recipe.test_per_task >= len(data.test) else \
            random.Random(f"icm-test:{task}").sample(data.test, recipe.test_per_task)
        encoded = {}
        for name, rows in (("train", train), ("test", test)):
            encoded[name] = batch_of(cached_texts(world, [t for t, _ in rows], log=log), [y for _, y in rows])
        index = {text: i for i, (text, _) in enumerate(train)}
        support = encoded["train"].take(torch.tensor([index[t] for t, _ in support_rows]))
        splits.append(TaskSplit(task, data.classes, encoded["train"], support, support_rows, encoded["test"]))
    return splits


def train_task_loras(world: MiniLMTopLayerWorld, layout: LoraLayout, splits: Sequence[TaskSplit], recipe: ICMRecipe,
                     *, log: Callable[[str], None] = print) -> list[tuple[dict, torch.Tensor]]:
    """Train each task's LoRA and head (the head in place in `world`); returns (final factors, snapshots M×D)."""
    from lora_fusion.eval.testbed import task_seed

    results = []
    for split, count in zip(splits, recipe.snapshots):
        seed = task_seed(recipe.seed, split.task)
        torch.manual_seed(seed)
        head = world.heads[split.task].requires_grad_(True)
        factors, snaps = train_joint_lora(world, [(split.task, split.train)], layout, steps=recipe.lora_steps,
                                          seed=seed, lr=recipe.lora_lr, snapshots=count,
                                          snapshot_every=recipe.snapshot_every, extra_parameters=list(head.parameters()))
        head.requires_grad_(False)
        loss, acc = world.evaluate(split.task, factors, split.test)
        log(f"{split.task}: LoRA trained on {len(split.train)} examples, {len(snaps)} snapshots; test CE {loss:.3f} "
            f"acc {acc:.3f}")
        results.append((factors, snaps))
    return results


def train_minilm_fvae(recipe: ICMRecipe, out: str | Path, *, log: Callable[[str], None] = print) -> TrainedFVAE:
    """Run the whole pipeline for one recipe and write `out/fvae/`, `out/adapters/<task>/` and `out/support.jsonl`
    (replacing earlier ones); meta-training checkpoints go to `out/checkpoints/` and a rerun resumes from them."""
    out = Path(out)
    world = MiniLMTopLayerWorld.load({t: _classes(t) for t in recipe.tasks}, max_seq_len=recipe.max_seq_len,
                                     seed=recipe.seed)
    layout = world.layout(recipe.rank)
    splits = load_splits(world, recipe, log=log)
    loras = train_task_loras(world, layout, splits, recipe, log=log)
    data = [TaskSnapshots(s.task, snaps, s.support) for s, (_, snaps) in zip(splits, loras)]
    if recipe.diversity.enabled:
        data += train_diverse_loras(world, layout, {s.task: s.train for s in splits},
                                    {s.task: s.support for s in splits}, recipe.diversity, steps=recipe.lora_steps,
                                    lr=recipe.lora_lr, seed=recipe.seed, log=log)
    trained = meta_train(world, layout, data, recipe.meta, checkpoint_dir=out / "checkpoints", log=log)
    if not is_main_process():
        return trained  # under `accelerate launch` every process holds the same result; the main one writes it
    trained.save(out / "fvae")
    for split, (factors, snaps) in zip(splits, loras):
        adapter = to_adapter(snaps[-1], layout, base_model=world.base_model,
                             provenance={"method": "icm-train", "params": {"task": split.task, "seed": recipe.seed}})
        adapter.save_pretrained(out / "adapters" / split.task, overwrite=True)
    with (out / "support.jsonl").open("w", encoding="utf-8") as file:
        for split in splits:
            for text, label in split.support_rows:
                file.write(json.dumps({"task": split.task, "text": text, "label": split.classes[label]},
                                      ensure_ascii=False) + "\n")
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=list) + "\n")
    return trained


def _classes(task: str) -> tuple[str, ...]:
    from lora_fusion.eval.catalog import get_task

    return tuple(get_task(task).classes)
