"""`lora-fusion bake BASE SOURCES… [merge options] --out DIR`: merge adapters with any method and add the result
into the base model's weights, streamed shard by shard, written as a full model.

Registered in `main` with `merge`'s declared options (less those that make no sense for a full model); the helpers
that turn those options into `merge`'s keywords are `main`'s, imported when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import fail, on_interrupt, user_errors

# merge options a bake does not take: it writes a full model (no adapter format, no push), and BASE is its base model
BAKE_SKIPPED = frozenset({"format", "push_to_hub", "private", "base_model"})


def bake(
    ctx: typer.Context,
    base: Annotated[str, typer.Argument(help="The base model: a local folder or a Hub id (safetensors only).",
                                        show_default=False)],
    sources: Annotated[list[str], typer.Argument(help="Hub ids (owner/name[@revision]) or local adapter folders/files.",
                                                 show_default=False)],
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit of a Hub BASE.")] = None,
    untie_embeddings: Annotated[
        bool,
        typer.Option("--untie-embeddings", help="For a model with tied embeddings whose embedding or lm_head the "
                     "adapters change: write both tensors and set tie_word_embeddings false (else refused)."),
    ] = False,
    dequantize: Annotated[
        Optional[str],
        typer.Option(help="nf4: add the update onto the NF4 round trip of W₀, as a QLoRA adapter was trained "
                     "(needs bitsandbytes: lora-fusion[qlora])."),
    ] = None,
    param: Annotated[
        Optional[list[str]], typer.Option(help="A method parameter as NAME=VALUE (repeatable), as for merge.")
    ] = None,
    module_weight: Annotated[
        Optional[list[str]], typer.Option(help="Per-module weights 'REGEX=w1,w2,…' (one per source), as for merge.")
    ] = None,
    rank_pattern: Annotated[
        Optional[list[str]], typer.Option(help="Per-module output rank 'REGEX=R', as for merge.")
    ] = None,
    subfolder: Annotated[Optional[str], typer.Option(help="Folder inside each source repo/dir.")] = None,
    weight_name: Annotated[Optional[str], typer.Option(help="The LoRA file inside each source, as for merge.")] = None,
    input_format: Annotated[Optional[str], typer.Option(help="Read the sources as peft, diffusers or kohya.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the shards and bytes that would be written; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan or result as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Merge adapters and add them into the base model, shard by shard: `lora-fusion bake BASE A B --out DIR`."""
    with user_errors():
        from lora_fusion.recipe import validated

        from .main import _declared_flags, _merge_arguments, _module_weights, _rank_patterns

        plan = validated({"sources": sources, **_declared_flags(ctx, param or [])}, origin="options")
        if not dry_run and plan.out is None:
            fail("say where the baked model goes: --out DIR.")
        weights = _module_weights(module_weight or [], plan.source_weights(), len(plan.entries()))
        ranks = _rank_patterns(rank_pattern or [], plan.params.get("rank"))
        arguments = _merge_arguments(plan, weights=weights, ranks=ranks, subfolder=subfolder, weight_name=weight_name,
                                     input_format=input_format)
        if plan.out:
            kept = "untouched" if Path(plan.out).exists() else "not created"
            on_interrupt(f"interrupted; nothing written; {plan.out} {kept}.")
        from lora_fusion.baking import bake as bake_model

        result = bake_model(
            base, plan.entries(), out=plan.out, overwrite=bool(plan.overwrite), revision=revision,
            dtype=plan.dtype, untie_embeddings=untie_embeddings, dequantize=dequantize,
            progress=False if quiet else None, dry_run=dry_run, **arguments,
        )
        if dry_run:
            typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))
            return
        written = sorted(p.name for p in result.glob("*.safetensors"))
        size = sum((result / name).stat().st_size for name in written)
        summary = {"out": str(result), "shards": len(written), "bytes": size}
        typer.echo(json.dumps(summary, indent=2) if as_json else
                   f"baked {len(sources)} adapter(s) into {base} -> {result} ({summary['shards']} shard(s), "
                   f"{summary['bytes']:,} bytes)")
