"""Every module of the library and the CLI imports: a cleanup that drops a name another module still imports
(merge_quality once lost TESTBED_TASKS this way) fails here, not in a user's run."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import lora_fusion
import lora_fusion_cli

MODULES = [
    info.name
    for package in (lora_fusion, lora_fusion_cli)
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    if not info.name.endswith("__main__")  # runs the app on import, by design
]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)
