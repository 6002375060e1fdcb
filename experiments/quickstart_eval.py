"""Score LoRA adapters on the quickstart tasks with the shipped heads and eval sets (`make demo`).

    python -m experiments.quickstart_eval --merged DIR [--adapters recipes/quickstart/adapters]

prints one row for the base model (no LoRA), one per individual adapter and one for the merged
adapter, with a column per task, their mean, and the merged adapter's normalised accuracy
(merged accuracy / accuracy of the task's own adapter).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from peft import PeftModel

from experiments._args import parse_study_args, study_parser
from lora_fusion.eval.tasks import Example
from lora_fusion.eval.textcls import Head, accuracy, embed, load_base, quiet

DEFAULT_ADAPTERS = Path("recipes/quickstart/adapters")
BASE_ROW = "base (no LoRA)"


def read_eval_set(path: Path) -> list[Example]:
    """Read ``{"text": ..., "label": ...}`` lines."""
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(row["text"], int(row["label"])) for row in rows]


def adapter_tasks(adapters_dir: Path) -> list[str]:
    """Names of the adapter directories (those with an ``adapter_config.json``), sorted."""
    tasks = sorted(p.parent.name for p in adapters_dir.glob("*/adapter_config.json"))
    if not tasks:
        raise FileNotFoundError(f"no PEFT adapters (*/adapter_config.json) under {adapters_dir}")
    return tasks


def require_adapter(adapter_dir: Path) -> None:
    """Fail early, and without any Hub lookup, if ``adapter_dir`` is not a local PEFT adapter."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")


class Evaluator:
    """Loads the base model, the task heads and the eval sets once, then scores any adapter."""

    def __init__(self, heads_dir: Path, eval_dir: Path, tasks: Sequence[str]) -> None:
        self.tokenizer, self.base = load_base()
        self.heads = {task: Head.load(heads_dir / f"{task}.safetensors") for task in tasks}
        self.eval_sets = {task: read_eval_set(eval_dir / f"{task}.jsonl") for task in tasks}
        self.texts = [text for examples in self.eval_sets.values() for text, _ in examples]

    def accuracies(self, adapter_dir: Path | None) -> dict[str, float]:
        """Accuracy per task of the base model with ``adapter_dir`` (``None``: no adapter)."""
        if adapter_dir is None:
            embeddings = embed(self.base, self.tokenizer, self.texts)
        else:
            require_adapter(adapter_dir)
            model = PeftModel.from_pretrained(self.base, str(adapter_dir))
            try:
                embeddings = embed(model, self.tokenizer, self.texts)
            finally:
                self.base = model.unload()
        scores, start = {}, 0
        for task, examples in self.eval_sets.items():
            labels = [label for _, label in examples]
            scores[task] = accuracy(
                self.heads[task], embeddings[start : start + len(labels)], labels
            )
            start += len(labels)
        return scores


def evaluate(
    adapter_dir: str | Path, heads_dir: str | Path, eval_dir: str | Path, tasks: Sequence[str]
) -> dict[str, float]:
    """Accuracy per task of one PEFT LoRA adapter (any LoRA of MiniLM, e.g. a merged one)."""
    return Evaluator(Path(heads_dir), Path(eval_dir), tasks).accuracies(Path(adapter_dir))


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Rows of per-task scores (tasks in the order of the first row) plus their mean, aligned."""
    tasks = list(next(iter(rows.values())))
    width = max(len(name) for name in rows)
    columns = [*tasks, "mean"]
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>{len(c)}}" for c in columns)]
    for name, scores in rows.items():
        values = [scores[task] for task in tasks]
        cells = [*values, sum(values) / len(values)]
        lines.append(
            f"{name:<{width}}  "
            + "  ".join(f"{v:>{len(c)}.3f}" for c, v in zip(columns, cells, strict=True))
        )
    return "\n".join(lines)


def score_rows(
    adapters_dir: Path, heads_dir: Path, eval_dir: Path, merged: Path
) -> tuple[dict[str, dict[str, float]], int]:
    """Table rows (base, each adapter, merged, merged / own adapter) and the eval set size."""
    require_adapter(merged)
    tasks = adapter_tasks(adapters_dir)
    evaluator = Evaluator(heads_dir, eval_dir, tasks)
    adapters: dict[str, Path | None] = {BASE_ROW: None}
    adapters.update({f"adapter {task}": adapters_dir / task for task in tasks})
    adapters["merged"] = merged
    rows = {name: evaluator.accuracies(path) for name, path in adapters.items()}
    rows["merged / own adapter"] = {
        task: rows["merged"][task] / rows[f"adapter {task}"][task] for task in tasks
    }
    return rows, len(evaluator.texts)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = study_parser(__doc__)
    parser.add_argument(
        "--merged", type=Path, required=True, help="merged PEFT LoRA adapter directory"
    )
    parser.add_argument(
        "--adapters",
        type=Path,
        default=DEFAULT_ADAPTERS,
        help="directory of per-task adapters (default: %(default)s)",
    )
    parser.add_argument(
        "--heads", type=Path, help="task heads directory (default: heads/ next to --adapters)"
    )
    parser.add_argument(
        "--eval-dir", type=Path, help="eval sets directory (default: eval/ next to --adapters)"
    )
    args = parse_study_args(parser, argv)
    heads_dir = args.heads or args.adapters.parent / "heads"
    eval_dir = args.eval_dir or args.adapters.parent / "eval"

    quiet()
    started = time.perf_counter()
    try:
        rows, n_texts = score_rows(args.adapters, heads_dir, eval_dir, args.merged)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(f"accuracy on {n_texts} eval texts; merged adapter: {args.merged}")
    print(format_table(rows))
    print(f"evaluated in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
