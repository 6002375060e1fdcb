"""`lora-fusion extract BASE FINETUNED --out DIR`: a LoRA from a full fine-tune (`lora_fusion.extract`).

The rank-rule options carry the declarations' help (`lora_fusion.params`); torch is imported only when the command
runs, never for `--help`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lora_fusion.params import ENERGY, MAX_RANK, SEED, SV_CUMULATIVE, SV_FRO, SV_RATIO, SVD

from .common import on_interrupt, user_errors

# The default is stated in the library (`lora_fusion.extraction.DEFAULT_RANK`); this module stays torch-free.
RANK_HELP = "Output rank of every module (default 16 when no rule is given)."


def extract(
    base: Annotated[str, typer.Argument(help="The base model: a local folder or a Hub id (owner/name[@revision]).")],
    finetuned: Annotated[str, typer.Argument(help="The fine-tuned model, of the same architecture.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output PEFT adapter folder.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", help=RANK_HELP)] = None,
    energy: Annotated[Optional[float], typer.Option(help=ENERGY.help)] = None,
    sv_fro: Annotated[Optional[float], typer.Option(help=SV_FRO.help)] = None,
    sv_ratio: Annotated[Optional[float], typer.Option(help=SV_RATIO.help)] = None,
    sv_cumulative: Annotated[Optional[float], typer.Option(help=SV_CUMULATIVE.help)] = None,
    max_rank: Annotated[Optional[int], typer.Option(help=MAX_RANK.help)] = None,
    rank_pattern: Annotated[Optional[list[str]], typer.Option(
        help="REGEX=R: modules matching REGEX (re.search) get rank R instead of the rule (repeatable; first wins).")
    ] = None,
    modules: Annotated[Optional[str], typer.Option(
        help="Extract only modules matching this regex (re.search; default: every Linear, Conv and Embedding).")
    ] = None,
    save_module: Annotated[Optional[list[str]], typer.Option(
        help="Write this module whole from the fine-tune (PEFT modules_to_save): a changed norm, a resized "
             "embedding (repeatable).")
    ] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="float32, float16 or bfloat16 (default: the fine-tune's).")] = None,
    svd: Annotated[str, typer.Option(help=SVD.help)] = "auto",
    device: Annotated[str, typer.Option(help="Where ΔW and its SVD are computed: cpu, cuda or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help=SEED.help)] = 0,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of ids given without @revision.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an --out that lora-fusion wrote.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print what would be extracted (headers and 1-D tensors only; no SVD).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary (or the plan) as JSON.")] = False,
) -> None:
    """Extract a LoRA from a full fine-tune: per module ΔW = W_ft − W₀, truncated SVD, written as a PEFT adapter."""
    from .common import fail
    from .main import _rank_patterns

    if out is None and not dry_run:
        fail("extract needs --out DIR (or --dry-run).")
    rules: dict[str, Any] = {"rank": rank, "energy": energy, "sv_fro": sv_fro, "sv_ratio": sv_ratio,
                             "sv_cumulative": sv_cumulative, "max_rank": max_rank}
    rules.update(_rank_patterns(rank_pattern or [], rank))
    with user_errors():
        from lora_fusion.extraction import extract as run_extract

        if out is not None and not dry_run:
            from lora_fusion.writer import check_output

            check_output(out, overwrite=overwrite, protected=[base, finetuned])
            on_interrupt(f"interrupted; nothing written; {out} {'untouched' if out.exists() else 'not created'}.")
        result: Any = run_extract(base, finetuned, **rules, modules=modules, save_modules=save_module or (),
                                  svd=svd, seed=seed, revision=revision, dtype=dtype, device=device,
                                  dry_run=dry_run)
        if dry_run:
            typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))
            return
        written = result.save_pretrained(out, overwrite=overwrite)
        summary = _summary(result, written)
        typer.echo(json.dumps(summary, indent=2) if as_json else _line(summary))


def _summary(adapter: Any, written: Path) -> dict[str, Any]:
    params = adapter.provenance["params"]
    ranks = [s.rank for s in adapter.stats.values()]
    energies = {name: s.retained_energy for name, s in adapter.stats.items()}
    lowest = min(energies, key=energies.__getitem__)
    return {
        "out": str(written),
        "modules": len(adapter.modules),
        "ranks": [min(ranks), max(ranks)],
        "lowest_retained_energy": {"module": lowest, "energy": energies[lowest]},
        "unchanged_modules": params["unchanged_modules"],
        "modules_to_save": params["modules_to_save"],
    }


def _line(summary: dict[str, Any]) -> str:
    low, high = summary["ranks"]
    worst = summary["lowest_retained_energy"]
    unchanged = summary["unchanged_modules"]
    saved = summary["modules_to_save"]
    ranks = f"{low}–{high}" if high != low else str(low)
    listed = f" ({', '.join(unchanged[:5])}{', …' if len(unchanged) > 5 else ''})" if unchanged else ""
    return (f"extracted {summary['modules']} modules -> {summary['out']} (rank {ranks}; lowest retained energy "
            f"{worst['energy']:.4f} in {worst['module']}); unchanged, skipped: {len(unchanged)}{listed}"
            + (f"; written whole: {', '.join(saved)}" if saved else ""))
