"""Latent fusion of several LoRAs through a trained F-VAE (docs/icm.md, an interpretation of ICM-Fusion's
"learned manifold projection" and "optimal task-vector orientation", Shao et al., AAAI 2026, arXiv:2508.04153).

1. μᵢ = E([lᵢ; vᵢ]) (posterior mean) for each LoRA; split into a direction uᵢ = μᵢ/‖μᵢ‖ on the unit sphere and a
   norm ρᵢ = ‖μᵢ‖.
2. Conflict projection (PCGrad, Yu et al., NeurIPS 2020, arXiv:2001.06782): for each i, in a seeded random order,
   and each other j in a seeded random order, if uᵢ·uⱼ < 0 then uᵢ ← uᵢ − (uᵢ·uⱼ)·uⱼ (uⱼ the original direction);
   uᵢ is re-normalised at the end.
3. Orientation: w = softmax(a), z_f = (Σ wᵢρᵢ)·normalize(Σ wᵢuᵢ + δ), v_f = Σ wᵢvᵢ.
4. a (from 0, uniform) and δ (from 0, penalty λ_δ‖δ‖²) minimise Σ_t L_task(D([z_f; v_f]); S_t) over the union of
   the few-shot support sets S_t with the decoder frozen (Adam).
5. Optionally, Eq. 8 refinement steps on the decoded vector with the same union loss.
6. l_f = D([z_f; v_f]) is de-normalised (pooled statistics, or Σ wᵢ·statsᵢ under `per_checkpoint`).

Ablations (docs/icm.md): `conflict_projection=False`; `learn_weights=False` (uniform w, δ = 0, no search);
`condition_only=True` (z = 0 and v_f = (1/T)·Σ vᵢ: ICM-LoRA generation with an averaged condition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lora_fusion.errors import InvalidParameterError

from .lora_io import unflatten, weighted_stats
from .meta import TrainedFVAE
from .worlds import Batch


@dataclass(frozen=True)
class FusionConfig:
    """Options of latent fusion; the defaults are docs/icm.md's."""

    conflict_projection: bool = field(default=True, metadata={"help": "Remove pairwise conflicting latent parts."})
    learn_weights: bool = field(default=True, metadata={"help": "Learn w and δ on the support sets (else uniform)."})
    condition_only: bool = field(default=False, metadata={"help": "Decode z = 0 with the mean task vector."})
    steps: int = field(default=200, metadata={"help": "Adam steps on (a, δ)."})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate for (a, δ)."})
    offset_l2: float = field(default=1e-2, metadata={"help": "Penalty λ_δ on ‖δ‖²."})
    refine_steps: int = field(default=0, metadata={"help": "Eq. 8 steps on the decoded LoRA after fusion."})
    refine_lr: float = field(default=0.05, metadata={"help": "β of the refinement steps."})
    seed: int = field(default=0, metadata={"help": "Seeds the order of the conflict projection."})

    def __post_init__(self) -> None:
        for name in ("steps", "refine_steps"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(name, getattr(self, name), expected="an integer ≥ 0")
        for name in ("lr", "refine_lr", "offset_l2"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(name, getattr(self, name), expected="a number ≥ 0")


@dataclass
class FusionResult:
    """The fused LoRA (raw flat vector), the learned weights w, conflicts removed and the objective's history."""

    flat: torch.Tensor
    weights: list[float]
    conflicts: int
    losses: list[float]
    config: FusionConfig

    def summary(self) -> dict[str, Any]:
        return {"weights": [round(w, 4) for w in self.weights], "conflicts_projected": self.conflicts,
                "support_loss_start": self.losses[0] if self.losses else None,
                "support_loss_end": self.losses[-1] if self.losses else None, **asdict(self.config)}


def project_conflicts(directions: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """PCGrad on unit directions (T×k): remove from each uᵢ its component along every uⱼ with uᵢ·uⱼ < 0, in seeded
    random orders, then re-normalise. Returns the new directions and the number of projections made."""
    projected, count = directions.clone(), 0
    for i in torch.randperm(len(directions), generator=generator).tolist():
        for j in torch.randperm(len(directions), generator=generator).tolist():
            if j == i:
                continue
            dot = projected[i] @ directions[j]
            if dot < 0:
                projected[i] = projected[i] - dot * directions[j]
                count += 1
    return F.normalize(projected, dim=-1), count


@torch.no_grad()
def latent_sensitivity(trained: TrainedFVAE, raw_flats: Sequence[torch.Tensor], supports: Sequence[tuple[str, Batch]]
                       ) -> list[float]:
    """‖D([μᵢ; vᵢ]) − D([0; vᵢ])‖ / ‖D([μᵢ; vᵢ])‖ per LoRA: how much the decoder uses the latent beyond the condition.

    Near 0 means posterior collapse: the task vector alone determines the decoding, so latent fusion (directions,
    conflict projection, offset) can only act through the weighted condition Σ wᵢvᵢ.
    """
    out = []
    for flat, (_, batch) in zip(raw_flats, supports):
        normalised, condition, _ = trained.prepare(flat.float(), batch)
        mu, _ = trained.fvae.encode(normalised[None], condition[None])
        with_latent = trained.fvae.decode(mu, condition[None])
        without = trained.fvae.decode(torch.zeros_like(mu), condition[None])
        out.append(float((with_latent - without).norm() / with_latent.norm().clamp(min=1e-12)))
    return out


def union_loss(trained: TrainedFVAE, raw_flat: torch.Tensor, supports: Sequence[tuple[str, Batch]]) -> torch.Tensor:
    """Σ_t L_task(raw_flat; S_t): the summed task loss of one LoRA over every task's support set."""
    factors = unflatten(raw_flat, trained.layout)
    return sum((trained.world.loss(task, factors, batch) for task, batch in supports), torch.zeros(()))


def fuse(
    trained: TrainedFVAE,
    raw_flats: Sequence[torch.Tensor],
    supports: Sequence[tuple[str, Batch]],
    config: FusionConfig = FusionConfig(),
) -> FusionResult:
    """Fuse T LoRAs (raw flat vectors of the F-VAE's layout) into one, following the module docstring.

    Args:
        trained: the meta-trained F-VAE with its world and normaliser.
        raw_flats: the LoRAs to fuse, in the order of `supports`.
        supports: (task name, support batch) per LoRA: its task vector comes from it, and the union of all of them
            is the objective of the weight search and of the refinement.
        config: fusion options and ablations.

    Returns:
        A [`FusionResult`]; same inputs and `config.seed` give the same result.
    """
    fvae = trained.fvae.eval().requires_grad_(False)
    prepared = [trained.prepare(flat.float(), batch) for flat, (_, batch) in zip(raw_flats, supports)]
    normalised = torch.stack([p[0] for p in prepared])
    conditions = torch.stack([p[1] for p in prepared])
    stats = [p[2] for p in prepared]
    count = len(raw_flats)
    uniform = torch.full((count,), 1.0 / count)

    def decode_raw(z: torch.Tensor, condition: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        decoded = fvae.decode(z[None], condition[None])[0]
        return trained.normaliser.denormalise(decoded, weighted_stats(stats, weights))

    if config.condition_only:
        z = torch.zeros(fvae.config.latent_dim)
        flat = decode_raw(z, uniform @ conditions, uniform).detach()
        with torch.no_grad():
            loss = float(union_loss(trained, flat, supports))
        return FusionResult(flat, uniform.tolist(), 0, [loss], config)

    with torch.no_grad():
        mu, _ = fvae.encode(normalised, conditions)
    norms = mu.norm(dim=-1)
    directions = F.normalize(mu, dim=-1)
    conflicts = 0
    if config.conflict_projection:
        directions, conflicts = project_conflicts(directions, torch.Generator().manual_seed(config.seed))

    logits = torch.zeros(count, requires_grad=True)
    offset = torch.zeros(fvae.config.latent_dim, requires_grad=True)

    def fused_raw() -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(logits, 0)
        z = (weights @ norms) * F.normalize(weights @ directions + offset, dim=0)
        return decode_raw(z, weights @ conditions, weights), weights

    losses: list[float] = []
    steps = config.steps if config.learn_weights else 0
    optimizer = torch.optim.Adam([logits, offset], lr=config.lr)
    for _ in range(steps):
        raw, _ = fused_raw()
        loss = union_loss(trained, raw, supports) + config.offset_l2 * offset.pow(2).sum()
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        raw, weights = fused_raw()
    for _ in range(config.refine_steps):
        raw = raw.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(union_loss(trained, raw, supports), raw)
        # Eq. 8 acts in normalised units; the pooled/weighted std maps the step back to raw units.
        _, std = weighted_stats(stats, weights).expand(trained.layout)
        raw = raw - config.refine_lr * grad * std.pow(2)
    final = raw.detach()
    with torch.no_grad():
        losses.append(float(union_loss(trained, final, supports)))
    return FusionResult(final, weights.tolist(), conflicts, losses, config)
