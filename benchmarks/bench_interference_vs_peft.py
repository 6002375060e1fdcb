"""lora-fusion vs PEFT's `add_weighted_adapter` on TIES and DARE-TIES SVD merges: same adapters, same process.

Builds a random Llama-shaped base model in code (hidden 2048, intermediate 5504: every module has min(m, n) > 1024,
so lora-fusion's full-space merges take its randomized-SVD path), writes three random PEFT LoRAs (rank 16, different
alphas, all seven projections) with PEFT itself, then times

* PEFT: `add_weighted_adapter(["a", "b", "c"], weights, "m", combination_type="ties_svd", density=0.2,
  svd_rank=16)` and `combination_type="dare_ties_svd"` (density 0.5): each forms every dense ΔWᵢ, merges them
  densely (`peft.utils.merge_utils.ties` / `dare_ties`) and takes a full SVD (`full_matrices=True`, its default);
  as a diagnostic, `ties_svd` once more with `svd_full_matrices=False`;
* lora-fusion: `merge(dirs, method="ties", density=0.2, rank=16)` and `method="dare_ties"` (density 0.5, seed 0),
  each with `space="full"` (dense merge, then randomized SVD) and `space="core"` (Core Space, k×k cores), the whole
  call including reading the files, best of N.

Errors are relative Frobenius errors over all modules, √(Σ‖X − D‖² / Σ‖D‖²), against the exact dense merge D of the
same method before truncation:

* TIES: D = `merge_utils.ties([ΔWᵢ], weights, 0.2, "total")` per module (ΔWᵢ from `lora_fusion.load_adapter`),
  next to the optimal rank-16 error of D, √(Σ tail σ² / Σ‖D‖²) (Eckart–Young–Mirsky);
* DARE-TIES: the random masks differ (PEFT draws them from torch's global RNG, lora-fusion from generators seeded
  per module), so each result is compared with its *own* dense merge, captured during the call (PEFT: the output
  of `merge_utils.dare_ties` inside the timed call; lora-fusion: the matrix its `dense_svd` receives, in an extra
  untimed call), each next to its own optimum;
* Core space is a different merge, not an approximation of the full-space one: its distance to D is information.

Usage: python benchmarks/bench_interference_vs_peft.py [--layers 1 --runs 3 --peft-runs 1 --wait-load 1.3]
                                                        [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import CpuShare, Timings, emit, log, machine, repeat, rounded, timed, wait_for_idle
from bench_vs_peft import (
    TARGETS,
    ErrorReport,
    add_model_arguments,
    build_base,
    model_record,
    peft_delta,
    relative_errors,
    write_lora,
)

METHODS = {"ties": "ties_svd", "dare_ties": "dare_ties_svd"}  # lora-fusion method -> PEFT combination_type
QUIET = 0.05  # largest share of the machine's CPU time other processes may take during a timed call, for "quiet"


@dataclass(frozen=True)
class PeftMerge:
    """One PEFT add_weighted_adapter merge: the adapter name of its (last) result, its timings, and the dense merges
    its SVDs received (per module, captured during the last run; empty if not captured)."""

    adapter: str
    runs_s: tuple[float, ...]
    dense: dict[str, Any]
    others_cpu_share: tuple[float | None, ...]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def capture_peft_dense(lora_model: Any, combination: str, into: dict[str, Any]) -> Iterator[None]:
    """While active, store in `into[module]` the dense merged ΔW that PEFT's `_svd_generalized_…` hands to its SVD.

    PEFT calls `ties` / `dare_ties` by the names imported into `peft.tuners.lora.model`; wrapping them (and the method,
    to know the module) keeps a reference to each result: no copy, no extra work inside the timed call.
    """
    from peft.tuners.lora import model as lora_module

    names = {id(m): n for n, m in lora_model.model.named_modules()}
    function = {"ties_svd": "ties", "dare_ties_svd": "dare_ties"}[combination]
    original_fn = getattr(lora_module, function)
    original_method = lora_model._svd_generalized_task_arithmetic_weighted_adapter
    current: list[str] = []

    def fn(*args: Any, **kwargs: Any) -> Any:
        result = original_fn(*args, **kwargs)
        into[current[-1]] = result
        return result

    def method(combination: str, adapters: Any, weights: Any, rank: int, target: Any, *rest: Any, **kw: Any) -> Any:
        current.append(names[id(target)])
        return original_method(combination, adapters, weights, rank, target, *rest, **kw)

    setattr(lora_module, function, fn)
    lora_model._svd_generalized_task_arithmetic_weighted_adapter = method
    try:
        yield
    finally:
        setattr(lora_module, function, original_fn)
        del lora_model._svd_generalized_task_arithmetic_weighted_adapter  # back to the class's method


@contextmanager
def capture_lora_fusion_dense(into: dict[str, Any]) -> Iterator[None]:
    """While active, store in `into[module]` the dense merged ΔW that lora-fusion's full-space element-wise merge
    hands to `dense_svd` (wrapping the module-level names in `lora_fusion.methods.interference`). The engine merges
    two modules at a time on worker threads, so the module being merged is remembered per thread."""
    import threading

    from lora_fusion.methods import interference

    original_merge, original_svd = interference.elementwise_merge, interference.dense_svd
    current = threading.local()

    def merge(group: Any, *args: Any, **kwargs: Any) -> Any:
        current.name = group.name
        return original_merge(group, *args, **kwargs)

    def svd(dense: Any, **kwargs: Any) -> Any:
        into[current.name] = dense
        return original_svd(dense, **kwargs)

    interference.elementwise_merge, interference.dense_svd = merge, svd
    try:
        yield
    finally:
        interference.elementwise_merge, interference.dense_svd = original_merge, original_svd


def time_peft_merge(model: Any, adapters: list[str], weights: list[float], *, name: str, combination: str,
                    density: float, svd_rank: int, runs: int, seed: int, capture: bool, **extra: Any) -> PeftMerge:
    """Time `add_weighted_adapter(..., combination_type=combination)` `runs` times (torch's global RNG seeded with
    `seed` before each, for DARE's masks); capture the dense merges of the last run if asked."""
    import torch

    dense: dict[str, Any] = {}
    seconds: list[float] = []
    shares: list[float | None] = []
    for run in range(runs):
        if run:
            model.delete_adapter(name)
        dense.clear()
        log(f"PEFT add_weighted_adapter {combination}{' ' + str(extra) if extra else ''}, run {run + 1}/{runs}")
        torch.manual_seed(seed)

        def call() -> None:
            model.add_weighted_adapter(adapters, weights, name, combination_type=combination, density=density,
                                       svd_rank=svd_rank, **extra)
            if torch.cuda.is_available():  # CUDA runs asynchronously: time the work, not its launch
                torch.cuda.synchronize()

        with torch.no_grad(), CpuShare() as cpu:
            if capture:
                with capture_peft_dense(model.base_model, combination, dense):
                    elapsed, _ = timed(call)
            else:
                elapsed, _ = timed(call)
        seconds.append(elapsed)
        shares.append(_share(cpu))
    return PeftMerge(name, tuple(seconds), dense, tuple(shares))


def _share(cpu: CpuShare) -> float | None:
    """Other processes' share of the CPU time during the block, or None where it cannot tell QUIET from busy: off
    Linux, or a block so short (the core-space merges: ~60 ms) that one 10 ms clock tick is more than QUIET of it."""
    result = cpu.result()
    if not result or result["resolution"] is None or result["resolution"] > QUIET:
        return None
    return result["others_cpu_share"]


def time_lora_fusion(sources: list[str], weights: list[float], *, method: str, space: str, density: float,
                     rank: int, seed: int, runs: int, device: str = "cpu") -> tuple[Timings, Any]:
    import lora_fusion

    def call() -> Any:  # the merged adapter's tensors are on the CPU: the call has waited for the GPU
        return lora_fusion.merge(sources, method=method, weights=weights, rank=rank, density=density, seed=seed,
                                 space=space, device=device)

    log(f"lora-fusion merge {method} space={space}, {runs} runs")
    return repeat(call, runs)


def optimal_error(dense: dict[str, Any], rank: int) -> tuple[float, float]:
    """The optimal rank-R relative error over all modules, √(Σ tail σ² / Σ‖D‖²), and the worst module's (float64
    singular values of each dense D)."""
    import torch

    tail = total = worst = 0.0
    for d in dense.values():
        s2 = torch.linalg.svdvals(d.double()) ** 2
        t, a = float(s2[rank:].sum()), float(s2.sum())
        tail, total, worst = tail + t, total + a, max(worst, math.sqrt(t / a))
    return math.sqrt(tail / total), worst


def reported_error(merged: Any, dense: dict[str, Any]) -> float:
    """The relative error over all modules that lora-fusion's own `.stats[m].relative_error` report, weighted by
    the energy of each module's dense merge: √(Σ eᵢ²·‖Dᵢ‖² / Σ‖Dᵢ‖²)."""
    energy = {n: float(d.double().norm() ** 2) for n, d in dense.items()}
    return math.sqrt(sum(merged.stats[n].relative_error ** 2 * e for n, e in energy.items()) / sum(energy.values()))


def errors_entry(report: ErrorReport, optimal: float) -> dict[str, float]:
    return {
        "rel_error": rounded(report.total, 6),
        "excess_over_optimal": rounded(report.total / optimal - 1, 3),
        "worst_module_rel_error": rounded(report.worst_module, 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, hidden=2048, intermediate=5504, layers=1)
    parser.add_argument("--svd-rank", type=int, default=16, help="output rank of every merge")
    parser.add_argument("--alphas", type=int, nargs="+", default=[32, 16, 8], help="lora_alpha of each adapter")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.3, 0.2], help="one weight per adapter")
    parser.add_argument("--ties-density", type=float, default=0.2)
    parser.add_argument("--dare-density", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3, help="lora-fusion runs per method and space (best is reported)")
    parser.add_argument("--peft-runs", type=int, default=1, help="PEFT add_weighted_adapter runs (slow)")
    parser.add_argument("--no-peft-thin", action="store_true", help="skip the svd_full_matrices=False diagnostic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: both PEFT's model and lora-fusion's merges")
    parser.add_argument("--wait-load", type=float, default=1.3, help="wait until the 1-min load average is below")
    parser.add_argument("--wait-max", type=float, default=600, help="longest wait for it, seconds (0: no wait)")
    args = parser.parse_args()
    if len(args.alphas) != len(args.weights):
        parser.error("give one --alphas and one --weights value per adapter")
    started = time.perf_counter()
    warnings.filterwarnings("ignore")

    import peft
    import torch
    from peft import PeftModel
    from peft.utils import merge_utils

    import lora_fusion

    waited = wait_for_idle(args.wait_load, args.wait_max)
    measuring = time.perf_counter()
    torch.manual_seed(args.seed)
    log(f"building a random Llama base (hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers)")
    base = build_base(args)
    names_peft = [chr(ord("a") + i) for i in range(len(args.weights))]
    with tempfile.TemporaryDirectory(prefix="lora-fusion-bench-interference-") as tmp:
        dirs = [Path(tmp) / n for n in names_peft]
        for i, (folder, alpha) in enumerate(zip(dirs, args.alphas)):
            write_lora(base, folder, rank=args.rank, alpha=alpha, seed=args.seed + 1 + i)
        sources = [str(d) for d in dirs]
        log(f"wrote {len(dirs)} PEFT LoRAs to {tmp}")

        # --- PEFT -------------------------------------------------------------------------------------------------
        def load() -> Any:
            model = PeftModel.from_pretrained(base, sources[0], adapter_name=names_peft[0])
            for name, source in zip(names_peft[1:], sources[1:]):
                model.load_adapter(source, adapter_name=name)
            return model

        setup_s = time.perf_counter() - measuring
        peft_load_s, model = timed(load)
        model.to(args.device)
        densities = {"ties": args.ties_density, "dare_ties": args.dare_density}
        peft_runs: dict[str, PeftMerge] = {}
        with CpuShare() as peft_cpu:
            for method, combination in METHODS.items():
                peft_runs[method] = time_peft_merge(
                    model, names_peft, args.weights, name=f"m_{method}", combination=combination,
                    density=densities[method], svd_rank=args.svd_rank, runs=args.peft_runs, seed=args.seed,
                    capture=True,
                )
            if not args.no_peft_thin:
                peft_runs["ties_thin"] = time_peft_merge(
                    model, names_peft, args.weights, name="m_ties_thin", combination="ties_svd",
                    density=args.ties_density, svd_rank=args.svd_rank, runs=1, seed=args.seed, capture=False,
                    svd_full_matrices=False,
                )

        # --- lora-fusion ----------------------------------------------------------------------------------------
        ours: dict[tuple[str, str], tuple[Timings, Any]] = {}
        ours_shares: dict[tuple[str, str], float | None] = {}
        with CpuShare() as ours_cpu:
            for method in METHODS:
                for space in ("full", "core"):
                    with CpuShare() as cpu:
                        ours[method, space] = time_lora_fusion(
                            sources, args.weights, method=method, space=space, density=densities[method],
                            rank=args.svd_rank, seed=args.seed, runs=args.runs, device=args.device,
                        )
                    ours_shares[method, space] = _share(cpu)
        log("lora-fusion full-space merges once more, untimed, capturing the dense merges their SVDs receive")
        ours_dense: dict[str, dict[str, Any]] = {}
        repeat_differs: dict[str, float] = {}
        for method in METHODS:
            ours_dense[method] = {}
            with capture_lora_fusion_dense(ours_dense[method]):
                again = lora_fusion.merge(sources, method=method, weights=args.weights, rank=args.svd_rank,
                                          density=densities[method], seed=args.seed, space="full",
                                          device=args.device)
            merged = ours[method, "full"][1]
            repeat_differs[method] = max(float((again.delta(n) - merged.delta(n)).abs().max()) for n in merged.modules)

        # --- references and errors ------------------------------------------------------------------------------
        # Untimed: on one thread, which is barely slower on an idle machine and keeps a neighbour job from
        # stretching the float64 SVDs below by 10× or more (README, "Timing on a busy machine"). With --device cuda
        # on the GPU, where the float64 SVDs take a fraction of the 4–5 s each of one CPU thread.
        references_started = time.perf_counter()
        on = torch.device(args.device)
        with single_thread():
            log("dense TIES reference (merge_utils.ties on lora_fusion.load_adapter's ΔWᵢ) and singular values")
            adapters = [lora_fusion.load_adapter(d) for d in dirs]
            names = sorted(adapters[0].modules)
            weights = torch.tensor(args.weights, device=on)
            reference = {
                n: merge_utils.ties([a.delta(n).to(on) for a in adapters], weights, args.ties_density, "total").double()
                for n in names
            }
            ties_optimal, ties_optimal_worst = optimal_error(reference, args.svd_rank)

            def result(merge: Any) -> dict[str, Any]:
                return {n: merge.delta(n).double().to(on) for n in names}

            def peft_result(adapter: str) -> dict[str, Any]:
                return {n: peft_delta(model, n, adapter).to(on) for n in names}

            def moved(dense: dict[str, Any]) -> dict[str, Any]:
                return {n: d.to(on) for n, d in dense.items()}

            ties_errors = {
                "peft_ties_svd": relative_errors(reference, peft_result(peft_runs["ties"].adapter)),
                "lora_fusion_full": relative_errors(reference, result(ours["ties", "full"][1])),
            }
            if "ties_thin" in peft_runs:
                thin = peft_result(peft_runs["ties_thin"].adapter)
                ties_errors["peft_ties_svd_thin"] = relative_errors(reference, thin)
            dense_checks = {
                "peft_dense_vs_reference": relative_errors(reference, moved(peft_runs["ties"].dense)).total,
                "lora_fusion_dense_vs_reference": relative_errors(reference, moved(ours_dense["ties"])).total,
            }
            core_ties_vs_full = relative_errors(reference, result(ours["ties", "core"][1]))

            log("DARE-TIES: each result against its own dense merge, and the optimum of each")
            peft_dare_dense = {n: d.double().to(on) for n, d in peft_runs["dare_ties"].dense.items()}
            ours_dare_dense = {n: d.double().to(on) for n, d in ours_dense["dare_ties"].items()}
            peft_dare_optimal, peft_dare_optimal_worst = optimal_error(peft_dare_dense, args.svd_rank)
            ours_dare_optimal, ours_dare_optimal_worst = optimal_error(ours_dare_dense, args.svd_rank)
            peft_dare_error = relative_errors(peft_dare_dense, peft_result(peft_runs["dare_ties"].adapter))
            ours_dare_error = relative_errors(ours_dare_dense, result(ours["dare_ties", "full"][1]))
            dare_masks_distance = relative_errors(peft_dare_dense, ours_dare_dense).total
            core_dare_vs_full = relative_errors(ours_dare_dense, result(ours["dare_ties", "core"][1]))

    references_done = time.perf_counter()

    # --- figures -------------------------------------------------------------------------------------------------
    def best(method: str, space: str) -> float:
        return ours[method, space][0].best

    peft_s = {key: min(run.runs_s) for key, run in peft_runs.items()}
    speedups = {
        method: {space: peft_s[method] / best(method, space) for space in ("full", "core")} for method in METHODS
    }
    ties_peft, ties_ours = ties_errors["peft_ties_svd"].total, ties_errors["lora_fusion_full"].total
    figures: dict[str, Any] = {
        "benchmark": "bench_interference_vs_peft",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "peft_load_s": rounded(peft_load_s),
        "ties": {
            "peft_ties_svd_s": rounded(peft_s["ties"]),
            "lora_fusion_full_s": rounded(best("ties", "full")),
            "lora_fusion_core_s": rounded(best("ties", "core")),
            "speedup_full": rounded(speedups["ties"]["full"], 3),
            "speedup_core": rounded(speedups["ties"]["core"], 3),
            "errors_vs_dense_ties": {
                "optimal_rel_error": rounded(ties_optimal, 6),
                "optimal_worst_module": rounded(ties_optimal_worst, 6),
                **{key: errors_entry(report, ties_optimal) for key, report in ties_errors.items()},
                "lora_fusion_full_reported_by_stats": rounded(
                    reported_error(ours["ties", "full"][1], ours_dense["ties"]), 6
                ),
                "lora_fusion_full_over_peft": rounded(ties_ours / ties_peft - 1, 3),
            },
            "dense_merge_check": {key: rounded(value, 3) for key, value in dense_checks.items()},
            "core_space_info": {
                "rel_distance_to_dense_ties": rounded(core_ties_vs_full.total, 6),
                "worst_module": rounded(core_ties_vs_full.worst_module, 6),
            },
        },
        "dare_ties": {
            "peft_dare_ties_svd_s": rounded(peft_s["dare_ties"]),
            "lora_fusion_full_s": rounded(best("dare_ties", "full")),
            "lora_fusion_core_s": rounded(best("dare_ties", "core")),
            "speedup_full": rounded(speedups["dare_ties"]["full"], 3),
            "speedup_core": rounded(speedups["dare_ties"]["core"], 3),
            "errors_vs_own_dense_merge": {
                "peft": {"optimal_rel_error": rounded(peft_dare_optimal, 6),
                         "optimal_worst_module": rounded(peft_dare_optimal_worst, 6),
                         **errors_entry(peft_dare_error, peft_dare_optimal)},
                "lora_fusion_full": {"optimal_rel_error": rounded(ours_dare_optimal, 6),
                                     "optimal_worst_module": rounded(ours_dare_optimal_worst, 6),
                                     **errors_entry(ours_dare_error, ours_dare_optimal),
                                     "reported_by_stats": rounded(
                                         reported_error(ours["dare_ties", "full"][1], ours_dense["dare_ties"]), 6)},
            },
            "dense_peft_vs_lora_fusion_masks_rel_distance": rounded(dare_masks_distance, 4),
            "core_space_info": {
                "rel_distance_to_own_full_dense": rounded(core_dare_vs_full.total, 6),
                "worst_module": rounded(core_dare_vs_full.worst_module, 6),
            },
        },
        "targets": {
            "full_20x": {m: speedups[m]["full"] >= 20 for m in METHODS},
            "core_100x": {m: speedups[m]["core"] >= 100 for m in METHODS},
            "ties_full_error_not_above_peft": ties_ours <= ties_peft * (1 + 1e-6),
            "ties_full_error_within_1pct_of_peft": ties_ours <= ties_peft * 1.01,
            "dare_full_excess_over_optimum_within_1pct": ours_dare_error.total <= ours_dare_optimal * 1.01,
        },
        "lora_fusion_repeat_max_abs_diff": {m: rounded(v, 3) for m, v in repeat_differs.items()},
        "timings": {
            "peft_runs_s": {key: [rounded(s) for s in run.runs_s] for key, run in peft_runs.items()},
            **{f"lora_fusion_{m}_{s}": t.to_dict() for (m, s), (t, _) in ours.items()},
        },
        "load": {
            "wait": waited,
            "peft_section": peft_cpu.result(),
            "lora_fusion_section": ours_cpu.result(),
            "others_cpu_share_per_timed_call": {
                **{f"peft_{key}": list(run.others_cpu_share) for key, run in peft_runs.items()},
                **{f"lora_fusion_{m}_{s}": share for (m, s), share in ours_shares.items()},
            },
            # Another job's threads distort both sides by erratic factors (README): trust figures only when quiet,
            # judged on every timed call long enough to measure (None: too short) and on both sections as a whole.
            "quiet_machine": all(
                share is not None and share < QUIET
                for share in [_share(peft_cpu), _share(ours_cpu)]
            ) and all(
                share < QUIET
                for share in [*(x for run in peft_runs.values() for x in run.others_cpu_share), *ours_shares.values()]
                if share is not None
            ),
        },
        "shapes": {
            **model_record(args),
            "lora_alpha": args.alphas,
            "weights": args.weights,
            "svd_rank": args.svd_rank,
            "ties_density": args.ties_density,
            "dare_density": args.dare_density,
            "seed": args.seed,
            "module_shapes_out_in": {
                t: list(adapters[0].modules[next(n for n in names if n.endswith(t))].shape) for t in TARGETS
            },
            "dtype": "float32",
        },
        "modules": len(names),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "lora_fusion": lora_fusion.__version__},
        "machine": machine(),
        "bench_runtime_s": rounded(time.perf_counter() - started, 3),
        "phases_s": {
            "imports_and_wait": rounded(measuring - started, 3),
            "build_and_write_adapters": rounded(setup_s, 3),
            "peft_timed": rounded(peft_cpu.result()["wall_s"], 3) if peft_cpu.result() else None,
            "lora_fusion_timed": rounded(ours_cpu.result()["wall_s"], 3) if ours_cpu.result() else None,
            "references_and_errors_1thread": rounded(references_done - references_started, 3),
        },
    }
    if "ties_thin" in peft_s:
        figures["ties"]["peft_ties_svd_thin_s"] = rounded(peft_s["ties_thin"])
        figures["ties"]["speedup_full_vs_peft_thin"] = rounded(peft_s["ties_thin"] / best("ties", "full"), 3)
        figures["ties"]["speedup_core_vs_peft_thin"] = rounded(peft_s["ties_thin"] / best("ties", "core"), 3)
    emit(figures)


if __name__ == "__main__":
    main()
