"""The randomized SVD's excess error over the exact optimum, per spectrum type, against its stated bound.

lora-fusion's full-space element-wise merges (TIES, DARE, magnitude pruning, Breadcrumbs) form the merged update ΔW
of each module densely and, above 1024 rows and columns, truncate it to rank R with a randomized SVD
(`lora_fusion.linalg.dense_svd`, svd="auto"). This script measures how far that truncation is from the best rank-R
approximation (Eckart–Young–Mirsky), as a relative Frobenius error:

    excess = ‖ΔW − ΔŴ_R‖_F / ‖ΔW‖_F − √(Σ_{j>R} σⱼ² / ‖ΔW‖_F²)

with σⱼ from a float64 SVD of the same float32 ΔW and ΔŴ_R the factors `dense_svd` returns, multiplied out in
float64. Each case is drawn with several sketch seeds; the mean and the largest excess are reported next to
`randomized_excess_bound` (an upper bound of the expected excess, docs/randomized_svd.md) for the code's
oversampling and power iterations. Spectra, all seeded:

* flat: `gaussian` (i.i.d. N(0, 1) entries: a Marchenko–Pastur spectrum, nothing stands out) and `ties_equal` (TIES,
  d = 0.2, of three random rank-16 updates of equal size and weight: the trim spreads the updates over a nearly
  flat spectrum, σ₁₆/σ₁₇ ≈ 1.01);
* decaying: `geometric` (σⱼ = 0.9^j, random singular vectors) and `power` (σⱼ = 1/j);
* mixed: `ties_weighted` (TIES of the same three updates with sizes 2, 1, 0.5 and weights 0.5, 0.3, 0.2, like
  bench_interference_vs_peft.py's alphas 32/16/8 and weights): the largest update dominates and decays over the
  leading components, the trimmed rest is flat (σ₁₆/σ₁₇ ≈ 3, σ₆₄/σ₆₅ ≈ 1.001).

Every float32 step (the sketch, its products, the written factors) leaves a floor of about 1e-8 in the excess where
the spectrum decays: `within_bound` compares the mean excess with the bound plus `FLOAT32_FLOOR`.

The shapes are bench_interference_vs_peft.py's (2048×2048 and 5504×2048, a Llama-2048 attention and MLP
projection); R = 16 (its output rank) and 64. Timings: `dense_svd` alone at R = 16 on one thread, best of 5
interleaved runs, with the code's oversampling and with 10 (the default before issue 20).

Usage: python benchmarks/randomized_svd_error.py [--seeds 5] [--oversampling P --power-iterations Q]
       > benchmarks/results/randomized_svd_error.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import emit, log, machine, rounded

from lora_fusion import linalg
from lora_fusion.linalg import dense_svd, randomized_excess_bound
from lora_fusion.methods.elementwise import DenseTask, Trim, combine

SHAPES = ((2048, 2048), (5504, 2048))
RANKS = (16, 64)
TYPES = {"gaussian": "flat", "ties_equal": "flat", "geometric": "decaying", "power": "decaying",
         "ties_weighted": "mixed"}
FLOAT32_FLOOR = 1e-7


def gaussian(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """I.i.d. N(0, 1) entries."""
    return torch.randn(m, n, generator=generator)


def with_spectrum(m: int, n: int, S: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U·diag(S)·Vᵀ with Haar-random orthonormal U (m×k) and V (n×k), k = min(m, n), in float32."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q
    return ((U * S[:k].double()) @ V.mT).float()


def ties_merge(
    m: int, n: int, generator: torch.Generator, sizes: tuple[float, ...], weights: tuple[float, ...]
) -> torch.Tensor:
    """lora-fusion's dense TIES merge (d = 0.2, "total") of three random rank-16 updates sᵢ·Bᵢ·Aᵢ."""
    tasks = [
        DenseTask.product(size * torch.randn(m, 16, generator=generator), torch.randn(16, n, generator=generator) / 4)
        for size in sizes
    ]
    return combine(tasks, [Trim.of(task, 0.2) for task in tasks], list(weights), majority="total")


def builders() -> dict[str, Callable[[int, int, torch.Generator], torch.Tensor]]:
    """Each spectrum's matrix of a given shape, from a seeded generator."""

    def geometric(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return with_spectrum(m, n, 0.9 ** torch.arange(min(m, n), dtype=torch.float64), generator)

    def power(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return with_spectrum(m, n, 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64), generator)

    return {
        "gaussian": gaussian,
        "ties_equal": lambda m, n, g: ties_merge(m, n, g, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
        "geometric": geometric,
        "power": power,
        "ties_weighted": lambda m, n, g: ties_merge(m, n, g, (2.0, 1.0, 0.5), (0.5, 0.3, 0.2)),
    }


def summary_of(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Over some cases: the range of the mean excess, the largest single excess, the range of the bound."""
    return {
        "excess_mean": [min(c["excess_mean"] for c in cases), max(c["excess_mean"] for c in cases)],
        "excess_max": max(c["excess_max"] for c in cases),
        "expected_excess_bound": [min(c["expected_excess_bound"] for c in cases),
                                  max(c["expected_excess_bound"] for c in cases)],
    }


def svd_timings(dense: torch.Tensor, oversamplings: tuple[int, ...], runs: int) -> dict[str, float]:
    """Best seconds of `dense_svd` to rank 16 with each oversampling, the runs interleaved so that a neighbour's load
    falls on all of them alike."""
    best = dict.fromkeys(oversamplings, math.inf)
    current = linalg.OVERSAMPLING
    try:
        for _ in range(runs):
            for p in best:
                linalg.OVERSAMPLING = p
                began = time.perf_counter()
                dense_svd(dense, components=16, generator=torch.Generator().manual_seed(0))
                best[p] = min(best[p], time.perf_counter() - began)
    finally:
        linalg.OVERSAMPLING = current
    return {f"p{p}": rounded(seconds) for p, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="sketch seeds per case")
    parser.add_argument("--oversampling", type=int, default=None, help="p (default: the code's OVERSAMPLING)")
    parser.add_argument("--power-iterations", type=int, default=None, help="q (default: the code's POWER_ITERATIONS)")
    parser.add_argument("--timing-runs", type=int, default=5, help="interleaved timed runs per oversampling")
    parser.add_argument("--timing-oversampling", type=int, nargs="*", default=[10],
                        help="other oversamplings to time next to the code's (default: 10, the earlier default)")
    args = parser.parse_args()
    if args.oversampling is not None:
        linalg.OVERSAMPLING = args.oversampling
    if args.power_iterations is not None:
        linalg.POWER_ITERATIONS = args.power_iterations
    p, q = linalg.OVERSAMPLING, linalg.POWER_ITERATIONS
    torch.set_num_threads(1)  # timings on one thread; the reductions, and so the bytes, do not depend on it then
    started = time.perf_counter()
    cases: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, float]] = {}
    for spectrum, build in builders().items():
        for m, n in SHAPES:
            log(f"{spectrum} {m}×{n}: building, then its exact singular values (float64)")
            dense = build(m, n, torch.Generator().manual_seed(0))
            S = torch.linalg.svdvals(dense.double())
            whole = float((S**2).sum())
            for rank in RANKS:
                optimum = math.sqrt(float((S[rank:] ** 2).sum()) / whole)
                excesses = []
                for seed in range(args.seeds):
                    svd = dense_svd(dense, components=rank, generator=torch.Generator().manual_seed(seed))
                    approximation = (svd.U[:, :rank].double() * svd.S[:rank]) @ svd.V[:, :rank].double().mT
                    error = float(torch.linalg.matrix_norm(dense.double() - approximation)) / math.sqrt(whole)
                    excesses.append(error - optimum)
                bound = randomized_excess_bound(S, rank=rank, width=rank + p, power_iterations=q)
                cases[f"{spectrum}/{m}x{n}/rank{rank}"] = {
                    "spectrum": spectrum,
                    "type": TYPES[spectrum],
                    "shape": [m, n],
                    "rank": rank,
                    "sigma_R_over_sigma_R+1": rounded(float(S[rank - 1] / S[rank])),
                    "optimal_rel_error": rounded(optimum, 6),
                    "excess_mean": rounded(statistics.mean(excesses), 3),
                    "excess_max": rounded(max(excesses), 3),
                    "expected_excess_bound": rounded(bound, 3),
                    "within_bound": statistics.mean(excesses) <= bound + FLOAT32_FLOOR,
                }
                log(f"  rank {rank}: optimum {optimum:.6f}, excess mean {statistics.mean(excesses):.3g} "
                    f"max {max(excesses):.3g}, bound {bound:.3g}")
            if spectrum == "gaussian":  # the cost does not depend on the values
                timings[f"{m}x{n}"] = svd_timings(dense, (*args.timing_oversampling, p), args.timing_runs)
    summary = {
        kind: {
            **{f"rank{rank}": summary_of([c for c in cases.values() if c["type"] == kind and c["rank"] == rank])
               for rank in RANKS},
            "all_within_bound": all(c["within_bound"] for c in cases.values() if c["type"] == kind),
        }
        for kind in ("flat", "decaying", "mixed")
    }
    emit({
        "benchmark": "randomized_svd_error",
        "oversampling": p,
        "power_iterations": q,
        "seeds": args.seeds,
        "float32_floor": FLOAT32_FLOOR,
        "summary": summary,
        "cases": cases,
        "dense_svd_rank16_one_thread_best_s": timings,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
        "machine": machine(),
        "runtime_s": rounded(time.perf_counter() - started, 3),
    })


if __name__ == "__main__":
    main()
