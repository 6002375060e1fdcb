"""The method interface and registry: a method is a pure function on one module's factors.

A method receives a [`ModuleGroup`] (the module's factors from every adapter that has it, with their weights) and
[`MergeParams`], and returns a [`ModuleResult`] (output factors with the scale folded in, and stats). It never reads
or writes files. Methods register themselves by name with [`register_method`], declaring which parameters they take,
so the engine can refuse a parameter a method would ignore before anything is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from ..adapter import ModuleFactors
from ..errors import InvalidParameterError, UnknownMethodError


@dataclass(frozen=True)
class MergeParams:
    """Parameters shared by the methods; each method declares the ones it uses."""

    rank: int | None = field(default=None, metadata={"help": "Output rank (default: the largest input rank)."})
    energy: float | None = field(
        default=None, metadata={"help": "Smallest rank per module keeping this fraction of Σσ², e.g. 0.99."}
    )
    scale: float = field(default=1.0, metadata={"help": "Global factor λ on the merged update."})

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise InvalidParameterError("rank", self.rank, expected="a positive integer, e.g. 16")
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0.0 < self.energy <= 1.0):
            raise InvalidParameterError("energy", self.energy, expected="a fraction in (0, 1], e.g. 0.99")
        if self.rank is not None and self.energy is not None:
            raise InvalidParameterError("rank", self.rank, expected="either a rank or an energy, not both")
        if not math.isfinite(self.scale):
            raise InvalidParameterError("scale", self.scale, expected="a finite number, e.g. 0.5")

    def given(self) -> dict[str, object]:
        """The parameters that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


@dataclass(frozen=True)
class ModuleGroup:
    """One module's factors from each adapter that has it, in float32, with the user weight of each."""

    name: str
    factors: Sequence[ModuleFactors]
    weights: Sequence[float]

    @property
    def max_rank(self) -> int:
        return max(f.rank for f in self.factors)

    def scaled_bias(self, factor: float = 1.0) -> torch.Tensor | None:
        """factor·Σ wᵢ·sᵢ·biasᵢ over the adapters with a lora_B bias (linear in the adapters, so exact); None if none."""
        biases = [w * f.scale * f.bias for f, w in zip(self.factors, self.weights) if f.bias is not None]
        return factor * torch.stack(biases).sum(0) if biases else None


@dataclass(frozen=True)
class ModuleStats:
    """What a merge did to one module: output rank, retained energy E(R), relative Frobenius error √(1−E(R))."""

    rank: int
    retained_energy: float = 1.0
    relative_error: float = 0.0
    sigma_max: float | None = None
    sigma_next: float | None = None

    @property
    def truncated(self) -> bool:
        return self.retained_energy < 1.0


@dataclass(frozen=True)
class ModuleResult:
    """Output factors of one module with every scale folded in (ΔW = B·A + bias), and its stats."""

    A: torch.Tensor
    B: torch.Tensor
    stats: ModuleStats
    bias: torch.Tensor | None = None


MethodFn = Callable[[ModuleGroup, MergeParams], ModuleResult]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, what it computes, where it comes from, which parameters it takes."""

    name: str
    fn: MethodFn
    summary: str
    formula: str
    reference: str
    params: frozenset[str]
    aliases: tuple[str, ...] = ()


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def register_method(
    name: str, *, summary: str, formula: str, reference: str, params: Sequence[str] = (), aliases: Sequence[str] = ()
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` under `name` (and `aliases`); `params` lists the [`MergeParams`] fields it uses."""

    def decorator(fn: MethodFn) -> MethodFn:
        spec = MethodSpec(name, fn, summary, formula, reference, frozenset(params), tuple(aliases))
        _REGISTRY[name] = spec
        _ALIASES.update({alias: name for alias in aliases})
        return fn

    return decorator


def get_method(name: str) -> MethodSpec:
    """The method registered as `name` or as an alias of it.

    Raises:
        UnknownMethodError: with the list of known names.
    """
    spec = _REGISTRY.get(_ALIASES.get(name, name))
    if spec is None:
        known = ", ".join(sorted([*_REGISTRY, *_ALIASES]))
        raise UnknownMethodError(f"unknown method {name!r}; choose one of: {known} (see `lora-fusion methods`).")
    return spec


def list_methods() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
