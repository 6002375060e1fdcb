"""The method interface and registry: a method is a pure function on one module's factors.

A method receives a [`ModuleGroup`] (the module's factors from every adapter that has it, with their weights) and its
own parameters (a [`MethodParams`] dataclass it declares), and returns a [`ModuleResult`] (output factors with the
scale folded in, and stats). It never reads or writes files. Methods register by name with [`register_method`],
with their parameter declaration and their cost, so a parameter a method would ignore is refused before anything is
downloaded and `--dry-run` can plan any method. Methods from outside the package register the same way, or through
the entry-point group `lora_fusion.methods`.

Nothing here imports torch at import time (`torch` is bound lazily): `--help` reads the declarations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import torch
from ..errors import InvalidParameterError, UnknownMethodError
from ..linalg import (
    EXACT_SVD_LIMIT, OVERSAMPLING, FactoredSVD, RankRule, choose_rank, relative_error, retained_energy, truncate,
)
from ..params import RESERVED_NAMES, MethodParams, Param, RankedParams, declared, defaults

if TYPE_CHECKING:
    import torch  # noqa: F811  (the real module for type checkers)

    from ..adapter import LoraAdapter, ModuleFactors


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
        """The largest rank the adapters were trained with (for a DoRA update, its B·A's rank)."""
        return max(f.nominal_rank for f in self.factors)

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
    """What a merge did to one module: output rank, retained energy E(R), relative Frobenius error √(1−E(R)).

    `exact_rank`: set where the module is its dense update at full rank (`rank` = min(out, in)) because its exact
    factored form had this larger rank (a LyCORIS LoHa/LoKr module read from a file); None otherwise.
    """

    rank: int
    retained_energy: float = 1.0
    relative_error: float = 0.0
    sigma_max: float | None = None
    sigma_next: float | None = None
    exact_rank: int | None = None

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
    svd: FactoredSVD,
    group: ModuleGroup,
    *,
    rule: RankRule,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> ModuleResult:
    """Truncate an SVD of the merged update to the rank `rule` gives (default: the largest input rank) and
    record E(R) and the relative error. A merge that is zero up to float32 rounding (e.g. ΔW₁ − ΔW₁) is written at
    rank 1 with zero factors and full energy (`scale` is the λ the update was scaled by: it scales that yardstick)."""
    S = svd.S
    if not S.numel() or float(S[0]) <= 1e-6 * group.magnitude(scale):
        zeros = ModuleStats(rank=1, sigma_max=0.0, sigma_next=0.0)
        m, n = svd.shape
        return ModuleResult(A=S.new_zeros(1, n, dtype=torch.float32), B=S.new_zeros(m, 1, dtype=torch.float32), stats=zeros, bias=bias)
    chosen = choose_rank(S, rule, default=group.max_rank, total=svd.total_energy)
    kept = retained_energy(S, chosen, svd.total_energy)
    B, A = truncate(svd, chosen)
    stats = ModuleStats(
        rank=chosen,
        retained_energy=kept,
        relative_error=relative_error(kept),
        sigma_max=float(S[0]),
        sigma_next=float(S[chosen]) if chosen < S.numel() else 0.0,
    )
    return ModuleResult(A=A, B=B, stats=stats, bias=bias)


@dataclass(frozen=True)
class ModuleShape:
    """What a plan knows of one module before any tensor is read: its shape (m×n), the input ranks, the rank the
    method gives without `rank`/`energy`, the output's bytes per entry, and whether base weights are read."""

    shape: tuple[int, int]
    ranks: tuple[int, ...]
    natural_rank: int
    item_bytes: int
    with_base: bool = False

    def output_rank(self, params: MethodParams, *, dense: bool) -> int:
        """The planned output rank: `rank`, or the largest possible with an adaptive rule (an upper bound), or the
        natural rank, under `max_rank`; at most min(m, n) when the method forms the dense update, Σ rᵢ when it
        stays factored."""
        ceiling = min(self.shape) if dense else sum(self.ranks)
        rule = params.rank_rule() if isinstance(params, RankedParams) else RankRule()
        chosen = min(ceiling, rule.rank or (ceiling if rule.adaptive else self.natural_rank))
        return chosen if rule.max_rank is None else min(chosen, rule.max_rank)


@dataclass(frozen=True)
class ModuleCost:
    """A method's estimate for one module: output rank, floating-point operations, and working memory in bytes."""

    output_rank: int
    flops: float
    working_bytes: int


def factored_cost(module: ModuleShape, params: MethodParams) -> ModuleCost:
    """Cost of a merge that stays factored: QRs of the stacked factors (k = Σ rᵢ), SVDs of k×k cores, the output."""
    (m, n), k, count = module.shape, sum(module.ranks), len(module.ranks)
    out = module.output_rank(params, dense=False)
    flops = 4.0 * (m + n) * k * k + 10.0 * k**3 * count + 2.0 * (m + n) * k * out
    working = 4 * (m + n) * k * 4 + 8 * k * k * (count + 2) + module.item_bytes * (m + n) * out
    return ModuleCost(out, flops, working)


def dense_svd_cost(module: ModuleShape, params: MethodParams, out_rank: int) -> tuple[float, int]:
    """FLOPs and bytes of taking a dense m×n update back to low rank (`linalg.dense_svd`): an exact SVD in float64
    (the copy, LAPACK's own copy, U and V, workspace) or a randomized one (the sketches). An energy target may grow
    the sketch up to the exact SVD, so it is planned as exact."""
    m, n = module.shape
    choice = getattr(params, "svd", "auto")
    adaptive = isinstance(params, RankedParams) and params.rank_rule().adaptive
    exact = choice == "exact" or adaptive or (
        choice == "auto" and min(m, n) <= EXACT_SVD_LIMIT
    )
    if exact:
        return 4.0 * m * n * min(m, n), 16 * m * n + 8 * (m + n) * min(m, n) + 32 * min(m, n) ** 2
    return 12.0 * m * n * (out_rank + OVERSAMPLING), 8 * (m + n) * (out_rank + OVERSAMPLING)


MethodFn = Callable[[ModuleGroup, Any], ModuleResult]
# Methods that need every adapter at once and data (ICM-Fusion) take the loaded adapters and return the merged one.
AdapterMethodFn = Callable[[Sequence["LoraAdapter"], Any], "LoraAdapter"]
CostFn = Callable[[ModuleShape, Any], ModuleCost]
MethodKind = Literal["module", "adapters"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, what it computes, where it comes from, its parameters and its cost.

    `kind` is `"module"` for a function on one module's factors (run by the per-module loop, streamed and sharded) or
    `"adapters"` for a function on every loaded adapter at once that returns the merged adapter (methods that learn
    from data, like ICM-Fusion: no plan before they run, float32 on the CPU, their own weights).
    """

    name: str
    fn: MethodFn | AdapterMethodFn
    summary: str
    formula: str
    reference: str
    params: type[MethodParams]
    aliases: tuple[str, ...] = ()
    spaces: tuple[str, ...] = ("full",)
    output_rank: Literal["sum", "max", "merged"] = "max"
    uses_base: bool = False
    kind: MethodKind = "module"
    cost: CostFn = factored_cost

    @property
    def declared(self) -> dict[str, Param]:
        """The parameters this method takes, by name."""
        return declared(self.params)

    def resolve(self, given: Mapping[str, object]) -> MethodParams:
        """The method's parameters: its defaults, overridden by what the user gave (None means not given).

        Raises:
            InvalidParameterError: a parameter the method does not take (listing the ones it takes), a value outside
                its domain, or a space the method has no form for.
        """
        takes = self.declared
        for name, value in given.items():
            if value is not None and name not in takes:
                listed = ", ".join(sorted(takes)) or "no parameters"
                raise InvalidParameterError(name, value, expected=f"none: {self.name} takes {listed}")
        params = self.params(**{name: value for name, value in given.items() if value is not None})
        space = getattr(params, "space", self.spaces[0])
        if space not in self.spaces:
            raise InvalidParameterError(
                "space", space, expected=f"{' or '.join(self.spaces)}: {self.name} has no {space} form"
            )
        return params

    def describe(self) -> dict[str, dict[str, object]]:
        """Each parameter the method takes: its default for this method and its help text (written once)."""
        return {
            name: {"default": value, "help": self.declared[name].help} for name, value in defaults(self.params).items()
        }


@dataclass(frozen=True)
class NoParams(MethodParams):
    """The parameters of a method that takes none."""


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}
_PARAMS: dict[str, tuple[Param, str]] = {}  # every declared parameter name -> (its declaration, the first method)
ENTRY_POINT_GROUP = "lora_fusion.methods"
_entry_points_loaded = False


def register_method(
    name: str,
    *,
    summary: str,
    formula: str,
    reference: str,
    params: type[MethodParams] = NoParams,
    aliases: Sequence[str] = (),
    spaces: Sequence[str] = ("full",),
    output_rank: Literal["sum", "max", "merged"] = "max",
    uses_base: bool = False,
    kind: MethodKind = "module",
    cost: CostFn = factored_cost,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as method `name` (and `aliases`); public, for methods defined anywhere.

    Args:
        name: the name used by `merge(method=…)`, recipes and `--method`.
        summary, formula, reference: one line each for `lora-fusion methods` (what it computes, its formula, the
            paper it follows).
        params: a frozen dataclass derived from [`MethodParams`] whose fields are declared with `Param.field`
            (defaults, checks, help): the method receives an instance of it.
        spaces: where it runs (the first is the default when it declares `space`): `"full"` on dense updates,
            `"core"` on core-space matrices.
        output_rank: its output rank without `rank`/`energy`: Σ rᵢ ("sum", exact methods), the largest input rank
            ("max"), or the merged update's own rank, at most Σ rᵢ ("merged").
        uses_base: it receives the base model's weight of each module in [`ModuleGroup.base`] when the user names a
            base model.
        kind: `"module"` (a function of a [`ModuleGroup`] and its parameters returning a [`ModuleResult`]) or
            `"adapters"` (a function of every loaded adapter and its parameters returning the merged adapter).
        cost: its estimate per module for `--dry-run` (default: a merge that stays factored, [`factored_cost`]).

    Raises:
        ValueError: the name is taken, a parameter name is already declared with another meaning, or it is a
            merge-wide option's name.

    Example:
        ```python
        >>> @register_method("halve", summary="Half the sum.", formula="ΔW = ½·Σ wᵢΔWᵢ", reference="-")
        ... def halve(group, params):
        ...     ...
        ```
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        for taken in (name, *aliases):
            if taken in _REGISTRY or taken in _ALIASES:
                raise ValueError(f"method name {taken!r} is already registered; pick another name.")
        for param_name, declaration in declared(params).items():
            if param_name in RESERVED_NAMES:
                raise ValueError(f"parameter {param_name!r} of {name}: {param_name!r} is a merge-wide option or a "
                                 "keyword of merge(); choose another name.")
            known, owner = _PARAMS.get(param_name, (declaration, name))
            if known is not declaration:
                raise ValueError(
                    f"parameter {param_name!r} of {name} is already declared by {owner} with another meaning; reuse "
                    f"that declaration or choose another name."
                )
        spec = MethodSpec(
            name, fn, summary, formula, reference, params, tuple(aliases), tuple(spaces), output_rank, uses_base,
            kind, cost,
        )
        _REGISTRY[name] = spec
        _ALIASES.update({alias: name for alias in aliases})
        for param_name, declaration in declared(params).items():
            _PARAMS.setdefault(param_name, (declaration, name))
        return fn

    return decorator


def load_entry_points() -> None:
    """Import the methods that installed packages declare in the entry-point group `lora_fusion.methods` (once).

    An entry point names a module (or an object in it) whose import registers methods with [`register_method`].
    A plugin that fails to import is skipped with a warning naming it, so one broken package cannot stop merges.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # a third-party import can fail in any way; say which one and go on
            warnings.warn(f"method plugin {entry.name} ({entry.value}) could not be loaded: {err}", stacklevel=2)


def get_method(name: str) -> MethodSpec:
    """The method registered as `name` or as an alias of it (installed plugins included).

    Raises:
        UnknownMethodError: with the list of known names.
    """
    spec = _REGISTRY.get(_ALIASES.get(name, name))
    if spec is None and not _entry_points_loaded:
        load_entry_points()
        spec = _REGISTRY.get(_ALIASES.get(name, name))
    if spec is None:
        known = ", ".join(sorted([*_REGISTRY, *_ALIASES]))
        raise UnknownMethodError(f"unknown method {name!r}; choose one of: {known} (see `lora-fusion methods`).")
    return spec


def list_methods() -> list[MethodSpec]:
    """Every registered method (installed plugins included), sorted by name."""
    load_entry_points()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def declared_params() -> dict[str, tuple[Param, tuple[str, ...]]]:
    """Every parameter name a registered method declares: its declaration and the methods that take it (sorted)."""
    takers: dict[str, list[str]] = {}
    for spec in _REGISTRY.values():
        for param_name in spec.declared:
            takers.setdefault(param_name, []).append(spec.name)
    return {name: (_PARAMS[name][0], tuple(sorted(takers[name]))) for name in sorted(takers)}
