"""A Llama-2-7B-shaped merge: four rank-16 adapters on all seven projections of 32 layers (224 modules), bf16.

The adapters are synthesised directly as PEFT files (safetensors + adapter_config.json, the key layout PEFT writes)
into a work directory outside git, and reused on later runs. Then, each in its own process so that its peak RSS is
its own, it measures

* `lora-fusion merge A B C D --method svd --out OUT --overwrite --quiet`, end to end (wall time, peak RSS);
* the I/O floor (`io_floor.py`): the same interpreter reading every tensor of the four inputs and writing one
  safetensors file with as many bf16 elements as the merge output;
* `python -c "import torch, safetensors"` alone, the startup both of them pay;
* the same merge with OMP_NUM_THREADS=1, a diagnostic: on a machine whose cores are busy with other work, torch's
  OpenMP threads spin-wait on each other and every small op gets many times slower (see benchmarks/README.md).

Runs are interleaved (floor, merge, floor, merge, ...) so a slow moment of the machine hits both alike.
Targets: merge wall time < 2x the floor's, merge peak RSS < 2 GB.

Usage: python benchmarks/bench_7b_shape.py [--workdir /tmp/lora-fusion-bench-7b] [--runs 3] [--profile] [--stages]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import ProcessRun, console_script, emit, log, machine, rounded, run_process

HERE = Path(__file__).resolve().parent


def llama_projections(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each of a Llama layer's seven projections (multi-head attention: q, k, v, o
    all hidden × hidden)."""
    square = (hidden, hidden)
    return {"self_attn.q_proj": square, "self_attn.k_proj": square, "self_attn.v_proj": square,
            "self_attn.o_proj": square, "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
            "mlp.down_proj": (hidden, intermediate)}


PROJECTIONS = llama_projections(4096, 11008)  # Llama-2-7B
LAYERS = 32
RANK = 16
ALPHA = 32
ADAPTERS = 4
BASE_MODEL = "meta-llama/Llama-2-7b-hf"
FORMAT_VERSION = 1  # bump when the synthesised files change, so stale caches are rebuilt


@dataclass(frozen=True)
class AdapterShape:
    """What `synthesise` writes: LoRAs of one rank on every projection of every layer (default: Llama-2-7B, bf16).
    `benchmarks/gpu_check.py` uses smaller ones, of different alphas, in float32, and a DoRA one (`dora`: PEFT's
    `lora_magnitude_vector` per module, `use_dora` in the config)."""

    projections: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(PROJECTIONS))
    layers: int = LAYERS
    rank: int = RANK
    alpha: int = ALPHA
    dtype: str = "bfloat16"
    base_model: str = BASE_MODEL
    dora: bool = False


LLAMA_7B = AdapterShape()


def adapter_config(shape: AdapterShape = LLAMA_7B) -> dict[str, Any]:
    """An adapter_config.json as PEFT writes it for a plain LoRA on the seven projections."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": shape.base_model,
        "r": shape.rank,
        "lora_alpha": shape.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(name.split(".")[-1] for name in shape.projections),
        "use_rslora": False,
        "use_dora": shape.dora,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _marker(shape: AdapterShape, seed: int) -> dict[str, Any]:
    """bench.json of a synthesised adapter: what it was made from (the 7B shape's marker predates the shape), as
    JSON reads it back (lists, not tuples), so a stored marker compares equal."""
    shaped = {} if shape == LLAMA_7B else {"shape": asdict(shape)}
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, "seed": seed, **shaped}))


def synthesise(folder: Path, seed: int, shape: AdapterShape = LLAMA_7B) -> None:
    """Write one random PEFT adapter: A ~ U(±1/√in) as PEFT's default init, B ~ N(0, 0.01²) (non-zero)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shape.layers):
        for projection, (out_features, in_features) in shape.projections.items():
            prefix = f"base_model.model.model.layers.{layer}.{projection}"
            bound = in_features**-0.5
            a = (torch.rand(shape.rank, in_features, generator=generator) * 2 - 1) * bound
            b = torch.randn(out_features, shape.rank, generator=generator) * 0.01
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype)
            if shape.dora:  # trained row magnitudes μ: positive, of the order of a random W₀'s row norms
                tensors[f"{prefix}.lora_magnitude_vector"] = (0.5 + 0.3 * torch.rand(out_features, generator=generator)
                                                               ).to(dtype)
    stage = folder.with_name(folder.name + ".incomplete")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    save_file(tensors, str(stage / "adapter_model.safetensors"), metadata={"format": "pt"})
    (stage / "adapter_config.json").write_text(json.dumps(adapter_config(shape), indent=2) + "\n")
    (stage / "bench.json").write_text(json.dumps(_marker(shape, seed)) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    stage.rename(folder)


def ensure_adapters(workdir: Path, shapes: list[AdapterShape] | None = None) -> list[Path]:
    """One adapter folder per shape in `workdir` (default: four of the 7B shape), synthesised unless a complete copy
    of the same shape and format is already there."""
    folders = []
    for index, shape in enumerate(shapes or [LLAMA_7B] * ADAPTERS):
        folder = workdir / f"adapter_{index}"
        marker = folder / "bench.json"
        current = marker.is_file() and json.loads(marker.read_text()) == _marker(shape, index)
        if current:
            log(f"reusing {folder}")
        else:
            log(f"synthesising {folder} ({shape.layers} layers, rank {shape.rank}, {shape.dtype})")
            synthesise(folder, seed=index, shape=shape)
        folders.append(folder)
    return folders


def stored_elements(path: Path) -> int:
    """The number of tensor elements in a safetensors file, from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())


def summary(runs: list[ProcessRun]) -> dict[str, Any]:
    """Best and median wall time and peak RSS of repeated runs of one command (a run killed at the time limit
    counts with its wall time at the kill, a lower bound)."""
    walls = [r.wall_s for r in runs]
    rss = [r.max_rss_mb for r in runs if not r.timed_out]  # a killed run's peak RSS is not reported
    return {
        "timed_out_runs": sum(r.timed_out for r in runs),
        "wall_best_s": rounded(min(walls)),
        "wall_median_s": rounded(statistics.median(walls)),
        "peak_rss_mb_max": rounded(max(rss)) if rss else None,
        "peak_rss_mb_median": rounded(statistics.median(rss)) if rss else None,
        "wall_all_s": [rounded(w) for w in walls],
        "peak_rss_all_mb": [rounded(m) for m in rss],
    }


def profile_merge(sources: list[Path], out: Path, top: int = 25) -> list[dict[str, Any]]:
    """cProfile of the library call the CLI makes (merge + save_pretrained), in this process; top functions by
    cumulative time are logged on stderr and returned."""
    import cProfile
    import io
    import pstats

    import lora_fusion

    profiler = cProfile.Profile()
    profiler.enable()
    merged = lora_fusion.merge([str(s) for s in sources], method="svd", progress=False)
    merged.save_pretrained(out, overwrite=True)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
    stats.print_stats(top)
    log("cProfile of merge + save_pretrained (cumulative):\n" + text.getvalue())
    rows = []
    for (file, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}:{function}", "calls": calls, "tottime_s": own,
                     "cumtime_s": cumulative})
    rows.sort(key=lambda r: r["cumtime_s"], reverse=True)
    return [{**r, "tottime_s": rounded(r["tottime_s"]), "cumtime_s": rounded(r["cumtime_s"])} for r in rows[:top]]


def stage_shares(sources: list[Path], rank: int = RANK) -> dict[str, float]:
    """Where the svd merge's per-module work goes: each stage of `linalg.factored_svd` + truncation timed on one
    torch thread over every module (reading the factors, stacking them, the Householder QRs, the core SVD, forming the
    kept singular vectors, casting the output), as shares of the total."""
    import torch

    from lora_fusion import load_adapter

    torch.set_num_threads(1)
    adapters = [load_adapter(s) for s in sources]
    spent = dict.fromkeys(("read", "stack", "geqrf", "core_svd", "ormqr", "cast"), 0.0)

    def timed(stage: str, work: Any) -> Any:
        begun = time.perf_counter()
        value = work()
        spent[stage] += time.perf_counter() - begun
        return value

    def kept(packed: Any, tau: Any, rotation: Any) -> Any:
        padded = packed.new_zeros(packed.shape[0], rank)
        padded[: rotation.shape[0]] = rotation[:, :rank].float()
        return torch.ormqr(packed, tau, padded)

    for name in adapters[0].modules:
        factors = timed("read", lambda: [a.factors(name) for a in adapters])
        B, A = timed("stack", lambda: (torch.cat([f.scale * f.B.float() for f in factors], 1),
                                       torch.cat([f.A.float() for f in factors], 0)))
        (pb, tb), (pa, ta) = timed("geqrf", lambda: (torch.geqrf(B), torch.geqrf(A.mT.contiguous())))
        k = B.shape[1]
        U, _, Vh = timed("core_svd", lambda: torch.linalg.svd(pb[:k].triu().double() @ pa[:k].triu().double().mT))
        left, right = timed("ormqr", lambda: (kept(pb, tb, U), kept(pa, ta, Vh.mT)))
        timed("cast", lambda: (left.to(torch.bfloat16), right.mT.contiguous().to(torch.bfloat16)))
    total = sum(spent.values())
    return {"one_thread_total_s": rounded(total, 3), **{stage: rounded(t / total, 3) for stage, t in spent.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-fusion-bench-7b"))
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of the floor and of the merge")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds before a merge run is killed (its "
                        "wall time is then a lower bound); a default-thread merge slower than a third of it is not "
                        "repeated")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="also cProfile the merge in-process (stderr)")
    parser.add_argument("--stages", action="store_true", help="only time the per-module stages (shares of the work)")
    args = parser.parse_args()
    started = time.perf_counter()
    workdir = args.workdir.expanduser().resolve()
    sources = ensure_adapters(workdir)
    if args.stages:
        emit({"benchmark": "bench_7b_shape stages", "shares": stage_shares(sources), "machine": machine()})
        return
    merged_dir, floor_file = workdir / "merged", workdir / "io_floor.safetensors"
    python = sys.executable

    import_cmd = [python, "-c", "import torch, safetensors"]
    floor_cmd = [python, str(HERE / "io_floor.py"), "--out", str(floor_file), *map(str, sources)]
    merge_cmd = [console_script("lora-fusion"), "merge", *map(str, sources), "--method", "svd",
                 "--out", str(merged_dir), "--overwrite", "--quiet"]  # fmt: skip

    single_thread = os.environ | {"OMP_NUM_THREADS": "1"}
    log(f"import baseline, floor, merge and single-thread merge, {args.runs} interleaved runs each")
    imports, floors, merges, merges_1t = [], [], [], []
    for run in range(args.runs):
        imports.append(run_process(import_cmd))
        floors.append(run_process(floor_cmd))
        # A merge slower than a third of the limit is far off target; repeating it would only blow the runtime.
        if not merges or merges[-1].wall_s < args.timeout / 3:
            merges.append(run_process(merge_cmd, timeout=args.timeout))
            merge_text = f"{merges[-1].wall_s:.2f} s / {merges[-1].max_rss_mb:.0f} MB"
            merge_text += " (killed at the time limit)" if merges[-1].timed_out else ""
        else:
            merge_text = "not repeated (too slow)"
        merges_1t.append(run_process(merge_cmd, env=single_thread, timeout=args.timeout))
        log(f"run {run + 1}: floor {floors[-1].wall_s:.2f} s / {floors[-1].max_rss_mb:.0f} MB, merge {merge_text}, "
            f"merge (1 thread) {merges_1t[-1].wall_s:.2f} s / {merges_1t[-1].max_rss_mb:.0f} MB")  # fmt: skip

    import torch

    # What the library itself predicts (`--dry-run`, headers only), to set beside the measured RSS.
    plan = json.loads(run_process([*merge_cmd, "--dry-run", "--json"]).stdout)
    merged_file = merged_dir / "adapter_model.safetensors"
    floor_out = json.loads(floors[-1].stdout)
    input_bytes = sum((s / "adapter_model.safetensors").stat().st_size for s in sources)
    merge_s, floor_s, merge_1t = summary(merges), summary(floors), summary(merges_1t)
    figures: dict[str, Any] = {
        "benchmark": "bench_7b_shape",
        "merge_wall_s": merge_s["wall_best_s"],
        "floor_wall_s": floor_s["wall_best_s"],
        "import_torch_safetensors_s": rounded(min(r.wall_s for r in imports)),
        "ratio_merge_over_floor": rounded(merge_s["wall_best_s"] / floor_s["wall_best_s"], 3),
        "ratio_merge_over_floor_median": rounded(merge_s["wall_median_s"] / floor_s["wall_median_s"], 3),
        "merge_1thread_wall_s": merge_1t["wall_best_s"],
        "ratio_merge_1thread_over_floor": rounded(merge_1t["wall_best_s"] / floor_s["wall_best_s"], 3),
        "merge_peak_rss_mb": merge_s["peak_rss_mb_max"],
        "merge_1thread_peak_rss_mb": merge_1t["peak_rss_mb_max"],
        "floor_peak_rss_mb": floor_s["peak_rss_mb_max"],
        "import_peak_rss_mb": rounded(max(r.max_rss_mb for r in imports)),
        "plan_estimated_peak_mb": rounded(plan["estimated_peak_bytes"] / 1e6),
        "merge_timed_out": any(r.timed_out for r in merges),
        "targets": {
            "merge_under_2x_floor": not merge_s["timed_out_runs"]
            and merge_s["wall_best_s"] < 2 * floor_s["wall_best_s"],
            # None: every default-thread merge was killed at the time limit, so its peak RSS is unknown.
            "merge_rss_under_2gb": None if merge_s["peak_rss_mb_max"] is None else merge_s["peak_rss_mb_max"] < 2000,
        },
        "merge": merge_s,
        "floor": floor_s,
        "merge_1thread": merge_1t,
        "import_torch_safetensors": summary(imports),
        "case": {
            "adapters": ADAPTERS,
            "rank": RANK,
            "layers": LAYERS,
            "modules": LAYERS * len(PROJECTIONS),
            "dtype": "bfloat16",
            "input_bytes_total": input_bytes,
            "input_elements_total": floor_out["read_elements"],
            "output_elements_merge": stored_elements(merged_file),
            "output_elements_floor": floor_out["written_elements"],
            "output_bytes_merge": merged_file.stat().st_size,
            "output_bytes_floor": floor_file.stat().st_size,
            "command": " ".join(["lora-fusion", *merge_cmd[1:]]),
        },
        "torch_threads_default": torch.get_num_threads(),
        "machine": machine(),
    }
    if args.profile:
        figures["profile_top"] = profile_merge(sources, workdir / "merged-profile")
    figures["bench_runtime_s"] = rounded(time.perf_counter() - started, 3)
    emit(figures)


if __name__ == "__main__":
    main()
