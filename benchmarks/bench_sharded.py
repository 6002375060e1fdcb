"""The 7B-shaped svd merge (bench_7b_shape.py's adapters) on 1 process and sharded over N processes, and on a GPU.

* 1 process: `lora-fusion merge A B C D --method svd --out OUT1 --quiet`;
* N processes: `torchrun --standalone --nproc_per_node N -m lora_fusion_cli merge … --out OUTN --quiet` (what
  `accelerate launch --multi_gpu --num_processes N -m lora_fusion_cli merge …` runs on a CPU machine), each process
  reading and merging every N-th module, the main one writing;
* where a CUDA GPU is visible: the 1-process merge with `--device cuda`, its wall time and how far its output is
  from the CPU output (different hardware, so not bit for bit: the largest absolute difference is printed).

Runs are interleaved; best and median wall times, the speedup (1-process time ÷ N-process time) and whether the
outputs are byte-identical are printed as JSON. Peak RSS is that of the largest single process of each run.

Usage: python benchmarks/bench_sharded.py [--workdir /tmp/lora-fusion-bench-7b] [--processes 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _common import console_script, emit, log, machine, rounded, run_process
from bench_7b_shape import ensure_adapters, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-fusion-bench-7b"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    workdir = args.workdir.expanduser().resolve()
    sources = [str(s) for s in ensure_adapters(workdir)]
    out_single, out_sharded = workdir / "merged-1proc", workdir / f"merged-{args.processes}proc"
    merge_args = ["merge", *sources, "--method", "svd", "--overwrite", "--quiet"]
    single_cmd = [console_script("lora-fusion"), *merge_args, "--out", str(out_single)]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    sharded_cmd = [torchrun, "--standalone", f"--nproc_per_node={args.processes}", "-m", "lora_fusion_cli",
                   *merge_args, "--out", str(out_sharded)]  # fmt: skip

    singles, shardeds = [], []
    for run in range(args.runs):
        singles.append(run_process(single_cmd))
        shardeds.append(run_process(sharded_cmd))
        log(f"run {run + 1}: 1 process {singles[-1].wall_s:.2f} s, {args.processes} processes "
            f"{shardeds[-1].wall_s:.2f} s")  # fmt: skip
    name = "adapter_model.safetensors"
    single, sharded = summary(singles), summary(shardeds)
    figures: dict[str, Any] = {
        "benchmark": "bench_sharded",
        "processes": args.processes,
        "one_process_wall_s": single["wall_best_s"],
        "sharded_wall_s": sharded["wall_best_s"],
        "speedup": rounded(single["wall_best_s"] / sharded["wall_best_s"], 3),
        "speedup_median": rounded(single["wall_median_s"] / sharded["wall_median_s"], 3),
        "byte_identical": (out_single / name).read_bytes() == (out_sharded / name).read_bytes(),
        "one_process": single,
        "sharded": sharded,
        "gpu": gpu_figures(merge_args, workdir, out_single / name),
        "machine": machine(),
    }
    emit(figures)


def gpu_figures(merge_args: list[str], workdir: Path, cpu_output: Path) -> dict[str, Any] | None:
    """The same merge on the GPU, when there is one: wall time and distance to the CPU output."""
    import torch

    if not torch.cuda.is_available():
        log("no CUDA GPU visible: GPU figures skipped")
        return None
    from safetensors.torch import load_file

    out_gpu = workdir / "merged-cuda"
    runs = [run_process([console_script("lora-fusion"), *merge_args, "--device", "cuda", "--out", str(out_gpu)])
            for _ in range(3)]  # fmt: skip
    cpu, gpu = load_file(cpu_output), load_file(out_gpu / "adapter_model.safetensors")
    # Singular vectors are defined up to sign, so compare the products B·A rather than the factors.
    worst = 0.0
    for key in cpu:
        if ".lora_A." in key:
            b_key = key.replace(".lora_A.", ".lora_B.")
            reference = cpu[b_key].float() @ cpu[key].float()
            worst = max(worst, float((gpu[b_key].float() @ gpu[key].float() - reference).abs().max()
                                     / reference.abs().max()))  # fmt: skip
    return {"device": torch.cuda.get_device_name(), "wall": summary(runs), "max_relative_delta_difference": worst}


if __name__ == "__main__":
    main()
