"""Merges of DoRA sources: element-wise methods with the dense update given, against the identity product they took
before, and the factored methods, which still take (I, ΔW).

Two synthetic DoRA adapters (PEFT layout: `lora_magnitude_vector` per module, `use_dora`; rank 16, alphas 16 and 32,
float32) on the seven projections of one Llama layer of hidden 2048 and intermediate 5504, and a random base-weights
file (std 0.02) with the same module names; made once per workdir by `bench_7b_shape.synthesise`. Then, in this
process:

* `ties` (density 0.2, rank 16): each DoRA update handed to the element-wise merge as the dense ΔW it is
  (`ModuleFactors.update`, the current code), against the same merge with `update` removed, so that each task is the
  product of the identity and ΔW (the code before); both results must be equal bit for bit;
* `svd` and `tsv` (rank 16) and `task_arithmetic` (limited to Σ rᵢ = 32 with DoRA sources), which run on the factors
  (I, ΔW): one run each, for the record.

Usage: python benchmarks/bench_dora.py [--workdir /tmp/lora-fusion-bench-dora] [--runs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from _common import emit, log, machine, repeat, rounded
from bench_7b_shape import AdapterShape, ensure_adapters, llama_projections

HIDDEN, INTERMEDIATE, RANK = 2048, 5504, 16


def inputs(workdir: Path) -> tuple[list[str], str]:
    """The two DoRA adapters and the base-weights file, made once per workdir."""
    import torch
    from safetensors.torch import save_file

    projections = llama_projections(HIDDEN, INTERMEDIATE)
    shapes = [AdapterShape(projections=projections, layers=1, rank=RANK, alpha=alpha, dtype="float32",
                           base_model="bench/dora", dora=True) for alpha in (16, 32)]
    sources = [str(s) for s in ensure_adapters(workdir, shapes)]
    base = workdir / "base.safetensors"
    if not base.is_file():
        generator = torch.Generator().manual_seed(1234)
        weights = {f"model.layers.0.{name}.weight": torch.randn(shape, generator=generator) * 0.02
                   for name, shape in projections.items()}
        save_file(weights, str(workdir / "base.incomplete"))
        (workdir / "base.incomplete").rename(base)
    return sources, str(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-fusion-bench-dora"))
    parser.add_argument("--runs", type=int, default=3, help="runs of each ties merge (best is reported)")
    args = parser.parse_args()
    started = time.perf_counter()
    import warnings

    import torch

    import lora_fusion
    from lora_fusion import engine
    from lora_fusion.dora import dora_factors
    from lora_fusion.errors import DegenerateMergeWarning

    warnings.filterwarnings("ignore", category=DegenerateMergeWarning)  # full-rank updates at rank 16, as meant
    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sources, base = inputs(workdir)

    def merge(method: str, **params: Any) -> Any:
        return lora_fusion.merge(sources, method=method, base_model=base, progress=False, **params)

    log(f"ties with the dense updates given, {args.runs} runs")
    given, given_result = repeat(lambda: merge("ties", density=0.2, rank=RANK), args.runs)
    log(f"ties through the identity product, {args.runs} runs")
    engine.dora_factors = lambda weight, factors: dataclasses.replace(dora_factors(weight, factors), update=None)
    try:
        through, through_result = repeat(lambda: merge("ties", density=0.2, rank=RANK), args.runs)
    finally:
        engine.dora_factors = dora_factors
    same = all(torch.equal(given_result.delta(n), through_result.delta(n)) for n in given_result.modules)
    factored = {}
    for method, params in (("svd", {"rank": RANK}), ("task_arithmetic", {}), ("tsv", {"rank": RANK})):
        log(f"{method}, one run")
        factored[method], _ = repeat(lambda: merge(method, **params), 1)
    emit({
        "benchmark": "bench_dora",
        "ties_dense_update_given_s": given.to_dict(),
        "ties_through_identity_s": through.to_dict(),
        "ties_speedup_best": rounded(through.best / given.best, 3),
        "ties_results_bit_identical": same,
        "factored_methods_one_run_s": {method: rounded(t.best) for method, t in factored.items()},
        "case": {"sources": 2, "modules": 7, "hidden": HIDDEN, "intermediate": INTERMEDIATE, "rank": RANK,
                 "dtype": "float32", "density": 0.2},
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
        "bench_runtime_s": rounded(time.perf_counter() - started),
    })


if __name__ == "__main__":
    main()
