"""Every module of the library, the CLI and the experiments imports: a cleanup that drops a name another module still
imports (merge_quality once lost TESTBED_TASKS this way) fails here, not in a user's run. The library and the CLI never
import the experiments, and every study parses its shared options the same way (`experiments/_args.py`)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import experiments
import lora_fusion
import lora_fusion_cli
from experiments._args import parse_study_args, study_parser

REPO = Path(__file__).resolve().parents[1]
MODULES = [
    info.name
    for package in (lora_fusion, lora_fusion_cli, experiments)
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    if not info.name.endswith("__main__")  # runs the app on import, by design
]
STUDIES = sorted(
    info.name
    for info in pkgutil.iter_modules(experiments.__path__, "experiments.")
    if not info.name.startswith("experiments._")  # helpers, not studies
)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_each_study_of_the_issue_is_a_module_of_experiments() -> None:
    assert set(STUDIES) >= {
        "experiments.merge_quality",
        "experiments.quickstart_eval",
        "experiments.train_quickstart",
        "experiments.rapf_evidence",
        "experiments.icm_evidence",
    }


def _imports_of_experiments(path: Path) -> list[str]:
    """`import experiments…`, `from experiments… import` and "experiments.x" strings (importlib) in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if re.fullmatch(r"experiments(\.\w+)*", node.value) else []
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                  if name == "experiments" or name.startswith("experiments.")]
    return found


def test_the_library_and_the_cli_never_import_the_experiments() -> None:
    sources = sorted((REPO / "lora_fusion").rglob("*.py")) + sorted((REPO / "cli").rglob("*.py"))
    assert len(sources) > 20
    offending = [hit for path in sources for hit in _imports_of_experiments(path)]
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_runs_from_the_repository_root_and_explains_itself(name: str, capsys) -> None:
    module = importlib.import_module(name)
    assert f"python -m {name}" in module.__doc__  # its usage line names the command that runs it
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    assert help_text.startswith(f"usage:python-m{name}")
    assert "".join(module.__doc__.strip().splitlines()[0].split()) in help_text  # the description


def test_shared_options_are_declared_and_parsed_the_same_way(capsys) -> None:
    import torch

    parser = study_parser(
        "A study.\n\nMore.", seeds=[0, 1, 2], out=Path("docs/results"), data_dirs=("wordnet", "fortunes"),
        threads=1, device=True,
    )
    parser.add_argument("--steps", type=int, default=5)
    threads = torch.get_num_threads()
    try:
        args = parse_study_args(parser, [])
        assert torch.get_num_threads() == 1
        assert (args.seeds, args.out, args.threads, args.device, args.steps) == ([0, 1, 2], Path("docs/results"), 1,
                                                                                None, 5)
        assert args.data_dirs.of("wordnet") == Path("/usr/share/wordnet")
        assert args.data_dirs.of("fortunes") == Path("/usr/share/games/fortunes")
        args = parse_study_args(parser, ["--seeds", "3", "4", "--wordnet-dir", "tests/data/wordnet-sample",
                                         "--out", "x", "--device", "cpu", "--threads", "2"])
        assert (args.seeds, args.out, args.device, torch.get_num_threads()) == ([3, 4], Path("x"), "cpu", 2)
        assert args.data_dirs.of("wordnet") == Path("tests/data/wordnet-sample")
        assert args.data_dirs.of("fortunes") == Path("/usr/share/games/fortunes")
        assert "_data_sources" not in vars(args)
    finally:
        torch.set_num_threads(threads)
    one = parse_study_args(study_parser("One seed.", seed=7), [])
    assert one.seed == 7 and not hasattr(one, "seeds") and not hasattr(one, "out")
    for wrong, message in ((["--seeds", "1", "1"], "distinct"), (["--seeds", "-1"], "non-negative"),
                           (["--threads", "0"], "at least 1"), (["--device", "gpu"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_info:
            parse_study_args(parser, wrong)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="either --seeds or --seed"):
        study_parser("Both.", seeds=[0], seed=0)
    with pytest.raises(ValueError, match="unknown data sources"):
        study_parser("Unknown.", data_dirs=("imagenet",))
