"""ICM-Fusion costs in the real-model setting (MiniLM, LoRA on the top layer's query/value, r = 8, D = 12,288):
F-VAE meta-training time per epoch (one pass over all snapshots), fusion time, and F-VAE size against LoRA size.

An epoch is ⌈N / meta_batch⌉ outer steps for N snapshots; the script times `--steps` outer steps (K = 2 inner steps,
and K = 0 for the no-meta ablation) and scales. Fusion is timed with `--fusion-steps` Adam steps over four tasks'
support sets (k = 10). Sizes are reported for the F-VAE forms this setting and larger layouts would use.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_icm.py [--steps 30] [--fusion-steps 30] > figures.json
"""

from __future__ import annotations

import argparse
import math
import time

from _common import emit, log, machine, rounded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="outer meta-training steps to time")
    parser.add_argument("--fusion-steps", type=int, default=30, help="fusion Adam steps to time")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from lora_fusion.icm.fusion import FusionConfig, fuse
    from lora_fusion.icm.fvae import FVAE, FVAEConfig, count_parameters
    from lora_fusion.icm.meta import MetaTrainConfig, TaskSnapshots, meta_train
    from lora_fusion.icm.minilm import MiniLMTopLayerWorld
    from lora_fusion.icm.pipeline import ICMRecipe, load_splits, train_task_loras

    torch.set_num_threads(args.threads)
    recipe = ICMRecipe(train_per_task=(200,) * 4, lora_steps=60, snapshots=(8,) * 4)
    world = MiniLMTopLayerWorld.load({t: _classes(t) for t in recipe.tasks}, max_seq_len=recipe.max_seq_len)
    layout = world.layout(recipe.rank)
    splits = load_splits(world, recipe, log=log)
    loras = train_task_loras(world, layout, splits, recipe, log=log)
    data = [TaskSnapshots(s.task, snaps, s.support) for s, (_, snaps) in zip(splits, loras)]
    snapshots = sum(len(snaps) for _, snaps in loras)
    steps_per_epoch = math.ceil(snapshots / recipe.meta.meta_batch)

    figures: dict = {"benchmark": "icm", "machine": {**machine(), "torch_threads": args.threads},
                     "setting": {"model": "all-MiniLM-L6-v2", "lora": "top layer query+value, r=8",
                                 "lora_numel": layout.numel, "tasks": len(data), "snapshots": snapshots,
                                 "support_k": recipe.support_k, "meta_batch": recipe.meta.meta_batch}}
    for label, inner in (("meta_K2", 2), ("no_meta_K0", 0)):
        config = MetaTrainConfig(steps=args.steps, inner_steps=inner, cpu=True, log_every=args.steps)
        started = time.perf_counter()
        trained = meta_train(world, layout, data, config, log=log)
        per_step = (time.perf_counter() - started) / args.steps
        figures[label] = {"s_per_step": rounded(per_step), "steps_per_epoch": steps_per_epoch,
                          "s_per_epoch": rounded(per_step * steps_per_epoch)}
    started = time.perf_counter()
    fuse(trained, [snaps[-1] for _, snaps in loras], [(s.task, s.support) for s in splits],
         FusionConfig(steps=args.fusion_steps))
    fusion = time.perf_counter() - started
    figures["fusion"] = {"steps": args.fusion_steps, "s": rounded(fusion),
                         "s_per_step": rounded(fusion / args.fusion_steps),
                         "s_at_200_steps_estimate": rounded(fusion / args.fusion_steps * 200)}

    sizes = []
    for name, numel, cond in (("MiniLM top layer q/v r=8 (this setting)", layout.numel, 384),
                              ("MiniLM all 6 layers q/v r=8 (the testbed's LoRAs)", 73_728, 384),
                              ("SmolLM2-135M q/v r=8", 460_800, 576),
                              ("ICM-LoRA default input (Florence-2)", 1_929_928, 768)):
        for architecture in ("mlp", "conv"):
            if architecture == "mlp" and numel > 100_000:
                continue
            fvae = FVAE(FVAEConfig(numel=numel, condition_dim=cond, architecture=architecture))
            params = count_parameters(fvae)
            sizes.append({"layout": name, "lora_numel": numel, "fvae": architecture, "fvae_parameters": params,
                          "ratio": rounded(params / numel)})
    figures["sizes"] = sizes
    emit(figures)


def _classes(task: str) -> tuple[str, ...]:
    from lora_fusion.eval.catalog import get_task

    return tuple(get_task(task).classes)


if __name__ == "__main__":
    main()
