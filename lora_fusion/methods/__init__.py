"""Merge methods, one module per family, each method registered by name (see `lora-fusion methods`)."""

from . import exact, icm, interference, rapf, subspace  # noqa: F401  (importing a family registers its methods)
from .base import (
    MergeParams,
    MethodSpec,
    ModuleGroup,
    ModuleResult,
    ModuleStats,
    describe_params,
    get_method,
    list_methods,
    register_adapter_method,
    register_method,
)

__all__ = [
    "MergeParams",
    "MethodSpec",
    "ModuleGroup",
    "ModuleResult",
    "ModuleStats",
    "describe_params",
    "get_method",
    "list_methods",
    "register_adapter_method",
    "register_method",
]
