"""Task worlds: a frozen base model, its tasks and a differentiable task loss of the base model carrying a LoRA.

ICM-Fusion needs, beyond the LoRA weights, three things from the model they adapt (docs/icm.md): the task loss
L_task(l; D) of the base model carrying a LoRA l on a few examples D (the inner loop, Eq. 8, and the fusion's
objective), the hidden state that defines an in-context task vector, and a way to read labelled support examples.
A [`TaskWorld`] provides them as functions of LoRA factors (module → (A, B) with ΔW = B·A), so gradients flow into
the factors without touching the base weights.

Two worlds ship: [`ToyMLPWorld`] (docs/icm.md: an MLP 16 → 64 → 5, for tests and quick studies) and
`lora_fusion.icm.minilm.MiniLMTopLayerWorld` (all-MiniLM-L6-v2 with the LoRA on its top layer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .errors import UnknownSupportLabelError
from .lora_io import Factors


@dataclass(frozen=True)
class Batch:
    """Labelled examples in the world's input form (`inputs`: named tensors with the examples on dim 0)."""

    inputs: Mapping[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor | slice) -> Batch:
        return Batch({k: v[index] for k, v in self.inputs.items()}, self.labels[index])

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device))


class TaskWorld(ABC):
    """A frozen base model with per-task outputs; every method takes LoRA factors and is differentiable in them."""

    kind: ClassVar[str]
    base_model: str
    task_classes: dict[str, tuple[str, ...]]

    @property
    @abstractmethod
    def condition_dim(self) -> int:
        """c, the length of an in-context task vector."""

    @abstractmethod
    def features(self, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The hidden state that defines task vectors, N×c (None: the base model without LoRA)."""

    @abstractmethod
    def logits(self, task: str, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Class scores of `task` for N inputs, N×classes."""

    @abstractmethod
    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> Mapping[str, torch.Tensor]:
        """Turn support records (`{"text": …}` or `{"x": […]}`) into the world's inputs."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able description from which [`restore`] rebuilds the world (with `tensors()`)."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The world's own weights that an F-VAE checkpoint must carry (heads, toy base weights)."""

    @classmethod
    @abstractmethod
    def restore(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> TaskWorld:
        """Rebuild a world saved with [`config`] and [`tensors`]."""

    def to(self, device: torch.device | str) -> TaskWorld:
        """Move the world's tensors to `device` (in place) and return it."""
        return self

    def loss(self, task: str, factors: Factors | None, batch: Batch) -> torch.Tensor:
        """L_task: mean cross-entropy of `task` on `batch` for the base model carrying `factors`."""
        return F.cross_entropy(self.logits(task, factors, batch.inputs), batch.labels)

    @torch.no_grad()
    def evaluate(self, task: str, factors: Factors | None, batch: Batch, chunk: int = 256) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of `task` on `batch`, in chunks of `chunk` examples."""
        total_loss, hits = 0.0, 0
        for start in range(0, len(batch), chunk):
            part = batch.take(slice(start, start + chunk))
            logits = self.logits(task, factors, part.inputs)
            total_loss += float(F.cross_entropy(logits, part.labels, reduction="sum"))
            hits += int((logits.argmax(-1) == part.labels).sum())
        return total_loss / len(batch), hits / len(batch)

    def support_batches(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Batch]:
        """Group support records `{"task": …, "label": class name or index, …}` by task into batches.

        Raises:
            UnknownSupportLabelError: a record names a task or a label the world does not have.
        """
        grouped: dict[str, list[Mapping[str, Any]]] = {}
        labels: dict[str, list[int]] = {}
        for number, record in enumerate(records, 1):
            task = record.get("task")
            if task not in self.task_classes:
                raise UnknownSupportLabelError(
                    f"support example {number}: unknown task {task!r}; the F-VAE knows {sorted(self.task_classes)}."
                )
            labels.setdefault(task, []).append(self._label_index(task, record.get("label"), number))
            grouped.setdefault(task, []).append(record)
        return {task: Batch(self.encode_records(rows), torch.tensor(labels[task])) for task, rows in grouped.items()}

    def _label_index(self, task: str, label: Any, number: int) -> int:
        classes = self.task_classes[task]
        if isinstance(label, str) and label in classes:
            return classes.index(label)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(classes):
            return label
        raise UnknownSupportLabelError(
            f"support example {number}: label {label!r} is not a class of task {task!r} ({', '.join(classes)})."
        )


def linear_with_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     factors: Factors | None, name: str) -> torch.Tensor:
    """x·(W + B·A)ᵀ + b, computed as x·Wᵀ + (x·Aᵀ)·Bᵀ + b: the LoRA path never forms the m×n update."""
    out = F.linear(x, weight, bias)
    if factors is not None and name in factors:
        a, b = factors[name]
        out = out + (x @ a.T) @ b.T
    return out


class ToyMLPWorld(TaskWorld):
    """docs/icm.md's toy base model: an MLP `fc1` d → h (GELU) → `fc2` h → classes, shared by all tasks.

    The LoRA adapts `fc1` and `fc2`; the task vector is the mean pre-logit activation (the GELU output).
    """

    kind = "toy_mlp"

    def __init__(self, fc1: torch.nn.Linear, fc2: torch.nn.Linear, tasks: Mapping[str, Sequence[str]],
                 base_model: str = "lora-fusion/toy-mlp") -> None:
        self.fc1, self.fc2 = fc1.requires_grad_(False), fc2.requires_grad_(False)
        self.task_classes = {task: tuple(classes) for task, classes in tasks.items()}
        self.base_model = base_model

    @property
    def condition_dim(self) -> int:
        return self.fc1.out_features

    def features(self, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.gelu(linear_with_lora(inputs["x"], self.fc1.weight, self.fc1.bias, factors, "fc1"))

    def logits(self, task: str, factors: Factors | None, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return linear_with_lora(self.features(factors, inputs), self.fc2.weight, self.fc2.bias, factors, "fc2")

    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> Mapping[str, torch.Tensor]:
        return {"x": torch.tensor([list(map(float, r["x"])) for r in records], dtype=torch.float32)}

    def module(self) -> torch.nn.Module:
        """The base model as an `nn.Module` (`fc1`, `fc2`), for `PeftModel.from_pretrained(world.module(), dir)`."""
        return _ToyMLP(self.fc1, self.fc2)

    def config(self) -> dict[str, Any]:
        tasks = {task: list(classes) for task, classes in self.task_classes.items()}
        return {"kind": self.kind, "base_model": self.base_model, "tasks": tasks}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{p}": getattr(getattr(self, name), p).detach().contiguous()
                for name in ("fc1", "fc2") for p in ("weight", "bias")}

    @classmethod
    def restore(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ToyMLPWorld:
        layers = []
        for name in ("fc1", "fc2"):
            weight = tensors[f"{name}.weight"]
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": tensors[f"{name}.bias"]})
            layers.append(layer)
        return cls(*layers, config["tasks"], base_model=config["base_model"])

    def to(self, device: torch.device | str) -> ToyMLPWorld:
        self.fc1.to(device)
        self.fc2.to(device)
        return self


class _ToyMLP(torch.nn.Module):
    def __init__(self, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


WORLD_KINDS: dict[str, str] = {"toy_mlp": "lora_fusion.icm.worlds:ToyMLPWorld",
                               "minilm_top": "lora_fusion.icm.minilm:MiniLMTopLayerWorld"}


def restore_world(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> TaskWorld:
    """Rebuild a saved world by its `kind` (imported on demand: the MiniLM world pulls in transformers)."""
    import importlib

    module, _, name = WORLD_KINDS[config["kind"]].partition(":")
    return getattr(importlib.import_module(module), name).restore(config, tensors)
