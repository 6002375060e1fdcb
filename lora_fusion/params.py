"""Parameter declarations: every merge option is declared once, here or beside the method that takes it.

A [`Param`] holds what a parameter means (help), what a valid value is (a check and the words for it) and its default.
A method's parameters are a frozen dataclass derived from [`MethodParams`] whose fields are made with
[`Param.field`]; the dataclass validates itself on construction. The `merge()` keyword check, the recipe keys, the
CLI options, `lora-fusion methods` and the `--dry-run` plan are all read from these declarations, so adding a
parameter is one declaration and one field.

Merge-wide options that are not a method's (where the sources come from, the output dtype and device, where the
result goes) are declared in [`MERGE_OPTIONS`], once for the CLI and the recipes.

This module imports no torch: `lora-fusion --help` builds its options from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .errors import InvalidParameterError

if TYPE_CHECKING:
    from .linalg import RankRule

_UNSET: Any = object()


@dataclass(frozen=True)
class Param:
    """The declaration of one parameter.

    Args:
        help: one line for `--help`, `lora-fusion methods` and the docs.
        expected: what a valid value is, in words, for the error message ("a fraction in (0, 1], e.g. 0.99").
        check: whether a (non-None) value is valid.
        default: the default, unless a method's field gives its own.
        path: the value is a file or folder path (a `PathLike` is accepted and stored as `str`).
        flag: the value is a switch (`--chained`, no `--no-chained`).
        short: a one-letter command-line spelling, e.g. `-r`.
        per_module: the value may differ per module: a rule list (`lora_fusion.controls`) is accepted for it.
    """

    help: str
    expected: str
    check: Callable[[Any], bool]
    default: Any = None
    path: bool = False
    flag: bool = False
    short: str | None = None
    per_module: bool = False

    def field(self, default: Any = _UNSET) -> Any:
        """A dataclass field for a method's parameters, with this declaration attached (and `default` if given)."""
        value = self.default if default is _UNSET else default
        return dataclasses.field(default=value, metadata={"param": self})


def is_real(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: object) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """A check for real numbers between `low` and `high` (each end closed unless said open)."""

    def check(value: object) -> bool:
        if not is_real(value):
            return False
        above = value > low if low_open else value >= low  # type: ignore[operator]
        below = value < high if high_open else value <= high  # type: ignore[operator]
        return above and below

    return check


def one_of(*choices: str) -> Callable[[Any], bool]:
    """A check for one of `choices`."""
    return lambda value: isinstance(value, str) and value in choices


# Parameters more than one method family takes. A family's own parameters are declared in its module.
RANK = Param(
    "Output rank (default: the largest input rank; exact sums keep Σ rᵢ, subspace methods their merged rank).",
    "a positive integer, e.g. 16",
    lambda value: is_int(value) and value >= 1,
    short="-r",
    per_module=True,
)
ENERGY = Param(
    "Instead of rank: the smallest rank per module keeping this fraction of Σσ², e.g. 0.99.",
    "a fraction in (0, 1], e.g. 0.99",
    in_range(0.0, 1.0, low_open=True),
    per_module=True,
)
SV_FRO = Param(
    "Instead of rank: the smallest rank per module keeping this fraction of ‖ΔW‖_F (kohya's sv_fro), e.g. 0.9.",
    "a fraction in (0, 1], e.g. 0.9",
    in_range(0.0, 1.0, low_open=True),
    per_module=True,
)
SV_RATIO = Param(
    "Instead of rank: keep the singular values above σ_max / x per module (kohya's sv_ratio), e.g. 10.",
    "a number ≥ 1, e.g. 10",
    in_range(1.0, math.inf),
    per_module=True,
)
SV_CUMULATIVE = Param(
    "Instead of rank: the smallest rank per module keeping this share of Σσ (kohya's sv_cumulative), e.g. 0.9.",
    "a fraction in (0, 1], e.g. 0.9",
    in_range(0.0, 1.0, low_open=True),
    per_module=True,
)
MAX_RANK = Param(
    "A cap on the output rank of every module, whatever rule chose it (e.g. a serving engine's max LoRA rank).",
    "a positive integer, e.g. 64",
    lambda value: is_int(value) and value >= 1,
    per_module=True,
)
# The rules choosing an output rank, at most one at a time (`max_rank` caps any of them).
RANK_RULES = ("rank", "energy", "sv_fro", "sv_ratio", "sv_cumulative")
SCALE = Param("Global factor λ on the merged update.", "a finite number, e.g. 0.5", is_real, default=1.0,
              per_module=True)
DENSITY = Param(
    "Fraction of entries kept (TIES/magnitude trim, DARE keep probability).",
    "a fraction in (0, 1], e.g. 0.2",
    in_range(0.0, 1.0, low_open=True),
    per_module=True,
)
SEED = Param(
    "Seed of the random draws: DARE masks, randomized SVD, ICM-Fusion, LoRAHub's search.",
    "a non-negative integer, e.g. 0",
    lambda value: is_int(value) and value >= 0,
    default=0,
)
SUPPORT = Param(
    "JSONL support file: ICM-Fusion's labelled examples of each source's task; LoRAHub's {input, output} or "
    "{text, label} examples.",
    "a path", lambda value: isinstance(value, str), path=True,
)
SPACE = Param(
    "'full' (dense update per module) or 'core' (k×k core-space matrices).",
    "'full' or 'core'",
    one_of("full", "core"),
    default="full",
)
SVD = Param(
    "SVD of a dense merged update: 'auto' (exact up to 1024 rows or columns, else randomized), 'exact' or "
    "'randomized'.",
    "'auto', 'exact' or 'randomized'",
    one_of("auto", "exact", "randomized"),
    default="auto",
)


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's parameters: each field is declared with [`Param.field`] and checked on construction.

    Raises:
        InvalidParameterError: a value outside its declared domain, `rank` together with `energy`, or an SVD choice
            for a core-space merge.
    """

    def __post_init__(self) -> None:
        for item in fields(self):
            declaration: Param = item.metadata["param"]
            value = getattr(self, item.name)
            if declaration.path and isinstance(value, os.PathLike):
                value = os.fspath(value)
                object.__setattr__(self, item.name, value)
            if value is not None and not declaration.check(value):
                raise InvalidParameterError(item.name, value, expected=declaration.expected)
        given = [name for name in RANK_RULES if getattr(self, name, None) is not None]
        if len(given) > 1:
            raise InvalidParameterError(
                given[0], getattr(self, given[0]), expected=f"one rank rule, not {' and '.join(given)}"
            )
        if getattr(self, "svd", "auto") != "auto" and getattr(self, "space", "full") == "core":
            # a core-space merge forms no dense update: its k×k SVD is always exact
            raise InvalidParameterError("svd", getattr(self, "svd"), expected="'auto' with space 'core', or space 'full'")

    def recorded(self) -> dict[str, object]:
        """Every parameter with its resolved value, by name: what the model card, the metadata and the plan show."""
        return {name: getattr(self, name) for name in sorted(f.name for f in fields(self))}


@dataclass(frozen=True)
class RankedParams(MethodParams):
    """The output-rank rule of a method that goes back to low rank (`linalg.RankRule`): one of rank, energy, sv_fro,
    sv_ratio or sv_cumulative, and a `max_rank` cap."""

    rank: int | None = RANK.field()
    energy: float | None = ENERGY.field()
    sv_fro: float | None = SV_FRO.field()
    sv_ratio: float | None = SV_RATIO.field()
    sv_cumulative: float | None = SV_CUMULATIVE.field()
    max_rank: int | None = MAX_RANK.field()

    def rank_rule(self) -> RankRule:
        """These parameters as a [`lora_fusion.linalg.RankRule`]."""
        from .linalg import RankRule

        return RankRule(self.rank, self.energy, self.sv_fro, self.sv_ratio, self.sv_cumulative, self.max_rank)


def declared(params: type[MethodParams]) -> dict[str, Param]:
    """The parameters a method's dataclass declares, by name, in field order."""
    return {item.name: item.metadata["param"] for item in fields(params)}


def defaults(params: type[MethodParams]) -> dict[str, Any]:
    """Each declared parameter's default for this method."""
    return {item.name: item.default for item in fields(params)}


def value_type(params: type[MethodParams], name: str) -> Any:
    """The Python type of a declared field, without `None` (e.g. `int` for `int | None`)."""
    hint = typing.get_type_hints(params)[name]
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return str
    if options and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return options[0]
    return hint


@dataclass(frozen=True)
class Option:
    """A merge-wide option of `lora-fusion merge` and of recipes (not a method's parameter)."""

    help: str
    type: Any
    default: Any = None
    flag: bool = False
    short: str | None = None


MERGE_OPTIONS: Mapping[str, Option] = {
    "method": Option("Merge method (see `lora-fusion methods`); default: linear.", str, "linear", short="-m"),
    "weights": Option("One weight per source, e.g. 0.6,0.4 (default 1 each).", list[float]),
    "base_model": Option("Base model dir, file or Hub id, for methods that read W₀ (rapf) or run it (lorahub), and "
                         "DoRA sources.", str),
    "device": Option("cpu, cuda or auto.", str, "cpu"),
    "dtype": Option("Output dtype: float32, float16 or bfloat16 (default: input).", str),
    "ignore_base_model": Option("Merge despite different base_model names.", bool, False, flag=True),
    "out": Option("Output folder: the adapter (a .safetensors file with --format kohya), or bake's model.", str,
                  short="-o"),
    "format": Option("Output format: peft, diffusers (folder) or kohya (one .safetensors file).", str, "peft"),
    "include": Option("Merge only modules matching this regex (re.search; repeatable).", list[str]),
    "exclude": Option("Leave modules matching this regex out of the output (repeatable).", list[str]),
    "overwrite": Option("Replace an existing --out.", bool, False, flag=True),
    "push_to_hub": Option("Also upload to this Hub repo id.", str),
    "private": Option("Create the Hub repo private.", bool, flag=True),
}

# Names a method's parameter cannot take: the merge-wide options and the other keywords of `merge()`.
RESERVED_NAMES = frozenset({*MERGE_OPTIONS, "sources", "revision", "subfolder", "token", "distributed", "dry_run",
                            "progress", "param", "recipe", "weight_name", "input_format", "module_weight"})
