"""`lora-fusion cil`: RAPF class-incremental training of a CLIP-style adapter (thin: parse, call, print).

The library (`lora_fusion.cil`) is imported inside the command, so `lora-fusion --help` imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import on_interrupt, user_errors

cil_app = typer.Typer(
    name="cil",
    help="Class-incremental training with RAPF (frozen encoders, linear adapter, Gaussian replay, fusion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@cil_app.command("run")
def run(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe, e.g. recipes/rapf_fashion_mnist.yaml.", show_default=False)
    ],
    restart: Annotated[bool, typer.Option("--restart", help="Ignore finished tasks in the output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train task by task; write metrics.json, accuracy.png and task_XX/adapter.safetensors to the recipe's `out`."""
    on_interrupt(
        "interrupted; the tasks finished so far are kept in the recipe's out folder: run the same command to resume "
        "from them."
    )
    with user_errors():
        from lora_fusion.cil import run_recipe
        from lora_fusion.distributed import finish, is_main_process

        try:
            result = run_recipe(recipe, resume=not restart, progress=not quiet)
        finally:
            finish()  # a launched process that exits with its process group open aborts
    if not is_main_process():
        return
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for t, (accuracy, names) in enumerate(zip(result.accuracies, result.tasks)):
        typer.echo(f"task {t}: {', '.join(names)} -> accuracy on seen classes {100 * accuracy:.2f}%")
    typer.echo(f"Last {100 * result.last:.2f}%  Avg {100 * result.avg:.2f}%  ({result.out})")
