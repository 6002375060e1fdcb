"""One prepared check of every CUDA path (issue 19): one command, one JSON object on stdout, progress on stderr.

Written before any GPU was seen, to make a short loan of one count. Each part compares the CUDA result with the same
work on the CPU, in float32 with TF32 off, against a tolerance stated below (`TOLERANCES`) and recorded in the JSON:

* `merges`: svd, ties (full and core space), dare_ties, knots, tsv and rapf (with a base-weights file) on three
  synthetic Llama-shaped float32 adapters ("small": hidden 1024, 2 layers, rank 16), `device="cuda"` against
  `device="cpu"`: the distance between the merged updates ΔW = B·A (factors are defined up to sign and rotation, their
  products are not), the wall time of each, and the peak GPU memory (`torch.cuda.max_memory_allocated`) beside the
  `--dry-run` plan's estimate for one module at a time (the GPU merges one module at a time);
* `svd_7b`: bench_7b_shape.py's four Llama-2-7B-shaped rank-16 bf16 adapters: `lora-fusion merge --method svd
  --device cuda` against its I/O floor (`io_floor.py`, read the inputs and write as many bytes), interleaved runs,
  each its own process; the output against the CPU merge's; the in-process peak GPU memory beside the plan;
* `sharded`: the merge launched through `accelerate launch` on the GPUs present (1 is fine) against the one-process
  merge on the same device: byte-identical files;
* `bake_extract`: a tiny Llama saved in code, `bake(..., device=...)` (the merge on the device, W₀ + ΔW on the CPU) and
  `extract(..., device=...)` (ΔW and its SVD on the device) against the CPU results;
* `training`: RAPF's class-incremental trainer for 2 tasks (a tiny random CLIP on synthetic images, features cached
  per precision as a user's run caches them) with Accelerate's mixed precision no / bf16 / fp16 (fp16 runs a
  GradScaler), and the F-VAE meta-training for a few steps with no / bf16, each precision in its own process
  (Accelerate fixes the precision once per process): finite results, and the metrics of each against float32's;
* `ties_vs_peft`: `bench_interference_vs_peft.py --device cuda` (one layer of hidden 2048): full-space TIES and
  PEFT's `ties_svd` on the same GPU, speed ratio at equal error.

On a machine without a CUDA GPU it runs the CPU half (the CPU references, and the precisions the CPU runs: no and
bf16), says "no GPU" on stderr and exits 0 when every CPU check held; `tests/test_gpu_check.py` runs that half at the
"tiny" scale. `--rehearse` runs the GPU half with the CPU standing in for the GPU, to try the script's own plumbing
where no GPU is lent (its comparisons are then of the CPU with itself). Exit code 1: a part failed or a result
exceeded its tolerance (the JSON says which).

On the `device` machine (its image lacks pydantic, carried as wheels: benchmarks/README.md, "GPU check"):
    python benchmarks/gpu_check.py > $OUT/gpu_check.json

Usage: python benchmarks/gpu_check.py [--scale small|tiny] [--parts merges,svd_7b,...] [--workdir DIR] [--runs 3]
       [--budget 300] [--rehearse]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import emit, log, machine, rounded, run_process
from bench_7b_shape import AdapterShape, ensure_adapters, llama_projections, summary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("merges", "training", "svd_7b", "ties_vs_peft", "bake_extract", "sharded")  # in order of importance
GPU_ONLY_PARTS = ("svd_7b", "sharded", "ties_vs_peft")  # nothing on the CPU to compare them with that others lack
SCALES = {  # hidden, intermediate, layers, rank of the merge inputs
    "small": (1024, 2816, 2, 16),
    "tiny": (128, 352, 2, 8),
}
# bake/extract's model: at "small", above 1024 rows and columns, so extract takes its randomized SVD and excess bound
BAKE_SCALES = {"small": (1280, 3456, 2, 16), "tiny": (128, 352, 2, 8)}
ALPHAS = (32, 16, 8)
WEIGHTS = (0.5, 0.3, 0.2)

# Largest relative distance √(Σ‖ΔW_gpu − ΔW_cpu‖² / Σ‖ΔW_cpu‖²) accepted between the CUDA and the CPU result, float32
# with TF32 off. Both run the same float32 algorithm (float64 for the small cores); the libraries (cuBLAS/cuSOLVER
# against the CPU's BLAS/LAPACK) sum in other orders, so each product differs by a few float32 ulps (~1e-7) times the
# conditioning of the step:
# * "factored": QR and SVD of the stacked factors, truncated at a singular-value gap that random adapters leave wide:
#   perturbation ≈ ε‖ΔW‖/gap, well below 1e-4;
# * "elementwise": a dense trim (TIES's top-k by magnitude, the sign election) can flip entries whose magnitudes or
#   sums tie within rounding; each flip moves ΔW by one small entry: 1e-3;
# * "trimmed_core": KnOTS trims and sign-elects the aligned tasks' coefficients in its shared basis, so an entry that
#   ties within rounding moves a whole basis direction's coefficient: perturbing the inputs by 4–8 ulp on the CPU
#   moved one seed's KnOTS merge by 2.2e-3 (worst module 6e-3), the others by ≤ 2.5e-5 (a reviewer's one-off runs,
#   not kept): 1e-2;
# * "bf16_output": the 7B merge writes bfloat16 factors: rounding one factor differently moves ΔW by up to 2⁻⁸
#   relative, so the products differ by up to ~1e-2.
TOLERANCES = {"factored": 1e-4, "elementwise": 1e-3, "trimmed_core": 1e-2, "bf16_output": 1e-2}
# Mixed precision against float32, on the same data and seeds (see `compare_training`):
# * RAPF's accuracies after each task: within 2 test images of the seen classes. bf16 keeps 8 bits of mantissa
#   (relative rounding 2⁻⁹ per operation) and fp16 10; over a few hundred SGD steps that moves the adapter by about a
#   percent, which may move an image lying on a class boundary, not many;
# * RAPF's adapter W: relative distance ≤ 0.05 (measured on the CPU in bf16: see the JSON's rapf figures);
# * the F-VAE's meta loss after training (evaluated in float32 on the same snapshots): relative difference ≤ 0.05,
#   between precisions on one device only: its reparameterisation noise comes from a generator on the device, and a
#   CUDA generator draws other numbers than a CPU one for the same seed (changing only that noise moved the CPU's
#   meta loss by 0.03–0.13 in a reviewer's one-off runs, not kept), so the GPU's float32 run is compared with the
#   CPU's on RAPF alone;
# * fp16 runs a GradScaler from 2¹⁰, not Accelerate's default 2¹⁶: at 2¹⁶ this recipe's gradients overflow fp16 in
#   the first ~5 of the first task's 12 steps, which the scaler skips (the gradients' size measured in float32 by
#   the reviewer of this script, a one-off run, not kept): a different training, where a real run of thousands of
#   steps skips the same few and loses nothing.
FP16_INITIAL_SCALE = 2.0**10
TRAINING_TOLERANCES = {"accuracy_images": 2, "rapf_weight": 0.05, "meta_loss": 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small", help="size of the merge inputs")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-fusion-gpu-check"))
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of the 7B merge and its floor")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; a part that would start after it is "
                        "skipped (and said so), the PEFT comparison gets what is left")  # fmt: skip
    parser.add_argument("--rehearse", action="store_true", help="run the GPU half on the CPU (plumbing only)")
    parser.add_argument("--partial", type=Path, help="also write the JSON so far to this file after every part (what "
                        "is left if the run is killed at a time limit)")  # fmt: skip
    parser.add_argument("--worker", choices=("training",), help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit(training_worker(args.precision, args.device, args.workdir.expanduser().resolve()))
        return
    started = time.perf_counter()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")

    import warnings

    import torch

    from lora_fusion.errors import DegenerateMergeWarning

    warnings.filterwarnings("ignore", category=DegenerateMergeWarning)  # random adapters at rank 16, as meant
    deterministic_float32()
    gpu = "cuda" if torch.cuda.is_available() else None
    target = gpu or ("cpu" if args.rehearse else None)
    if gpu is None:
        log("no GPU: running the CPU half" + (" and rehearsing the GPU half on the CPU" if args.rehearse else ""))
    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "merges": lambda: check_merges(workdir / f"merges-{args.scale}", SCALES[args.scale], target),
        "bake_extract": lambda: check_bake_extract(workdir / f"bake-{args.scale}", BAKE_SCALES[args.scale], target),
        "training": lambda: check_training(workdir / "training", target),
        "svd_7b": lambda: check_svd_7b(workdir / "7b", target, runs=args.runs),
        "sharded": lambda: check_sharded(workdir / f"merges-{args.scale}", SCALES[args.scale], target),
        "ties_vs_peft": lambda: check_ties_vs_peft(target, seconds_left=args.budget - (time.perf_counter() - started)),
    }
    results: dict[str, Any] = {}

    def figures() -> dict[str, Any]:
        failures = sorted(failed_checks(results))
        return {
            "benchmark": "gpu_check",
            "device": torch.cuda.get_device_name() if gpu else ("cpu (rehearsal)" if args.rehearse else "no GPU"),
            "gpus": torch.cuda.device_count() if gpu else 0,
            "versions": versions(),
            "scale": args.scale,
            "tf32": False,
            "tolerances": {**TOLERANCES, **{f"training_{k}": v for k, v in TRAINING_TOLERANCES.items()},
                           "fp16_initial_loss_scale": FP16_INITIAL_SCALE},
            "ok": not failures,
            "failures": failures,
            "parts": results,
            "machine": machine(),
            "runtime_s": rounded(time.perf_counter() - started),
        }

    for part in parts:
        if target is None and part in GPU_ONLY_PARTS:
            results[part] = {"skipped": "no GPU"}
            continue
        if time.perf_counter() - started > args.budget:
            results[part] = {"skipped": f"over the {args.budget:g} s budget"}
            log(f"{part}: skipped, over the budget")
            continue
        log(f"{part} ...")
        begun = time.perf_counter()
        try:
            results[part] = runners[part]()
        except Exception as err:  # one broken part must not cost the others' figures: recorded, exit code 1
            import traceback

            results[part] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            log(f"{part}: FAILED {type(err).__name__}: {err}")
        results[part]["part_seconds"] = rounded(time.perf_counter() - begun)
        if args.partial:
            args.partial.write_text(json.dumps(figures(), indent=2) + "\n")
    final = figures()
    emit(final)
    sys.exit(0 if final["ok"] else 1)


def deterministic_float32() -> None:
    """float32 matrix products in full float32 on the GPU (no TF32), so that CUDA and CPU results are comparable."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    import torch

    found: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "accelerate", "safetensors", "huggingface_hub"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def failed_checks(results: dict[str, Any], path: str = "") -> list[str]:
    """Every part that raised, and every `within_tolerance` / target that is false, by its path in the JSON."""
    failed = []
    for key, value in results.items():
        where = f"{path}.{key}" if path else key
        if key == "error":
            failed.append(path)
        elif key in ("within_tolerance", "identical", "finite") and value is False:
            failed.append(where)
        elif isinstance(value, dict):
            failed.extend(failed_checks(value, where))
    return failed


# --- measuring ------------------------------------------------------------------------------------------------------


class GpuMemory:
    """Peak GPU memory allocated inside the block, above what was allocated when it began (None on the CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak_bytes: int | None = None

    def __enter__(self) -> GpuMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.start


def distance(reference: Any, other: Any, names: Sequence[str], *, on: str = "cpu") -> dict[str, float]:
    """√(Σ‖ΔW_o − ΔW_r‖² / Σ‖ΔW_r‖²) over `names` and the worst module's ‖ΔW_o − ΔW_r‖ / ‖ΔW_r‖, ΔW of two
    [`LoraAdapter`]s (or of two mappings name → (B, A)), computed on `on` in float64."""
    import torch

    residual = total = worst = 0.0
    for name in names:
        r, o = (_delta(x, name).to(on, dtype=torch.float64) for x in (reference, other))
        err, ref = float((o - r).norm() ** 2), float(r.norm() ** 2)
        residual, total = residual + err, total + ref
        worst = max(worst, math.sqrt(err / ref) if ref else math.sqrt(err))
    return {"relative": math.sqrt(residual / total) if total else math.sqrt(residual), "worst_module": worst}


def _delta(source: Any, name: str) -> Any:
    if hasattr(source, "delta"):
        return source.delta(name)
    B, A = source[name]
    return B.float() @ A.float()


def judged(measured: dict[str, float], tolerance: float, kind: str) -> dict[str, Any]:
    return {**{k: float(f"{v:.3g}") for k, v in measured.items()}, "tolerance": tolerance, "tolerance_kind": kind,
            "within_tolerance": measured["relative"] <= tolerance}


# --- merges ---------------------------------------------------------------------------------------------------------


def small_inputs(workdir: Path, scale: tuple[int, int, int, int]) -> tuple[list[Path], Path]:
    """Three float32 adapters of the scale's shape (alphas 32, 16, 8) and a base-weights file for RAPF (random W₀,
    std 0.02, the same module names), each made once per workdir."""
    import torch
    from safetensors.torch import save_file

    hidden, intermediate, layers, rank = scale
    projections = llama_projections(hidden, intermediate)
    shapes = [AdapterShape(projections=projections, layers=layers, rank=rank, alpha=alpha, dtype="float32",
                           base_model="gpu-check/llama") for alpha in ALPHAS]
    sources = ensure_adapters(workdir, shapes)
    base = workdir / "base.safetensors"
    if not base.is_file():
        generator = torch.Generator().manual_seed(1234)
        weights = {f"model.layers.{layer}.{name}.weight": torch.randn(shape, generator=generator) * 0.02
                   for layer in range(layers) for name, shape in projections.items()}
        save_file(weights, str(base.with_suffix(".incomplete")))
        base.with_suffix(".incomplete").rename(base)
    return sources, base


def merge_cases(rank: int, base: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Name → (merge keyword arguments, tolerance kind). RAPF's base-aware path takes an SVD of each W₀ per input in
    float64: the first layer only, to keep the CPU reference short."""
    return {
        "svd": ({"method": "svd", "rank": rank}, "factored"),
        "ties_full": ({"method": "ties", "density": 0.2, "space": "full", "rank": rank}, "elementwise"),
        "ties_core": ({"method": "ties", "density": 0.2, "space": "core", "rank": rank}, "elementwise"),
        "dare_ties": ({"method": "dare_ties", "density": 0.5, "seed": 0, "space": "full", "rank": rank},
                      "elementwise"),
        "knots": ({"method": "knots", "rank": rank}, "trimmed_core"),
        "tsv": ({"method": "tsv", "rank": rank}, "factored"),
        "rapf": ({"method": "rapf", "rank": rank, "bias": 0.6, "base_model": str(base),
                  "include": [r"layers\.0\."]}, "factored"),
    }


def check_merges(workdir: Path, scale: tuple[int, int, int, int], target: str | None) -> dict[str, Any]:
    """The main cases at the scale's size; a DoRA source (its update formed from W₀ on the device); and every other
    registered per-module method at the tiny size, where each costs a fraction of a second."""
    from lora_fusion.methods import list_methods

    sources, base = small_inputs(workdir, scale)
    paths = [str(s) for s in sources]
    results: dict[str, Any] = {"inputs": {"hidden": scale[0], "intermediate": scale[1], "layers": scale[2],
                                          "rank": scale[3], "adapters": len(paths), "dtype": "float32"}}
    for name, (kwargs, tolerance) in merge_cases(scale[3], base).items():
        log(f"merges: {name}")
        results[name] = merge_case(paths, list(WEIGHTS), kwargs, tolerance, target)
    hidden, intermediate, layers, rank = scale
    dora_shape = AdapterShape(projections=llama_projections(hidden, intermediate), layers=layers, rank=rank,
                              alpha=16, dtype="float32", base_model="gpu-check/llama", dora=True)
    dora = str(ensure_adapters(workdir / "dora", [dora_shape])[0])
    log("merges: ties_with_dora")
    results["ties_with_dora"] = merge_case(
        [dora, paths[1]], [0.6, 0.4], {"method": "ties", "density": 0.2, "space": "full", "rank": rank,
                                       "base_model": str(base), "include": [r"layers\.0\."]}, "elementwise", target)
    tiny, tiny_base = small_inputs(workdir / "tiny", SCALES["tiny"])
    covered = {kwargs["method"] for kwargs, _ in merge_cases(rank, base).values()}
    others: dict[str, Any] = {}
    for spec in list_methods():
        if spec.kind != "module" or spec.name in covered:
            continue
        log(f"merges: {spec.name} (tiny)")
        exact = spec.name in ("linear", "task_arithmetic", "iso_c", "iso_cts")
        others[spec.name] = merge_case([str(s) for s in tiny], list(WEIGHTS), {"method": spec.name},
                                       "factored" if exact else "elementwise", target)
    log("merges: rapf without base weights (tiny)")
    others["rapf_adapter_only"] = merge_case([str(s) for s in tiny], list(WEIGHTS), {"method": "rapf"}, "factored",
                                             target)
    results["other_methods_tiny"] = others
    return results


def merge_case(paths: list[str], weights: list[float], kwargs: dict[str, Any], tolerance: str,
               target: str | None) -> dict[str, Any]:
    """One merge on the CPU and (when `target`) on the device: timings, peak device memory beside the plan's
    estimate, and the distance between the two merged updates."""
    import lora_fusion

    plan = lora_fusion.merge(paths, weights=weights, dry_run=True, progress=False, **kwargs)
    entry: dict[str, Any] = {
        "plan_peak_bytes": plan.peak_bytes,  # what `--dry-run` prints: CPU workers' modules + the output
        "plan_one_module_bytes": max(m.working_bytes for m in plan.modules),
    }
    begun = time.perf_counter()
    on_cpu = lora_fusion.merge(paths, weights=weights, progress=False, **kwargs)
    entry["cpu_s"] = rounded(time.perf_counter() - begun)
    if target is None:
        return entry
    lora_fusion.merge(paths, weights=weights, progress=False, device=target, **kwargs)  # warm-up: kernels, handles
    with GpuMemory(target) as memory:
        begun = time.perf_counter()
        on_device = lora_fusion.merge(paths, weights=weights, progress=False, device=target, **kwargs)
        entry["device_s"] = rounded(time.perf_counter() - begun)  # its tensors are on the CPU: synchronised
    entry["device_peak_bytes"] = memory.peak_bytes
    entry["cpu_over_device"] = rounded(entry["cpu_s"] / entry["device_s"], 3)
    entry["device_vs_cpu"] = judged(distance(on_cpu, on_device, list(on_cpu.modules)), TOLERANCES[tolerance],
                                    tolerance)
    return entry


def check_sharded(workdir: Path, scale: tuple[int, int, int, int], target: str | None) -> dict[str, Any]:
    """`accelerate launch` of the svd merge on every GPU present (a single process on one GPU) against the plain
    one-process merge on the same device: the same bytes."""
    import torch

    sources, _ = small_inputs(workdir, scale)
    assert target is not None
    processes = max(1, torch.cuda.device_count()) if target.startswith("cuda") else 1
    common = ["merge", *map(str, sources), "--method", "svd", "--rank", str(scale[3]), "--device", target,
              "--overwrite", "--quiet"]
    one, launched = workdir / "merged-1proc", workdir / f"merged-launched-{processes}"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  *(["--multi_gpu"] if processes > 1 else []), *(["--cpu"] if target == "cpu" else [])]
    single = run_process([sys.executable, "-m", "lora_fusion_cli", *common, "--out", str(one)], env=cli_env())
    sharded = run_process([*accelerate, "-m", "lora_fusion_cli", *common, "--out", str(launched)], env=cli_env())
    files = sorted(p.name for p in one.iterdir())
    same = {name: (one / name).read_bytes() == (launched / name).read_bytes() for name in files}
    return {"processes": processes, "one_process_s": rounded(single.wall_s), "launched_s": rounded(sharded.wall_s),
            "files": same, "identical": all(same.values())}


def cli_env() -> dict[str, str]:
    """The environment of a CLI child: this checkout's packages importable (the device machine runs it uninstalled,
    with `lora_fusion_cli` a link to cli/ at the root, see benchmarks/README.md)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


# --- the 7B-shaped svd merge ----------------------------------------------------------------------------------------


def check_svd_7b(workdir: Path, target: str | None, *, runs: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    import lora_fusion

    assert target is not None
    sources = ensure_adapters(workdir)
    python = sys.executable
    cpu_out, device_out, floor_file = workdir / "merged-cpu", workdir / "merged-device", workdir / "floor.safetensors"
    merge = [python, "-m", "lora_fusion_cli", "merge", *map(str, sources), "--method", "svd", "--overwrite",
             "--quiet"]
    floor_cmd = [python, str(HERE / "io_floor.py"), "--out", str(floor_file), *map(str, sources)]
    # what the GPU merge pays before any work: importing torch and starting CUDA (the floor starts no CUDA)
    startup_cmd = [python, "-c", f"import torch; torch.zeros(1, device={target!r}).sum().item()"]
    floors, merges, startups = [], [], []
    for run in range(runs):  # interleaved: a slow moment of the machine hits both alike
        floors.append(run_process(floor_cmd))
        merges.append(run_process([*merge, "--device", target, "--out", str(device_out)], env=cli_env()))
        startups.append(run_process(startup_cmd))
        log(f"svd_7b: run {run + 1}: floor {floors[-1].wall_s:.2f} s, merge on {target} {merges[-1].wall_s:.2f} s")
    on_cpu = run_process([*merge, "--device", "cpu", "--out", str(cpu_out)], env=cli_env())
    names = None
    factors = []
    for folder in (cpu_out, device_out):
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        modules = sorted(k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight"))
        names = names or modules
        factors.append({m: (tensors[f"{m}.lora_B.weight"].to(target), tensors[f"{m}.lora_A.weight"].to(target))
                        for m in modules})
    closeness = distance(factors[0], factors[1], names or [], on=target)
    adapters = [lora_fusion.load_adapter(s) for s in sources]
    plan = lora_fusion.merge(adapters, method="svd", dry_run=True, progress=False)
    with GpuMemory(target) as memory:
        lora_fusion.merge(adapters, method="svd", device=target, progress=False)
    device_s, floor_s = summary(merges), summary(floors)
    ratio = device_s["wall_best_s"] / floor_s["wall_best_s"]
    return {
        "merge_device": device_s,
        "floor": floor_s,
        "merge_cpu_s": rounded(on_cpu.wall_s),
        "torch_import_and_device_start_best_s": rounded(min(r.wall_s for r in startups)),
        "ratio_device_merge_over_floor": rounded(ratio, 3),
        "ratio_device_merge_over_floor_median": rounded(device_s["wall_median_s"] / floor_s["wall_median_s"], 3),
        "target_within_1_2x_floor": ratio <= 1.2,
        "device_vs_cpu": judged(closeness, TOLERANCES["bf16_output"], "bf16_output"),
        "device_peak_bytes": memory.peak_bytes,
        "plan_peak_bytes": plan.peak_bytes,
        "plan_one_module_bytes": max(m.working_bytes for m in plan.modules),
        "modules": len(names or []),
        "torch_threads": torch.get_num_threads(),
    }


# --- bake and extract -----------------------------------------------------------------------------------------------


def tiny_llama(folder: Path, scale: tuple[int, int, int, int]) -> Path:
    """A random float32 Llama of the scale's hidden and intermediate sizes (2 layers), saved with transformers (kept
    in `folder` for the next run of the same sizes)."""
    hidden, intermediate, _, _ = scale
    saved = folder / "config.json"
    if saved.is_file():
        config = json.loads(saved.read_text())
        if (config.get("hidden_size"), config.get("intermediate_size")) == (hidden, intermediate):
            return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         tie_word_embeddings=False)
    stage = folder.with_name(folder.name + ".incomplete")
    shutil.rmtree(stage, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(stage, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    stage.rename(folder)
    return folder


def check_bake_extract(workdir: Path, scale: tuple[int, int, int, int], target: str | None) -> dict[str, Any]:
    from safetensors.torch import load_file

    import lora_fusion

    hidden, intermediate, _, rank = scale
    base = tiny_llama(workdir / "base", scale)
    shapes = [AdapterShape(projections=llama_projections(hidden, intermediate), layers=2, rank=rank, alpha=alpha,
                           dtype="float32", base_model=str(base)) for alpha in ALPHAS[:2]]
    sources = [str(s) for s in ensure_adapters(workdir / "adapters", shapes)]
    options = {"method": "svd", "rank": rank, "weights": [0.6, 0.4], "overwrite": True, "progress": False}
    results: dict[str, Any] = {}
    begun = time.perf_counter()
    baked_cpu = lora_fusion.bake(base, sources, out=workdir / "baked-cpu", device="cpu", **options)
    results["bake_cpu_s"] = rounded(time.perf_counter() - begun)
    begun = time.perf_counter()
    extracted_cpu = lora_fusion.extract(base, baked_cpu, rank=rank, device="cpu")
    results["extract_cpu_s"] = rounded(time.perf_counter() - begun)
    worst = max(s.relative_error for s in extracted_cpu.stats.values())
    results["extract_cpu_relative_error_max"] = float(f"{worst:.3g}")
    if target is None:
        return results
    with GpuMemory(target) as memory:
        begun = time.perf_counter()
        baked_device = lora_fusion.bake(base, sources, out=workdir / "baked-device", device=target, **options)
        results["bake_device_s"] = rounded(time.perf_counter() - begun)
    results["bake_device_peak_bytes"] = memory.peak_bytes
    original = load_file(str(_weights_file(base)))
    cpu, device = load_file(str(_weights_file(baked_cpu))), load_file(str(_weights_file(baked_device)))
    changed = [k for k in original if not original[k].equal(cpu[k])]
    unchanged_equal = all(device[k].equal(cpu[k]) for k in original if k not in changed)
    # the baked weights differ where the merged ΔW does: measured against the update, not against W₀
    updates = {k: (cpu[k].double() - original[k].double(), device[k].double() - original[k].double())
               for k in changed}
    closeness = {"relative": math.sqrt(sum(float((d - c).norm() ** 2) for c, d in updates.values())
                                       / sum(float(c.norm() ** 2) for c, _ in updates.values())),
                 "worst_module": max(float((d - c).norm() / c.norm()) for c, d in updates.values())}
    results["bake_device_vs_cpu"] = {**judged(closeness, TOLERANCES["factored"], "factored"),
                                     "changed_tensors": len(changed), "unchanged_tensors_identical": unchanged_equal}
    if not unchanged_equal:
        results["bake_device_vs_cpu"]["within_tolerance"] = False
    with GpuMemory(target) as memory:
        begun = time.perf_counter()
        extracted_device = lora_fusion.extract(base, baked_cpu, rank=rank, device=target)
        results["extract_device_s"] = rounded(time.perf_counter() - begun)
    results["extract_device_peak_bytes"] = memory.peak_bytes
    results["extract_device_vs_cpu"] = judged(
        distance(extracted_cpu, extracted_device, list(extracted_cpu.modules)), TOLERANCES["factored"], "factored")
    return results


def _weights_file(folder: Path) -> Path:
    return folder / "model.safetensors"


# --- training in mixed precision ------------------------------------------------------------------------------------


def check_training(workdir: Path, target: str | None) -> dict[str, Any]:
    """One process per precision (Accelerate fixes it once per process): float32 first, the reference."""
    device = target or "cpu"
    precisions = ["no", "bf16", "fp16"] if device.startswith("cuda") else ["no", "bf16"]
    runs = {precision: training_process(precision, device, workdir) for precision in precisions}
    result = {"device": device, "runs": runs, "against_float32": compare_training(runs, reference="no")}
    if device != "cpu":  # the same float32 run on the CPU: the CUDA path of the trainers against the CPU's
        on_cpu = training_process("no", "cpu", workdir)
        result["cpu_float32"] = on_cpu
        # RAPF only: the F-VAE's noise generator lives on the device, whose stream differs (TRAINING_TOLERANCES)
        compared = compare_training({"cpu": on_cpu, "device": runs["no"]}, reference="cpu")["device"]
        result["device_float32_against_cpu_float32"] = {"rapf": compared["rapf"]}
    return result


def training_process(precision: str, device: str, workdir: Path) -> dict[str, Any]:
    log(f"training: {precision} on {device}")
    folder = workdir / f"{device.replace(':', '')}-{precision}"
    shutil.rmtree(folder, ignore_errors=True)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "training", "--precision",
                           precision, "--device", device, "--workdir", str(folder)],
                          capture_output=True, text=True, env=cli_env(), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the {precision} training process on {device} failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout)


def compare_training(runs: dict[str, Any], *, reference: str) -> dict[str, Any]:
    """Each run's metrics against those of `runs[reference]` (TRAINING_TOLERANCES)."""
    import torch
    from safetensors.torch import load_file

    weight = {p: load_file(r["rapf"]["adapter_file"])["weight"].double() for p, r in runs.items()}
    seen_test_images = runs[reference]["rapf"]["seen_test_images"]
    compared: dict[str, Any] = {}
    for precision, run in runs.items():
        if precision == reference:
            continue
        gaps = [abs(a - b) for a, b in zip(run["rapf"]["accuracies"], runs[reference]["rapf"]["accuracies"])]
        allowed = [TRAINING_TOLERANCES["accuracy_images"] / n for n in seen_test_images]
        weight_gap = float((weight[precision] - weight[reference]).norm() / weight[reference].norm())
        rapf = {
            "finite": bool(torch.isfinite(weight[precision]).all())
            and all(math.isfinite(x) for epochs in run["rapf"]["epoch_losses"] for x in epochs),
            "last_epoch_losses": [epochs[-1] for epochs in run["rapf"]["epoch_losses"]],
            "reference_last_epoch_losses": [epochs[-1] for epochs in runs[reference]["rapf"]["epoch_losses"]],
            "accuracy_abs_differences": [rounded(g) for g in gaps],
            "accuracy_tolerances": [rounded(a) for a in allowed],
            "weight_relative_distance": rounded(weight_gap),
            "weight_tolerance": TRAINING_TOLERANCES["rapf_weight"],
        }
        rapf["within_tolerance"] = (all(g <= a + 1e-12 for g, a in zip(gaps, allowed))
                                    and weight_gap <= TRAINING_TOLERANCES["rapf_weight"])
        compared[precision] = {"rapf": rapf}
        if "fvae" in run:
            ours, theirs = run["fvae"], runs[reference]["fvae"]
            gap = abs(ours["meta_loss"] - theirs["meta_loss"]) / abs(theirs["meta_loss"])
            compared[precision]["fvae"] = {
                "finite": all(math.isfinite(x) for x in ours["logged_losses"]) and math.isfinite(ours["meta_loss"]),
                "meta_loss_relative_difference": rounded(gap),
                "tolerance": TRAINING_TOLERANCES["meta_loss"],
                "within_tolerance": gap <= TRAINING_TOLERANCES["meta_loss"],
            }
    return compared


def training_worker(precision: str, device: str, workdir: Path) -> dict[str, Any]:
    """In its own process: RAPF's trainer for 2 tasks, then (not for fp16) the F-VAE meta-training, both under one
    Accelerate precision; returns their metrics and where the RAPF adapter was written."""
    import importlib.util

    from accelerate import Accelerator
    from accelerate.utils import GradScalerKwargs

    from lora_fusion.cil.trainer import run_cil

    deterministic_float32()
    # the tests' tiny CLIP and synthetic images, so the check trains what they test (loaded from its file: a
    # `tests` package elsewhere on the path must not shadow it)
    spec = importlib.util.spec_from_file_location("gpu_check_rapf_tests", ROOT / "tests" / "test_rapf.py")
    assert spec is not None and spec.loader is not None
    fixtures = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))  # test_rapf imports lora_fusion and its siblings from the checkout
    spec.loader.exec_module(fixtures)
    on_cpu = device == "cpu"
    recipe = fixtures.tiny_recipe(workdir, mixed_precision=precision, cpu=on_cpu)
    dataset = fixtures.synthetic_dataset()
    scaler = [GradScalerKwargs(init_scale=FP16_INITIAL_SCALE)] if precision == "fp16" else []
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=precision, kwargs_handlers=scaler)
    with GpuMemory(device) as memory:
        begun = time.perf_counter()
        result = run_cil(recipe, encoders=fixtures.build_tiny_clip(), dataset=dataset, accelerator=accelerator,
                         resume=False, stop_after=1, progress=False)
        seconds = time.perf_counter() - begun
    per_class = int((dataset.test.labels == 0).sum())
    rapf = {
        "accuracies": result.accuracies,
        "epoch_losses": result.losses,
        "seen_test_images": [per_class * len(sum(result.tasks[: t + 1], [])) for t in range(len(result.tasks))],
        "adapter_file": str(sorted(Path(result.out).glob("task_*/adapter.safetensors"))[-1]),
        "seconds": rounded(seconds),
        "peak_device_bytes": memory.peak_bytes,
    }
    figures: dict[str, Any] = {"precision": precision, "device": device, "rapf": rapf}
    if precision != "fp16":
        figures["fvae"] = fvae_run(precision, on_cpu, device)
    return figures


def fvae_run(precision: str, on_cpu: bool, device: str, steps: int = 40) -> dict[str, Any]:
    """The toy world of tests/test_icm.py (4 tasks, uneven snapshot counts), `steps` meta-training steps."""
    import torch

    from lora_fusion.icm.meta import MetaTrainConfig, TaskSnapshots, evaluate_meta_loss, meta_train
    from lora_fusion.icm.toy import make_toy_world, toy_layout
    from lora_fusion.icm.training import train_joint_lora

    torch.manual_seed(0)
    world, tasks = make_toy_world(n_tasks=4, seed=0)
    layout = toy_layout(world)
    generator = torch.Generator().manual_seed(1)
    data = []
    for index, task in enumerate(tasks):
        train, support = (task.sample(n, generator) for n in (400, 10))
        _, snapshots = train_joint_lora(world, [(task.name, train)], layout, steps=120, seed=index, lr=1e-2,
                                        snapshots=(6, 4, 2, 1)[index])
        data.append(TaskSnapshots(task.name, snapshots, support))
    lines: list[str] = []
    config = MetaTrainConfig(steps=steps, cpu=on_cpu, seed=0, log_every=10, mixed_precision=precision)
    with GpuMemory(device) as memory:
        begun = time.perf_counter()
        trained = meta_train(world, layout, data, config, log=lines.append)
        seconds = time.perf_counter() - begun
    losses = [float(line.split(" loss ")[1].split()[0]) for line in lines if " loss " in line]
    return {"steps": steps, "logged_losses": losses, "meta_loss": evaluate_meta_loss(trained, data),
            "seconds": rounded(seconds), "peak_device_bytes": memory.peak_bytes}


# --- against PEFT on the same GPU -----------------------------------------------------------------------------------


def check_ties_vs_peft(target: str | None, *, seconds_left: float) -> dict[str, Any]:
    assert target is not None
    command = [sys.executable, str(HERE / "bench_interference_vs_peft.py"), "--device", target, "--layers", "1",
               "--runs", "2", "--peft-runs", "1", "--no-peft-thin", "--wait-max", "0"]
    done = run_process(command, env=cli_env(), timeout=max(90.0, seconds_left), check=False)
    if done.timed_out:
        return {"error": f"timed out after {done.wall_s:.0f} s (the budget left)"}
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-1500:]}
    figures = json.loads(done.stdout)
    ties = figures["ties"]
    return {
        "peft_ties_svd_s": ties["peft_ties_svd_s"],
        "lora_fusion_full_s": ties["lora_fusion_full_s"],
        "speedup_full": ties["speedup_full"],
        "target_full_100x": ties["speedup_full"] >= 100,
        "errors_vs_dense_ties": ties["errors_vs_dense_ties"],
        "dare_ties": {k: v for k, v in figures["dare_ties"].items() if k.endswith("_s") or k.startswith("speedup")},
        "bench": figures,
    }


if __name__ == "__main__":
    main()
