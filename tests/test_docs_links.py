"""Every pointer the documentation gives resolves inside the repository (a fresh clone, nothing outside it).

Checked in README.md, benchmarks/README.md and docs/**/*.md:

* relative Markdown links `[text](path)` and images `![alt](path)` (anchors `#...` stripped, http(s) ignored);
* repository paths, in code spans or plain text, that start with a top-level folder of the repository
  (`lora_fusion/…`, `docs/…`, `recipes/…`, …) or with a folder next to the document (`results/…`); a glob such
  as `recipes/rapf_*.yaml` must match at least one file, and `tests/x.py::test_name` must define `test_name`;
* every `*.md` file name, with or without a folder (`METHODS.md` alone counts: it must exist next to the
  document or at the repository root);
* bare `*.py` names (`bench_vs_peft.py`), which must name some file of the repository.

And `lora-fusion methods` (the registry's summaries, formulas, references and parameter help) cites no `*.md`
file that the repository lacks.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Top-level folders a clean clone has; build outputs and virtualenvs (.gitignore) are no pointers' targets.
TOP_LEVEL = ("lora_fusion", "cli", "docs", "benchmarks", "recipes", "tests", "experiments", ".ci")
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "out", "runs", "build", "dist"}

LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL = re.compile(r"(?:https?|ftp|file)://\S+")
# A path-like token: letters, digits, _ . - / *, placeholder marks (kept so that they can be recognised and skipped)
# and a pytest id tail (::name[param]).
TOKEN = re.compile(r"(?<![\w./*<>{}$~…-])((?:\.{0,2}/)?[\w*.<>{}$~…-]+(?:/[\w*.<>{}$~…-]*)*(?:::[\w\[\]-]+)?)")
PLACEHOLDER = re.compile(r"[<>{}$~…]|XX|\.\.\.")


def documents() -> list[Path]:
    found = [REPO / "README.md", REPO / "benchmarks" / "README.md"]
    found += sorted((REPO / "docs").rglob("*.md"))
    return [p for p in found if p.is_file()]


@lru_cache(maxsize=1)
def repo_file_names() -> frozenset[str]:
    names: set[str] = set()
    for _, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        names.update(files)
    return frozenset(names)


def _exists(base: Path, target: str) -> bool:
    if any(ch in target for ch in "*?["):
        return any(base.glob(target))
    return (base / target).exists()


def _test_is_defined(file: Path, test_id: str) -> bool:
    name = test_id.split("[", 1)[0]
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\b|^class\s+{re.escape(name)}\b",
                     file.read_text(encoding="utf-8"), re.MULTILINE) is not None


def broken_pointers(doc: Path, text: str | None = None) -> list[str]:
    """The pointers of one document that do not resolve, as 'line N: pointer (why)'."""
    text = doc.read_text(encoding="utf-8") if text is None else text
    here = doc.parent
    local_dirs = {p.name for p in here.iterdir() if p.is_dir()} if here != REPO else set()
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        # 1. Markdown links and images.
        for match in LINK.finditer(line):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # http(s), mailto, … and same-page anchors
            path = target.split("#", 1)[0]
            if not (here / path).exists():
                problems.append(f"line {number}: link ({target}) does not exist")
        # 2. Path-like tokens anywhere else on the line.
        rest = URL.sub(" ", LINK.sub(" ", line))
        for match in TOKEN.finditer(rest):
            token = match.group(1).rstrip(".,;:")
            path, _, test_id = token.partition("::")
            path = path.rstrip(".,;:")
            if not path or PLACEHOLDER.search(path):
                continue
            first = path.removeprefix("./").split("/", 1)[0]
            has_folder = "/" in path.removeprefix("./")
            if has_folder and first in TOP_LEVEL:
                base = REPO
            elif has_folder and first in local_dirs:
                base = here
            elif path.endswith(".md"):
                if not has_folder:
                    base = here if (here / path).exists() else REPO
                else:
                    continue  # a path outside the repository's folders (an upstream repo's, a user's)
            elif not has_folder and path.endswith(".py") and not path.startswith("."):
                if path not in repo_file_names():
                    problems.append(f"line {number}: {path} is no file of the repository")
                continue
            else:
                continue
            if not _exists(base, path.removeprefix("./")):
                where = "the repository root" if base == REPO else f"{base.relative_to(REPO)}/"
                problems.append(f"line {number}: {path} does not exist (relative to {where})")
            elif test_id and path.endswith(".py") and (base / path).is_file():
                if not _test_is_defined(base / path, test_id):
                    problems.append(f"line {number}: {token}: {path} defines no {test_id.split('[', 1)[0]}")
    return problems


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_pointer_in_the_docs_resolves(doc: Path) -> None:
    problems = broken_pointers(doc)
    assert not problems, f"{doc.relative_to(REPO)} cites what the repository does not hold:\n" + "\n".join(problems)


def test_the_checker_catches_broken_pointers() -> None:
    doc = REPO / "docs" / "rapf.md"
    good = "See [the methods](methods.md#exact), `lora_fusion/cil/recipe.py`, results/rapf_bench_cache.json.\n"
    assert broken_pointers(doc, good) == []
    for bad in ("See [the methods](method.md).", "See ![plot](results/nope.png).", "METHODS.md §d says so.",
                "`lora_fusion/cil/recipes.py`", "docs/missing.md", "`recipes/rapf_*.yml`", "`bench_nope.py`",
                "`tests/test_docs_links.py::test_nothing_here`", "(results/absent.json)"):
        assert broken_pointers(doc, bad), bad
    # Not pointers into this repository: URLs, user paths, an upstream repository's files, placeholders.
    for fine in ("https://github.com/linlany/RAPF/blob/main/README.md", "`~/.cache/lora-fusion/cil`",
                 "`class_orders/cifar100_order.yaml`", "`task_XX/adapter.safetensors`",
                 "`python benchmarks/bench_<name>.py`", "`adapter_config.json`"):
        assert broken_pointers(doc, fine) == [], fine


def test_lora_fusion_methods_cites_no_missing_file() -> None:
    from typer.testing import CliRunner

    from lora_fusion_cli.main import app

    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    missing = []
    for row in rows:
        strings = [row["summary"], row["formula"], row["reference"]]
        strings += [str(param.get("help", "")) for param in row["params"].values()]
        for text in strings:
            for name in re.findall(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.(?:md|py|yaml|json|txt))\b", text):
                if not (REPO / name).exists() and not name.startswith("arXiv"):
                    missing.append(f"{row['name']}: {name!r} in {text!r}")
    assert not missing, "`lora-fusion methods` cites files the repository lacks:\n" + "\n".join(missing)
