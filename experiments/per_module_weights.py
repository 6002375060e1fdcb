"""Per-module weights against one global λ on the merge testbed: what per-module control buys on 4 real tasks.

    python -m experiments.per_module_weights [--cache DIR] [--seeds 0 1 2] [--out docs/results] [--methods linear ties]

For each training seed, the 4 task LoRAs of the testbed (all-MiniLM-L6-v2, `query`/`value` of 6 layers, r = 8;
trained or loaded by ``lora_fusion.eval.testbed``, the same cache as ``experiments.merge_quality``) are merged with
``lora_fusion.merge`` where every source gets the same weight, in three families:

* ``global``: one λ for every module (task arithmetic at scale λ);
* ``query_value``: ``[{"filter": "query", "value": λq}, {"value": λv}]``, one λ for the query and one for the value
  projections;
* ``layer_gradient``: ``[{"value": [λ0, λ1]}]``, λ interpolated linearly from the first to the last of the 6 layers.

Each λ ranges over ``SCALE_GRID`` (5 points for ``global``, 25 for the others; the diagonal λq = λv or λ0 = λ1 is the
global point itself). Each family's point is chosen on mean normalised validation accuracy (merged ÷ own LoRA,
averaged over tasks); a point replaces the best only if strictly better and the global points come first, so ties
keep the global (simpler) point. The chosen points are then scored on the test split with each task's own head,
and compared seed by seed with the global λ. ``--methods`` picks the merge methods: ``linear`` (the sum, i.e. task
arithmetic) and ``ties`` (full space, default density); TIES gets the same rule lists as source weights. Writes
``per_module_weights.md``, ``.json`` (every grid point, the chosen points per seed, checks and timings) and ``.png``
to ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from experiments._args import parse_study_args, study_parser
from experiments.merge_quality import SCALE_GRID, SEARCH_DTYPES, SeedRun, Variant, open_testbed, versions
from lora_fusion.adapter import LoraAdapter
from lora_fusion.controls import interpolate
from lora_fusion.eval.catalog import TESTBED_TASKS
from lora_fusion.eval.scores import format_mean_std, markdown_table, mean, mean_std
from lora_fusion.eval.testbed import STEPS, Evaluator, default_cache_dir, train_or_load

STEM = "per_module_weights"
DEFAULT_OUT = Path("docs/results")
METHODS = {"linear": Variant("linear", None), "ties": Variant("ties", "full")}
FAMILIES = ("global", "query_value", "layer_gradient")
FAMILY_LABELS = {
    "global": "global λ",
    "query_value": "query vs value (λq, λv)",
    "layer_gradient": "layer gradient (λ0 → λ5)",
}
SHORT = {"global": "global", "query_value": "q vs v", "layer_gradient": "gradient"}
QUERY = "query"  # the filter of the query rule: re.search on names like encoder.layer.3.attention.self.query
Point = tuple[float, ...]


def weight(family: str, point: Point) -> float | list[dict[str, Any]]:
    """The weight every source gets at ``point``: a number where the point is uniform (the global merge itself)."""
    if len(set(point)) == 1:
        return float(point[0])
    if family == "query_value":
        return [{"filter": QUERY, "value": point[0]}, {"value": point[1]}]
    if family == "layer_gradient":
        return [{"value": list(point)}]
    raise ValueError(f"{family}: a non-uniform point {point}")


def candidates(family: str) -> list[Point]:
    """The family's grid, the global points first (λ = 1 first, as in merge_quality's search), so that ties keep them."""
    scales = [1.0] + [s for s in SCALE_GRID if s != 1.0]
    uniform = [(s,) if family == "global" else (s, s) for s in scales]
    if family == "global":
        return uniform
    return uniform + [(a, b) for a in SCALE_GRID for b in SCALE_GRID if a != b]


def expected_weight(family: str, point: Point, module: str, depth: int) -> float:
    """What the rule list should give ``module`` (an independent reading of the layer index and the filter)."""
    if family == "query_value":
        return point[0] if module.endswith(".query") else point[1]
    if family == "layer_gradient":
        layer = int(module.split("encoder.layer.")[1].split(".")[0])
        return interpolate(point, layer / (depth - 1))
    return point[0]


def control_check(run: SeedRun, variant: Variant) -> dict[str, float]:
    """Largest |ΔW(rules) − w(module)·ΔW(weights 1)| over modules, relative to max |ΔW|, for one off-diagonal point
    per family: the per-module weights reach each module as the rules say (linear and TIES are 1-homogeneous in a
    weight shared by all sources)."""
    unit = run.merged(variant, {"weights": [1.0] * len(run.adapters)})
    depth = 1 + max(int(m.split("encoder.layer.")[1].split(".")[0]) for m in unit.modules)
    out = {}
    for family in FAMILIES[1:]:
        point = (0.25, 1.5)
        merged = run.merged(variant, {"weights": [weight(family, point)] * len(run.adapters)})
        worst = 0.0
        for module in unit.modules:
            reference = expected_weight(family, point, module, depth) * unit.factors(module).delta()
            difference = (merged.factors(module).delta() - reference).abs().max()
            worst = max(worst, float(difference / reference.abs().max()))
        out[f"{family} {point}"] = worst
    return out


def largest_difference(a: LoraAdapter, b: LoraAdapter) -> float:
    return max(float((a.factors(m).delta() - b.factors(m).delta()).abs().max()) for m in a.modules)


def search(run: SeedRun, variant: Variant, family: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Every grid point of ``family`` on validation, the best one (strictly better replaces), and its test score."""
    n = len(run.adapters)
    grid, best, best_score = [], None, float("-inf")
    for point in candidates(family):
        score = run.score(run.merged(variant, {"weights": [weight(family, point)] * n}), "validation")
        grid.append({"point": list(point), "validation_mean_normalised": score["mean_normalised"]})
        if score["mean_normalised"] > best_score:
            best, best_score = point, score["mean_normalised"]
    test = run.score(run.merged(variant, {"weights": [weight(family, best)] * n}), "test")
    log(f"seed {run.seed}: {variant.label} {family:<15} {best} validation {best_score:.4f} "
        f"test {test['mean_normalised']:.4f}")
    return {"point": list(best), "weight": weight(family, best), "validation_mean_normalised": best_score,
            "test": test, "grid": grid}


def run_seed(seed: int, data: Sequence[Any], evaluator: Evaluator, args: Any, log: Callable[[str], None]) -> dict:
    members = {d.name: train_or_load(d, seed, steps=args.steps, cache_dir=args.cache, log=log) for d in data}
    run = SeedRun(seed, members, evaluator, log, SEARCH_DTYPES[args.search_dtype])
    passes, seconds = evaluator.passes, evaluator.seconds
    result: dict[str, Any] = {
        "seed": seed,
        "training": {t: {"cached": m.cached, "train_seconds": m.meta["train_seconds"],
                         "cache_entry": f"{m.directory.parent.name}/{m.directory.name}"} for t, m in members.items()},
        "references": run.references(members),
        "methods": {},
    }
    for name in args.methods:
        variant = METHODS[name]
        started = time.perf_counter()
        families = {family: search(run, variant, family, log) for family in FAMILIES}
        result["methods"][name] = {"families": families, "seconds": time.perf_counter() - started,
                                   "control_check": control_check(run, variant)}
    best = result["methods"].get("linear", {}).get("families", {}).get("global")
    if best is not None:  # the global linear merge is task arithmetic at λ: the same update
        arithmetic = run.merged(Variant("task_arithmetic", None), {"scale": best["point"][0]})
        result["task_arithmetic_difference"] = largest_difference(
            arithmetic, run.merged(METHODS["linear"], {"weights": [best["point"][0]] * len(run.adapters)}))
    result["timings"] = {"merge_seconds": run.merge_seconds, "merges": run.merges,
                         "embedding_passes": evaluator.passes - passes, "evaluation_seconds": evaluator.seconds - seconds}
    return result


def summarise(per_seed: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Per method and family: test scores over seeds, and the paired difference to the global λ on the same seed."""
    out: dict[str, Any] = {}
    for name in per_seed[0]["methods"]:
        out[name] = {}
        for family in FAMILIES:
            chosen = [seed["methods"][name]["families"][family] for seed in per_seed]
            glob = [seed["methods"][name]["families"]["global"] for seed in per_seed]
            norm = [c["test"]["mean_normalised"] for c in chosen]
            diff = [c["test"]["mean_normalised"] - g["test"]["mean_normalised"] for c, g in zip(chosen, glob)]
            val_diff = [c["validation_mean_normalised"] - g["validation_mean_normalised"] for c, g in zip(chosen, glob)]
            out[name][family] = {
                "points": [c["point"] for c in chosen],
                "accuracy": {t: mean_std([c["test"]["accuracy"][t] for c in chosen]) for t in tasks},
                "mean_accuracy": mean_std([mean(list(c["test"]["accuracy"].values())) for c in chosen]),
                "validation_mean_normalised": mean_std([c["validation_mean_normalised"] for c in chosen]),
                "mean_normalised": mean_std(norm),
                "per_seed_mean_normalised": norm,
                "difference_vs_global": mean_std(diff),
                "per_seed_difference": diff,
                "validation_difference_vs_global": mean_std(val_diff),
                "wins": sum(d > 0 for d in diff),
                "losses": sum(d < 0 for d in diff),
            }
    return out


def point_text(family: str, point: Sequence[float]) -> str:
    if family == "global" or len(set(point)) == 1:
        return f"λ={point[0]:g}"
    if family == "query_value":
        return f"λq={point[0]:g}, λv={point[1]:g}"
    return f"λ {point[0]:g}→{point[1]:g}"


def pm(value: Sequence[float], sign: bool = False) -> str:
    return f"{value[0]:+.3f} ± {value[1]:.3f}" if sign else f"{value[0]:.3f} ± {value[1]:.3f}"


def grid_table(per_seed: Sequence[Mapping[str, Any]], name: str, family: str, scales: Sequence[float]) -> str:
    """Validation mean normalised accuracy over the 5×5 grid, mean over seeds (rows: first λ, columns: second)."""
    values: dict[tuple[float, ...], list[float]] = {}
    for seed in per_seed:
        for entry in seed["methods"][name]["families"][family]["grid"]:
            values.setdefault(tuple(entry["point"]), []).append(entry["validation_mean_normalised"])
    first, second = ("λq", "λv") if family == "query_value" else ("λ0 (layer 0)", "λ1 (layer 5)")
    rows = [[f"{a:g}", *[f"{mean(values[(a, b)]):.3f}" for b in scales]] for a in scales]
    return markdown_table([f"{first} ↓ / {second} →", *[f"{b:g}" for b in scales]], rows)


def findings(summary: Mapping[str, Any], n_seeds: int) -> str:
    lines = []
    for name, families in summary.items():
        glob = families["global"]
        parts = [f"**{name}**: the global λ scores {pm(glob['mean_normalised'])}"]
        for family in FAMILIES[1:]:
            s = families[family]
            resolved = s["wins"] == n_seeds and s["difference_vs_global"][0] > 0
            parts.append(
                f"{FAMILY_LABELS[family]} {pm(s['mean_normalised'])}, paired difference "
                f"{pm(s['difference_vs_global'], sign=True)} (better on {s['wins']}, worse on {s['losses']} of {n_seeds} "
                f"seeds; on validation, where it was chosen, {pm(s['validation_difference_vs_global'], sign=True)})"
                + ("" if resolved else ": no gain resolved")
            )
        lines.append("; ".join(parts) + ".")
    return "\n\n".join(lines)


def write_report(out: Path, report: Mapping[str, Any]) -> bool:
    cfg, per_seed, summary = report["config"], report["seeds"], report["summary"]
    tasks = cfg["tasks"]
    header = ["method", "weights", "chosen (per seed)", "val. norm.", *tasks, "mean acc.", "norm. acc.",
              "Δ vs global (paired)", "seeds better/worse"]
    body = []
    for name, families in summary.items():
        for family in FAMILIES:
            s = families[family]
            chosen = " / ".join(point_text(family, p) for p in s["points"])
            body.append([name, FAMILY_LABELS[family], chosen, pm(s["validation_mean_normalised"]),
                         *[pm(s["accuracy"][t]) for t in tasks], pm(s["mean_accuracy"]), pm(s["mean_normalised"]),
                         "–" if family == "global" else pm(s["difference_vs_global"], sign=True),
                         "–" if family == "global" else f"{s['wins']}/{s['losses']}"])
    refs = [seed["references"] for seed in per_seed]
    ref_lines = "; ".join(
        f"{label} {format_mean_std([r[key]['test']['mean_normalised'] for r in refs])}"
        for label, key in (("base model (no LoRA)", "base"), ("plain average (λ = 0.25)", "average"))
    )
    comparison = report.get("merge_quality_comparison")
    timing = report["timings"]
    checks = [c for seed in per_seed for m in seed["methods"].values() for c in m["control_check"].values()]
    grids = "\n\n".join(
        f"**{name}, {FAMILY_LABELS[family]}**\n\n{grid_table(per_seed, name, family, cfg['scale_grid'])}"
        for name in summary for family in FAMILIES[1:]
    )
    seeds = " ".join(map(str, cfg["seeds"]))
    ties = " `ties` runs in full space at its default density (0.2)." if "ties" in cfg["methods"] else ""
    train_all = sum(t["train_seconds"] for seed in per_seed for t in seed["training"].values())
    runs = "".join(f", from the run `{c}`" if i == 0 else f" and `{c}`" for i, c in enumerate(cfg.get("combined_from", [])))
    precision = (
        "Validation and test passes run in float32 (merge_quality searches under bfloat16 autocast, which is fast only "
        "on CPUs with AVX512-BF16; on this AVX2-only CPU it is several times slower than float32)."
        if cfg["search_dtype"] == "float32"
        else "Validation passes run under bfloat16 CPU autocast, as merge_quality's search; test passes in float32."
    )
    text = f"""# Per-module weights vs one global λ (all-MiniLM-L6-v2 testbed, 4 tasks)

Generated by `{report['command']}` on {report['generated']}{runs}. Every grid point, the chosen points per seed, the checks
and the timings are in `{STEM}.json`; the plot is `{STEM}.png`. Issue 16 §3: does per-module control (a λ per
projection, or a λ gradient over the layers) found by a simple validation search beat the best global λ?

## Findings

Mean normalised test accuracy (merged ÷ the task's own LoRA, averaged over the 4 tasks), mean ± sample std over
{len(cfg['seeds'])} training seeds; "paired difference" is per-module minus global on the same seed's LoRAs.

{findings(summary, len(cfg['seeds']))}

References on the same LoRAs: {ref_lines}.

![per-module vs global λ]({STEM}.png)

## Test accuracy

{markdown_table(header, body)}

"val. norm." is the validation score of the chosen point (the search's objective, so biased upwards); the other
cells are test scores. Points are listed in seed order; `λ=x` in a per-module row means the search kept the global
point (no off-diagonal point was strictly better on validation).

## Validation surfaces (mean over seeds)

The search's objective over each 5×5 grid; the diagonal is the global λ.

{grids}

## Setup

* **LoRAs, tasks, heads, splits:** those of `experiments.merge_quality` (same training cache and recipe:
  {cfg['steps']} steps per task, r = 8 on `query`/`value` of the 6 layers, seeds {', '.join(map(str, cfg['seeds']))}).
  See [merge_quality.md](merge_quality.md).
* **Merges:** `lora_fusion.merge(loras, method=M, weights=[w] * 4)` with the same `w` for all 4 sources: a number
  (global), `[{{"filter": "{QUERY}", "value": λq}}, {{"value": λv}}]` (query vs value), or `[{{"value": [λ0, λ1]}}]`
  (gradient: λ at layer i is λ0 + (λ1 − λ0)·i/5). λ ∈ {{{', '.join(f'{s:g}' for s in cfg['scale_grid'])}}}. `linear`
  with weights λ is task arithmetic at λ (checked: the largest difference of ΔW to `task_arithmetic` at the chosen λ
  is {max(s.get('task_arithmetic_difference', 0.0) for s in per_seed):.1e}).{ties}
* **Selection:** per family, the grid point with the highest mean normalised validation accuracy; the global points
  are tried first and a point must be strictly better to replace the best, so ties keep the global point. {precision}
* **Check of the per-module control:** for one off-diagonal point per family (0.25, 1.5), every module's ΔW equals
  the expected weight (query/value by module name, the layer gradient from the layer index) times the ΔW of the
  weight-1 merge: largest relative difference {max(checks) if checks else float('nan'):.1e} over seeds and methods.
* **Against merge_quality:** {comparison['text'] if comparison else 'not compared (no merge_quality.json in --out)'}
* **Runtime:** {timing['total_seconds'] / 60:.1f} min for this run: {timing['evaluation_seconds'] / 60:.1f} min for
  {timing['embedding_passes']} embedding passes, {timing['merge_seconds'] / 60:.1f} min merging,
  {timing['train_seconds_this_run'] / 60:.1f} min training (LoRAs not in the cache); training the
  {sum(len(seed['training']) for seed in per_seed)} LoRAs took {train_all / 60:.1f} min when they were trained (their
  cache entries' `train_seconds`). {cfg['torch_threads']} torch thread(s) on a 2-core CPU shared with other jobs.

## Reproduce

Without root, the Debian data packages can be unpacked anywhere:

```
cd /tmp && apt-get download wordnet-base fortunes fortunes-min
for deb in wordnet-base_*.deb fortunes_*.deb fortunes-min_*.deb; do dpkg -x "$deb" /tmp/debdata; done
python -m experiments.per_module_weights --seeds {seeds} --out docs/results --threads 1 \\
    --wordnet-dir /tmp/debdata/usr/share/wordnet --fortunes-dir /tmp/debdata/usr/share/games/fortunes
```

(With the packages installed, `--wordnet-dir` and `--fortunes-dir` can be left out.) Trained LoRAs are cached in
`~/.cache/lora-fusion/testbed` (`--cache`), shared with merge_quality. `--render {STEM}.json` rewrites this page and
the plot from the JSON alone.
"""
    (out / f"{STEM}.md").write_text(text, encoding="utf-8")
    print(markdown_table(header, body))
    return write_plot(out / f"{STEM}.png", per_seed, summary, cfg["scale_grid"])


def write_plot(path: Path, per_seed: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
               scales: Sequence[float]) -> bool:
    """Mean normalised test accuracy per method and family (seeds as dots), and the linear validation surfaces."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    labels, x = [], 0
    for name, families in summary.items():
        for family, color in zip(FAMILIES, ("#9ecae1", "#3182bd", "#08519c")):
            s = families[family]
            axes[0].bar(x, s["mean_normalised"][0], yerr=s["mean_normalised"][1], color=color, capsize=3)
            axes[0].plot([x] * len(per_seed), s["per_seed_mean_normalised"], "k.", markersize=4)
            labels.append(f"{name}\n{SHORT[family]}")
            x += 1
    values = [v for f in summary.values() for s in f.values() for v in s["per_seed_mean_normalised"]]
    axes[0].set_ylim(min(values) - 0.02, min(1.0, max(values) + 0.02))
    axes[0].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[0].set_ylabel("mean normalised test accuracy")
    axes[0].set_title("chosen on validation (bars: mean ± std; dots: seeds)", fontsize=9)
    name = next(iter(summary))
    for ax, family in zip(axes[1:], FAMILIES[1:]):
        grid = [[mean([e["validation_mean_normalised"] for seed in per_seed
                       for e in seed["methods"][name]["families"][family]["grid"] if tuple(e["point"]) == (a, b)])
                 for b in scales] for a in scales]
        image = ax.imshow(grid, cmap="viridis", origin="lower")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(len(scales)), [f"{s:g}" for s in scales])
        ax.set_yticks(range(len(scales)), [f"{s:g}" for s in scales])
        first, second = ("λq", "λv") if family == "query_value" else ("λ0 (layer 0)", "λ1 (layer 5)")
        ax.set_ylabel(first)
        ax.set_xlabel(second)
        ax.set_title(f"{name}: validation, mean over seeds", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def slashed(values: Any) -> str:
    return "/".join(f"{v:g}" for v in values)


def compare_with_merge_quality(out: Path, per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The global linear λ here against merge_quality's tuned task_arithmetic (same seeds), if its JSON is in ``out``."""
    path = out / "merge_quality.json"
    if not path.is_file() or not all("linear" in seed["methods"] for seed in per_seed):
        return None
    loaded = json.loads(path.read_text())
    theirs = {seed["seed"]: seed["variants"].get("task_arithmetic") for seed in loaded["seeds"]}
    rows = []
    for seed in per_seed:
        other = theirs.get(seed["seed"])
        if not other or "tuned" not in other:
            continue
        ours = seed["methods"]["linear"]["families"]["global"]
        grid = {e["point"][0]: e["validation_mean_normalised"] for e in ours["grid"]}
        val = max(abs(grid[e["params"]["scale"]] - e["validation_mean_normalised"])
                  for e in other["grid"] if e["params"]["scale"] in grid)
        rows.append({"seed": seed["seed"], "lambda": ours["point"][0], "merge_quality_lambda": other["tuned"]["params"]["scale"],
                     "test": ours["test"]["mean_normalised"], "merge_quality_test": other["tuned"]["test"]["mean_normalised"],
                     "largest_validation_difference": val})
    if not rows:
        return None
    same = all(r["lambda"] == r["merge_quality_lambda"] for r in rows)
    test = max(abs(r["test"] - r["merge_quality_test"]) for r in rows)
    val = max(r["largest_validation_difference"] for r in rows)
    text = (f"the global linear λ chose {'the same λ as' if same else 'a different λ from'} merge_quality's tuned "
            f"task_arithmetic on seeds {', '.join(str(r['seed']) for r in rows)} "
            f"(here {slashed(r['lambda'] for r in rows)}, there {slashed(r['merge_quality_lambda'] for r in rows)}); "
            f"its test score differs by at most {test:.4f} "
            f"and the validation grid by at most {val:.4f} (mean normalised accuracy; merge_quality's validation passes ran "
            f"in {loaded['config'].get('search_dtype', 'float32')}).")
    return {"seeds": rows, "same_lambda": same, "largest_test_difference": test,
            "largest_validation_difference": val, "text": text}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = study_parser(__doc__, seeds=[0, 1, 2], out=DEFAULT_OUT, data_dirs=("wordnet", "fortunes"), threads=1)
    parser.add_argument("--cache", type=Path, default=None, help=f"trained LoRAs and heads (default: {default_cache_dir()})")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per task (default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["linear", "ties"],
                        help="merge methods (default: %(default)s)")
    parser.add_argument("--search-dtype", choices=sorted(SEARCH_DTYPES), default="float32",
                        help="precision of the validation passes; test is always float32; bfloat16 pays only on CPUs "
                             "with AVX512-BF16 (default: %(default)s)")
    parser.add_argument("--render", type=Path, nargs="+", default=None, metavar="JSON",
                        help=f"only write {STEM}.md, .json and .png in --out from {STEM}.json files written before "
                             "(several: their seeds and methods combined)")
    args = parse_study_args(parser, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render is not None:
        reports = [json.loads(path.read_text(encoding="utf-8")) for path in args.render]
        report = reports[0] if len(reports) == 1 else combine(args.out, reports)
        if len(reports) > 1:
            report["command"] = " ".join(["python -m experiments.per_module_weights", *(argv or sys.argv[1:])])
        (args.out / f"{STEM}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        write_report(args.out, report)
        return
    started = time.perf_counter()
    data, evaluator, log = open_testbed(parser, TESTBED_TASKS, args.data_dirs, started)
    command = " ".join(["python -m experiments.per_module_weights", *(argv or sys.argv[1:])])
    config = {"tasks": list(TESTBED_TASKS), "seeds": [], "steps": args.steps, "methods": args.methods,
              "families": {f: FAMILY_LABELS[f] for f in FAMILIES}, "scale_grid": list(SCALE_GRID),
              "query_filter": QUERY, "search_dtype": args.search_dtype, "torch_threads": torch.get_num_threads(),
              "selection": "per family, the highest mean normalised validation accuracy; global points first, "
                           "strictly better replaces (ties keep the global point)"}
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:  # the report is rewritten after every seed, so an interrupted run keeps what it measured
        per_seed.append(run_seed(seed, data, evaluator, args, log))
        trained = [t for s in per_seed for t in s["training"].values() if not t["cached"]]
        timings = {"total_seconds": time.perf_counter() - started,
                   "train_seconds_this_run": sum(t["train_seconds"] for t in trained),
                   "evaluation_seconds": evaluator.seconds, "embedding_passes": evaluator.passes,
                   "merge_seconds": sum(s["timings"]["merge_seconds"] for s in per_seed)}
        report = build_report(args.out, command, {**config, "seeds": [s["seed"] for s in per_seed]}, per_seed, timings)
        (args.out / f"{STEM}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        plotted = write_report(args.out, report)
        log(f"wrote {args.out / STEM}.md, .json" + (", .png" if plotted else "") + f" (seeds so far: "
            f"{', '.join(str(s['seed']) for s in per_seed)})")


def build_report(out: Path, command: str, config: Mapping[str, Any], per_seed: Sequence[Mapping[str, Any]],
                 timings: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "config": dict(config),
        "versions": versions(),
        "seeds": list(per_seed),
        "summary": summarise(per_seed, config["tasks"]),
        "merge_quality_comparison": compare_with_merge_quality(out, per_seed),
        "timings": dict(timings),
    }


def combine(out: Path, reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One report from several runs of this study (e.g. one per seed, or one per method on the same seeds): the
    seeds in order, each seed's methods together; timings added up."""
    seeds: dict[int, dict[str, Any]] = {}
    for report in reports:
        for entry in report["seeds"]:
            if entry["seed"] in seeds:
                seeds[entry["seed"]]["methods"].update(entry["methods"])
            else:
                seeds[entry["seed"]] = json.loads(json.dumps(entry))
    per_seed = [seeds[s] for s in sorted(seeds)]
    methods = [m for m in METHODS if all(m in s["methods"] for s in per_seed)]
    for entry in per_seed:  # a method measured on only some seeds is left out of the combined table
        entry["methods"] = {m: entry["methods"][m] for m in methods}
    timings = {k: sum(r["timings"][k] for r in reports) for k in reports[0]["timings"]}
    config = {**reports[0]["config"], "seeds": sorted(seeds), "methods": methods,
              "combined_from": [r["command"] for r in reports]}
    return build_report(out, reports[0]["command"], config, per_seed, timings)

if __name__ == "__main__":
    main()
