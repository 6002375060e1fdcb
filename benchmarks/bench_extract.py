"""Issue 15 §6: `lora-fusion extract` against `mergekit-extract-lora` (mergekit 0.1.5) on the same two models, same
rank: wall time, peak RSS, and each output's error against the optimal (Eckart–Young) truncation.

The models: a Llama-shaped pair built here (hidden 2048, intermediate 5504, 2 layers, vocabulary 4096, bf16, saved
in 50 MB shards; ~240 MB each), the "fine-tune" adding to every linear weight a rank-64 update with a decaying
spectrum (σⱼ ∝ 0.9^j) plus a dense noise floor carrying ~5% of its energy, as full fine-tunes look; and optionally
(`--smollm DIR`) the SmolLM2-135M base/fine-tuned pair that `experiments/extract_smollm.py` saves.

Both tools run as command-line programs in their own processes (mergekit lives in its own virtual environment,
`--mergekit`, with torch 2.13.0 CPU: a benchmark-only dependency), interleaved, `--runs` times each; wall time and
peak RSS per run. Both extract the linear layers only (mergekit writes embeddings whole unless `--embed-lora`; here
`-e embed_tokens -e lm_head --skip-undecomposable` for mergekit, `--modules 'layers\\.'` for lora-fusion), at rank
`--rank` (mergekit `--max-rank`). Errors: per module ‖ΔW − B·A‖_F / ‖ΔW‖_F from each output's factors against ΔW
in float64, and the optimum √(Σ_{j>R} σⱼ²/Σσⱼ²) from float64 singular values.

Usage: python benchmarks/bench_extract.py --mergekit /tmp/mk-venv/bin/mergekit-extract-lora [--runs 2] [--rank 16]
                                          [--smollm /path/with/base+tuned [--no-llama]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, log, machine, rounded, run_process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def build_pair(folder: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """The Llama-shaped base and its "fine-tune" (see the module docstring), bf16, in 50 MB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=4096, hidden_size=2048, intermediate_size=5504, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = folder / "base"
    model.save_pretrained(base, max_shard_size="50MB")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim != 2 or "layers." not in name:
                continue
            m, n = weight.shape
            head = (torch.randn(m, 64, generator=generator) * 0.9 ** torch.arange(64.0)) @ torch.randn(
                64, n, generator=generator)
            noise = torch.randn(m, n, generator=generator)
            noise *= math.sqrt(0.05 / 0.95) * head.norm() / noise.norm()
            update = head + noise
            weight.add_((update * (0.02 * weight.float().norm() / update.norm())).to(weight.dtype))
    tuned = folder / "tuned"
    model.save_pretrained(tuned, max_shard_size="50MB")
    return base, tuned


def errors(base: Path, tuned: Path, adapter: Path, rank: int, optima: dict[str, float]) -> dict[str, Any]:
    """Per module: the output's relative error and the optimum at `rank` (float64; `optima` caches the optimum of
    each module, computed once for both tools)."""
    import torch
    from safetensors import safe_open

    from lora_fusion import load_adapter

    written = load_adapter(adapter)  # PEFT's semantics: scale alpha/r after the patterns, in the canonical form
    maps = {side: json.loads((side / "model.safetensors.index.json").read_text())["weight_map"]
            for side in (base, tuned)}
    rows = {}
    for module in written.modules:
        key = f"{module}.weight"
        weights = []
        for side in (tuned, base):
            with safe_open(str(side / maps[side][key]), "pt") as handle:
                weights.append(handle.get_tensor(key).double())
        delta = weights[0] - weights[1]
        if module not in optima:
            S = torch.linalg.svdvals(delta)
            optima[module] = math.sqrt(float((S[rank:] ** 2).sum() / (S**2).sum()))
        rows[module] = {
            "rank": written.modules[module].rank,
            "error": float((delta - written.delta(module).double()).norm() / delta.norm()),
            "optimum": optima[module],
        }
    excess = [row["error"] - row["optimum"] for row in rows.values()]
    return {
        "modules": len(rows),
        "mean_error": rounded(statistics.fmean(row["error"] for row in rows.values()), 8),
        "mean_optimum": rounded(statistics.fmean(row["optimum"] for row in rows.values()), 8),
        "max_excess_over_optimum": rounded(max(excess), 4),
        "per_module": {k: {n: rounded(v, 8) if isinstance(v, float) else v for n, v in row.items()}
                       for k, row in rows.items()},
    }


def compare(base: Path, tuned: Path, *, mergekit: str, rank: int, runs: int, work: Path, label: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    ours_cmd = [sys.executable, "-m", "lora_fusion_cli", "extract", str(base), str(tuned), "--rank", str(rank),
                "--modules", r"layers\.", "--out", str(work / "ours"), "--overwrite"]
    theirs_cmd = [mergekit, "--model", str(tuned), "--base-model", str(base), "--out-path", str(work / "theirs"),
                  "--max-rank", str(rank), "-e", "embed_tokens", "-e", "lm_head", "--skip-undecomposable", "--quiet",
                  "--no-copy-tokenizer"]
    ours, theirs = [], []
    for attempt in range(runs):
        shutil.rmtree(work / "theirs", ignore_errors=True)
        run = run_process(theirs_cmd, env=env)
        log(f"{label} mergekit run {attempt + 1}: {run.wall_s:.2f} s, {run.max_rss_mb:.0f} MB")
        theirs.append(run)
        run = run_process(ours_cmd, env=env)
        log(f"{label} lora-fusion run {attempt + 1}: {run.wall_s:.2f} s, {run.max_rss_mb:.0f} MB")
        ours.append(run)
    best_ours, best_theirs = min(r.wall_s for r in ours), min(r.wall_s for r in theirs)
    optima: dict[str, float] = {}
    return {
        "model": label,
        "rank": rank,
        "lora_fusion": {"wall_s": [rounded(r.wall_s) for r in ours], "peak_rss_mb": rounded(max(r.max_rss_mb
                        for r in ours)), "errors": errors(base, tuned, work / "ours", rank, optima)},
        "mergekit": {"wall_s": [rounded(r.wall_s) for r in theirs], "peak_rss_mb": rounded(max(r.max_rss_mb
                     for r in theirs)), "errors": errors(base, tuned, work / "theirs", rank, optima)},
        "speedup_best": rounded(best_theirs / best_ours, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="the mergekit-extract-lora executable (its own venv)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--smollm", type=Path, help="a folder with base/ and tuned/ (experiments/extract_smollm.py)")
    parser.add_argument("--no-llama", action="store_true", help="skip the Llama-shaped pair (e.g. with --smollm)")
    args = parser.parse_args()
    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        work = Path(tmp)
        if not args.no_llama:
            log("building the Llama-shaped pair")
            base, tuned = build_pair(work)
            results.append(compare(base, tuned, mergekit=args.mergekit, rank=args.rank, runs=args.runs, work=work,
                                   label="llama-2048x5504-2layers-bf16"))
        if args.smollm is not None:
            results.append(compare(args.smollm / "base", args.smollm / "tuned", mergekit=args.mergekit,
                                   rank=args.rank, runs=args.runs, work=work, label="smollm2-135m"))
    emit({"benchmark": "extract_vs_mergekit", "machine": {**machine(), "torch_threads": torch.get_num_threads()},
          "results": [{k: v for k, v in r.items()} for r in results]})


if __name__ == "__main__":
    main()
