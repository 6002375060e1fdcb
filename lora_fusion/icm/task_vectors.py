"""Task vectors: what conditions the F-VAE on a task (docs/icm.md).

* ``in_context`` (default): v = mean over k support examples of the hidden state of the base model carrying the
  task's LoRA, with no gradients; ICM-LoRA's `ICL/last_time_step_icl.py` does this with the last decoder state.
  Which hidden state is the world's choice ([`TaskWorld.features`]): mean-pooled last layer for MiniLM, the
  pre-logit activation for the toy MLP.
* ``base``: the same mean with the base model alone (ablation e.6.5): the vector then describes the task's data only.
* ``weight_delta``: the Ilharco-style reading, v built from the LoRA weights themselves (ablation e.6.6). A D-long
  condition would double the F-VAE's input, so v = P·l/√D with a fixed seeded Gaussian P ∈ R^{c×D}, a
  Johnson–Lindenstrauss projection of the normalised flat LoRA to the same length c as the other modes.
"""

from __future__ import annotations

from typing import Literal

import torch

from .lora_io import Factors
from .worlds import Batch, TaskWorld

TaskVectorMode = Literal["in_context", "base", "weight_delta"]
TASK_VECTOR_MODES: tuple[str, ...] = ("in_context", "base", "weight_delta")
PROJECTION_SEED = 20250806  # fixed: the projection is part of the F-VAE's definition, saved with it by its seed


@torch.no_grad()
def in_context_task_vector(world: TaskWorld, factors: Factors | None, support: Batch) -> torch.Tensor:
    """v = (1/k)·Σⱼ h(xⱼ) over the k support inputs, h the world's hidden state with `factors` applied."""
    return world.features(factors, support.inputs).float().mean(0)


def weight_delta_projection(numel: int, condition_dim: int, *, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """The fixed c×D Gaussian projection of the `weight_delta` mode, entries N(0, 1/D)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(condition_dim, numel, generator=generator) / numel**0.5


def task_vector(
    mode: TaskVectorMode,
    world: TaskWorld,
    *,
    factors: Factors,
    normalised_flat: torch.Tensor,
    support: Batch,
    projection: torch.Tensor | None = None,
) -> torch.Tensor:
    """The task vector of one LoRA under `mode` (see the module docstring); `projection` is needed for
    `weight_delta` ([`weight_delta_projection`])."""
    if mode == "in_context":
        return in_context_task_vector(world, factors, support)
    if mode == "base":
        return in_context_task_vector(world, None, support)
    if mode == "weight_delta":
        if projection is None:
            raise ValueError("weight_delta task vectors need the F-VAE's projection matrix")
        return (projection.to(normalised_flat) @ normalised_flat.detach()).float()
    raise ValueError(f"unknown task-vector mode {mode!r}; expected one of {TASK_VECTOR_MODES}")
