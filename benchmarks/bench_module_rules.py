"""Per-module rules cost nothing measurable: the 7B-shaped svd merge of `bench_7b_shape.py` (four rank-16 bf16
adapters, 224 modules) and the `bench_vs_peft.py`-sized merge, each run plainly and with a three-rule weight list,
in one process, interleaved.

    python benchmarks/bench_module_rules.py [--runs 3] [--workdir /tmp/lora-fusion-bench-7b]

Prints one JSON object: per case, the best and median wall time of the plain and the ruled merge and their ratio.
The ruled merge gives the first source `[{filter: mlp, value: 0.2}, {filter: self_attn, value: [0.5, 1.0]},
{value: 0.7}]` (a filter, a layer gradient, a default); the others keep one number, as in the plain run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, machine, rounded  # noqa: E402
from bench_7b_shape import ensure_adapters  # noqa: E402

RULES = [{"filter": "mlp", "value": 0.2}, {"filter": "self_attn", "value": [0.5, 1.0]}, {"value": 0.7}]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def compare(name: str, sources: list[Path], *, rank: int, runs: int) -> dict[str, object]:
    from lora_fusion import load_adapter, merge

    count = len(sources)
    plain_weights = [0.7] + [1.0 / count] * (count - 1)
    ruled_weights = [RULES] + [1.0 / count] * (count - 1)
    merge(sources, method="svd", weights=plain_weights, rank=rank)  # warm-up: imports, page cache
    plain, ruled = [], []
    for run in range(runs):
        plain.append(timed(lambda: merge(sources, method="svd", weights=plain_weights, rank=rank)))
        ruled.append(timed(lambda: merge(sources, method="svd", weights=ruled_weights, rank=rank)))
        log(f"{name} run {run + 1}: plain {plain[-1]:.3f} s, ruled {ruled[-1]:.3f} s")
    return {
        "modules": len(load_adapter(sources[0]).modules),
        "plain_s": {"best": rounded(min(plain)), "median": rounded(statistics.median(plain))},
        "ruled_s": {"best": rounded(min(ruled)), "median": rounded(statistics.median(ruled))},
        "ratio_best": rounded(min(ruled) / min(plain)),
        "ratio_median": rounded(statistics.median(ruled) / statistics.median(plain)),
    }


def small_adapters(workdir: Path) -> list[Path]:
    """Two rank-16 PEFT LoRAs of bench_vs_peft's model shape (hidden 1024, intermediate 2752, 2 layers)."""
    import torch
    from safetensors.torch import save_file

    shapes = {}
    for layer in range(2):
        for name, shape in (("self_attn.q_proj", (1024, 1024)), ("self_attn.k_proj", (1024, 1024)),
                            ("self_attn.v_proj", (1024, 1024)), ("self_attn.o_proj", (1024, 1024)),
                            ("mlp.gate_proj", (2752, 1024)), ("mlp.up_proj", (2752, 1024)),
                            ("mlp.down_proj", (1024, 2752))):
            shapes[f"model.layers.{layer}.{name}"] = shape
    folders = []
    for seed in range(2):
        folder = workdir / f"small_{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for module, (m, n) in shapes.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, n, generator=generator) / n**0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(m, 16, generator=generator)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "bias": "none",
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-fusion-bench-7b"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    figures = {
        "benchmark": "bench_module_rules",
        "machine": machine(),
        "rules": RULES,
        "vs_peft_shape": compare("vs_peft shape", small_adapters(args.workdir), rank=16, runs=args.runs),
        "7b_shape": compare("7b shape", ensure_adapters(args.workdir), rank=16, runs=args.runs),
    }
    emit(figures)


if __name__ == "__main__":
    main()
