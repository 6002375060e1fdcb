"""lora-fusion vs PEFT's `add_weighted_adapter(combination_type="svd")`: same adapters, same process, side by side.

Builds a random Llama-shaped base model in code, writes two random PEFT LoRAs (rank 16, different alphas, all seven
projections) with PEFT itself, then times

* PEFT: `PeftModel.from_pretrained` + `load_adapter` (reported apart), and
  `add_weighted_adapter(["a", "b"], [0.6, 0.4], "m", combination_type="svd", svd_rank=16)`, which forms every
  dense ΔW and takes its full SVD;
* lora-fusion: `merge([dirA, dirB], method="svd", weights=[0.6, 0.4], rank=16)`, the whole call including reading
  the files, and `method="linear"` (the exact sum, rank 32);

and compares each result with the exact dense Σ wᵢ·ΔWᵢ: the relative Frobenius error over all modules,
√(Σ‖ΔW − ΔŴ‖² / Σ‖ΔW‖²), next to the optimal rank-16 error √(Σ tail σ² / Σ‖ΔW‖²) (Eckart–Young–Mirsky).

Usage: python benchmarks/bench_vs_peft.py [--hidden 1024 --intermediate 2752 --layers 2 --runs 3 --peft-runs 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import Timings, emit, log, machine, repeat, rounded, timed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = [0.6, 0.4]


@dataclass(frozen=True)
class ErrorReport:
    """Relative Frobenius error of an approximation over all modules, and the worst single module."""

    total: float
    worst_module: float


@dataclass(frozen=True)
class PeftRun:
    """PEFT's side: the model with adapters "a", "b" and the merge "m", and its timings."""

    model: Any
    load_s: float
    svd_runs_s: tuple[float, ...]


def add_model_arguments(parser: argparse.ArgumentParser, *, hidden: int, intermediate: int, layers: int) -> None:
    """The options `build_base` and the adapters read: model shape and input rank, with this benchmark's defaults."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--intermediate", type=int, default=intermediate)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16, help="rank of each input LoRA")


def model_record(args: argparse.Namespace) -> dict[str, Any]:
    """The options `add_model_arguments` defines, as a benchmark's JSON records them."""
    return {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "heads": args.heads,
            "vocab": args.vocab, "input_rank": args.rank}


def build_base(args: argparse.Namespace) -> Any:
    """A random float32 Llama with the requested shapes (no weights are downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    return LlamaForCausalLM(config).eval()


def write_lora(base: Any, folder: Path, *, rank: int, alpha: int, seed: int) -> None:
    """A random PEFT LoRA (A and B both random: init_lora_weights=False) saved by PEFT's own save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(folder)


def peft_delta(model: Any, module: str, adapter: str) -> Any:
    """ΔW of `adapter` in one module of a PeftModel: scaling·B·A, float64 (read from the layer, not recomputed)."""
    layer = model.base_model.model.get_submodule(module)
    return layer.scaling[adapter] * (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double())


def relative_errors(reference: dict[str, Any], approximation: dict[str, Any]) -> ErrorReport:
    """√(Σ‖R − X‖² / Σ‖R‖²) over modules, and max over modules of ‖R − X‖ / ‖R‖ (float64)."""
    residual = total = worst = 0.0
    for name, exact in reference.items():
        err = float((exact - approximation[name]).norm() ** 2)
        ref = float(exact.norm() ** 2)
        residual, total, worst = residual + err, total + ref, max(worst, math.sqrt(err / ref))
    return ErrorReport(math.sqrt(residual / total), worst)


def time_peft(base: Any, dirs: list[Path], *, svd_rank: int, runs: int) -> PeftRun:
    """Load both adapters into a copy of `base` with PEFT, then time add_weighted_adapter(svd) `runs` times."""
    import torch
    from peft import PeftModel

    def load() -> Any:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a")
        model.load_adapter(str(dirs[1]), adapter_name="b")
        return model

    load_s, model = timed(load)
    seconds: list[float] = []
    for run in range(runs):
        if run:
            model.delete_adapter("m")
        log(f"PEFT add_weighted_adapter svd, run {run + 1}/{runs} (dense ΔW + full SVD per module)")
        with torch.no_grad():
            elapsed, _ = timed(
                lambda: model.add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type="svd", svd_rank=svd_rank)
            )
        seconds.append(elapsed)
    return PeftRun(model, load_s, tuple(seconds))


def time_lora_fusion(sources: list[str], *, svd_rank: int, runs: int) -> dict[str, tuple[Timings, Any]]:
    """Time lora_fusion.merge: svd, linear, and (diagnostic) svd with one torch thread; keep the last results.

    One thread: on a machine whose cores are busy with other work, OpenMP threads spin-wait on each other and the
    many small ops of a factored merge slow down far more than PEFT's few big dense ones.
    """
    import torch

    import lora_fusion

    def svd() -> Any:
        return lora_fusion.merge(sources, method="svd", weights=WEIGHTS, rank=svd_rank)

    results = {
        "svd": repeat(svd, runs),
        "linear": repeat(lambda: lora_fusion.merge(sources, method="linear", weights=WEIGHTS), runs),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results["svd_1thread"] = repeat(svd, runs)
    finally:
        torch.set_num_threads(threads)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, hidden=1024, intermediate=2752, layers=2)
    parser.add_argument("--svd-rank", type=int, default=16, help="output rank of both SVD merges")
    parser.add_argument("--alphas", type=int, nargs=2, default=[32, 8], help="lora_alpha of the two adapters")
    parser.add_argument("--runs", type=int, default=3, help="lora-fusion runs per method (best is reported)")
    parser.add_argument("--peft-runs", type=int, default=1, help="PEFT add_weighted_adapter runs (slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    warnings.filterwarnings("ignore")

    import peft
    import torch

    import lora_fusion

    torch.manual_seed(args.seed)
    log(f"building a random Llama base (hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers)")
    base = build_base(args)
    with tempfile.TemporaryDirectory(prefix="lora-fusion-bench-peft-") as tmp:
        dirs = [Path(tmp) / "a", Path(tmp) / "b"]
        for i, (folder, alpha) in enumerate(zip(dirs, args.alphas)):
            write_lora(base, folder, rank=args.rank, alpha=alpha, seed=args.seed + 1 + i)
        log(f"wrote two PEFT LoRAs to {tmp}")

        peft_run = time_peft(base, dirs, svd_rank=args.svd_rank, runs=args.peft_runs)
        log(f"lora-fusion merge svd and linear, best of {args.runs}")
        ours = time_lora_fusion([str(d) for d in dirs], svd_rank=args.svd_rank, runs=args.runs)
        (svd_times, merged_svd), (linear_times, merged_linear) = ours["svd"], ours["linear"]
        svd_1t_times = ours["svd_1thread"][0]

        log("computing dense references and their singular values (float64)")
        adapters = [lora_fusion.load_adapter(d) for d in dirs]
        names = sorted(adapters[0].modules)
        reference = {n: sum(w * a.delta(n).double() for w, a in zip(WEIGHTS, adapters)) for n in names}
        total_energy = sum(float(r.norm() ** 2) for r in reference.values())
        tail_energy = sum(float((torch.linalg.svdvals(r)[args.svd_rank :] ** 2).sum()) for r in reference.values())
        optimal = math.sqrt(tail_energy / total_energy)

        peft_error = relative_errors(reference, {n: peft_delta(peft_run.model, n, "m") for n in names})
        ours_error = relative_errors(reference, {n: merged_svd.delta(n).double() for n in names})
        linear_error = relative_errors(reference, {n: merged_linear.delta(n).double() for n in names})

    peft_svd_s = min(peft_run.svd_runs_s)
    shapes = {t: list(adapters[0].modules[next(n for n in names if n.endswith(t))].shape) for t in TARGETS}
    figures = {
        "benchmark": "bench_vs_peft",
        "peft_load_s": rounded(peft_run.load_s),
        "peft_svd_s": rounded(peft_svd_s),
        "lora_fusion_svd_s": rounded(svd_times.best),
        "lora_fusion_linear_s": rounded(linear_times.best),
        "lora_fusion_svd_1thread_s": rounded(svd_1t_times.best),
        "speedup_svd": rounded(peft_svd_s / svd_times.best, 3),
        "speedup_svd_incl_peft_load": rounded((peft_run.load_s + peft_svd_s) / svd_times.best, 3),
        "speedup_svd_1thread": rounded(peft_svd_s / svd_1t_times.best, 3),
        "peft_rel_error": rounded(peft_error.total, 6),
        "lora_fusion_rel_error": rounded(ours_error.total, 6),
        "optimal_rel_error": rounded(optimal, 6),
        "peft_excess_over_optimal": rounded(peft_error.total / optimal - 1, 3),
        "lora_fusion_excess_over_optimal": rounded(ours_error.total / optimal - 1, 3),
        "lora_fusion_linear_rel_error": rounded(linear_error.total, 3),
        "worst_module_rel_error": {
            "peft": rounded(peft_error.worst_module, 6),
            "lora_fusion_svd": rounded(ours_error.worst_module, 6),
            "lora_fusion_linear": rounded(linear_error.worst_module, 6),
        },
        "timings": {
            "peft_svd_runs_s": [rounded(s) for s in peft_run.svd_runs_s],
            "lora_fusion_svd": svd_times.to_dict(),
            "lora_fusion_linear": linear_times.to_dict(),
            "lora_fusion_svd_1thread": svd_1t_times.to_dict(),
        },
        "shapes": {
            **model_record(args),
            "lora_alpha": args.alphas,
            "weights": WEIGHTS,
            "svd_rank": args.svd_rank,
            "module_shapes_out_in": shapes,
            "dtype": "float32",
        },
        "modules": len(names),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "lora_fusion": lora_fusion.__version__},
        "machine": machine(),
        "bench_runtime_s": rounded(time.perf_counter() - started, 3),
    }
    emit(figures)


if __name__ == "__main__":
    main()
