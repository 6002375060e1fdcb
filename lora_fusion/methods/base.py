"""The method interface and registry: a method is a pure function on one module's factors.

A method receives a [`ModuleGroup`] (the module's factors from every adapter that has it, with their weights) and
[`MergeParams`], and returns a [`ModuleResult`] (output factors with the scale folded in, and stats). It never reads
or writes files. Methods register themselves by name with [`register_method`], declaring which parameters they take,
so the engine can refuse a parameter a method would ignore before anything is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from ..adapter import LoraAdapter, ModuleFactors
from ..linalg import EXACT_SVD_LIMIT, FactoredSVD, SvdChoice, choose_rank, relative_error, retained_energy, truncate
from ..errors import InvalidParameterError, UnknownMethodError


@dataclass(frozen=True)
class MergeParams:
    """Parameters shared by the methods; each method declares the ones it uses."""

    rank: int | None = field(default=None, metadata={"help": "Output rank (default: the largest input rank; exact sums keep Σ rᵢ, subspace methods their merged rank)."})
    energy: float | None = field(
        default=None, metadata={"help": "Smallest rank per module keeping this fraction of Σσ², e.g. 0.99."}
    )
    scale: float = field(default=1.0, metadata={"help": "Global factor λ on the merged update."})
    density: float | None = field(
        default=None, metadata={"help": "Fraction of entries kept (TIES/magnitude trim, DARE keep probability)."}
    )
    majority: str = field(default="total", metadata={"help": "TIES sign election: 'total' (mass) or 'frequency'."})
    gamma: float = field(default=0.01, metadata={"help": "Breadcrumbs: fraction of the largest entries removed."})
    seed: int = field(default=0, metadata={"help": "Seed of the random draws: DARE masks, randomized SVD, ICM-Fusion."})
    space: str = field(default="full", metadata={"help": "'full' (dense update per module) or 'core' (k×k cores)."})
    svd: SvdChoice = field(
        default="auto",
        metadata={"help": f"SVD of a dense merged update: 'auto' (exact up to {EXACT_SVD_LIMIT} rows or columns, else "
                          "randomized), 'exact' or 'randomized'."},
    )
    common_fraction: float = field(default=0.8, metadata={"help": "Iso-CTS: share of the rank given to the common subspace."})
    bias: float | None = field(
        default=None, metadata={"help": "RAPF: offset b of the fusion mask M = min(1, D/max D + b), in [0, 1]."}
    )
    chained: bool = field(
        default=False,
        metadata={"help": "RAPF: each adapter was trained on top of the previous fused weights (not from the base)."},
    )
    fvae: str | None = field(default=None, metadata={"help": "ICM-Fusion: F-VAE directory from `lora-fusion icm train`."})
    support: str | None = field(
        default=None, metadata={"help": "ICM-Fusion: JSONL support file of labelled examples of each source's task."}
    )

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise InvalidParameterError("rank", self.rank, expected="a positive integer, e.g. 16")
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0.0 < self.energy <= 1.0):
            raise InvalidParameterError("energy", self.energy, expected="a fraction in (0, 1], e.g. 0.99")
        if self.rank is not None and self.energy is not None:
            raise InvalidParameterError("rank", self.rank, expected="either a rank or an energy, not both")
        if not math.isfinite(self.scale):
            raise InvalidParameterError("scale", self.scale, expected="a finite number, e.g. 0.5")
        if self.density is not None and not (_real(self.density) and 0.0 < self.density <= 1.0):
            raise InvalidParameterError("density", self.density, expected="a fraction in (0, 1], e.g. 0.2")
        if self.majority not in ("total", "frequency"):
            raise InvalidParameterError("majority", self.majority, expected="'total' or 'frequency'")
        if not (_real(self.gamma) and 0.0 <= self.gamma < 1.0):
            raise InvalidParameterError("gamma", self.gamma, expected="a fraction in [0, 1), e.g. 0.01")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidParameterError("seed", self.seed, expected="a non-negative integer, e.g. 0")
        if not (_real(self.common_fraction) and 0.0 < self.common_fraction <= 1.0):
            raise InvalidParameterError("common_fraction", self.common_fraction, expected="a fraction in (0, 1], e.g. 0.8")
        if self.space not in ("full", "core"):
            raise InvalidParameterError("space", self.space, expected="'full' or 'core'")
        if self.svd not in ("auto", "exact", "randomized"):
            raise InvalidParameterError("svd", self.svd, expected="'auto', 'exact' or 'randomized'")
        if self.svd != "auto" and self.space == "core":
            # a core-space merge forms no dense update: its k×k SVD is always exact
            raise InvalidParameterError("svd", self.svd, expected="'auto' with space 'core', or space 'full'")
        if self.bias is not None and not (_real(self.bias) and 0.0 <= self.bias <= 1.0):
            raise InvalidParameterError("bias", self.bias, expected="a number in [0, 1], e.g. 0.6")
        if not isinstance(self.chained, bool):
            raise InvalidParameterError("chained", self.chained, expected="true or false")
        for name in ("fvae", "support"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidParameterError(name, getattr(self, name), expected="a path")



def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModuleGroup:
    """One module's factors from each adapter that has it, in float32, with the user weight of each.

    `base` is the base model's weight W₀ of the module (float32, m×n like ΔW), given only to methods registered with
    `uses_base=True` when the user names a base model; None otherwise.
    """

    name: str
    factors: Sequence[ModuleFactors]
    weights: Sequence[float]
    base: torch.Tensor | None = None

    @property
    def max_rank(self) -> int:
        return max(f.rank for f in self.factors)

    def magnitude(self, factor: float = 1.0) -> float:
        """Σ |c·wᵢ·sᵢ|·‖Bᵢ‖·‖Aᵢ‖, an upper bound of ‖c·Σ wᵢΔWᵢ‖_F: the yardstick for "zero up to rounding"."""
        return sum(
            abs(factor * w * f.scale) * float(f.B.float().norm() * f.A.float().norm())
            for f, w in zip(self.factors, self.weights)
        )

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


def lowrank_result(
    svd: FactoredSVD, group: ModuleGroup, params: MergeParams, *, bias: torch.Tensor | None = None
) -> ModuleResult:
    """Truncate an SVD of the merged update to the requested rank (`rank`, `energy`, or the largest input rank) and
    record E(R) and the relative error. A merge that is zero up to float32 rounding (e.g. ΔW₁ − ΔW₁) is written at
    rank 1 with zero factors and full energy."""
    S = svd.S
    if not S.numel() or float(S[0]) <= 1e-6 * group.magnitude(params.scale):
        zeros = ModuleStats(rank=1, sigma_max=0.0, sigma_next=0.0)
        m, n = svd.shape
        return ModuleResult(A=S.new_zeros(1, n, dtype=torch.float32), B=S.new_zeros(m, 1, dtype=torch.float32), stats=zeros, bias=bias)
    rank = choose_rank(S, rank=params.rank, energy=params.energy, default=group.max_rank, total=svd.total_energy)
    energy = retained_energy(S, rank, svd.total_energy)
    B, A = truncate(svd, rank)
    stats = ModuleStats(
        rank=rank,
        retained_energy=energy,
        relative_error=relative_error(energy),
        sigma_max=float(S[0]),
        sigma_next=float(S[rank]) if rank < S.numel() else 0.0,
    )
    return ModuleResult(A=A, B=B, stats=stats, bias=bias)


MethodFn = Callable[[ModuleGroup, MergeParams], ModuleResult]
# Methods that need every adapter at once and data (ICM-Fusion) take the loaded adapters and return the merged one.
AdapterMethodFn = Callable[[Sequence[LoraAdapter], MergeParams], LoraAdapter]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, what it computes, where it comes from, which parameters it takes."""

    name: str
    fn: MethodFn | AdapterMethodFn
    summary: str
    formula: str
    reference: str
    params: frozenset[str]
    aliases: tuple[str, ...] = ()
    defaults: Mapping[str, object] = field(default_factory=dict)
    spaces: tuple[str, ...] = ("full",)
    output_rank: Literal["sum", "max", "merged"] = "max"
    uses_base: bool = False
    whole_adapters: bool = False
    required: tuple[str, ...] = ()

    def resolve(self, given: Mapping[str, object]) -> MergeParams:
        """The method's parameters: its defaults, overridden by what the user gave (only parameters it takes).

        Raises:
            InvalidParameterError: a parameter the method does not take, or a space it has no form for.
        """
        for name, value in given.items():
            if value is not None and name not in self.params:
                takes = ", ".join(sorted(self.params)) or "no parameters"
                raise InvalidParameterError(name, value, expected=f"none: {self.name} takes {takes}")
        values = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        params = MergeParams(**values)
        if params.space not in self.spaces:
            raise InvalidParameterError(
                "space", params.space, expected=f"{' or '.join(self.spaces)}: {self.name} has no {params.space} form"
            )
        return params

    def recorded(self, params: MergeParams) -> dict[str, object]:
        """The parameters this method used, with their resolved values, for the model card and metadata."""
        return {name: getattr(params, name) for name in sorted(self.params)}


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def register_method(
    name: str,
    *,
    summary: str,
    formula: str,
    reference: str,
    params: Sequence[str] = (),
    aliases: Sequence[str] = (),
    defaults: Mapping[str, object] | None = None,
    spaces: Sequence[str] = ("full",),
    output_rank: Literal["sum", "max", "merged"] = "max",
    uses_base: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` under `name` (and `aliases`).

    `params` lists the [`MergeParams`] fields it uses, `defaults` its own default values for them, and `spaces`
    where it can run (the first is the default): `"full"` on dense updates, `"core"` on core-space matrices.
    `output_rank` says what its output rank is without `rank`/`energy`: Σ rᵢ ("sum", exact methods), the largest
    input rank ("max"), or the merged update's own rank, at most Σ rᵢ ("merged"). `uses_base` methods receive the
    base model's weight of each module in [`ModuleGroup.base`] when the user names a base model.
    """

    def decorator(fn: MethodFn) -> MethodFn:
        spec = MethodSpec(
            name, fn, summary, formula, reference, frozenset(params), tuple(aliases),
            {"space": spaces[0], **(defaults or {})}, tuple(spaces), output_rank, uses_base,
        )
        _REGISTRY[name] = spec
        _ALIASES.update({alias: name for alias in aliases})
        return fn

    return decorator


def register_adapter_method(
    name: str, *, summary: str, formula: str, reference: str, params: Sequence[str] = (), required: Sequence[str] = ()
) -> Callable[[AdapterMethodFn], AdapterMethodFn]:
    """Register `fn` under `name` as a method on whole adapters: it receives every loaded adapter and the
    [`MergeParams`] and returns the merged [`LoraAdapter`] (for methods that learn from data, like ICM-Fusion).
    `required` names the parameters it cannot run without, checked before anything is downloaded."""

    def decorator(fn: AdapterMethodFn) -> AdapterMethodFn:
        _REGISTRY[name] = MethodSpec(
            name, fn, summary, formula, reference, frozenset(params), output_rank="merged", whole_adapters=True,
            required=tuple(required),
        )
        return fn

    return decorator


def describe_params(spec: MethodSpec) -> dict[str, dict[str, object]]:
    """Each parameter the method takes: its default for this method and its help text (written once, on the field)."""
    return {
        f.name: {"default": spec.defaults.get(f.name, f.default), "help": f.metadata["help"]}
        for f in fields(MergeParams)
        if f.name in spec.params
    }


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
