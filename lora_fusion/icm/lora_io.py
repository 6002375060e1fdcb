"""LoRA ⇄ flat vector: the fixed layout, the invertible per-tensor normalisation and the way back to an adapter.

An F-VAE emits a fixed-length vector, so every LoRA it sees shares one layout: the same modules in the same order,
the same shapes and ranks (docs/icm.md, "layout constraint"). The flat vector of a LoRA is, module by module in
layout order, A (r×n, row-major) then B (m×r), with the module's scale s folded in as √s on each factor, which keeps
ΔW = B·A and makes adapters of different `lora_alpha` comparable.

Normalisation (docs/icm.md) z-scores each tensor (each A and each B) with a mean and standard deviation:

* ``pooled`` (default): one (mean, std) per tensor over all training checkpoints of all tasks. A fixed affine map,
  so a fused vector de-normalises with the same statistics and the tasks keep their relative scales.
* ``per_checkpoint``: ICM-LoRA's `normalizeLoraWeight_small.py`, each checkpoint z-scored with its own statistics;
  a fused vector is de-normalised with the w-weighted average of the fused LoRAs' statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lora_fusion.adapter import LoraAdapter
from lora_fusion.spec import AdapterConfig, MemoryStore, ModuleSpec

from .errors import LayoutMismatchError

Normalisation = Literal["pooled", "per_checkpoint"]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module name → (A r×n, B m×r) with the scale folded in, so that ΔW = B·A."""


@dataclass(frozen=True)
class ModuleShape:
    """One module of a layout: its name, update shape m×n and rank r."""

    name: str
    out_features: int
    in_features: int
    rank: int

    @property
    def numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class LoraLayout:
    """The modules (in flattening order), shapes and ranks shared by every LoRA of one F-VAE."""

    modules: tuple[ModuleShape, ...]

    @classmethod
    def of(cls, adapter: LoraAdapter) -> LoraLayout:
        """The layout of `adapter`, modules sorted by name (a fixed, reproducible key order)."""
        shapes = []
        for name in sorted(adapter.modules):
            spec = adapter.modules[name]
            if spec.kind != "linear":
                raise LayoutMismatchError(f"module {name} is a {spec.kind}; ICM-Fusion encodes nn.Linear LoRAs only.")
            shapes.append(ModuleShape(name, spec.out_features, spec.in_features, spec.rank))
        return cls(tuple(shapes))

    @property
    def numel(self) -> int:
        """D, the length of a flat LoRA vector."""
        return sum(module.numel for module in self.modules)

    @property
    def tensor_sizes(self) -> list[int]:
        """The length of each normalised tensor in flat order: A₁, B₁, A₂, B₂, …"""
        return [size for m in self.modules for size in (m.rank * m.in_features, m.out_features * m.rank)]

    def check(self, adapter: LoraAdapter, *, what: str) -> None:
        """Raise [`LayoutMismatchError`] naming the first difference between `adapter` and this layout."""
        theirs = {name: spec for name, spec in adapter.modules.items()}
        ours = {m.name: m for m in self.modules}
        if set(theirs) != set(ours):
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise LayoutMismatchError(
                f"{what} targets other modules than the F-VAE was trained on (missing {missing[:3]}, extra "
                f"{extra[:3]}); train an F-VAE on LoRAs of this layout with `lora-fusion icm train`."
            )
        for name, module in ours.items():
            spec = theirs[name]
            got = (spec.out_features, spec.in_features, spec.rank)
            want = (module.out_features, module.in_features, module.rank)
            if got != want:
                raise LayoutMismatchError(
                    f"{what}: module {name} has shape {got[0]}×{got[1]} rank {got[2]}, the F-VAE was trained on "
                    f"{want[0]}×{want[1]} rank {want[2]}; train an F-VAE on LoRAs of this shape."
                )

    def to_dict(self) -> list[dict[str, int | str]]:
        return [vars(m).copy() for m in self.modules]

    @classmethod
    def from_dict(cls, rows: Sequence[Mapping[str, int | str]]) -> LoraLayout:
        return cls(tuple(ModuleShape(str(r["name"]), int(r["out_features"]), int(r["in_features"]), int(r["rank"]))
                         for r in rows))


def adapter_factors(adapter: LoraAdapter) -> Factors:
    """Every module's (A, B) in float32 with √s folded into each factor, so that ΔW = B·A exactly."""
    out: Factors = {}
    for name in adapter.modules:
        factors = adapter.factors(name)
        root = math.sqrt(abs(factors.scale))
        out[name] = (factors.A.float() * root, factors.B.float() * math.copysign(root, factors.scale))
    return out


def flatten(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], layout: LoraLayout) -> torch.Tensor:
    """The flat vector [vec(A₁); vec(B₁); vec(A₂); …] of D = Σ r(m+n) entries, in layout order."""
    parts = []
    for module in layout.modules:
        a, b = factors[module.name]
        parts.extend((a.reshape(-1), b.reshape(-1)))
    return torch.cat(parts)


def canonical_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced SVD factors of ΔW = B·A (ours, docs/icm.md): A' = S^½Vᵀ, B' = US^½ with ΔW = USVᵀ truncated to
    rank r, each singular pair's sign fixed so that the largest-magnitude entry of its column of U is positive.

    B·A = (B·R)(R⁻¹·A) for any invertible R, so two LoRAs of the same update (another seed, another optimiser path)
    can have unrelated factors; the canonical factors depend on ΔW alone (up to ties among singular values). Computed
    from QR of B and Aᵀ and the SVD of an r×r matrix, in float64, never forming the m×n update.
    """
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u_small, singular, vh_small = torch.linalg.svd(r_b @ r_a.T)
    u, v = q_b @ u_small, q_a @ vh_small.T
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))[0]
    signs[signs == 0] = 1.0
    root = singular.sqrt() * signs
    return (root[:, None] * v.T).to(a.dtype), (u * singular.sqrt()).to(b.dtype) * signs.to(b.dtype)


def canonical_flat(flat: torch.Tensor, layout: LoraLayout) -> torch.Tensor:
    """[`flatten`] of every module's [`canonical_factors`]: a flat LoRA that depends on its updates ΔW only."""
    return flatten({name: canonical_factors(a, b) for name, (a, b) in unflatten(flat, layout).items()}, layout)


def unflatten(flat: torch.Tensor, layout: LoraLayout) -> Factors:
    """The inverse of [`flatten`]: views into `flat` (differentiable), shaped A r×n and B m×r."""
    out: Factors = {}
    start = 0
    for module in layout.modules:
        a_size, b_size = module.rank * module.in_features, module.out_features * module.rank
        a = flat[start : start + a_size].reshape(module.rank, module.in_features)
        b = flat[start + a_size : start + a_size + b_size].reshape(module.out_features, module.rank)
        out[module.name] = (a, b)
        start += a_size + b_size
    return out


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor (mean, std), one entry per tensor of the flat layout (A₁, B₁, A₂, …)."""

    mean: torch.Tensor
    std: torch.Tensor

    def expand(self, layout: LoraLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics repeated to length D, for element-wise (de-)normalisation."""
        sizes = torch.tensor(layout.tensor_sizes)
        return self.mean.repeat_interleave(sizes), self.std.repeat_interleave(sizes)


def tensor_stats(flats: torch.Tensor, layout: LoraLayout) -> TensorStats:
    """Mean and std of each tensor over all rows of `flats` (N×D) together; std floored at 1e-8 (B starts at 0)."""
    means, stds, start = [], [], 0
    for size in layout.tensor_sizes:
        chunk = flats[:, start : start + size]
        means.append(chunk.mean())
        stds.append(chunk.std(unbiased=False).clamp(min=1e-8))
        start += size
    return TensorStats(torch.stack(means), torch.stack(stds))


@dataclass(frozen=True)
class Normaliser:
    """The invertible per-tensor affine map between raw flat LoRAs and the F-VAE's space.

    `pooled` holds one set of statistics; `per_checkpoint` computes each LoRA's own and de-normalises a fusion with
    the weighted average of the fused LoRAs' statistics (`denormalise(flat, stats=weighted_stats(...))`).
    """

    layout: LoraLayout
    mode: Normalisation
    pooled: TensorStats

    @classmethod
    def fit(cls, flats: torch.Tensor, layout: LoraLayout, mode: Normalisation = "pooled") -> Normaliser:
        """Pooled statistics over the training checkpoints `flats` (N×D); kept in both modes (for `per_checkpoint`
        they de-normalise generations that have no source LoRA, e.g. a decoded sample)."""
        return cls(layout, mode, tensor_stats(flats, layout))

    def stats_of(self, flat: torch.Tensor) -> TensorStats:
        """The statistics that normalise `flat` (a raw D-vector): the pooled ones, or its own."""
        return self.pooled if self.mode == "pooled" else tensor_stats(flat.unsqueeze(0), self.layout)

    def normalise(self, flat: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats_of(flat).expand(self.layout)
        return (flat - mean.to(flat)) / std.to(flat)

    def denormalise(self, flat: torch.Tensor, stats: TensorStats | None = None) -> torch.Tensor:
        mean, std = (stats or self.pooled).expand(self.layout)
        return flat * std.to(flat) + mean.to(flat)


def weighted_stats(stats: Sequence[TensorStats], weights: torch.Tensor) -> TensorStats:
    """Σᵢ wᵢ·(meanᵢ, stdᵢ): the de-normalisation of a fusion under `per_checkpoint` (docs/icm.md)."""
    means = torch.stack([s.mean for s in stats])
    stds = torch.stack([s.std for s in stats])
    return TensorStats(weights @ means, weights @ stds)


def to_adapter(
    flat: torch.Tensor,
    layout: LoraLayout,
    *,
    base_model: str | None,
    task_type: str | None = None,
    provenance: Mapping[str, object] | None = None,
) -> LoraAdapter:
    """An in-memory [`LoraAdapter`] (scale 1, float32) from a raw flat vector, ready for the writer; its per-module
    stats say rank r and no truncation (the factors are written exactly as decoded)."""
    from lora_fusion.methods.base import ModuleStats

    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, ModuleSpec] = {}
    for name, (a, b) in unflatten(flat.detach().float(), layout).items():
        decoded = ModuleSpec(name, "linear", b.shape[0], a.shape[1], a.shape[0], 1.0, torch.float32,
                             tuple(a.shape), tuple(b.shape), a_key="", b_key="")
        spec = decoded.written(rank=a.shape[0], dtype=torch.float32)
        modules[name] = spec
        tensors[spec.a_key], tensors[spec.b_key] = a.clone().contiguous(), b.clone().contiguous()
    rank = max(m.rank for m in layout.modules)
    config = AdapterConfig(base_model=base_model, task_type=task_type, r=rank, lora_alpha=float(rank))
    stats = {name: ModuleStats(rank=spec.rank) for name, spec in modules.items()}
    return LoraAdapter(config=config, modules=modules, store=MemoryStore(tensors), provenance=dict(provenance or {}),
                       stats=stats)
