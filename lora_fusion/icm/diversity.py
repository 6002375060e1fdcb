"""More diverse LoRAs per task for the F-VAE's training set (docs/icm.md, "A latent that matters"; ours).

ICM-Fusion's F-VAE sees the last checkpoints of one LoRA per task (`lora_fusion.icm.training`): within a task they
differ little, so the task vector alone predicts them and the latent collapses. [`train_diverse_loras`] adds, after
each task's LoRA and head are trained (heads stay frozen here):

* `seeds` LoRAs per task from other seeds (initialisation and batch order);
* `subsets` LoRAs per task, each on a seeded random `subset_fraction` of the task's training data;
* `multitask` LoRAs, each trained jointly on a seeded random set of 2 … T tasks (summed loss, a batch of each task
  per step), so that the F-VAE also sees multi-task LoRAs, the kind fusion asks it to produce;
* for every one of them `snapshots` checkpoints spread evenly over the whole trajectory (not only its end).

The same function with another `salt` trains held-out LoRAs for the task-identity probe (`lora_fusion.icm.gates`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lora_fusion.errors import InvalidParameterError

from .lora_io import LoraLayout
from .meta import TaskSnapshots
from .training import train_joint_lora
from .worlds import Batch, TaskWorld


@dataclass(frozen=True)
class DiversityConfig:
    """How many extra LoRAs of each kind join the F-VAE's training set (all 0: none, the default)."""

    seeds: int = field(default=0, metadata={"help": "Extra LoRAs per task from other seeds."})
    subsets: int = field(default=0, metadata={"help": "Extra LoRAs per task, each on a random data subset."})
    subset_fraction: float = field(default=0.5, metadata={"help": "Share of the task's data in each subset."})
    multitask: int = field(default=0, metadata={"help": "LoRAs trained jointly on random sets of ≥ 2 tasks."})
    snapshots: int = field(default=4, metadata={"help": "Checkpoints kept per extra LoRA, spread over its run."})
    batch_size: int = field(default=32, metadata={"help": "Examples per task and training step of each extra LoRA."})

    def __post_init__(self) -> None:
        for name in ("seeds", "subsets", "multitask"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(name, getattr(self, name), expected="an integer ≥ 0")
        for name in ("snapshots", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, getattr(self, name), expected="a positive integer")
        if not 0 < self.subset_fraction <= 1:
            raise InvalidParameterError("subset_fraction", self.subset_fraction, expected="a fraction in (0, 1]")

    @property
    def enabled(self) -> bool:
        return bool(self.seeds or self.subsets or self.multitask)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """One batch holding the examples of several (their inputs must have the same named tensors)."""
    keys = batches[0].inputs.keys()
    return Batch({k: torch.cat([b.inputs[k] for b in batches]) for k in keys}, torch.cat([b.labels for b in batches]))


def derived_seed(*parts: object) -> int:
    """A 31-bit seed from a description of what it seeds (stable across runs and Python versions)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def train_diverse_loras(
    world: TaskWorld,
    layout: LoraLayout,
    train: Mapping[str, Batch],
    support: Mapping[str, Batch],
    config: DiversityConfig,
    *,
    steps: int,
    lr: float,
    seed: int,
    salt: str = "diverse",
    log: Callable[[str], None] = print,
) -> list[TaskSnapshots]:
    """Train the extra LoRAs of `config` (module docstring) with the world's current, frozen heads.

    Args:
        world, layout: the base model with its task heads, and the LoRA layout.
        train, support: per task, its training data and its support set (in task order).
        config: how many LoRAs of each kind.
        steps, lr: each LoRA's training length and AdamW learning rate (the recipe's).
        seed, salt: every LoRA's seed derives from (seed, salt, kind, task(s), index); another salt gives other LoRAs.

    Returns:
        One [`TaskSnapshots`] per extra LoRA (its `snapshots` checkpoints); a multi-task LoRA is named
        "task+task…" and lists its tasks in `members`.
    """
    every = max(1, steps // config.snapshots)
    snapshots = min(config.snapshots, steps // every)
    out: list[TaskSnapshots] = []

    def run(kind: str, objective: list[tuple[str, Batch]], index: int) -> torch.Tensor:
        names = "+".join(task for task, _ in objective)
        _, snaps = train_joint_lora(world, objective, layout, steps=steps, lr=lr, batch_size=config.batch_size,
                                    snapshots=snapshots, snapshot_every=every, seed=derived_seed(seed, salt, kind, names, index))
        log(f"{salt} {kind} LoRA {index} on {names}: {len(snaps)} snapshots")
        return snaps

    for task, data in train.items():
        for index in range(config.seeds):
            out.append(TaskSnapshots(task, run("seed", [(task, data)], index), support[task]))
        for index in range(config.subsets):
            rng = random.Random(derived_seed(seed, salt, "subset-data", task, index))
            size = max(1, round(config.subset_fraction * len(data)))
            picked = data.take(torch.tensor(sorted(rng.sample(range(len(data)), size))))
            out.append(TaskSnapshots(task, run("subset", [(task, picked)], index), support[task]))
    tasks = list(train)
    for index in range(config.multitask if len(tasks) > 1 else 0):
        rng = random.Random(derived_seed(seed, salt, "multitask-tasks", index))
        chosen = sorted(rng.sample(range(len(tasks)), rng.randint(2, len(tasks))))
        members = tuple((tasks[i], support[tasks[i]]) for i in chosen)
        snaps = run("multitask", [(tasks[i], train[tasks[i]]) for i in chosen], index)
        out.append(TaskSnapshots("+".join(tasks[i] for i in chosen), snaps,
                                 concat_batches([b for _, b in members]), members))
    return out
