"""Sharded merges under `accelerate launch` (or torchrun): each process merges its own modules, all gather the result.

A merge is launched on N processes exactly like a single one (`accelerate launch -m lora_fusion_cli merge …`). When
the launcher's `WORLD_SIZE` is above 1, Accelerate's [`PartialState`] sets up the process group (gloo on CPU, NCCL on
GPUs) and the device of each process; every process then reads and merges only its share of the modules, and the
outputs are gathered so that each process holds the whole result. Modules are computed independently by the same
code on one thread each, so the result is the single-process result bit for bit on the same device and dtype. Only
the main process writes; a failure in any process while opening the sources or merging is raised in every process,
so none waits for the others and nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import LoraFusionError

T = TypeVar("T")


def world_size() -> int:
    """The number of processes the launcher started (1 outside `accelerate launch`/torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process writes results (rank 0, or the only process)."""
    return os.environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class Shard:
    """This process's place in a launched merge: its index, the process count, and its device."""

    index: int
    count: int
    device: Any

    def take(self, costs: Mapping[str, float]) -> list[str]:
        """This process's share of the modules, balanced by cost: the costliest module goes to the least loaded
        process, ties broken by name (the same deal in every process). Dealing every N-th module instead would give
        one process all the k_proj of a model whose modules repeat with a period of N."""
        loads = [0.0] * self.count
        mine = []
        for name in sorted(costs, key=lambda n: (-costs[n], n)):
            owner = min(range(self.count), key=lambda i: (loads[i], i))
            loads[owner] += costs[name]
            if owner == self.index:
                mine.append(name)
        return mine


def current_shard(device: str) -> Shard | None:
    """The shard of this process when launched on several processes, else None (Accelerate only imported then).

    `device` is the user's choice: "cpu" keeps every process on the CPU (gloo); "cuda"/"auto" give each process its
    own GPU when there is one.
    """
    if world_size() == 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return Shard(index=state.process_index, count=state.num_processes, device=state.device)


def gather_shards(shard: Shard, compute: Callable[[], T]) -> list[T]:
    """Run `compute` on every process and return every process's result, in process order, on every process.

    An exception in any process is raised in all of them: the one that failed re-raises its own; the others raise
    a [`LoraFusionError`] naming it, so the launcher sees every process stop and nobody writes a partial result.
    """
    import torch.distributed as dist

    try:
        outcome: tuple[str, Any] = ("ok", compute())
        failure: BaseException | None = None
    except Exception as err:  # propagated to the other processes below, then re-raised here
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        outcome, failure = ("error", f"{type(err).__name__}: {first_line}"), err
    gathered: list[Any] = [None] * shard.count
    dist.all_gather_object(gathered, outcome)
    if failure is not None:
        raise failure
    for index, (status, value) in enumerate(gathered):
        if status == "error":
            raise LoraFusionError(f"process {index} of the sharded merge failed ({value}).")
    return [value for _, value in gathered]


def finish() -> None:
    """Close this process's process group, if a launched merge opened one.

    A process that exits with its gloo group still open aborts ("terminate called without an active exception"),
    which the launcher reports as a failed run. No barrier: after the gather no process needs the others, so the
    main one writes (or fails) while the rest exit.
    """
    if world_size() == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
