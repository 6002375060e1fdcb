"""Ordinary LoRA training in a [`TaskWorld`], keeping the last checkpoints: the F-VAE's training data.

ICM-LoRA trains each task's LoRA for 200 epochs and keeps one checkpoint per epoch over the second half
(`train_lora/train_lora_arg.py`); ICM-Fusion's Algorithm 1 takes "the LoRA from ordinary fine-tuning". Here a LoRA
(A ~ N(0, 1/n), B = 0, PEFT's default up to the init distribution) is trained with AdamW on the world's task loss,
and the last `snapshots` checkpoints, `snapshot_every` steps apart, are returned as raw flat vectors.
[`train_joint_lora`] trains one LoRA on the summed loss of one or more tasks: a single term is an ordinary task LoRA,
several make the multi-task LoRAs of `lora_fusion.icm.diversity`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lora_io import Factors, LoraLayout, flatten
from .worlds import Batch, TaskWorld


def train_joint_lora(
    world: TaskWorld,
    objective: Sequence[tuple[str, Batch]],
    layout: LoraLayout,
    *,
    steps: int,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    snapshots: int = 1,
    snapshot_every: int = 5,
    extra_parameters: Sequence[torch.nn.Parameter] = (),
) -> tuple[Factors, torch.Tensor]:
    """Train one LoRA on the summed loss of the (task, data) terms of `objective`, a batch of each per step (one term:
    the task's ordinary LoRA; several: a multi-task LoRA). Returns its final factors and its last `snapshots`
    checkpoints (M×D, oldest first). `extra_parameters` train jointly with the LoRA (a task head the world owns).
    Same seed, same result."""
    generator = torch.Generator().manual_seed(seed)
    factors: Factors = {}
    for module in layout.modules:
        a = torch.randn(module.rank, module.in_features, generator=generator) / module.in_features**0.5
        factors[module.name] = (a.requires_grad_(True), torch.zeros(module.out_features, module.rank,
                                                                    requires_grad=True))
    parameters = [t for pair in factors.values() for t in pair] + list(extra_parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    first_kept = steps - (snapshots - 1) * snapshot_every
    kept: list[torch.Tensor] = []
    for step in range(1, steps + 1):
        terms = []
        for task, data in objective:
            index = torch.randint(len(data), (min(batch_size, len(data)),), generator=generator)
            terms.append(world.loss(task, factors, data.take(index)))
        loss = sum(terms[1:], terms[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= first_kept and (step - first_kept) % snapshot_every == 0:
            kept.append(flatten({k: (a.detach(), b.detach()) for k, (a, b) in factors.items()}, layout).clone())
    final = {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in factors.items()}
    return final, torch.stack(kept)
