"""Errors a user can act on.

Every class here derives from [`LoraFusionError`]; the CLI prints such an error on one line and exits with code 2.
Each also derives from the matching built-in exception, so `except ValueError` keeps working for library users.
Messages say what is wrong and what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class LoraFusionError(Exception):
    """Base of every error the user can fix: the CLI prints it on one line and exits 2."""


class SourceNotFoundError(LoraFusionError, FileNotFoundError):
    """A local path or Hub repository/file/revision that does not exist (or is not visible with this token)."""


class NotALoraAdapterError(LoraFusionError, ValueError):
    """The source exists but is not a PEFT LoRA adapter (a full model, another tuner type, ...)."""


class UnsupportedAdapterError(LoraFusionError, ValueError):
    """A LoRA feature that cannot be merged exactly (DoRA, PiSSA, ...); the message names the feature."""


class AmbiguousSourceError(LoraFusionError, ValueError):
    """A folder or Hub repo holding several LoRA files and no way to tell which is meant; pass `weight_name`."""


class CorruptAdapterError(LoraFusionError, ValueError):
    """Unreadable files, inconsistent shapes, or non-finite weights."""


class NonFiniteError(CorruptAdapterError):
    """NaN or Inf in a factor."""


class OutputOverflowError(NonFiniteError):
    """Finite factors whose scaled value does not fit the output dtype (Inf once cast)."""


class IncompatibleAdaptersError(LoraFusionError, ValueError):
    """Adapters that cannot be merged together: different base models or different shapes for one module."""


class InvalidParameterError(LoraFusionError, ValueError):
    """A merge parameter outside its domain (rank, energy, weights, ...)."""

    def __init__(self, name: str, value: object, *, expected: str) -> None:
        self.name, self.value, self.expected = name, value, expected
        super().__init__(f"invalid {name} {value!r}: expected {expected}.")


class UnknownMethodError(LoraFusionError, ValueError):
    """A method name that is not registered."""


class OutputExistsError(LoraFusionError, FileExistsError):
    """The output directory exists and overwriting was not asked for."""


class OutputWriteError(LoraFusionError, OSError):
    """The output could not be written (disk full, permissions); nothing was left behind."""


class HubError(LoraFusionError, OSError):
    """The Hub refused or could not be reached; the message says whether to log in, check the id or go offline."""


class RecipeError(LoraFusionError, ValueError):
    """A YAML recipe with an unknown key, a wrong type, or invalid YAML."""


class DegenerateMergeWarning(UserWarning):
    """A merge that ran but whose result is probably not what was meant (all-zero inputs, low retained energy, ...).

    The CLI prints each on one line on stderr, `--quiet` included.
    """


class OutputProtectedError(OutputExistsError):
    """`--overwrite` (overwrite=True) would delete something lora-fusion did not write: the current directory or one
    of its parents, the home folder, a source or the base model (or a folder holding or inside one), a file, a link,
    or a folder with files other than an adapter's. Nothing is written or deleted.

    Attributes:
        folder: the output that was refused, absolute.
        reason: why, in words ("it is the current directory", "it holds files lora-fusion did not write", ...).
        files: the names inside `folder` that replacing it would have lost (all of them; the message shows three).
    """

    def __init__(self, folder: Path, reason: str, files: list[str], advice: str) -> None:
        self.folder, self.reason, self.files = folder, reason, list(files)
        shown = ", ".join(self.files[:3]) + (f" and {len(self.files) - 3} more" if len(self.files) > 3 else "")
        lost = f"; replacing it would delete {shown}" if self.files else ""
        super().__init__(f"refusing to replace {folder}: {reason}{lost}. {advice}")


class PublicRepoError(HubError):
    """`--private` (private=True) was asked for, but the Hub repo exists and is public: nothing was uploaded."""


class HubOfflineError(HubError):
    """An upload was asked for while huggingface_hub is in offline mode (`HF_HUB_OFFLINE=1`): nothing was uploaded."""
