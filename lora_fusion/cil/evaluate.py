"""Task-agnostic evaluation of a class-incremental adapter, and the metrics RAPF reports (docs/rapf.md).

Prediction is the argmax of s·cos(W·g(x), t̂_c) over every class seen so far. After task t we record the accuracy on
all seen classes (its mean over tasks is Avg, its final value Last) and the accuracy matrix acc[t][j] on the
classes of each task j ≤ t.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F


def cosine_logits(weight: torch.Tensor, features: torch.Tensor, text_unit: torch.Tensor, scale: float) -> torch.Tensor:
    """logit_c(x) = s·cos(W·g(x), t̂_c): W is text_dim×image_dim, `text_unit` holds unit text features per row."""
    return scale * F.normalize(features @ weight.mT, dim=-1) @ text_unit.mT


@torch.no_grad()
def evaluate_seen(weight: torch.Tensor | None, features: torch.Tensor, positions: torch.Tensor,
                  text_unit: torch.Tensor, tasks: Sequence[Sequence[int]], *, scale: float = 100.0,
                  chunk: int = 4096) -> tuple[float, list[float]]:
    """Accuracy on the test images of the seen classes (all of `tasks`), and per task.

    `weight=None` is the zero-shot rule: the nearest text feature to the raw image feature (only when both live in
    one space, as with CLIP). `positions` are the images' class positions in the class order.

    Returns:
        (accuracy over all seen classes, [accuracy on the classes of task j for each j]), as fractions.
    """
    seen = sum(len(t) for t in tasks)
    keep = (positions >= 0) & (positions < seen)
    x, y = features[keep], positions[keep]
    classes = text_unit[:seen]
    predictions = []
    for start in range(0, x.shape[0], chunk):
        batch = x[start : start + chunk].float()
        logits = (F.normalize(batch, dim=-1) @ classes.mT if weight is None
                  else cosine_logits(weight.float(), batch, classes, scale))
        predictions.append(logits.argmax(-1))
    correct = (torch.cat(predictions) == y) if predictions else torch.zeros(0, dtype=torch.bool)
    per_task = []
    for task in tasks:
        mine = (y >= task[0]) & (y <= task[-1])
        per_task.append(float(correct[mine].float().mean()) if mine.any() else float("nan"))
    return float(correct.float().mean()) if correct.numel() else float("nan"), per_task


def last_and_avg(accuracies: Sequence[float]) -> tuple[float, float]:
    """Last = accuracy on all seen classes after the final task; Avg = its mean over every task, the first included."""
    return accuracies[-1], sum(accuracies) / len(accuracies)


def plot_accuracy(curves: dict[str, Sequence[float]], path: Path, *, title: str,
                  spread: dict[str, Sequence[float]] | None = None) -> None:
    """Accuracy on all seen classes after each task, one line per run (±spread as a band when given), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, values in curves.items():
        steps = list(range(1, len(values) + 1))
        percent = [100 * v for v in values]
        ax.plot(steps, percent, marker="o", label=label)
        if spread and label in spread:
            band = [100 * s for s in spread[label]]
            ax.fill_between(steps, [p - b for p, b in zip(percent, band)], [p + b for p, b in zip(percent, band)],
                            alpha=0.15)
    ax.set_xticks(range(1, max((len(v) for v in curves.values()), default=1) + 1))
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
