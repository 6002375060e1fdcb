"""`lora-fusion icm …`: train an ICM-Fusion F-VAE, fuse LoRAs through it, inspect it.

The evidence study is not a command: `python -m experiments.icm_evidence` (from the repository root).

Thin: parse, call `lora_fusion.icm`, print. The library (and torch) is imported inside the commands, so `--help`
stays fast; user errors go through `user_errors` (one line, exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import user_errors

icm_app = typer.Typer(
    name="icm",
    help="ICM-Fusion: meta-train an F-VAE over LoRAs, then fuse LoRAs in its latent space.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

FVAEOpt = Annotated[Path, typer.Option("--fvae", help="F-VAE directory written by `lora-fusion icm train`.")]
SupportOpt = Annotated[Path, typer.Option("--support", help="JSONL support file: {task, label, text} per line.")]


@icm_app.command("train")
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (e.g. recipes/icm_minilm.yaml).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder: fvae/, adapters/<task>/, support.jsonl.")],
    seed: Annotated[int | None, typer.Option("--seed", help="Override the recipe's seed.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Override the meta-training steps.")] = None,
) -> None:
    """Train each task's MiniLM top-layer LoRA (keeping snapshots) and meta-train an F-VAE on them (Algorithm 1)."""
    with user_errors():
        from lora_fusion.icm.pipeline import ICMRecipe, train_minilm_fvae

        spec = ICMRecipe.from_file(recipe, seed=seed, steps=steps)
        from lora_fusion.distributed import finish, is_main_process

        try:
            trained = train_minilm_fvae(spec, out, log=lambda line: typer.echo(line, err=True))
        finally:
            finish()  # a launched process that exits with its process group open aborts
        if not is_main_process():
            return  # the main process wrote the outputs and reports them
        last = trained.history[-1] if trained.history else {}
        typer.echo(json.dumps({"fvae": str(out / "fvae"), "adapters": str(out / "adapters"),
                               "support": str(out / "support.jsonl"), "final_loss": last.get("loss")}))


@icm_app.command("fuse")
def fuse(
    sources: Annotated[list[str], typer.Argument(help="LoRA adapter dirs (or Hub ids), one per task.",
                                                 show_default=False)],
    fvae: FVAEOpt,
    support: SupportOpt,
    out: Annotated[Path, typer.Option("--out", help="Where to write the fused PEFT adapter.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the conflict projection's order.")] = 0,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated task of each source, in order "
                                              "(default: the support file's tasks in order).")] = None,
    no_projection: Annotated[bool, typer.Option("--no-projection", help="Ablation: keep conflicting parts.")] = False,
    uniform: Annotated[bool, typer.Option("--uniform", help="Ablation: uniform weights, no search.")] = False,
    condition_only: Annotated[bool, typer.Option("--condition-only", help="Ablation: z = 0, mean condition.")] = False,
    steps: Annotated[int, typer.Option("--steps", min=0, help="Adam steps of the weight search.")] = 200,
    refine_steps: Annotated[int, typer.Option("--refine-steps", min=0, help="Eq. 8 refinement steps.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Fuse LoRAs through a trained F-VAE and write one PEFT adapter (same as `merge --method icm`)."""
    with user_errors():
        from lora_fusion import load_adapter
        from lora_fusion.icm.api import icm_merge

        fused = icm_merge(
            [load_adapter(source) for source in sources], fvae=fvae, support=support, seed=seed,
            tasks=tasks.split(",") if tasks else None, conflict_projection=not no_projection,
            learn_weights=not uniform, condition_only=condition_only, steps=steps, refine_steps=refine_steps,
        )
        path = fused.save_pretrained(out, overwrite=overwrite)
        params = fused.provenance["params"]
        typer.echo(json.dumps({"out": str(path), "tasks": params["tasks"], "weights": params["weights"],
                               "conflicts_projected": params["conflicts_projected"]}))


@icm_app.command("info")
def info(fvae: Annotated[Path, typer.Argument(help="F-VAE directory.", show_default=False)]) -> None:
    """Print an F-VAE's base model, tasks, layout, size and last training loss as JSON."""
    with user_errors():
        from lora_fusion.icm.meta import load_fvae

        trained = load_fvae(fvae)
        typer.echo(json.dumps({
            "base_model": trained.base_model,
            "tasks": {task: list(classes) for task, classes in trained.world.task_classes.items()},
            "modules": [m.name for m in trained.layout.modules],
            "lora_numel": trained.layout.numel,
            "fvae_parameters": sum(p.numel() for p in trained.fvae.parameters()),
            "architecture": trained.fvae.config.body,
            "task_vectors": trained.config.task_vectors,
            "normalisation": trained.normaliser.mode,
            "inner_steps": trained.config.inner_steps,
            "final": trained.history[-1] if trained.history else None,
        }, indent=2))
