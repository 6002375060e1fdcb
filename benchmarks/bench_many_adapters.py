"""Many adapters in one run: 50 rank-16 bf16 adapters of a Llama-3.2-1B-shaped model merged with `linear` and `svd`.

Shape: 16 layers, hidden 2048, q/o 2048×2048 and k/v 512×2048 (grouped-query attention), r = 16 on q, k, v, o:
64 modules, 3.4 M parameters (6.8 MB) per adapter, 341 MB for the 50. The adapters are synthesised as PEFT files
(safetensors + adapter_config.json, PEFT's key layout) into a work directory outside git, reused on later runs.

Each merge runs as `lora-fusion merge A1 … A50 --method M --out OUT --overwrite --quiet` in its own process, so its
peak RSS (GNU time's maximum resident set size) is its own; `python -c "import lora_fusion.engine, …"` gives the
baseline every run pays. Inputs are memory-mapped: pages read count in RSS while mapped but are reclaimable.

* `linear` keeps every input rank (output rank 50·16 = 800 per module): the output is as large as the inputs, so
  its peak is bounded by baseline + output + the inputs' mapped pages.
* `svd --rank 16` streams: per module, 50 factor pairs in, one rank-16 pair out.

Peak RSS comes from GNU time; a second, sampled run splits it into anonymous memory (the merge's own) and
file-backed pages (the memory-mapped inputs, reclaimable by the kernel).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_many_adapters.py [--workdir DIR] [--adapters 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import console_script, emit, log, machine, rounded, run_process

LAYERS, HIDDEN, KV, RANK = 16, 2048, 512, 16
PROJECTIONS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}


def make_adapter(folder: Path, seed: int) -> None:
    """One PEFT LoRA adapter: random A (r×in) and B (out×r), bf16, alpha 32."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for proj, (out_f, in_f) in PROJECTIONS.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=g) / in_f**0.5).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=g) / RANK**0.5).bfloat16()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        "r": RANK, "lora_alpha": 2 * RANK, "target_modules": sorted(PROJECTIONS), "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def peak_memory_split(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run `argv` and sample /proc/PID/status every 20 ms: peaks of anonymous memory (heap: not reclaimable) and of
    file-backed resident pages (the memory-mapped inputs: reclaimable), in MB."""
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks = {"RssAnon": 0.0, "RssFile": 0.0, "VmHWM": 0.0}
    while child.poll() is None:
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) * 1024 / 1e6)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.02)
    return {"peak_anon_mb": rounded(peaks["RssAnon"]), "peak_file_backed_mb": rounded(peaks["RssFile"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-fusion-bench-many"))
    parser.add_argument("--adapters", type=int, default=50)
    args = parser.parse_args()

    sources = [args.workdir / "inputs" / f"a{i:02d}" for i in range(args.adapters)]
    for i, folder in enumerate(sources):
        if not (folder / "adapter_config.json").is_file():
            log(f"writing adapter {i + 1}/{len(sources)} to {folder}")
            make_adapter(folder, seed=i)
    input_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in sources)

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    imports = [sys.executable, "-c", "import torch, safetensors, huggingface_hub, lora_fusion.engine, lora_fusion.writer"]
    baseline = run_process(imports, env=env)
    baseline_anon = peak_memory_split(imports, env)["peak_anon_mb"]
    runs = {}
    for method, options in (("linear", []), ("svd", ["--rank", str(RANK)])):
        out = args.workdir / f"out-{method}"
        log(f"merging {len(sources)} adapters with {method}")
        argv = [console_script("lora-fusion"), "merge", *map(str, sources), "--method", method, *options,
                "--out", str(out), "--overwrite", "--quiet", "--json"]
        run = run_process(argv, env=env, timeout=1800)
        summary = json.loads(run.stdout)
        output_bytes = (out / "adapter_model.safetensors").stat().st_size
        split = peak_memory_split(argv, env)  # a second run, sampled: which part of the peak is reclaimable
        plan = json.loads(run_process([*argv[:-2], "--dry-run", "--json"], env=env).stdout)
        runs[method] = {
            "wall_s": rounded(run.wall_s),
            "peak_rss_mb": rounded(run.max_rss_mb),
            "peak_rss_over_baseline_mb": rounded(run.max_rss_mb - baseline.max_rss_mb),
            "output_mb": rounded(output_bytes / 1e6),
            "peak_rss_over_baseline_per_input_mb": rounded((run.max_rss_mb - baseline.max_rss_mb) / (input_bytes / 1e6)),
            **split,
            "peak_anon_over_imports_mb": rounded(split["peak_anon_mb"] - baseline_anon),
            "dry_run_estimated_peak_mb": rounded(plan["estimated_peak_bytes"] / 1e6),
            "output_ranks": summary["ranks"],
            "modules": summary["modules"],
        }
        shutil.rmtree(out, ignore_errors=True)
    emit({
        "benchmark": "bench_many_adapters",
        "adapters": len(sources),
        "shape": f"{LAYERS} layers, q/o {HIDDEN}x{HIDDEN}, k/v {KV}x{HIDDEN}, r={RANK}, bf16",
        "input_mb": rounded(input_bytes / 1e6),
        "baseline_import_rss_mb": rounded(baseline.max_rss_mb),
        "baseline_import_anon_mb": baseline_anon,
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "runs": runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
