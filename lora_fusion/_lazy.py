"""Package attributes imported on first use, so that importing a package (and `lora-fusion --help`) loads no torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports `package.<table[name]>` when `name` is first used."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{table[name]}"), name)

    return __getattr__


class LazyModule:
    """A stand-in for a module that imports it on first attribute access.

    The method registry (names, parameter declarations, costs) is read by `lora-fusion --help`, recipes and
    `lora-fusion methods`, none of which compute anything: the modules that declare methods bind `torch` to this
    stand-in so that reading their declarations never loads torch (about 1 s). After the first access the module's
    namespace is copied in, so later lookups are plain attribute reads.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self._name)
        self.__dict__.update(vars(module))
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch: Any = LazyModule("torch")
