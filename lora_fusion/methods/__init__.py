"""Merge methods, one module per family, each method registered by name (see `lora-fusion methods`)."""

from . import exact, icm, interference, lorahub, rapf, subspace  # noqa: F401  (importing a family registers its methods)
from .base import (
    MethodSpec,
    ModuleCost,
    ModuleGroup,
    ModuleResult,
    ModuleShape,
    ModuleStats,
    NoParams,
    dense_svd_cost,
    declared_params,
    factored_cost,
    get_method,
    list_methods,
    lowrank_result,
    register_method,
)

__all__ = [
    "MethodSpec",
    "ModuleCost",
    "ModuleGroup",
    "ModuleResult",
    "ModuleShape",
    "ModuleStats",
    "NoParams",
    "declared_params",
    "dense_svd_cost",
    "factored_cost",
    "get_method",
    "list_methods",
    "lowrank_result",
    "register_method",
]
