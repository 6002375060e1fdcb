"""Score arithmetic and result tables for multi-task merge evaluations (no torch needed).

*Normalised accuracy* of a merged adapter on a task is its accuracy divided by the accuracy of
the task's own (individual) adapter with the same head, as in the task-arithmetic literature
(Ilharco et al. 2023; Yadav et al. 2023).  Results over several training seeds are reported as
mean ± sample standard deviation (n − 1 in the denominator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PARAM_SYMBOLS = {"scale": "λ", "density": "d"}


def normalised(accuracies: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """Accuracy per task divided by the individual adapter's accuracy on that task.

    Raises:
        ValueError: if an individual accuracy is zero (the ratio is undefined).
    """
    out = {}
    for task, value in accuracies.items():
        if individual[task] <= 0:
            raise ValueError(f"individual accuracy on {task} is {individual[task]}; cannot normalise")
        out[task] = value / individual[task]
    return out


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    center = mean(values)
    if len(values) < 2:
        return center, 0.0
    return center, math.sqrt(math.fsum((v - center) ** 2 for v in values) / (len(values) - 1))


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``0.812 ± 0.010`` over seeds; just ``0.812`` for a single seed."""
    center, spread = mean_std(values)
    return f"{center:.{digits}f}" if len(values) < 2 else f"{center:.{digits}f} ± {spread:.{digits}f}"


def format_params(per_seed: Sequence[Mapping[str, object]]) -> str:
    """Chosen parameters over seeds: ``λ=0.5, d=0.1`` when every seed agrees, else per seed in
    seed order, ``λ=0.5/0.75/0.5, d=0.1``; ``–`` when there are none."""
    names = [name for name in per_seed[0]] if per_seed else []
    parts = []
    for name in names:
        values = [_short(params[name]) for params in per_seed]
        shown = values[0] if len(set(values)) == 1 else "/".join(values)
        parts.append(f"{PARAM_SYMBOLS.get(name, name)}={shown}")
    return ", ".join(parts) if parts else "–"


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class ResultRow:
    """One table row: a method (or reference) and its per-seed scores.

    ``accuracy[task]`` and ``normalised[task]`` hold one value per seed, in seed order.
    """

    method: str
    space: str
    setting: str
    accuracy: dict[str, list[float]]
    normalised: dict[str, list[float]] = field(default_factory=dict)
    kind: str = "reference"  # "reference", "default" or "tuned"

    def mean_accuracy(self) -> list[float]:
        """Per seed, the mean accuracy over tasks."""
        return _task_means(self.accuracy)

    def mean_normalised(self) -> list[float]:
        """Per seed, the mean normalised accuracy over tasks (empty if not normalised)."""
        return _task_means(self.normalised) if self.normalised else []


def _task_means(per_task: Mapping[str, Sequence[float]]) -> list[float]:
    columns = list(per_task.values())
    return [mean([column[seed] for column in columns]) for seed in range(len(columns[0]))]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; text columns left-aligned, the others right-aligned."""
    numeric = [
        i > 0
        and all(_numeric(row[i]) or row[i] in ("–", "") for row in rows)
        and any(_numeric(row[i]) for row in rows)
        for i in range(len(header))
    ]
    rule = ["---:" if flag else "---" for flag in numeric]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _numeric(cell: str) -> bool:
    try:
        float(cell.split(" ")[0])
    except ValueError:
        return False
    return True


def results_table(rows: Sequence[ResultRow], tasks: Sequence[str], digits: int = 3) -> str:
    """Method, space, setting, per-task accuracy, mean accuracy and mean normalised accuracy, each
    as mean ± std over seeds."""
    header = ["method", "space", "setting", *tasks, "mean acc.", "mean norm. acc."]
    body = []
    for row in rows:
        cells = [row.method, row.space, row.setting]
        cells += [format_mean_std(row.accuracy[task], digits) for task in tasks]
        cells.append(format_mean_std(row.mean_accuracy(), digits))
        norm = row.mean_normalised()
        cells.append(format_mean_std(norm, digits) if norm else "–")
        body.append(cells)
    return markdown_table(header, body)


REFERENCES = ("base model (no LoRA)", "individual LoRAs", "average")


def collect_rows(per_seed: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[ResultRow]:
    """Table rows on the test split over seeds: the references (base model, individual LoRAs,
    average), then per variant its default and (if it has parameters) its tuned setting.

    ``per_seed[i]`` holds ``references[name]["test"]`` and ``variants[label][setting]`` with
    ``params`` and ``test``, each score a mapping with ``accuracy`` and ``normalised`` per task;
    a variant label is ``method`` or ``method/space``.
    """

    def row(method: str, space: str, kind: str, setting: str, results: Sequence[Mapping[str, Any]]) -> ResultRow:
        return ResultRow(
            method=method,
            space=space,
            setting=setting,
            accuracy={task: [r["accuracy"][task] for r in results] for task in tasks},
            normalised={task: [r["normalised"][task] for r in results] for task in tasks},
            kind=kind,
        )

    refs = [seed["references"] for seed in per_seed]
    rows = [
        row(REFERENCES[0], "–", "reference", "heads only", [r["base"]["test"] for r in refs]),
        row(REFERENCES[1], "–", "reference", "each on its own task", [r["individual"]["test"] for r in refs]),
        row(REFERENCES[2], "–", "reference", "linear, weights 1/T", [r["average"]["test"] for r in refs]),
    ]
    for label in per_seed[0]["variants"]:
        method, _, space = label.partition("/")
        results = [seed["variants"][label] for seed in per_seed]
        if any("error" in result for result in results):
            continue  # failed on some seed: listed separately, not averaged
        if not results[0]["default"]["params"]:
            rows.append(row(method, space or "–", "default", "default (no parameters)", [r["default"]["test"] for r in results]))
            continue
        for kind in ("default", "tuned"):
            params = format_params([r[kind]["params"] for r in results])
            rows.append(row(method, space or "–", kind, f"{kind}: {params}", [r[kind]["test"] for r in results]))
    return rows


def row_summary(row: ResultRow) -> tuple[float, float]:
    """Mean and std over seeds of the row's mean normalised accuracy."""
    return mean_std(row.mean_normalised())


def findings(rows: Sequence[ResultRow], n_seeds: int) -> str:
    """Sentences that restate what the table shows: the references, the best default and tuned
    merges, which merges fall below the base model, how each method at its tuned setting compares
    with the plain average on every seed, full vs core space, and the seed noise.  No significance
    test is implied; "on every seed" compares the same seed's LoRAs (a paired comparison)."""
    base_row = next(r for r in rows if r.method == REFERENCES[0])
    average_row = next(r for r in rows if r.method == REFERENCES[2])
    base = row_summary(base_row)[0]
    average_per_seed = average_row.mean_normalised()
    defaults = [r for r in rows if r.kind == "default"]
    tuned_rows = {(r.method, r.space): r for r in rows if r.kind == "tuned"}
    # each method at its tuned setting; the default where there is nothing to tune
    best_of = [tuned_rows.get((r.method, r.space), r) for r in defaults]

    def name(r: ResultRow) -> str:
        return r.method if r.space == "–" else f"{r.method} ({r.space})"

    def fmt(r: ResultRow) -> str:
        center, spread = row_summary(r)
        return f"{center:.3f}" + (f" ± {spread:.3f}" if n_seeds > 1 else "")

    def listing(candidates: Sequence[ResultRow]) -> str:
        return ", ".join(f"{name(r)} {row_summary(r)[0]:.3f}" for r in candidates)

    def ranked(candidates: Sequence[ResultRow]) -> list[ResultRow]:
        return sorted(candidates, key=lambda r: -row_summary(r)[0])

    seeds = f"{n_seeds} training seed{'s' if n_seeds > 1 else ''}"
    every = "on every seed" if n_seeds > 1 else "on the seed"
    below_base = [r for r in defaults if row_summary(r)[0] < base]
    above = [r for r in best_of if all(v > a for v, a in zip(r.mean_normalised(), average_per_seed))]
    below = [r for r in best_of if all(v < a for v, a in zip(r.mean_normalised(), average_per_seed))]
    top_default, top_tuned = ranked(defaults), ranked(best_of)
    lines = [
        f"Scores are mean normalised test accuracy (merged ÷ the task's own LoRA, averaged over the "
        f"{len(base_row.accuracy)} tasks; mean{' ± std' if n_seeds > 1 else ''} over {seeds}).",
        f"The base model with the trained heads but no LoRA scores {fmt(base_row)}; the plain average "
        f"of the LoRAs scores {fmt(average_row)}.",
        f"At default parameters the best merge is {name(top_default[0])} ({fmt(top_default[0])});",
        f"{len(below_base)} of {len(defaults)} default merges score below the base model"
        + (f" ({listing(below_base)})." if below_base else "."),
        f"At their tuned settings (λ and density chosen on validation; methods without parameters at "
        f"their default) the highest means are {', '.join(f'{name(r)} ({fmt(r)})' for r in top_tuned[:3])}.",
        f"{len(above)} of {len(best_of)} methods at their tuned setting beat the plain average {every}"
        + (f" ({listing(above)})" if above else "")
        + f"; {len(below)} score below it {every}"
        + (f" ({listing(below)})" if below else "")
        + f"; the other {len(best_of) - len(above) - len(below)} are mixed.",
    ]
    pairs = [
        (tuned_rows[(r.method, "full")], tuned_rows[(r.method, "core")])
        for r in defaults
        if r.space == "full" and (r.method, "full") in tuned_rows and (r.method, "core") in tuned_rows
    ]
    if pairs:
        core_better = [f.method for f, c in pairs if row_summary(c)[0] > row_summary(f)[0]]
        lines.append(
            f"Tuned, the element-wise methods score higher in core space than in full space for "
            f"{len(core_better)} of {len(pairs)} methods"
            + (f" ({', '.join(core_better)})." if core_better else ".")
        )
    if n_seeds > 1:
        spread = max(row_summary(r)[1] for r in (base_row, average_row))
        lines.append(
            f"The references vary by up to {spread:.3f} (std) between seeds, so with {seeds} "
            "gaps of a few hundredths between methods are not resolved."
        )
    else:
        lines.append("With a single training seed there is no estimate of seed noise.")
    return " ".join(lines)
