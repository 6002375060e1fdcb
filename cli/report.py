"""`lora-fusion report`: the merge report (PNG figures, one self-contained HTML page, report.json) of a merged output
and its sources, or of sources alone. Registered in `main`; imports neither `main` nor the other sub-apps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import fail, user_errors


def report(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="A merged output lora-fusion wrote (found from its metadata) and its sources, or two or more "
            "sources alone: Hub ids (owner/name[@revision]) or local adapter folders/files.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The report folder to write.", show_default=False)],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out that holds only the files of a report.")
    ] = False,
    density: Annotated[float, typer.Option(help="Top-k fraction of each update kept before counting sign conflicts.")]
    = 0.2,
    subfolder: Annotated[Optional[str], typer.Option(help="Folder inside each source.")] = None,
) -> None:
    """Write a merge report: per-module rank, retained energy and error; per-layer interference; spectra."""
    with user_errors():
        from lora_fusion.errors import InvalidParameterError
        from lora_fusion.report import build_report, check_report_folder, is_merge_output, read_provenance, write_report
        from lora_fusion.sources import load_adapter

        if not 0.0 < density <= 1.0:
            raise InvalidParameterError("density", density, expected="a fraction in (0, 1], e.g. 0.2")
        check_report_folder(out, overwrite=overwrite, protected=sources)  # before reading: a refusal costs nothing
        adapters = [(given, load_adapter(given, subfolder=subfolder)) for given in sources]
        outputs = [(given, a) for given, a in adapters if is_merge_output(read_provenance(a))]
        inputs = [a for given, a in adapters if all(a is not o for _, o in outputs)]
        if len(outputs) > 1:
            fail(f"{outputs[0][0]} and {outputs[1][0]} are both merged outputs; give one output and its sources.")
        if not outputs and len(inputs) < 2:
            fail(f"{sources[0]} is not a merge output lora-fusion wrote; give a merged output and its sources, or "
                 "two or more sources to compare.")
        built = build_report(inputs, outputs[0][1] if outputs else None, density=density)
        written = write_report(built, out, overwrite=overwrite)
        typer.echo(f"report written to {written} (index.html, report.json and {len(built['spectra'])} spectra)")
