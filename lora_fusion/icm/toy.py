"""docs/icm.md's toy world: an MLP base model, several conflicting classification domains, rank-4 LoRAs.

Inputs of domain k are x ~ N(m_k, I) with well-separated means m_k; labels are argmax(W_k·x) for a domain teacher
W_k. Teachers come in pairs with opposite perturbations around a shared matrix (W = S ± P), which puts the domains'
LoRAs in conflict in weight space. The base MLP d → h (GELU) → classes is pre-trained on a base domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .lora_io import LoraLayout, ModuleShape
from .worlds import Batch, ToyMLPWorld


@dataclass(frozen=True)
class ToyTask:
    """One domain: its name, the input mean and the teacher."""

    name: str
    mean: torch.Tensor
    teacher: torch.Tensor

    def sample(self, count: int, generator: torch.Generator) -> Batch:
        x = self.mean + torch.randn(count, self.mean.shape[0], generator=generator)
        return Batch({"x": x}, (x @ self.teacher.T).argmax(-1))


def make_toy_world(
    *, n_tasks: int = 6, dim: int = 16, hidden: int = 64, classes: int = 5, seed: int = 0, pretrain_steps: int = 200
) -> tuple[ToyMLPWorld, list[ToyTask]]:
    """The base MLP (pre-trained on a base domain) and `n_tasks` domains with paired, conflicting teachers."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(classes, dim, generator=generator)
    tasks = []
    for k in range(n_tasks):
        if k % 2 == 0:
            perturbation = 1.5 * torch.randn(classes, dim, generator=generator)
        teacher = shared + (perturbation if k % 2 == 0 else -perturbation)
        mean = 3.0 * F.normalize(torch.randn(dim, generator=generator), dim=0)
        tasks.append(ToyTask(f"domain{k}", mean, teacher))
    torch.manual_seed(seed)
    fc1, fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, classes)
    base_task = ToyTask("base", torch.zeros(dim), shared)
    optimizer = torch.optim.Adam([*fc1.parameters(), *fc2.parameters()], lr=1e-2)
    for _ in range(pretrain_steps):
        batch = base_task.sample(128, generator)
        loss = F.cross_entropy(fc2(F.gelu(fc1(batch.inputs["x"]))), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    names = [str(c) for c in range(classes)]
    world = ToyMLPWorld(fc1, fc2, {t.name: names for t in tasks}, base_model=f"lora-fusion/toy-mlp-seed{seed}")
    return world, tasks


def toy_layout(world: ToyMLPWorld, rank: int = 4) -> LoraLayout:
    """Rank-`rank` LoRAs on `fc1` and `fc2`: D = r·(d + h) + r·(h + classes) (596 for the defaults)."""
    return LoraLayout((
        ModuleShape("fc1", world.fc1.out_features, world.fc1.in_features, rank),
        ModuleShape("fc2", world.fc2.out_features, world.fc2.in_features, rank),
    ))
