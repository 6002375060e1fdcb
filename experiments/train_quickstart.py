"""Train the quickstart demo's LoRA adapters: one per WordNet task, each with its own linear head.

    python -m experiments.train_quickstart [--out recipes/quickstart] [--seed 0] [--steps 300]

For every task this writes ``<out>/adapters/<task>/`` (PEFT ``save_pretrained``),
``<out>/heads/<task>.safetensors`` and the shipped test set ``<out>/eval/<task>.jsonl``.
Training (``lora_fusion.eval.textcls.fit``) is deterministic for a given seed (and thread count).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerBase

from experiments._args import parse_study_args, study_parser
from lora_fusion.eval.tasks import SPLITS, Example
from lora_fusion.eval.textcls import (
    LORA_TARGET_MODULES,
    MINILM_HUB_ID,
    Head,
    accuracy,
    embed,
    fit,
    load_base,
    lora_config,
    quiet,
)
from lora_fusion.eval.wordnet import DEFAULT_WORDNET_DIR, TASKS, load_task

DEFAULT_OUT = Path("recipes/quickstart")
STEPS = 300


def write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    """Write ``{"text": ..., "label": ...}`` lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text, label in examples:
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def write_model_card(
    adapter_dir: Path, task: str, config: LoraConfig, *, steps: int, seed: int
) -> None:
    """Write a short adapter README; PEFT's ``save_pretrained`` then completes its metadata."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "README.md").write_text(
        f"---\nbase_model: {MINILM_HUB_ID}\nlibrary_name: peft\n---\n\n"
        f"# lora-fusion quickstart adapter: {task}\n\n"
        f"LoRA (r={config.r}, alpha={config.lora_alpha}, "
        f"on {'+'.join(LORA_TARGET_MODULES)}) for the WordNet gloss task `{task}` "
        f"(classes: {', '.join(TASKS[task])}), trained {steps} steps with seed {seed} by "
        "`python -m experiments.train_quickstart`.\n"
        f"Its classifier head is `../../heads/{task}.safetensors`; see `../../README.md`.\n\n",
        encoding="utf-8",
    )


def split_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    head: Head,
    examples: Sequence[Example],
) -> float:
    """Accuracy of ``model`` + ``head`` on labelled examples."""
    texts, labels = zip(*examples, strict=True)
    return accuracy(head, embed(model, tokenizer, texts), labels)


def train_task(
    task: str, out: Path, *, wordnet_dir: str | Path = DEFAULT_WORDNET_DIR, seed: int, steps: int
) -> None:
    """Train one task's LoRA and head; save them and the test set under ``out``; print accuracy."""
    started = time.perf_counter()
    train, validation, test = (
        load_task(task, split, wordnet_dir=wordnet_dir, seed=seed) for split in SPLITS
    )
    torch.manual_seed(seed)
    tokenizer, base = load_base()
    config = lora_config()
    model = get_peft_model(base, config)
    head = Head.new(task, TASKS[task], base.config.hidden_size)
    print(
        f"{task}: {len(train)} train / {len(validation)} validation / {len(test)} test examples",
        flush=True,
    )
    fit(model, tokenizer, head, train, steps=steps, seed=seed)
    seconds = time.perf_counter() - started

    # PEFT keeps target_modules as a set; a sorted list makes adapter_config.json reproducible.
    config.target_modules = sorted(LORA_TARGET_MODULES)
    write_model_card(out / "adapters" / task, task, config, steps=steps, seed=seed)
    model.save_pretrained(str(out / "adapters" / task), save_embedding_layers=False)
    head.save(out / "heads" / f"{task}.safetensors")
    write_jsonl(out / "eval" / f"{task}.jsonl", test)
    val_acc, test_acc = (
        split_accuracy(model, tokenizer, head, examples) for examples in (validation, test)
    )
    print(
        f"{task}: {steps} steps, {seconds:.0f} s; accuracy val {val_acc:.3f}, test {test_acc:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = study_parser(__doc__, seed=0, out=DEFAULT_OUT, data_dirs=("wordnet",))
    parser.add_argument(
        "--steps", type=int, default=STEPS, help="optimizer steps per task (default: %(default)s)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=sorted(TASKS),
        default=list(TASKS),
        help="tasks to train (default: all)",
    )
    args = parse_study_args(parser, argv)

    quiet()
    started = time.perf_counter()
    for task in args.tasks:
        train_task(
            task, args.out, wordnet_dir=args.data_dirs.of("wordnet"), seed=args.seed, steps=args.steps
        )
    seconds = time.perf_counter() - started
    print(f"trained {len(args.tasks)} tasks x {args.steps} steps in {seconds:.0f} s")


if __name__ == "__main__":
    main()
