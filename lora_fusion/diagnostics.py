"""How much LoRA adapters would interfere if merged: cosine similarity of their updates, sign conflicts among their
largest entries, and overlap of their column spaces, per module and overall (`lora-fusion inspect --interference`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from statistics import fmean
from typing import Any

import torch

from .adapter import LoraAdapter, ModuleFactors
from .methods.elementwise import DenseTask, Trim, sparsified_blocks


def cosine(first: ModuleFactors, second: ModuleFactors) -> float:
    """⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖·‖ΔW₂‖), from the factors: ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ)."""

    def inner(x: ModuleFactors, y: ModuleFactors) -> float:
        return x.scale * y.scale * float(((x.B.double().mT @ y.B.double()) * (x.A.double() @ y.A.double().mT)).sum())

    norms = (inner(first, first) * inner(second, second)) ** 0.5
    return inner(first, second) / norms if norms > 0 else 0.0


def subspace_overlap(first: ModuleFactors, second: ModuleFactors) -> float:
    """‖Q₁ᵀQ₂‖_F² / min(r₁, r₂) for orthonormal bases Q of the column spaces of B₁ and B₂: 1 when one contains the
    other, 0 when they are orthogonal."""
    q1 = torch.linalg.qr(first.B.double()).Q
    q2 = torch.linalg.qr(second.B.double()).Q
    return float((q1.mT @ q2).pow(2).sum()) / min(q1.shape[1], q2.shape[1])


def sign_conflicts(factors: Sequence[ModuleFactors], density: float) -> float:
    """Among the entries in some task's top-`density` magnitudes, the fraction where the tasks keeping that entry
    disagree in sign (the interference TIES resolves by election)."""
    tasks = [DenseTask.product(f.scale * f.B.float(), f.A.float()) for f in factors]
    union = conflict = 0
    # streamed like the merges (methods/elementwise.py): no module's T dense updates are ever held whole
    for _, _, blocks, _ in sparsified_blocks(tasks, [Trim.of(task, density) for task in tasks]):
        kept = torch.stack(blocks).sign()
        union += int((kept != 0).any(0).sum())
        conflict += int(((kept > 0).any(0) & (kept < 0).any(0)).sum())
    return conflict / max(1, union)


def interference_report(adapters: Sequence[LoraAdapter], *, density: float = 0.2) -> dict[str, Any]:
    """Per module held by at least two adapters with the same shape: pairwise cosine and subspace overlap, and the
    top-`density` sign conflict fraction; plus their means over modules. Pairs are keyed "i-j" by source position.

    Modules that cannot be compared are listed under "unmatched" with the reason (held by one adapter only, or shapes
    that differ: adapters of different base models), so partly different adapters still get a report.
    """
    names = [a.source.source if a.source else f"adapter {i}" for i, a in enumerate(adapters)]
    modules: dict[str, Any] = {}
    unmatched: dict[str, str] = {}
    for module in sorted({m for a in adapters for m in a.modules}):
        holders = [(i, a.modules[module]) for i, a in enumerate(adapters) if module in a.modules]
        if len(holders) < 2:
            unmatched[module] = f"only in [{holders[0][0]}]"
            continue
        shapes = {(s.kind, s.shape) for _, s in holders}
        if len(shapes) > 1:
            listed = ", ".join(f"[{i}] {s.kind} {'×'.join(map(str, s.shape))}" for i, s in holders)
            unmatched[module] = f"shapes differ: {listed}"
            continue
        present = [(i, adapters[i].factors(module)) for i, _ in holders]
        pairs = {
            f"{i}-{j}": {"cosine": cosine(x, y), "subspace_overlap": subspace_overlap(x, y)}
            for (i, x), (j, y) in combinations(present, 2)
        }
        modules[module] = {"pairs": pairs, "sign_conflict": sign_conflicts([f for _, f in present], density)}
    overall = overall_interference(modules)
    return {"sources": names, "density": density, "overall": overall, "modules": modules, "unmatched": unmatched}


def overall_interference(modules: Mapping[str, Any]) -> dict[str, Any]:
    """The means over `modules` (per-module records with "pairs" and "sign_conflict") of each pair's cosine and
    subspace overlap and of the sign conflict, with the number of modules."""
    pair_keys = sorted({k for m in modules.values() for k in m["pairs"]})
    return {
        "pairs": {
            key: {
                stat: fmean(m["pairs"][key][stat] for m in modules.values() if key in m["pairs"])
                for stat in ("cosine", "subspace_overlap")
            }
            for key in pair_keys
        },
        "sign_conflict": fmean(m["sign_conflict"] for m in modules.values()) if modules else 0.0,
        "modules": len(modules),
    }
