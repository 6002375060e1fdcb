"""Per-class Gaussian statistics of frozen features and the pseudo-features RAPF replays (docs/rapf.md).

The statistics are computed once per class, after its task, on pre-adapter features; they never change because the
feature space is frozen. The Cholesky factor is computed once here (the official code recomputes it per batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fecam_shrinkage(cov: torch.Tensor) -> torch.Tensor:
    """Σ' = Σ + mean(diag Σ)·I + m_off·(11ᵀ − I), m_off = mean of the non-zero off-diagonal entries (FeCAM:
    Goswami et al., NeurIPS 2023, arXiv:2309.14062; coefficients 1 and 1 as in RAPF's `shrink_cov`)."""
    d = cov.shape[0]
    diag_mean = cov.diagonal().mean()
    off = cov[~torch.eye(d, dtype=torch.bool, device=cov.device)]
    nonzero = off[off != 0]
    off_mean = nonzero.mean() if nonzero.numel() else cov.new_tensor(0.0)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return cov + diag_mean * eye + off_mean * (torch.ones_like(cov) - eye)


@dataclass(frozen=True)
class ClassGaussian:
    """N(μ, Σ) of one class in the frozen feature space, with the Cholesky factor L of Σ (Σ = L·Lᵀ)."""

    mean: torch.Tensor
    cholesky: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, *, ridge: float = 1e-4, shrinkage: bool = False) -> ClassGaussian:
        """μ and Σ = cov + ridge·I (unbiased covariance, float64), optionally FeCAM-shrunk, then its Cholesky factor.

        With fewer samples than dimensions the covariance is singular; only the ridge (and shrinkage) makes the
        Cholesky factor exist, as in the official code.
        """
        x = features.double()
        cov = torch.cov(x.mT) if x.shape[0] > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
        cov = cov + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        if shrinkage:
            cov = fecam_shrinkage(cov)
        return cls(mean=x.mean(0).float(), cholesky=torch.linalg.cholesky(cov).float())

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """count pseudo-features x = μ + L·z, z ~ N(0, I), drawn from `generator` on the CPU."""
        z = torch.randn(count, self.mean.numel(), generator=generator)
        return self.mean + z @ self.cholesky.mT
