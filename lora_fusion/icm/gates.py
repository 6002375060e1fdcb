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


def probe_accuracy(train_mu: torch.Tensor, train_labels: Sequence[int | str], test_mu: torch.Tensor,
                   test_labels: Sequence[int | str], *, ridge: float = 1e-6) -> float:
    """Accuracy of the least-squares linear probe [μ; 1]·W ≈ onehot(label) fitted on the training rows (N×d) and
    applied to the test rows; a ridge λ = `ridge`·tr(XᵀX)/(d + 1) keeps a fit of fewer rows than features well posed.
    Any features work (μ, task vectors, flat LoRAs): with more features than rows the same ridge solution is computed
    in its dual form, Xᵀ(XXᵀ + λI)⁻¹Y."""
    classes = sorted(set(train_labels))

    def design(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows.double(), torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)

    x = design(train_mu)
    targets = torch.zeros(len(train_labels), len(classes), dtype=torch.float64)
    targets[torch.arange(len(train_labels)), torch.tensor([classes.index(y) for y in train_labels])] = 1.0
    penalty = ridge * float(x.pow(2).sum()) / x.shape[1]
    if x.shape[1] <= x.shape[0]:
        gram = x.T @ x + penalty * torch.eye(x.shape[1], dtype=torch.float64)
        scores = design(test_mu) @ torch.linalg.solve(gram, x.T @ targets)
    else:
        kernel = x @ x.T + penalty * torch.eye(x.shape[0], dtype=torch.float64)
        scores = (design(test_mu) @ x.T) @ torch.linalg.solve(kernel, targets)
    predicted = scores.argmax(-1).tolist()
    return sum(classes[p] == y for p, y in zip(predicted, test_labels)) / len(test_labels)
