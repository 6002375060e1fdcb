"""Offline evidence for RAPF (issue 4 §3): the component ablation on Fashion-MNIST, mean ± std over seeds.

    python -m experiments.rapf_evidence [--recipe recipes/rapf_fashion_mnist.yaml] [--seeds 0 1 2] [--out docs/results]

Rows: the untrained adapter (what "zero-shot" means without a shared image-text space, see docs/rapf.md),
sequential fine-tuning, + Gaussian replay, + hinge, + decomposed fusion (full RAPF), fusion with the raw-basis mask,
and joint training on all classes (upper bound). Writes rapf_fashion_mnist.{json,md,png} to `--out`; the runs'
adapters go to a temporary folder. `--sweep bias 0.5 0.6 …` (or `--sweep threshold …`) runs full RAPF
at each value instead (rapf_fashion_mnist_bias.{json,md,png}, rapf_fashion_mnist_threshold.*). `--device cpu|cuda|auto`
overrides the recipe's `cpu` key (the zero-shot row is evaluated on the CPU in any case).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from experiments._args import parse_study_args, study_parser
from lora_fusion.cil.evaluate import evaluate_seen, plot_accuracy
from lora_fusion.cil.recipe import CILRecipe, load_recipe
from lora_fusion.cil.trainer import build_dataset, build_encoders, new_adapter_weight, run_cil

# (label, recipe changes); "zero_shot" is evaluated without training.
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("zero-shot (untrained adapter)", {"zero_shot": True}),
    ("sequential fine-tuning", {"rapf": {"replay": False, "hinge": False, "fusion": "none"}}),
    ("+ Gaussian replay", {"rapf": {"replay": True, "hinge": False, "fusion": "none"}}),
    ("+ hinge", {"rapf": {"replay": True, "hinge": True, "fusion": "none"}}),
    ("+ fusion = full RAPF", {"rapf": {"replay": True, "hinge": True, "fusion": "decomposed"}}),
    ("fusion with raw-basis mask", {"rapf": {"replay": True, "hinge": True, "fusion": "raw"}}),
    ("joint training (upper bound)", {"joint": True}),
]


def _variant(recipe: CILRecipe, changes: dict[str, Any], seed: int, out: Path) -> CILRecipe:
    rapf = recipe.rapf.model_copy(update=changes.get("rapf", {}))
    return recipe.model_copy(update={"rapf": rapf, "joint": changes.get("joint", False), "seed": seed,
                                     "out": str(out)})


def _zero_shot(recipe: CILRecipe, encoders: Any, dataset: Any, seed: int) -> list[float]:
    """Accuracy after each task of the adapter as initialised (CLIP: the nearest text feature of g(x) itself)."""
    from accelerate import Accelerator

    from lora_fusion.cil.cache import cached_features
    from lora_fusion.cil.data import split_tasks

    split = split_tasks(dataset, initial=recipe.initial_classes, increment=recipe.increment,
                        class_order=recipe.class_order)
    features, _ = cached_features(encoders, dataset.test, accelerator=Accelerator(cpu=True),
                                  cache_dir=Path(recipe.cache_dir) if recipe.cache_dir else None)
    positions = split.position_of(dataset.test.labels)
    names = [dataset.class_names[label] for label in split.order]
    with torch.no_grad():
        text = torch.nn.functional.normalize(encoders.encode_texts([recipe.prompt.format(n) for n in names]), dim=-1)
    shared_space = encoders.image_dim == encoders.text_dim
    weight = None if shared_space else new_adapter_weight(encoders.text_dim, encoders.image_dim,
                                                           torch.Generator().manual_seed(seed))
    return [evaluate_seen(weight, features, positions, text, split.tasks[: t + 1],
                          scale=recipe.train.logit_scale)[0] for t in range(len(split.tasks))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the report written as JSON."""
    parser = study_parser(__doc__, seeds=[0, 1, 2], out=Path("docs/results"), threads=1, device=True)
    parser.add_argument("--recipe", default="recipes/rapf_fashion_mnist.yaml",
                        help="the CIL recipe of every row (default: %(default)s)")
    parser.add_argument("--sweep", nargs="+", default=None, metavar=("FIELD", "VALUE"),
                        help="Instead of the ablation, full RAPF at each value of rapf.FIELD (bias or threshold); "
                             "writes rapf_fashion_mnist_FIELD.*")
    args = parse_study_args(parser, argv)
    if args.sweep is not None and (args.sweep[0] not in ("bias", "threshold") or len(args.sweep) < 2):
        parser.error("--sweep takes a field (bias or threshold) and at least one value, e.g. --sweep bias 0.5 0.6")
    rows_to_run = ROWS if args.sweep is None else [
        (f"full RAPF, {args.sweep[0]} = {float(v):g}",
         {"rapf": {"replay": True, "hinge": True, "fusion": "decomposed", args.sweep[0]: float(v)}})
        for v in args.sweep[1:]
    ]
    stem = "rapf_fashion_mnist" if args.sweep is None else f"rapf_fashion_mnist_{args.sweep[0]}"

    recipe = load_recipe(args.recipe)
    if args.device is not None:
        recipe = recipe.model_copy(update={"cpu": args.device == "cpu"})
    started = time.perf_counter()
    encoders = build_encoders(recipe)
    dataset = build_dataset(recipe)
    load_seconds = time.perf_counter() - started
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rapf-evidence-") as scratch:
        for label, changes in rows_to_run:
            runs = []
            for seed in args.seeds:
                if changes.get("zero_shot"):
                    curve, seconds, pairs = _zero_shot(recipe, encoders, dataset, seed), 0.0, []
                else:
                    out = Path(scratch) / f"{len(rows)}-{seed}"
                    t0 = time.perf_counter()
                    result = run_cil(_variant(recipe, changes, seed, out), encoders=encoders, dataset=dataset,
                                     resume=False, progress=False)
                    curve, seconds, pairs = result.accuracies, time.perf_counter() - t0, result.hard_pairs
                runs.append({"seed": seed, "accuracies": curve, "last": curve[-1],
                             "avg": sum(curve) / len(curve), "seconds": seconds, "hard_pairs": pairs})
                print(f"{label:32s} seed {seed}: last {curve[-1]:.4f} avg {sum(curve) / len(curve):.4f} "
                      f"({seconds:.1f} s)", flush=True)
            last, avg = _mean_std([r["last"] for r in runs]), _mean_std([r["avg"] for r in runs])
            rows[label] = {"last_mean": last[0], "last_std": last[1], "avg_mean": avg[0], "avg_std": avg[1],
                           "runs": runs}
    report = {"recipe": recipe.model_dump(mode="json"), "seeds": args.seeds, "threads": args.threads,
              "encoder_and_data_load_seconds": load_seconds, "rows": rows}
    target = Path(args.out)
    # Joint training is a single task: it is in the table, not among the curves.
    tasks = max(len(row["runs"][0]["accuracies"]) for row in rows.values())
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = ["| method | Last (%) | Avg (%) | seconds per run |", "|---|---|---|---|"]
    for label, row in rows.items():
        secs = statistics.fmean(r["seconds"] for r in row["runs"])
        lines.append(f"| {label} | {100 * row['last_mean']:.2f} ± {100 * row['last_std']:.2f} | "
                     f"{100 * row['avg_mean']:.2f} ± {100 * row['avg_std']:.2f} | {secs:.1f} |")
    (target / f"{stem}.md").write_text(
        f"{recipe.name}: {tasks} tasks, seeds {args.seeds}, mean ± std (sample std over seeds).\n\n"
        + "\n".join(lines) + "\n")
    curves = {label: [statistics.fmean(r["accuracies"][t] for r in row["runs"]) for t in range(tasks)]
              for label, row in rows.items() if len(row["runs"][0]["accuracies"]) == tasks}
    spread = {label: [statistics.stdev(r["accuracies"][t] for r in row["runs"]) if len(row["runs"]) > 1 else 0.0
                      for t in range(tasks)] for label, row in rows.items() if label in curves}
    plot_accuracy(curves, target / f"{stem}.png", spread=spread,
                  title=f"RAPF components, {recipe.name} (mean ± std over {len(args.seeds)} seeds)")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
