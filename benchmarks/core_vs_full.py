"""How far core-space element-wise merges are from full-space ones, on random adapters (docs/methods.md table).

    python benchmarks/core_vs_full.py [--seeds 5]

Prints JSON: per method, mean and sample std over seeds of ‖core − full‖/‖full‖, ‖full − TA‖/‖TA‖ and
‖core − TA‖/‖TA‖ (TA: the plain sum), for 3 rank-8 adapters of a 256×384 module, both at their full output rank.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lora_fusion.adapter import ModuleFactors
from lora_fusion.methods import ModuleGroup, get_method

METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "breadcrumbs")


def random_group(seed: int, m: int = 256, n: int = 384, ranks: tuple[int, ...] = (8, 8, 8)) -> ModuleGroup:
    g = torch.Generator().manual_seed(seed)
    factors = [
        ModuleFactors(torch.randn(r, n, generator=g) / n**0.5, torch.randn(m, r, generator=g) / r**0.5, 1.0)
        for r in ranks
    ]
    return ModuleGroup("module", factors, [1.0] * len(ranks))


def distances(name: str, group: ModuleGroup) -> tuple[float, float, float]:
    spec = get_method(name)
    full = spec.fn(group, spec.resolve({"rank": min(group.factors[0].B.shape[0], group.factors[0].A.shape[1])}))
    core = spec.fn(group, spec.resolve({"space": "core", "rank": sum(f.rank for f in group.factors)}))
    F, C = full.B @ full.A, core.B @ core.A
    plain = sum(f.delta() for f in group.factors)
    rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
    return rel(C, F), rel(F, plain), rel(C, plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    report = {}
    for name in METHODS:
        runs = [distances(name, random_group(seed)) for seed in range(args.seeds)]
        report[name] = {
            key: {"mean": round(statistics.mean(r[i] for r in runs), 3), "std": round(statistics.stdev(r[i] for r in runs), 3)}
            for i, key in enumerate(("core_vs_full", "full_vs_ta", "core_vs_ta"))
        }
    print(json.dumps({"seeds": args.seeds, "shape": [256, 384], "ranks": [8, 8, 8], "methods": report}, indent=2))


if __name__ == "__main__":
    main()
