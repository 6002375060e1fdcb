"""The library's layering (issue 13 §6), checked on the import graph that `ast` reads from the source files.

An edge is any import a module can execute: at module level or inside a function, relative imports resolved,
`from pkg import name` read as `pkg.name` when that is a module, and a name a package serves from its lazy `_LAZY`
table read as the submodule that defines it (the package itself is an edge too). Imports under `if TYPE_CHECKING:`
run only for type checkers and are left out. The CLI folder `cli/` is the package `lora_fusion_cli`.

Rules:
  * no import circles inside `lora_fusion` (each cycle is reported as its path);
  * `lora_fusion` never imports the CLI (`lora_fusion_cli`, `cli`) or the studies (`experiments`);
  * `lora_fusion.methods.*` never import the sources, the Hub, the formats, the writer, eval or the experiments
    themselves (the adapters they are handed can still be saved: `adapter` reaches the writer, by design);
  * the ICM core (F-VAE, meta-training, fusion) never reaches `lora_fusion.eval`, directly or through any module of
    the library;
  * the engine's internals are never imported by a module the engine itself imports;
  * the CLI sub-apps (`cil`, `icm`) import neither each other nor `main`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lora_fusion": ROOT / "lora_fusion", "lora_fusion_cli": ROOT / "cli"}
Graph = dict[str, set[str]]


# --------------------------------------------------------------------------------------------- the graph builder


def module_files(packages: Mapping[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` of each package (a package's `__init__.py` is the package)."""
    files = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of `tree` except those in the body of an `if TYPE_CHECKING:` (its `else` runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _runtime_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        yield from _runtime_imports(node)


def lazy_tables(sources: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Package -> its module-level `_LAZY = {name: submodule}` table, for packages that serve names lazily."""
    tables = {}
    for module, text in sources.items():
        for node in ast.parse(text).body:
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
                and isinstance(node.value, ast.Dict)
            ):
                pairs = zip(node.value.keys, node.value.values)
                tables[module] = {ast.literal_eval(key): ast.literal_eval(value) for key, value in pairs}
    return tables


def import_graph(sources: Mapping[str, str], packages: Iterable[str]) -> Graph:
    """Module -> the modules it imports, from each module's source text; `sources` maps dotted names to text.

    Every module named in `sources` is a node; its edges are the imported names that are modules of `sources` or
    start with one of `packages` (so that an import of an unknown submodule of a checked package still shows up).
    A package is a module whose name is a prefix of another's: `sources` should hold its `__init__` text.
    """
    packages = tuple(packages)
    lazy = lazy_tables(sources)
    is_package = {name.rpartition(".")[0] for name in sources}
    graph: Graph = {}
    for module, text in sources.items():
        here = module if module in is_package else module.rpartition(".")[0]
        edges: set[str] = set()
        for node in _runtime_imports(ast.parse(text)):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # `from ..x import y` in package a.b.c: a.b.x
                parts = here.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in sources:
                    edges.add(target)
                    continue
                edges.add(base)
                if alias.name in lazy.get(base, {}):
                    edges.add(f"{base}.{lazy[base][alias.name]}")
        graph[module] = {
            edge for edge in edges if edge != module and (edge in sources or edge.split(".")[0] in packages)
        }
    return graph


def repository_graph() -> Graph:
    files = module_files(PACKAGES)
    return import_graph({name: path.read_text(encoding="utf-8") for name, path in files.items()},
                        [*PACKAGES, "cli", "experiments"])


def cycles(graph: Graph, within: str) -> list[list[str]]:
    """Import circles among the modules under `within`, each as its path `[a, b, …, a]`: one per edge that leads a
    depth-first search back to a module on its current path, so the list is empty exactly when there is no circle."""
    nodes = sorted(under(graph, within))
    found, done = [], set()
    for start in nodes:
        if start in done:
            continue
        stack, on_path, path = [(start, iter(sorted(graph[start])))], {start}, [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(node)
                path.pop()
                done.add(node)
            elif child in on_path:
                found.append([*path[path.index(child):], child])
            elif child in graph and child not in done and _inside(child, within):
                stack.append((child, iter(sorted(graph[child]))))
                on_path.add(child)
                path.append(child)
    return found


def reachable(graph: Graph, start: str, within: str) -> dict[str, list[str]]:
    """Module -> one import path from `start` to it, following only modules under `within`."""
    paths, todo = {start: [start]}, [start]
    while todo:
        node = todo.pop()
        for child in sorted(graph.get(node, ())):
            if child not in paths:
                paths[child] = [*paths[node], child]
                if _inside(child, within):
                    todo.append(child)
    return paths


def offences(graph: Graph, importers: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    """`importer -> imported` for each direct import by one of `importers` of a module in or under `forbidden`."""
    banned = tuple(forbidden)
    return [
        f"{module} -> {edge}"
        for module in sorted(importers)
        for edge in sorted(graph.get(module, ()))
        if any(_inside(edge, package) for package in banned)
    ]


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def under(graph: Graph, package: str) -> list[str]:
    """The modules of `graph` in or under `package`."""
    return [name for name in graph if _inside(name, package)]


# --------------------------------------------------------------------------------------------- the rules
# Each rule returns its violations, one line each: the tests below assert that the repository has none, and that a
# graph with planted violations shows every one of them.

ICM_CORE = ("lora_fusion.icm.fvae", "lora_fusion.icm.meta", "lora_fusion.icm.fusion")
ENGINE = ("lora_fusion.engine", "lora_fusion.api")
SUBAPPS = ("lora_fusion_cli.cil", "lora_fusion_cli.icm")


def import_circles(graph: Graph) -> list[str]:
    return [" -> ".join(cycle) for cycle in cycles(graph, "lora_fusion")]


def library_imports_cli_or_experiments(graph: Graph) -> list[str]:
    return offences(graph, under(graph, "lora_fusion"), ["lora_fusion_cli", "cli", "experiments"])


def methods_doing_io(graph: Graph) -> list[str]:
    forbidden = ["lora_fusion.sources", "lora_fusion.hub", "lora_fusion.formats", "lora_fusion.writer",
                 "lora_fusion.eval", "experiments"]
    return offences(graph, under(graph, "lora_fusion.methods"), forbidden)


def icm_core_reaching_eval(graph: Graph) -> list[str]:
    return [
        " -> ".join(path)
        for core in ICM_CORE
        for name, path in sorted(reachable(graph, core, "lora_fusion").items())
        if _inside(name, "lora_fusion.eval")
    ]


def engine_imported_back(graph: Graph) -> list[str]:
    engine = [name for name in ENGINE if name in graph]
    below = {name for e in engine for name in reachable(graph, e, "lora_fusion")} - set(engine)
    return offences(graph, below, engine)


def subapps_importing_each_other_or_main(graph: Graph) -> list[str]:
    return offences(graph, SUBAPPS, ["lora_fusion_cli.main"]) + [
        f"{a} -> {b}" for a in SUBAPPS for b in SUBAPPS if b in graph.get(a, ())
    ]


RULES = [import_circles, library_imports_cli_or_experiments, methods_doing_io, icm_core_reaching_eval,
         engine_imported_back, subapps_importing_each_other_or_main]
GRAPH = repository_graph()


def test_the_graph_sees_the_whole_library() -> None:
    assert {"lora_fusion", "lora_fusion.engine", "lora_fusion.methods.base", "lora_fusion_cli.main"} <= set(GRAPH)
    assert "lora_fusion.linalg" in GRAPH["lora_fusion.methods.exact"]  # `from ..linalg import …`
    assert "lora_fusion.methods.exact" in GRAPH["lora_fusion.methods"]  # `from . import exact, …`
    assert "lora_fusion.icm.api" in GRAPH["lora_fusion.methods.icm"]  # an import inside a function
    assert "lora_fusion.sources" in GRAPH["lora_fusion.eval.testbed"]  # `from lora_fusion import load_adapter`


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_the_library_keeps_its_layers(rule) -> None:
    violations = rule(GRAPH)
    assert not violations, f"{rule.__name__}:\n" + "\n".join(violations)


# --------------------------------------------------------------------------------------------- the rules can fail


def synthetic(**modules: str) -> Graph:
    """A graph from module texts; `a__b` names module `a.b` (keyword arguments cannot hold dots)."""
    return import_graph({name.replace("__", "."): text for name, text in modules.items()},
                        ["lora_fusion", "lora_fusion_cli", "experiments"])


def test_the_builder_resolves_relative_lazy_and_function_level_imports_and_skips_type_checking() -> None:
    graph = synthetic(
        lora_fusion="from ._lazy import table\n_LAZY = {'load': 'sources'}\n",
        lora_fusion___lazy="",
        lora_fusion__sources="",
        lora_fusion__sub="",
        lora_fusion__sub__a=(
            "from typing import TYPE_CHECKING\nimport torch\nfrom .. import sources\nfrom ..sub import b\n"
            "import lora_fusion.c\n"
            "if TYPE_CHECKING:\n    from lora_fusion import d\nelse:\n    from lora_fusion import e\n"
            "def f():\n    from lora_fusion import load\n    from . import b as again\n"
        ),
        lora_fusion__sub__b="",
        lora_fusion__c="",
        lora_fusion__d="",
        lora_fusion__e="",
    )
    assert graph["lora_fusion.sub.a"] == {
        "lora_fusion.sources", "lora_fusion.sub.b", "lora_fusion.c", "lora_fusion.e", "lora_fusion"
    }
    assert graph["lora_fusion"] == {"lora_fusion._lazy"}


def test_every_rule_reports_a_planted_violation_with_its_path() -> None:
    graph = synthetic(
        lora_fusion="",
        lora_fusion__a="from . import b\n",
        lora_fusion__b="def f():\n    from .a import x\n",
        lora_fusion__writer="import experiments.study\nfrom lora_fusion_cli.main import app\n",
        lora_fusion__methods="",
        lora_fusion__methods__x="def f():\n    from ..writer import w\n",
        lora_fusion__icm="",
        lora_fusion__icm__fusion="from . import helper\n",
        lora_fusion__icm__helper="from ..eval import t\n",
        lora_fusion__eval="",
        lora_fusion__engine="from .spec import s\n",
        lora_fusion__spec="def f():\n    from . import engine\n",
        lora_fusion_cli="",
        lora_fusion_cli__main="",
        lora_fusion_cli__cil="from .icm import icm_app\n",
        lora_fusion_cli__icm="from .main import app\n",
    )
    assert {rule.__name__: rule(graph) for rule in RULES} == {
        "import_circles": ["lora_fusion.a -> lora_fusion.b -> lora_fusion.a",
                           "lora_fusion.engine -> lora_fusion.spec -> lora_fusion.engine"],
        "library_imports_cli_or_experiments": ["lora_fusion.writer -> experiments.study",
                                               "lora_fusion.writer -> lora_fusion_cli.main"],
        "methods_doing_io": ["lora_fusion.methods.x -> lora_fusion.writer"],
        "icm_core_reaching_eval": ["lora_fusion.icm.fusion -> lora_fusion.icm.helper -> lora_fusion.eval"],
        "engine_imported_back": ["lora_fusion.spec -> lora_fusion.engine"],
        "subapps_importing_each_other_or_main": ["lora_fusion_cli.icm -> lora_fusion_cli.main",
                                                 "lora_fusion_cli.cil -> lora_fusion_cli.icm"],
    }
    quiet = synthetic(lora_fusion="", lora_fusion__a="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from . import b\n", lora_fusion__b="from . import a\n")
    assert import_circles(quiet) == []  # an import for type checkers only closes no circle
