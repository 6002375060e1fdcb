"""Gates of a latent that matters (docs/icm.md, "A latent that matters"; the definitions are ours).

* [`unit_latent_sensitivity`]: the relative change of the decoded (normalised) LoRA per unit change of the latent,
  at each LoRA's posterior mean μᵢ, averaged over `directions` seeded random unit vectors u:
  sᵢ = mean_u ‖D([μᵢ + u; vᵢ]) − D([μᵢ; vᵢ])‖ / ‖D([μᵢ; vᵢ])‖. The unit is one standard deviation of the prior
  N(0, I), the scale the KL term ties the latent to. A decoder that ignores z has s = 0 exactly. (The older
  `lora_fusion.icm.fusion.latent_sensitivity` compares D at μᵢ with D at 0, a change of ‖μᵢ‖ rather than of 1.)
* [`probe_accuracy`]: how well a linear map reads the task from μ: least squares from [μ; 1] onto one-hot task
  labels, fitted on the training LoRAs' μ and scored (arg-max) on held-out LoRAs' μ.

Gate thresholds (issue 17 §3): sensitivity ≥ 0.1 and probe accuracy ≥ 0.95.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import TrainedFVAE
from .worlds import Batch

SENSITIVITY_GATE = 0.1
PROBE_GATE = 0.95


@torch.no_grad()
def posterior_means(trained: TrainedFVAE, raw_flats: Sequence[torch.Tensor], supports: Sequence[Batch]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, v) of each raw flat LoRA with its support set (its task vector's examples): N×k and N×c."""
    prepared = [trained.prepare(flat.float(), batch) for flat, batch in zip(raw_flats, supports)]
    conditions = torch.stack([p[1] for p in prepared])
    mu, _ = trained.fvae.eval().encode(torch.stack([p[0] for p in prepared]), conditions)
    return mu, conditions


@torch.no_grad()
def unit_latent_sensitivity(trained: TrainedFVAE, raw_flats: Sequence[torch.Tensor], supports: Sequence[Batch],
                            *, directions: int = 8, seed: int = 0) -> list[float]:
    """sᵢ per LoRA (module docstring), with the same `directions` seeded unit vectors for every LoRA."""
    mu, conditions = posterior_means(trained, raw_flats, supports)
    generator = torch.Generator().manual_seed(seed)
    units = torch.nn.functional.normalize(torch.randn(directions, mu.shape[1], generator=generator), dim=-1)
    fvae = trained.fvae
    out = []
    for mean, condition in zip(mu, conditions):
        at_mean = fvae.decode(mean[None], condition[None])
        moved = fvae.decode(mean[None] + units, condition.expand(directions, -1))
        out.append(float(((moved - at_mean).norm(dim=-1) / at_mean.norm().clamp(min=1e-12)).mean()))
    return out


def probe_accuracy(train_mu: torch.Tensor, train_labels: Sequence[int], test_mu: torch.Tensor,
                   test_labels: Sequence[int], *, ridge: float = 1e-6) -> float:
    """Accuracy of the least-squares linear probe [μ; 1]·W ≈ onehot(label) fitted on the training μ (N×k) and
    applied to the test μ; `ridge` (relative to the mean diagonal of the Gram matrix) keeps a fit of fewer LoRAs
    than latent dimensions well posed."""
    classes = sorted(set(train_labels))

    def design(mu: torch.Tensor) -> torch.Tensor:
        return torch.cat([mu.double(), torch.ones(len(mu), 1, dtype=torch.float64)], dim=1)

    x = design(train_mu)
    targets = torch.zeros(len(train_labels), len(classes), dtype=torch.float64)
    targets[torch.arange(len(train_labels)), torch.tensor([classes.index(y) for y in train_labels])] = 1.0
    gram = x.T @ x
    gram = gram + ridge * float(gram.diagonal().mean()) * torch.eye(len(gram), dtype=torch.float64)
    weights = torch.linalg.solve(gram, x.T @ targets)
    predicted = (design(test_mu) @ weights).argmax(-1).tolist()
    return sum(classes[p] == y for p, y in zip(predicted, test_labels)) / len(test_labels)
