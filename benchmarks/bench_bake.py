"""`lora-fusion bake` vs PEFT's `merge_and_unload()` + `save_pretrained`, and the read+write floor (issue 15 §6).

A Llama-shaped bfloat16 model built in code (random weights; by default hidden 1024, intermediate 2816, 8 layers,
vocab 32000: 169M parameters, 338 MB) is saved in 4 or more shards, with one random PEFT LoRA (rank 16 on q, k, v, o,
gate, up, down). Three commands then run as their own processes, interleaved, `--runs` times each:

* bake: `python -m lora_fusion_cli bake BASE LORA --out OUT --overwrite --quiet`;
* PEFT: `AutoModelForCausalLM.from_pretrained(BASE)`, `PeftModel.from_pretrained(model, LORA).merge_and_unload()`,
  `save_pretrained(OUT, max_shard_size=…)` (this script, `--peft-child`);
* the floor: read every shard of BASE (`load_file`) and write the same tensors (`save_file`), shard by shard, nothing
  else (this script, `--floor-child`).

Each process's wall time and peak RSS (GNU time, or RUSAGE_CHILDREN of a wrapper: `_common.run_process`) are printed
as JSON, with bake ÷ floor (target ≤ 1.3×) and bake's peak RSS ÷ PEFT's (target ≤ 0.5), and how many of bake's
weights differ from PEFT's (both add in float32 and round once, so none should).

Usage: python benchmarks/bench_bake.py [--workdir /tmp/lora-fusion-bench-bake] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from _common import emit, log, machine, rounded, run_process

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = "90MB"


def build(workdir: Path, *, hidden: int, intermediate: int, layers: int, vocab: int) -> tuple[Path, Path]:
    """The base model and its LoRA under `workdir` (built once, reused by later runs)."""
    base, lora = workdir / "base", workdir / "lora"
    if (base / "model.safetensors.index.json").exists() and (lora / "adapter_config.json").exists():
        return base, lora
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    log(f"building a random Llama ({hidden=}, {intermediate=}, {layers=}, {vocab=}) in {base}")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size=SHARD_SIZE)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(lora)
    return base, lora


def peft_child(base: str, lora: str, out: str) -> None:
    """PEFT's way: the whole model in memory, merged, saved."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, lora).merge_and_unload()
    merged.save_pretrained(out, max_shard_size=SHARD_SIZE)


def floor_child(base: str, out: str) -> None:
    """Read every shard's tensors and write them again, one shard at a time: the I/O a bake cannot avoid."""
    from safetensors.torch import load_file, save_file

    Path(out).mkdir(parents=True, exist_ok=True)
    for shard in sorted(Path(base).glob("*.safetensors")):
        save_file(load_file(shard), str(Path(out) / shard.name), metadata={"format": "pt"})


def distance(bake_out: Path, peft_out: Path) -> dict[str, Any]:
    """How bake's weights differ from PEFT's: the share of elements that differ, the largest difference."""
    import torch
    from safetensors.torch import load_file

    peft = {k: v for f in sorted(peft_out.glob("*.safetensors")) for k, v in load_file(f).items()}
    differ = total = 0
    largest = 0.0
    for shard in sorted(bake_out.glob("*.safetensors")):
        for key, tensor in load_file(shard).items():
            other = peft[key]
            unequal = tensor != other
            differ, total = differ + int(unequal.sum()), total + tensor.numel()
            if unequal.any():
                largest = max(largest, float((tensor.float() - other.float()).abs().max()))
    return {"elements": total, "share_differing": rounded(differ / total), "max_abs_difference": rounded(largest),
            "how": "bake: (W0.float() + dW).to(bfloat16); PEFT: bf16 weight += float32 dW (PEFT keeps the adapter "
                   "in float32; torch adds in float32 and rounds once)"}


def summary(runs: list[Any]) -> dict[str, Any]:
    walls = sorted(r.wall_s for r in runs)
    return {"wall_best_s": rounded(walls[0]), "wall_median_s": rounded(walls[len(walls) // 2]),
            "peak_rss_mb": rounded(max(r.max_rss_mb for r in runs)), "all_wall_s": [rounded(r.wall_s) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-fusion-bench-bake"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--peft-child", nargs=3, metavar=("BASE", "LORA", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--floor-child", nargs=2, metavar=("BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_child:
        return peft_child(*args.peft_child)
    if args.floor_child:
        return floor_child(*args.floor_child)

    workdir = args.workdir.expanduser().resolve()
    base, lora = build(workdir, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                       vocab=args.vocab)
    shards = sorted(base.glob("*.safetensors"))
    outs = {name: workdir / f"out-{name}" for name in ("bake", "peft", "floor")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    commands = {
        "bake": [sys.executable, "-m", "lora_fusion_cli", "bake", str(base), str(lora), "--out", str(outs["bake"]),
                 "--overwrite", "--quiet"],
        "peft": [sys.executable, __file__, "--peft-child", str(base), str(lora), str(outs["peft"])],
        "floor": [sys.executable, __file__, "--floor-child", str(base), str(outs["floor"])],
    }
    runs: dict[str, list[Any]] = {name: [] for name in commands}
    for run in range(args.runs):
        for name, argv in commands.items():
            runs[name].append(run_process(argv, env=env))
        log(f"run {run + 1}: " + ", ".join(f"{n} {r[-1].wall_s:.2f} s / {r[-1].max_rss_mb:.0f} MB"
                                            for n, r in runs.items()))
    figures = {name: summary(r) for name, r in runs.items()}
    bake, peft, floor = figures["bake"], figures["peft"], figures["floor"]
    emit({
        "benchmark": "bench_bake",
        "model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                  "vocab": args.vocab, "dtype": "bfloat16", "shards": len(shards),
                  "bytes": sum(s.stat().st_size for s in shards), "lora": "rank 16, q k v o gate up down"},
        "bake_over_floor": rounded(bake["wall_best_s"] / floor["wall_best_s"], 3),
        "bake_over_floor_median": rounded(bake["wall_median_s"] / floor["wall_median_s"], 3),
        "bake_over_peft_time": rounded(bake["wall_best_s"] / peft["wall_best_s"], 3),
        "bake_over_peft_peak_rss": rounded(bake["peak_rss_mb"] / peft["peak_rss_mb"], 3),
        "targets": {"bake_over_floor": 1.3, "bake_over_peft_peak_rss": 0.5},
        "bake": bake,
        "peft": peft,
        "floor": floor,
        "bake_vs_peft_weights": distance(outs["bake"], outs["peft"]),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
