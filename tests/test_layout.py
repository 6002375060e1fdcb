"""The README's layout tree matches the repository (issue 13 §9): every path it lists exists, and every module of the
library, the CLI and the studies is listed (a package's `__init__.py` is listed through its folder)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_paths() -> list[str]:
    """The paths of the README's `## Layout` tree, nesting read from the two-space indentation."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## Layout\n+```text\n(.*?)^```", readme, re.S | re.M)
    assert block, "README.md has no ```text block under ## Layout"
    paths, parents = [], []
    for line in block[1].splitlines():
        indent = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        parents = parents[:indent]
        paths.append("".join(parents) + name)
        if name.endswith("/"):
            parents.append(name)
    return paths


def test_every_listed_path_exists() -> None:
    missing = [path for path in layout_paths() if not (ROOT / path).exists()]
    assert not missing, f"README layout lists paths that do not exist: {missing}"


def test_every_module_is_listed() -> None:
    listed = set(layout_paths())
    modules = sorted(
        path.relative_to(ROOT).as_posix()
        for folder in ("lora_fusion", "cli", "experiments")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "__init__.py" or path.parent == ROOT / "lora_fusion"
    )
    unlisted = [module for module in modules if module not in listed]
    assert not unlisted, f"README layout does not list: {unlisted}"


def test_the_parser_reads_nesting() -> None:
    paths = layout_paths()
    assert "lora_fusion/methods/base.py" in paths and "cli/main.py" in paths and "tests/" in paths
