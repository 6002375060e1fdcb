"""Does an ICM-Fusion F-VAE latent carry the task? Options against posterior collapse, gated (issue 17 §3).

    python -m experiments.icm_latent --recipe recipes/icm_latent.yaml --out docs/results \
        --wordnet-dir DIR --fortunes-dir DIR

Per seed, on the MiniLM top-layer ICM world (`lora_fusion.icm.pipeline`, balanced setting): train each task's LoRA
and head keeping its last checkpoints; train held-out LoRAs of each task (other seeds, heads
frozen) for the probe; then for every variant of the recipe (`variants:`, each a set of `meta:` overrides of
`MetaTrainConfig` and an optional `diversity:` block of `DiversityConfig`) meta-train an F-VAE and compute the gates
of `lora_fusion.icm.gates` (unit latent sensitivity at the task LoRAs' μ, least-squares probe of task identity from
μ: fit on the variant's single-task training LoRAs, scored on the held-out ones). The variants that pass both gates
(and those listed in `always_fuse`, the baseline by default, for reference) are then fused (latent fusion,
`fusion_steps`) from the task LoRAs and scored on the test sets next to task arithmetic and TIES on the same LoRAs
(λ chosen on the same support sets). Writes `<name>.json` and `<name>.md` (default `icm_latent`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from experiments._args import parse_study_args, study_parser
from experiments.icm_evidence import best_lambda_merge, evaluate
from lora_fusion.icm.diversity import DiversityConfig, train_diverse_loras
from lora_fusion.icm.errors import TrainingDivergedError
from lora_fusion.icm.fusion import FusionConfig, fuse, latent_sensitivity
from lora_fusion.icm.gates import PROBE_GATE, SENSITIVITY_GATE, posterior_means, probe_accuracy, unit_latent_sensitivity
from lora_fusion.icm.lora_io import canonical_flat, to_adapter, unflatten
from lora_fusion.icm.meta import TaskSnapshots, meta_train
from lora_fusion.icm.minilm import MiniLMTopLayerWorld
from lora_fusion.icm.pipeline import ICMRecipe, load_splits, train_task_loras
from lora_fusion.icm.task_vectors import in_context_task_vector

BASELINES = ("task-arithmetic", "ties")


def run_seed(recipe: ICMRecipe, variants: Mapping[str, Mapping[str, Any]], heldout: DiversityConfig, *,
             fusion_steps: int, always_fuse: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    """One seed: LoRAs, baselines, and per variant an F-VAE and its gates; the variants that pass both gates, and
    those named in `always_fuse`, are fused and scored."""
    from lora_fusion.eval.catalog import get_task

    started = time.perf_counter()
    world = MiniLMTopLayerWorld.load({t: tuple(get_task(t).classes) for t in recipe.tasks},
                                     max_seq_len=recipe.max_seq_len, seed=recipe.seed)
    layout = world.layout(recipe.rank)
    splits = load_splits(world, recipe, log=log)
    loras = train_task_loras(world, layout, splits, recipe, log=log)
    supports = [(s.task, s.support) for s in splits]
    train = {s.task: s.train for s in splits}
    support = {s.task: s.support for s in splits}
    base_data = [TaskSnapshots(s.task, snaps, s.support) for s, (_, snaps) in zip(splits, loras)]
    raw_finals = [snaps[-1] for _, snaps in loras]
    result: dict[str, Any] = {"seed": recipe.seed, "methods": {}, "variants": {}, "timing": {}}

    own = {s.task: world.evaluate(s.task, unflatten(f, layout), s.test) for s, f in zip(splits, raw_finals)}
    result["methods"]["own-lora"] = {"per_task": {t: {"loss": l, "acc": a} for t, (l, a) in own.items()},
                                     "loss": statistics.fmean(l for l, _ in own.values()),
                                     "acc": statistics.fmean(a for _, a in own.values())}
    result["methods"]["base"] = evaluate(world, None, splits)
    adapters = [to_adapter(f, layout, base_model=world.base_model) for f in raw_finals]
    full_rank = recipe.rank * len(adapters)
    for method, kwargs in (("task-arithmetic", {"method": "task_arithmetic"}),
                           ("ties", {"method": "ties", "density": 0.2, "rank": full_rank})):
        factors, lam = best_lambda_merge(world, adapters, supports, **kwargs)
        result["methods"][method] = {**evaluate(world, factors, splits), "lambda": lam}

    tick = time.perf_counter()
    held = train_diverse_loras(world, layout, train, support, heldout, steps=recipe.lora_steps, lr=recipe.lora_lr,
                               seed=recipe.seed, salt="heldout", log=log)
    result["timing"]["heldout_loras_s"] = round(time.perf_counter() - tick, 2)
    held_flats = [f for item in held for f in item.flats]
    held_supports = [item.support for item in held for _ in item.flats]
    held_labels = [item.task for item in held for _ in item.flats]
    # What any latent could read: the same probe on the LoRA weights themselves (raw and canonical factors) and on
    # the in-context task vectors, training LoRAs = each task's snapshots, test = the held-out LoRAs.
    train_flats = torch.cat([item.flats for item in base_data])
    train_labels = [item.task for item in base_data for _ in item.flats]
    vectors = {name: torch.stack([in_context_task_vector(world, unflatten(f, layout), batch) for f, batch in pairs])
               for name, pairs in (("train", [(f, item.support) for item in base_data for f in item.flats]),
                                   ("test", list(zip(held_flats, held_supports))))}
    result["probe_without_fvae"] = {
        "raw_weights": probe_accuracy(train_flats, train_labels, torch.stack(held_flats), held_labels),
        "canonical_weights": probe_accuracy(torch.stack([canonical_flat(f, layout) for f in train_flats]),
                                            train_labels,
                                            torch.stack([canonical_flat(f, layout) for f in held_flats]), held_labels),
        "task_vectors": probe_accuracy(vectors["train"], train_labels, vectors["test"], held_labels),
    }
    log(f"probe without the F-VAE: {result['probe_without_fvae']}")

    extra_by_config: dict[DiversityConfig, list[TaskSnapshots]] = {}
    for name, spec in variants.items():
        diversity = DiversityConfig(**(spec.get("diversity") or {}))
        if diversity not in extra_by_config:
            tick = time.perf_counter()
            extra_by_config[diversity] = train_diverse_loras(
                world, layout, train, support, diversity, steps=recipe.lora_steps, lr=recipe.lora_lr,
                seed=recipe.seed, log=log) if diversity.enabled else []
            result["timing"][f"diverse_loras_{name}_s"] = round(time.perf_counter() - tick, 2)
        data = base_data + extra_by_config[diversity]
        meta = replace(recipe.meta, seed=recipe.seed, **(spec.get("meta") or {}))
        tick = time.perf_counter()
        try:
            trained = meta_train(world, layout, data, meta, log=lambda line, v=name: log(f"[{v}] {line}"))
        except TrainingDivergedError as err:
            log(f"[{name}] {err}")
            result["variants"][name] = {"diverged": str(err)}
            continue
        meta_s = round(time.perf_counter() - tick, 2)
        single = [item for item in data if not item.members]
        train_mu, _ = posterior_means(trained, [f for item in single for f in item.flats],
                                      [item.support for item in single for _ in item.flats])
        test_mu, _ = posterior_means(trained, held_flats, held_supports)
        sensitivity = unit_latent_sensitivity(trained, raw_finals, [s.support for s in splits], seed=recipe.seed)
        probe = probe_accuracy(train_mu, [item.task for item in single for _ in item.flats], test_mu, held_labels)
        passes = statistics.fmean(sensitivity) >= SENSITIVITY_GATE and probe >= PROBE_GATE
        record = {
            "unit_sensitivity": sensitivity, "unit_sensitivity_mean": statistics.fmean(sensitivity),
            "mu_vs_zero_sensitivity": latent_sensitivity(trained, raw_finals, supports),
            "probe_accuracy": probe, "probe_train_loras": len(train_mu), "probe_test_loras": len(test_mu),
            "training_loras": sum(len(item.flats) for item in data),
            "multitask_loras": sum(len(item.flats) for item in data if item.members),
            "gates": {"sensitivity": statistics.fmean(sensitivity) >= SENSITIVITY_GATE, "probe": probe >= PROBE_GATE},
            "final_loss": trained.history[-1]["loss"] if trained.history else None,
            "timing": {"meta_train_s": meta_s},
        }
        if passes or name in always_fuse:
            tick = time.perf_counter()
            fused = fuse(trained, raw_finals, supports, FusionConfig(steps=fusion_steps, seed=recipe.seed))
            record["fusion"] = {**evaluate(world, unflatten(fused.flat, layout), splits), "weights": fused.weights}
            record["timing"]["fusion_s"] = round(time.perf_counter() - tick, 2)
        record["gates"]["both"] = record["gates"]["sensitivity"] and record["gates"]["probe"]
        result["variants"][name] = record
        fusion = record.get("fusion")
        log(f"[{name}] sensitivity {record['unit_sensitivity_mean']:.4f} probe {probe:.3f} ({meta_s} s)"
            + (f"; fused loss {fusion['loss']:.4f} acc {fusion['acc']:.4f}" if fusion else ""))
    result["timing"]["total_s"] = round(time.perf_counter() - started, 2)
    return result


def paired(values: Mapping[int, float], reference: Mapping[int, float]) -> dict[str, Any]:
    """Mean of the per-seed differences values − reference and its 2-standard-error interval."""
    diffs = [values[s] - reference[s] for s in values if s in reference]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"mean": mean, "se": se, "low": mean - 2 * se, "high": mean + 2 * se, "n": len(diffs), "diffs": diffs}


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per variant: gates over seeds, fused loss/accuracy, and paired differences against TA and TIES."""
    table: dict[str, Any] = {}
    names = list(dict.fromkeys(n for run in runs for n in run["variants"]))
    for name in names:
        rows = [(run, run["variants"][name]) for run in runs if "gates" in run["variants"].get(name, {})]
        if not rows:
            table[name] = {"n": 0}
            continue
        entry: dict[str, Any] = {
            "n": len(rows),
            "diverged": sum("diverged" in run["variants"].get(name, {}) for run in runs),
            "unit_sensitivity": [v["unit_sensitivity_mean"] for _, v in rows],
            "mu_vs_zero_sensitivity": [statistics.fmean(v["mu_vs_zero_sensitivity"]) for _, v in rows],
            "probe_accuracy": [v["probe_accuracy"] for _, v in rows],
            "passes_sensitivity": [v["gates"]["sensitivity"] for _, v in rows],
            "passes_probe": [v["gates"]["probe"] for _, v in rows],
        }
        entry["passes_both_every_seed"] = all(v["gates"]["both"] for _, v in rows)
        fused_rows = [(run, v) for run, v in rows if "fusion" in v]
        entry["fused_seeds"] = len(fused_rows)
        for metric in ("loss", "acc") if fused_rows else ():
            fused = {run["seed"]: v["fusion"][metric] for run, v in fused_rows}
            entry[f"icm_{metric}"] = list(fused.values())
            for baseline in BASELINES:
                entry[f"{metric}_minus_{baseline}"] = paired(
                    fused, {run["seed"]: run["methods"][baseline][metric] for run, _ in fused_rows})
        table[name] = entry
    return table


def markdown(table: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], scale: Mapping[str, Any]) -> str:
    def mean_sd(values: Sequence[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {sd:.3f}"

    def interval(d: Mapping[str, Any]) -> str:
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    seeds = [run["seed"] for run in runs]
    lines = ["# ICM-Fusion: a latent that matters? (issue 17 §3)", "",
             f"Generated by `python -m experiments.icm_latent`; seeds {seeds} (mean ± std over them). Gates: unit "
             f"latent sensitivity ≥ {SENSITIVITY_GATE} (mean over the 4 task LoRAs) and linear probe of task identity "
             f"from μ ≥ {PROBE_GATE} on held-out LoRAs, in every seed (definitions: docs/icm.md).", "",
             "## Gates", "",
             "| variant | unit sensitivity | μ-vs-0 sensitivity | probe acc | passes (seeds) |", "|---|---|---|---|---|"]
    for name, row in table.items():
        if not row["n"]:
            lines.append(f"| {name} | diverged | | | 0 |")
            continue
        both = sum(s and p for s, p in zip(row["passes_sensitivity"], row["passes_probe"]))
        lines.append(f"| {name} | {mean_sd(row['unit_sensitivity'])} | {mean_sd(row['mu_vs_zero_sensitivity'])} | "
                     f"{mean_sd(row['probe_accuracy'])} | {both}/{row['n']} |")
    lines += ["", "## Fusion against task arithmetic and TIES on the same LoRAs", "",
              "Paired per-seed differences ICM − baseline, mean [2-SE interval]; loss: mean test cross-entropy over "
              "the 4 tasks (lower is better), acc: mean test accuracy (higher is better). Fused: the variants that "
              "passed both gates in a seed, and " + ", ".join(scale["always_fuse"]) + " for reference.", "",
              "| variant | gates | fused seeds | ICM loss | ICM acc | loss − TA | loss − TIES | acc − TA | acc − TIES |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        if not row["n"] or not row["fused_seeds"]:
            continue
        gate = "pass" if row["passes_both_every_seed"] else "fail"
        lines.append(f"| {name} | {gate} | {row['fused_seeds']} | {mean_sd(row['icm_loss'])} | {mean_sd(row['icm_acc'])} | "
                     f"{interval(row['loss_minus_task-arithmetic'])} | {interval(row['loss_minus_ties'])} | "
                     f"{interval(row['acc_minus_task-arithmetic'])} | {interval(row['acc_minus_ties'])} |")
    diagnostics = [run["probe_without_fvae"] for run in runs if "probe_without_fvae" in run]
    if diagnostics:
        lines += ["", "## The same probe without the F-VAE", "",
                  f"Fitted on each task's training snapshots, scored on the held-out LoRAs ({len(diagnostics)} seeds):",
                  "", "| features | probe acc |", "|---|---|"]
        for key in diagnostics[0]:
            lines.append(f"| {key.replace('_', ' ')} | {mean_sd([d[key] for d in diagnostics])} |")
    lines += ["", "| reference | loss | acc |", "|---|---|---|"]
    for method in ("own-lora", "base", *BASELINES):
        lines.append(f"| {method} | {mean_sd([r['methods'][method]['loss'] for r in runs])} | "
                     f"{mean_sd([r['methods'][method]['acc'] for r in runs])} |")
    lines += ["", f"Scale: `{json.dumps(scale, default=str)}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from lora_fusion.recipe import read_recipe_file

    parser = study_parser(__doc__, seeds=[0, 1, 2], out=Path("docs/results"), threads=1,
                          data_dirs=("wordnet", "fortunes"))
    parser.add_argument("--recipe", type=Path, required=True,
                        help="YAML: `variants`, `heldout`, `fusion_steps` and ICM recipe keys")
    parser.add_argument("--runs", type=Path, help="JSONL of finished seeds, appended to and reused (resume)")
    parser.add_argument("--name", default="icm_latent", help="stem of the output files (default: %(default)s)")
    args = parse_study_args(parser, argv)
    spec = read_recipe_file(args.recipe)
    variants = spec.pop("variants")
    heldout = DiversityConfig(**spec.pop("heldout", {"seeds": 2, "snapshots": 1}))
    fusion_steps = int(spec.pop("fusion_steps", 100))
    always_fuse = list(spec.pop("always_fuse", ["baseline"]))
    spec["data_dirs"] = {**(spec.get("data_dirs") or {}), **{k: str(v) for k, v in args.data_dirs.dirs.items()}}
    runs_path = args.runs or args.out / f"{args.name}_runs.jsonl"
    done = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.is_file() else []

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    for seed in args.seeds:
        if any(run["seed"] == seed for run in done):
            continue
        log(f"=== seed {seed}")
        run = run_seed(ICMRecipe.from_mapping({**spec, "seed": seed}), variants, heldout, fusion_steps=fusion_steps,
                       always_fuse=always_fuse, log=log)
        done.append(run)
        runs_path.parent.mkdir(parents=True, exist_ok=True)
        with runs_path.open("a") as file:
            file.write(json.dumps(run) + "\n")
    runs = [run for run in done if run["seed"] in args.seeds]
    table = summarise(runs)
    scale = {"seeds": [run["seed"] for run in runs], "fusion_steps": fusion_steps, "always_fuse": always_fuse,
             "heldout": heldout.to_dict(),
             "variants": variants, "recipe": {k: v for k, v in spec.items() if k != "data_dirs"}}
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"scale": scale, "table": table, "runs": runs}
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(table, runs, scale))
    log(f"wrote {args.out / args.name}.md")


if __name__ == "__main__":
    main()
