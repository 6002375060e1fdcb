"""What every command of the CLI shares: user errors and warnings as one line, and the Ctrl-C note.

Kept apart from `main` so that the sub-apps (`cil`, `icm`) and `main` import it without importing each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and exit code 2 (re-raise with LORA_FUSION_DEBUG=1), Ctrl-C into
    one line saying what was written and exit code 130, and the library's warnings into one `Warning:` line each
    (Python's default adds the file, line and source code)."""
    import warnings

    from lora_fusion.errors import LoraFusionError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            yield
    except LoraFusionError as err:
        if os.environ.get("LORA_FUSION_DEBUG") == "1":
            raise
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:  # Ctrl-C: say what is on disk (writes are atomic), exit as shells expect
        typer.echo(interrupted_note(), err=True)
        raise typer.Exit(code=130) from None


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    typer.echo(f"Warning: {message}", err=True)


def warn(message: str) -> None:
    """A warning found by the CLI itself: one line on stderr, printed with --quiet too."""
    typer.echo(f"Warning: {message}", err=True)


# What a Ctrl-C leaves behind, kept current by the commands that write; printed on Ctrl-C with exit code 130.
_interrupted = ["interrupted."]


def on_interrupt(message: str) -> None:
    """Say what a Ctrl-C from now on would leave on disk (one line)."""
    _interrupted[0] = message


def interrupted_note() -> str:
    """The line to print on Ctrl-C."""
    return _interrupted[0]


def fail(message: str) -> None:
    """A user error found by the CLI itself."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code=2)
