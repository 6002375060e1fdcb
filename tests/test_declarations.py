"""One place per parameter (issue 13 §1–§3): the `merge()` keyword check, the recipe keys, the CLI options, the methods
listing and the `--dry-run` plan all come from the methods' declarations and `MERGE_OPTIONS`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest

from lora_fusion import merge
from lora_fusion.engine import CPU_WORKERS
from lora_fusion.errors import InvalidParameterError
from lora_fusion.methods import ModuleCost, declared_params, get_method, list_methods, register_method
from lora_fusion.params import MERGE_OPTIONS, MethodParams, Param
from lora_fusion.recipe import Recipe
from tests.test_cli import invoke
from tests.test_reliability import lora

CLI_ONLY = {"param", "dry_run", "recipe", "subfolder", "weight_name", "input_format", "module_weight", "rank_pattern", "report", "json",
            "quiet", "help"}


@pytest.fixture
def scratch_registry(monkeypatch):
    import lora_fusion.methods.base as base

    for name in ("_REGISTRY", "_ALIASES", "_PARAMS"):
        monkeypatch.setattr(base, name, dict(getattr(base, name)))
    return base


def test_a_misspelled_or_foreign_keyword_lists_the_methods_parameters(tmp_path) -> None:
    sources = [lora(tmp_path / "a"), lora(tmp_path / "b", seed=1)]
    with pytest.raises(InvalidParameterError, match=r"rnak 3: expected none: svd takes energy, max_rank, rank, scale, sv_cumulative"):
        merge(sources, method="svd", rnak=3)
    with pytest.raises(InvalidParameterError, match="linear takes no parameters"):
        merge(sources, method="linear", density=0.5)


def test_every_merge_option_of_the_cli_comes_from_a_declaration() -> None:
    text = invoke("merge", "--help").stdout
    options = {name.replace("-", "_") for name in re.findall(r"--([a-z][a-z-]*)", text.split("Options:", 1)[1])}
    assert options - CLI_ONLY == set(MERGE_OPTIONS) | set(declared_params())


def test_the_recipe_keys_are_the_merge_options_and_the_declared_parameters(tmp_path) -> None:
    assert set(Recipe.model_fields) == {"sources", *MERGE_OPTIONS}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\ndensity: 0.3\nrnak: 2\nsources: [{lora(tmp_path / 'a')}]\n")
    result = invoke("merge", "--recipe", recipe, "--dry-run")
    assert result.exit_code == 2 and "unknown key 'rnak'; ties takes density, energy, majority, max_rank, rank" in result.stderr


def test_the_methods_listing_is_the_declarations() -> None:
    rows = json.loads(invoke("methods", "--json").stdout)
    assert [row["name"] for row in rows] == [spec.name for spec in list_methods()]
    for row in rows:
        assert row["params"] == json.loads(json.dumps(get_method(row["name"]).describe()))


def test_the_dry_run_plan_uses_the_methods_own_cost(scratch_registry, tmp_path) -> None:
    def cost(module, params):
        return ModuleCost(output_rank=3, flops=1000.0 * params.rounds, working_bytes=7)

    @dataclass(frozen=True)
    class Rounds(MethodParams):
        rounds: int = Param("How many rounds.", "a positive integer", lambda v: isinstance(v, int) and v > 0).field(2)

    register_method("costly", summary="s", formula="f", reference="r", params=Rounds, cost=cost)(lambda g, p: None)
    source = lora(tmp_path / "a")
    plan = merge([source], method="costly", rounds=5, dry_run=True)
    assert len(plan.modules) == 4 and plan.flops == 4 * 5000.0 and {m.output_rank for m in plan.modules} == {3}
    assert plan.params == {"rounds": 5} and plan.peak_bytes == CPU_WORKERS * 7 + plan.output_bytes


def test_a_declared_name_cannot_shadow_a_merge_option(scratch_registry) -> None:
    @dataclass(frozen=True)
    class Shadow(MethodParams):
        device: str = Param("where", "text", lambda v: True).field("x")

    with pytest.raises(ValueError, match="'device' is a merge-wide option"):
        register_method("shadow", summary="s", formula="f", reference="r", params=Shadow)(lambda g, p: None)


def test_a_plugin_that_fails_to_import_is_skipped_with_a_warning(scratch_registry, monkeypatch) -> None:
    class Broken:
        name, value = "broken", "no_such_module_for_lora_fusion"

        def load(self):
            raise ImportError("No module named 'no_such_module_for_lora_fusion'")

    monkeypatch.setattr(scratch_registry, "_entry_points_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [Broken()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [spec.name for spec in list_methods()]
    assert "svd" in names and any("method plugin broken" in str(w.message) for w in caught)


def test_reading_the_declarations_imports_no_torch() -> None:
    code = ("import sys, lora_fusion.methods, lora_fusion.recipe; from lora_fusion.methods import declared_params; "
            "declared_params(); assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
