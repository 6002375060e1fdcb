"""Evidence for ICM-Fusion's claims on the real MiniLM testbed (issue 5 §6, protocol docs/icm.md).

    python -m experiments.icm_evidence --recipe recipes/icm_evidence.yaml --out docs/results

For every seed and setting (balanced k = 10, few-shot k = 5, long-tailed task data and snapshot counts), it trains the
tasks' top-layer LoRAs, then compares on each task's test set (mean cross-entropy and accuracy, each task with its
own head): each task's own LoRA; task arithmetic, TIES (d = 0.2) and DARE + TA (d = 0.5), λ ∈ {0.1, …, 1.0} chosen
on the support sets; a LoRAHub-style gradient-free weight search on the same support sets (the same-data control);
ICM-Fusion and its ablations. Writes `icm_evidence.json`, `icm_evidence.md` and `icm_evidence.png`.
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
from lora_fusion.icm.errors import TrainingDivergedError
from lora_fusion.icm.fusion import FusionConfig, fuse, latent_sensitivity
from lora_fusion.icm.lora_io import Factors, adapter_factors, to_adapter, unflatten
from lora_fusion.icm.meta import TaskSnapshots, meta_train
from lora_fusion.icm.minilm import MiniLMTopLayerWorld
from lora_fusion.icm.pipeline import ICMRecipe, TaskSplit, load_splits, train_task_loras
from lora_fusion.icm.worlds import Batch

LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 11))
# Fusion variants of the main F-VAE, and F-VAE variants (each fused with the default options).
FUSION_ABLATIONS = {
    "icm": FusionConfig(),
    "icm-no-projection": FusionConfig(conflict_projection=False),
    "icm-uniform": FusionConfig(learn_weights=False),
    "icm-condition-only": FusionConfig(condition_only=True),
}
FVAE_ABLATIONS = {
    "icm-no-meta": {"inner_steps": 0},
    "icm-base-task-vectors": {"task_vectors": "base"},
    "icm-weight-delta-task-vectors": {"task_vectors": "weight_delta"},
    "icm-per-checkpoint-norm": {"normalisation": "per_checkpoint"},
}


def evaluate(world: MiniLMTopLayerWorld, factors: Factors | None, splits: Sequence[TaskSplit]) -> dict[str, Any]:
    """Per-task test (cross-entropy, accuracy) and their means."""
    per_task = {s.task: world.evaluate(s.task, factors, s.test) for s in splits}
    return {"per_task": {t: {"loss": l, "acc": a} for t, (l, a) in per_task.items()},
            "loss": statistics.fmean(l for l, _ in per_task.values()),
            "acc": statistics.fmean(a for _, a in per_task.values())}


def best_lambda_merge(world: MiniLMTopLayerWorld, adapters: Sequence[Any], supports: Sequence[tuple[str, Batch]],
                      **merge_kwargs: Any) -> tuple[Factors, float]:
    """The λ ∈ LAMBDAS whose merge has the lowest summed support loss (docs/icm.md, baselines c–e); element-wise
    methods keep rank Σ rᵢ (`rank=` in `merge_kwargs`), so no truncation blurs the comparison."""
    from lora_fusion import merge

    best: tuple[float, Factors, float] | None = None
    for lam in LAMBDAS:
        factors = adapter_factors(merge(list(adapters), scale=lam, progress=False, **merge_kwargs))
        with torch.no_grad():
            loss = float(sum(world.loss(task, factors, batch) for task, batch in supports))
        if best is None or loss < best[0]:
            best = (loss, factors, lam)
    assert best is not None
    return best[1], best[2]


def weighted_sum(factor_list: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """Σᵢ wᵢ·Bᵢ·Aᵢ per module, exactly, as concatenated factors (rank Σ rᵢ)."""
    return {name: (torch.cat([f[name][0] for f in factor_list]),
                   torch.cat([w * f[name][1] for f, w in zip(factor_list, weights)], dim=1))
            for name in factor_list[0]}


def lorahub_search(world: MiniLMTopLayerWorld, factor_list: Sequence[Factors], supports: Sequence[tuple[str, Batch]],
                   *, seed: int, evaluations: int = 80, l1: float = 0.05) -> tuple[Factors, list[float]]:
    """LoRAHub-style gradient-free search (Huang et al., COLM 2024, arXiv:2307.13269): weights w ∈ [−1.5, 1.5]^T
    minimising Σ_t L_task(Σᵢ wᵢΔWᵢ; S_t) + 0.05·Σ|wᵢ|, starting from w = 0 as LoRAHub does. LoRAHub uses nevergrad's
    Shiwa; this is a seeded (1+1) evolution strategy with the 1/5th success rule, 80 evaluations by default."""
    generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def objective(w: torch.Tensor) -> float:
        factors = weighted_sum(factor_list, w.tolist())
        return float(sum(world.loss(task, factors, batch) for task, batch in supports)) + l1 * float(w.abs().sum())

    best = torch.zeros(len(factor_list))
    best_value, sigma = objective(best), 0.5
    for _ in range(evaluations - 1):
        candidate = (best + sigma * torch.randn(len(best), generator=generator)).clamp(-1.5, 1.5)
        value = objective(candidate)
        if value < best_value:
            best, best_value, sigma = candidate, value, sigma * 1.5
        else:
            sigma *= 1.5 ** -0.25
    return weighted_sum(factor_list, best.tolist()), best.tolist()


# Settings that differ only in k (balanced, few-shot) train identical LoRAs and heads: train them once per process.
_TRAINED: dict[tuple[Any, ...], tuple[dict[str, dict[str, torch.Tensor]], list[tuple[Factors, torch.Tensor]]]] = {}


def trained_loras(world: MiniLMTopLayerWorld, recipe: ICMRecipe, splits: Sequence[TaskSplit], *,
                  log: Callable[[str], None]) -> list[tuple[Factors, torch.Tensor]]:
    """`train_task_loras`, memoised on everything the LoRAs depend on (the support size k is not one of them)."""
    key = (recipe.seed, recipe.tasks, recipe.train_per_task, recipe.snapshots, recipe.rank, recipe.lora_steps,
           recipe.lora_lr, recipe.snapshot_every, recipe.max_seq_len)
    if key not in _TRAINED:
        loras = train_task_loras(world, world.layout(recipe.rank), splits, recipe, log=log)
        _TRAINED[key] = ({t: {k: v.clone() for k, v in h.state_dict().items()} for t, h in world.heads.items()}, loras)
    heads, loras = _TRAINED[key]
    for task, state in heads.items():
        world.heads[task].load_state_dict(state)
    return loras


def run_setting(name: str, recipe: ICMRecipe, *, log: Callable[[str], None], ablations: bool,
                fusion_steps: int) -> dict[str, Any]:
    """One (setting, seed): train LoRAs, run every method, evaluate on the test sets."""
    started = time.perf_counter()
    world = MiniLMTopLayerWorld.load({t: _classes(t) for t in recipe.tasks}, max_seq_len=recipe.max_seq_len,
                                     seed=recipe.seed)
    layout = world.layout(recipe.rank)
    splits = load_splits(world, recipe, log=log)
    loras = trained_loras(world, recipe, splits, log=log)
    supports = [(s.task, s.support) for s in splits]
    finals = [unflatten(snaps[-1], layout) for _, snaps in loras]
    adapters = [to_adapter(snaps[-1], layout, base_model=world.base_model) for _, snaps in loras]
    results: dict[str, Any] = {"setting": name, "seed": recipe.seed, "methods": {}, "timing": {}}
    methods = results["methods"]

    # (a) each task's own LoRA, evaluated on its own task only.
    own = {s.task: world.evaluate(s.task, f, s.test) for s, f in zip(splits, finals)}
    methods["own-lora"] = {"per_task": {t: {"loss": l, "acc": a} for t, (l, a) in own.items()},
                           "loss": statistics.fmean(l for l, _ in own.values()),
                           "acc": statistics.fmean(a for _, a in own.values())}
    methods["base"] = evaluate(world, None, splits)
    full_rank = recipe.rank * len(adapters)
    for method, kwargs in (("task-arithmetic", {"method": "task_arithmetic"}),
                           ("ties", {"method": "ties", "density": 0.2, "rank": full_rank}),
                           ("dare", {"method": "dare_linear", "density": 0.5, "seed": recipe.seed, "rank": full_rank})):
        factors, lam = best_lambda_merge(world, adapters, supports, **kwargs)
        methods[method] = {**evaluate(world, factors, splits), "lambda": lam}
    tick = time.perf_counter()
    factors, weights = lorahub_search(world, finals, supports, seed=recipe.seed)
    methods["lorahub"] = {**evaluate(world, factors, splits), "weights": weights}
    results["timing"]["lorahub_s"] = round(time.perf_counter() - tick, 2)

    data = [TaskSnapshots(s.task, snaps, s.support) for s, (_, snaps) in zip(splits, loras)]
    raw_finals = [snaps[-1] for _, snaps in loras]
    fvae_variants = {"icm": {}} | (FVAE_ABLATIONS if ablations else {})
    for variant, overrides in fvae_variants.items():
        meta = replace(recipe.meta, seed=recipe.seed, **overrides)
        tick = time.perf_counter()
        fusions = FUSION_ABLATIONS if variant == "icm" and ablations else {variant: FusionConfig()}
        try:
            trained = meta_train(world, layout, data, meta, log=lambda line, v=variant: log(f"[{name} {v}] {line}"))
        except TrainingDivergedError as err:
            log(f"[{name} {variant}] {err}")
            nan = float("nan")
            for label in fusions:
                methods[label] = {"loss": nan, "acc": nan, "diverged": str(err),
                                  "per_task": {s.task: {"loss": nan, "acc": nan} for s in splits}}
            continue
        results["timing"][f"{variant}_meta_train_s"] = round(time.perf_counter() - tick, 2)
        for label, config in fusions.items():
            tick = time.perf_counter()
            result = fuse(trained, raw_finals, supports, replace(config, steps=fusion_steps, seed=recipe.seed))
            results["timing"][f"{label}_fusion_s"] = round(time.perf_counter() - tick, 2)
            methods[label] = {**evaluate(world, unflatten(result.flat, layout), splits),
                              "weights": result.weights, "conflicts": result.conflicts,
                              "support_loss": [result.losses[0], result.losses[-1]]}
        if variant == "icm":
            # Reconstruction check: decoding each task's own LoRA (posterior mean) keeps its accuracy?
            recon = {}
            for split, flat in zip(splits, raw_finals):
                normalised, condition, stats = trained.prepare(flat, split.support)
                with torch.no_grad():
                    mu, _ = trained.fvae.encode(normalised[None], condition[None])
                    decoded = trained.normaliser.denormalise(trained.fvae.decode(mu, condition[None])[0], stats)
                recon[split.task] = world.evaluate(split.task, unflatten(decoded, layout), split.test)[1]
            results["reconstruction_acc"] = recon
            results["latent_sensitivity"] = latent_sensitivity(trained, raw_finals, supports)
            log(f"[{name}] F-VAE reconstruction accuracy {recon}")
            results["fvae_parameters"] = sum(p.numel() for p in trained.fvae.parameters())
            results["lora_numel"] = layout.numel
    results["timing"]["total_s"] = round(time.perf_counter() - started, 2)
    for method, values in methods.items():
        log(f"[{name} seed {recipe.seed}] {method:32s} loss {values['loss']:.4f} acc {values['acc']:.4f}")
    return results


def _classes(task: str) -> tuple[str, ...]:
    from lora_fusion.eval.catalog import get_task

    return tuple(get_task(task).classes)


SETTINGS: dict[str, dict[str, Any]] = {
    "balanced": {"support_k": 10},
    "few-shot": {"support_k": 5},
    "long-tailed": {"support_k": 10, "train_per_task": (400, 200, 80, 24), "snapshots": (16, 8, 4, 1)},
}


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every method's mean loss, mean accuracy and tail-task accuracy, per setting; a run whose
    F-VAE diverged (NaN) is counted in `diverged` and left out of the means (`n` says how many remain)."""
    table: dict[str, Any] = {}
    for run in runs:
        setting = table.setdefault(run["setting"], {})
        tail = list(run["methods"]["own-lora"]["per_task"])[-1]
        for method, values in run["methods"].items():
            row = setting.setdefault(method, {"loss": [], "acc": [], "tail_acc": [], "per_task_acc": {},
                                              "loss_by_seed": {}, "diverged": 0})
            if not math.isfinite(values["loss"]):
                row["diverged"] += 1
                continue
            row["loss_by_seed"][run["seed"]] = values["loss"]
            row["loss"].append(values["loss"])
            row["acc"].append(values["acc"])
            row["tail_acc"].append(values["per_task"][tail]["acc"])
            for task, scores in values["per_task"].items():
                row["per_task_acc"].setdefault(task, []).append(scores["acc"])
    for setting in table.values():
        for row in setting.values():
            row["n"] = len(row["loss"])
            for key in ("loss", "acc", "tail_acc"):
                row[f"{key}_mean"] = statistics.fmean(row[key]) if row[key] else float("nan")
                row[f"{key}_std"] = statistics.stdev(row[key]) if len(row[key]) > 1 else 0.0
    return table


def claims(table: Mapping[str, Any]) -> dict[str, Any]:
    """The paper's claims checked against the table (docs/icm.md 'counts as reproducing')."""
    out: dict[str, Any] = {}
    for setting, rows in table.items():
        if "icm" not in rows:
            continue
        icm = rows["icm"]
        if not icm["loss"]:
            out[setting] = {"icm_diverged_in_every_seed": True}
            continue
        baselines = [m for m in ("task-arithmetic", "ties", "dare") if m in rows]
        best = min(baselines, key=lambda m: rows[m]["loss_mean"])
        # paired by seed: the same LoRAs and support sets enter both methods
        diffs = [loss - rows[best]["loss_by_seed"][seed] for seed, loss in icm["loss_by_seed"].items()]
        n = len(diffs)
        se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
        out[setting] = {
            "lower_loss_than_best_data_free": statistics.fmean(diffs) < 0,
            "best_data_free": best,
            "loss_difference_mean": statistics.fmean(diffs),
            "loss_difference_se": se,
            "beyond_2se": bool(n > 1 and statistics.fmean(diffs) < -2 * se),
            "higher_acc_than_best_data_free": icm["acc_mean"] > rows[best]["acc_mean"],
            "beats_lorahub_loss": icm["loss_mean"] < rows["lorahub"]["loss_mean"],
            "tail_acc_at_least_ta_and_ties": icm["tail_acc_mean"] >= max(rows["task-arithmetic"]["tail_acc_mean"],
                                                                         rows["ties"]["tail_acc_mean"]),
            "task_enhancement": [t for t, accs in icm["per_task_acc"].items()
                                 if statistics.fmean(accs) > statistics.fmean(rows["own-lora"]["per_task_acc"][t])],
        }
        for ablation in ("icm-no-meta", "icm-no-projection"):
            if ablation in rows:
                out[setting][f"{ablation}_worse"] = rows[ablation]["loss_mean"] > icm["loss_mean"]
    return out


def markdown(table: Mapping[str, Any], verdicts: Mapping[str, Any], scale: Mapping[str, Any]) -> str:
    lines = ["# ICM-Fusion on the MiniLM testbed", "",
             "Generated by `python -m experiments.icm_evidence`; mean ± std over seeds " + str(scale["seeds"]) + ".",
             "Loss: mean test cross-entropy over the 4 tasks (each with its own head); acc: mean test accuracy; "
             "tail: accuracy on the last task (" + scale["tail"] + ").", "",
             f"Scale: {json.dumps(scale, default=str)}", ""]
    for setting, rows in table.items():
        lines += [f"## {setting}", "", "| method | loss | acc | tail acc | seeds |", "|---|---|---|---|---|"]
        for method, row in rows.items():
            seeds = f"{row['n']}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
            lines.append(f"| {method} | {row['loss_mean']:.3f} ± {row['loss_std']:.3f} | "
                         f"{row['acc_mean']:.3f} ± {row['acc_std']:.3f} | "
                         f"{row['tail_acc_mean']:.3f} ± {row['tail_acc_std']:.3f} | {seeds} |")
        if setting in verdicts:
            lines += ["", "Claims: `" + json.dumps(verdicts[setting], default=str) + "`"]
        lines.append("")
    return "\n".join(lines)


def plot(table: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(table)
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.5), sharey=True)
    for axis, setting in zip(axes if len(settings) > 1 else [axes], settings):
        rows = table[setting]
        names = list(rows)
        axis.barh(names, [rows[m]["acc_mean"] for m in names], xerr=[rows[m]["acc_std"] for m in names])
        axis.set_title(setting)
        axis.set_xlabel("mean test accuracy (4 tasks)")
        axis.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    from lora_fusion.recipe import read_recipe_file

    parser = study_parser(__doc__, out=Path("docs/results"), threads=1)
    parser.add_argument("--recipe", type=Path, required=True, help="YAML: `seeds`, `settings`, `ablations_in`, "
                        "`fusion_steps` and ICM recipe keys (scale)")
    parser.add_argument("--runs", type=Path, help="JSONL of finished runs, appended to and reused (resume)")
    parser.add_argument("--name", default="icm_evidence", help="stem of the output files (default: %(default)s)")
    args = parse_study_args(parser, argv)
    spec = read_recipe_file(args.recipe)
    seeds = spec.pop("seeds", [0, 1, 2])
    settings = spec.pop("settings", list(SETTINGS))
    ablations_in = set(spec.pop("ablations_in", ["few-shot"]))
    fusion_steps = int(spec.pop("fusion_steps", 100))
    runs_path = args.runs or args.out / f"{args.name}_runs.jsonl"
    done = [json.loads(l) for l in runs_path.read_text().splitlines()] if runs_path.is_file() else []
    finished = {(r["setting"], r["seed"]) for r in done}

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    for seed in seeds:
        for setting in settings:
            if (setting, seed) in finished:
                continue
            recipe = ICMRecipe.from_mapping({**spec, **SETTINGS[setting], "seed": seed})
            log(f"=== {setting} seed {seed}")
            run = run_setting(setting, recipe, log=log, ablations=setting in ablations_in, fusion_steps=fusion_steps)
            done.append(run)
            runs_path.parent.mkdir(parents=True, exist_ok=True)
            with runs_path.open("a") as file:
                file.write(json.dumps(run) + "\n")
    runs = [r for r in done if r["setting"] in settings and r["seed"] in seeds]
    table = summarise(runs)
    verdicts = claims(table)
    base = ICMRecipe.from_mapping({**spec})
    scale = {"seeds": seeds, "tail": base.tasks[-1], "fusion_steps": fusion_steps, "ablations_in": sorted(ablations_in),
             "recipe": {k: v for k, v in spec.items()}, "settings": {s: SETTINGS[s] for s in settings}}
    record = {"scale": scale, "table": table, "claims": verdicts, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(table, verdicts, scale))
    plot(table, args.out / f"{args.name}.png")
    log(f"wrote {args.out / args.name}.md")


if __name__ == "__main__":
    main()
