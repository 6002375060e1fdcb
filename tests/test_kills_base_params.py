"""Fast tests that kill mutants which survived `make mutation` in lora_fusion/methods/base.py and lora_fusion/params.py.

Each test checks what a caller sees: a `--dry-run` plan's output ranks, FLOPs and bytes (hand-computed below for tiny
modules from the cost model the docstrings describe), a merged adapter, an error, or the value of a public helper that
plugin authors use (`factored_cost`, `dense_svd_cost`, `in_range`, `one_of`, `Param.field`, `value_type`). The
survivor list with a reason for each one not killed here is in docs/testing.md.

mutmut imports the package once before forking, so code that runs only at import time (the module-level `Param(...)`
declarations, the built-in `@register_method` decorators) never reaches a selected mutant: the helpers are called here
at run time, as a plugin would call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_fusion import merge
from lora_fusion.errors import InvalidParameterError
from lora_fusion.methods import ModuleShape, declared_params, dense_svd_cost, factored_cost, get_method, register_method
from lora_fusion.methods.base import NoParams
from lora_fusion.params import MethodParams, Param, defaults, in_range, one_of, value_type
from tests.test_declarations import scratch_registry  # noqa: F401  (fixture)
from tests.test_properties import write_lora

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> list[Path]:
    """Two rank-4 adapters of one 16×12 module (m = 16, n = 12, m + n = 28, k = Σrᵢ = 8, T = 2)."""
    root = tmp_path_factory.mktemp("pair")
    return [write_lora(root / name, {Q: (16, 12)}, r=4, alpha=8, seed=seed) for seed, name in enumerate("ab")]


def planned(sources: list[Path], method: str, **params: object) -> tuple[int, float, int]:
    """(output rank, FLOPs, working bytes) of the one module of a dry run."""
    (module,) = merge(sources, method=method, dry_run=True, **params).modules
    return module.output_rank, module.flops, module.working_bytes


# ============================================================================ ModuleShape.output_rank, factored_cost
# The factored cost model (factored_cost's docstring): QR of the stacked (m+n)×k factors 4(m+n)k², an SVD of each k×k
# core 10k³ per adapter, the output 2(m+n)k·R FLOPs; bytes: float32 stacked factors 4·4(m+n)k, T+2 float64 k×k
# cores 8k²(T+2), and the output item·(m+n)·R.
# For the pair: 4·28·64 = 7168, 10·512·2 = 10240, 2·28·8·R = 448R FLOPs; 3584 + 2048 + 4·28·R = 5632 + 112R bytes.


def test_the_svd_plan_of_two_adapters_without_rank_keeps_the_largest_input_rank(pair) -> None:
    assert planned(pair, "svd") == (4, 7168 + 10240 + 448 * 4, 5632 + 112 * 4)  # 19200 FLOP, 6080 B


def test_the_svd_plan_with_rank_3_costs_a_rank_3_output(pair) -> None:
    assert planned(pair, "svd", rank=3) == (3, 7168 + 10240 + 448 * 3, 5632 + 112 * 3)


def test_a_rank_above_the_sum_of_input_ranks_is_planned_at_that_sum(pair) -> None:
    assert planned(pair, "svd", rank=20)[0] == 8


def test_an_energy_target_plans_the_whole_factored_rank_as_an_upper_bound(pair) -> None:
    # factored: at most Σrᵢ = 8 (not min(m, n) = 12, not the natural rank 4)
    assert planned(pair, "svd", energy=0.9) == (8, 7168 + 10240 + 448 * 8, 5632 + 112 * 8)


def test_an_exact_sum_is_planned_at_the_sum_of_the_input_ranks(pair) -> None:
    assert planned(pair, "linear") == (8, 7168 + 10240 + 448 * 8, 5632 + 112 * 8)


def test_the_factored_cost_of_three_unequal_adapters_of_a_wide_module() -> None:
    # m = 5, n = 9 (m + n = 14), ranks 1, 2, 3: k = 6, T = 3, the output at rank 2
    params = get_method("svd").resolve({"rank": 2})
    cost = factored_cost(ModuleShape((5, 9), (1, 2, 3), 3, 2), params)
    # FLOPs 4·14·36 + 10·216·3 + 2·14·6·2 = 2016 + 6480 + 336; bytes 16·14·6 + 8·36·5 + 2·14·2 = 1344 + 1440 + 56
    assert (cost.output_rank, cost.flops, cost.working_bytes) == (2, 8832.0, 2840)


def test_a_dense_method_plans_an_energy_target_at_min_m_n(pair) -> None:
    # TIES forms the 16×12 update: at most min(m, n) = 12 with energy (Σrᵢ = 8 is no bound of a sparsified update)
    assert planned(pair, "ties", energy=0.9)[0] == 12
    assert planned(pair, "ties")[0] == 4 and planned(pair, "ties", rank=5)[0] == 5


def test_a_dense_method_caps_a_large_rank_at_min_m_n(pair) -> None:
    assert planned(pair, "ties", rank=30)[0] == 12


# ============================================================================================ dense_svd_cost
# Exact SVD of the 16×12 update in float64: 4·m·n·min(m,n) = 4·16·12·12 = 9216 FLOPs; bytes 16mn (the copy and
# LAPACK's) + 8(m+n)·min (U, V) + 32·min² (workspace) = 3072 + 2688 + 4608 = 10368.
# Randomized SVD to rank 4 with 20 oversampling columns: 12·m·n·24 = 55296 FLOPs; sketches 8·(m+n)·24 = 5376 bytes.
SMALL = ModuleShape((16, 12), (4, 4), 4, 4)
EXACT_SMALL = (9216.0, 10368)
RANDOMIZED_SMALL = (55296.0, 5376)


def ties(**given: object) -> MethodParams:
    return get_method("ties").resolve(given)


def test_auto_takes_the_exact_svd_of_a_small_update() -> None:
    assert dense_svd_cost(SMALL, ties(), 4) == EXACT_SMALL


def test_randomized_is_planned_as_a_randomized_svd() -> None:
    assert dense_svd_cost(SMALL, ties(svd="randomized"), 4) == RANDOMIZED_SMALL


def test_randomized_to_rank_1_sketches_21_columns() -> None:
    assert dense_svd_cost(ModuleShape((3, 5), (1,), 1, 4), ties(svd="randomized"), 1) == (12.0 * 15 * 21, 8 * 8 * 21)


def test_exact_is_planned_as_exact_on_a_small_update() -> None:
    assert dense_svd_cost(SMALL, ties(svd="exact"), 4) == EXACT_SMALL


def test_an_energy_target_is_planned_as_exact_even_when_randomized_is_asked() -> None:
    assert dense_svd_cost(SMALL, ties(svd="randomized", energy=0.9), 12) == EXACT_SMALL


def test_auto_is_exact_up_to_1024_rows_or_columns_and_randomized_above() -> None:
    at_limit, above = ModuleShape((1024, 3000), (2,), 2, 4), ModuleShape((3000, 1025), (2,), 2, 4)
    assert dense_svd_cost(at_limit, ties(), 2) == dense_svd_cost(at_limit, ties(svd="exact"), 2)
    assert dense_svd_cost(above, ties(), 2) == dense_svd_cost(above, ties(svd="randomized"), 2)
    assert dense_svd_cost(above, ties(svd="exact"), 2) != dense_svd_cost(above, ties(svd="randomized"), 2)


def test_a_plugin_method_without_svd_or_energy_parameters_is_planned_as_auto() -> None:
    assert dense_svd_cost(SMALL, NoParams(), 4) == EXACT_SMALL
    large = ModuleShape((2000, 1500), (2,), 2, 4)
    assert dense_svd_cost(large, NoParams(), 2) == dense_svd_cost(large, ties(svd="randomized"), 2)


def test_the_ties_plans_count_the_dense_svd(pair) -> None:
    # elementwise_cost: 4·m·n·k = 6144 and 10·m·n·T = 3840 FLOPs to form and combine, then the SVD; bytes: the m×n
    # float32 update 768, the SVD's, and the rank-4 output 4·28·4 = 448.
    assert planned(pair, "ties") == (4, 6144 + 3840 + EXACT_SMALL[0], 768 + EXACT_SMALL[1] + 448)
    randomized = (4, 6144 + 3840 + RANDOMIZED_SMALL[0], 768 + RANDOMIZED_SMALL[1] + 448)
    assert planned(pair, "ties", svd="randomized") == randomized


# ============================================================================================ lowrank_result


def test_rapf_keeps_a_tiny_but_nonzero_update(tmp_path) -> None:
    """RAPF calls lowrank_result without `scale`: the "zero up to rounding" yardstick is 1e-6·Σ|wᵢsᵢ|·‖Bᵢ‖‖Aᵢ‖.
    Here B = [b b], A = [[1, 0], [−1, δ]]: ΔW = b·[0, δ], σ₁ = ‖b‖δ = 2.5δ, ‖B‖‖A‖ ≈ √2·2.5·√2 = 5, so σ₁ ≈ 1.43e-6 of
    the yardstick's scale: a real update, to be written, not zeros."""
    folder = write_lora(tmp_path / "tiny", {Q: (4, 2)}, r=2, alpha=2)  # scale 1
    delta = 3 * 2**-20
    b = torch.tensor([1.0, 2.0, -1.0, 0.5])
    B, A = torch.stack([b, b], 1), torch.tensor([[1.0, 0.0], [-1.0, delta]])
    save_file({f"base_model.model.{Q}.lora_A.weight": A, f"base_model.model.{Q}.lora_B.weight": B},
              str(folder / "adapter_model.safetensors"))
    merged = merge([folder], method="rapf")
    expected = torch.outer(b.double(), torch.tensor([0.0, delta], dtype=torch.float64))
    assert torch.allclose(merged.delta(Q).double(), expected, rtol=1e-3, atol=1e-9)
    assert float(merged.delta(Q).abs().max()) > 5e-6


# Found while checking these mutants, fixed: iso_cts called lowrank_result positionally when the merged update was zero
# (a TypeError instead of a rank-1 zero module), and knots indexed an empty list of row blocks (an IndexError).
@pytest.mark.parametrize("method", ["iso_cts", "knots", "iso_c", "tsv"])
def test_subspace_methods_write_an_all_zero_merge_at_rank_1(tmp_path, method: str) -> None:
    folder = write_lora(tmp_path / "zero", {Q: (16, 12)}, r=4, alpha=8)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[f"base_model.model.{Q}.lora_B.weight"].zero_()  # a freshly initialised PEFT adapter: B = 0
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.warns(Warning):  # the all-zero source and merge are reported (DegenerateMergeWarning)
        merged = merge([folder, folder], method=method)
    assert merged.modules[Q].rank == 1 and float(merged.delta(Q).abs().max()) == 0.0


# ============================================================================== register_method, load_entry_points

ROUNDS = Param("How many rounds.", "a positive integer", lambda v: isinstance(v, int) and v > 0)
OTHER_ROUNDS = Param("Rounds of something else.", "a positive integer", lambda v: isinstance(v, int) and v > 0)


@dataclass(frozen=True)
class Rounds(MethodParams):
    rounds: int = ROUNDS.field(2)


@dataclass(frozen=True)
class OtherRounds(MethodParams):
    rounds: int = OTHER_ROUNDS.field(3)


def test_a_plugin_parameter_is_listed_and_cannot_be_redeclared_with_another_meaning(scratch_registry) -> None:
    register_method("rounds_a", summary="s", formula="f", reference="r", params=Rounds)(lambda g, p: None)
    register_method("rounds_b", summary="s", formula="f", reference="r", params=Rounds)(lambda g, p: None)
    assert declared_params()["rounds"] == (ROUNDS, ("rounds_a", "rounds_b"))
    with pytest.raises(ValueError, match="'rounds' of rounds_c is already declared by rounds_a with another meaning"):
        register_method("rounds_c", summary="s", formula="f", reference="r", params=OtherRounds)(lambda g, p: None)


class FakeEntry:
    def __init__(self, name: str, load) -> None:
        self.name, self.value, self.load = name, f"fake_plugin:{name}", load


def test_plugins_of_the_methods_group_are_imported_once(scratch_registry, monkeypatch) -> None:
    loads = []

    def load() -> None:
        loads.append(1)
        register_method("plugged", summary="s", formula="f", reference="r")(lambda g, p: None)

    def broken() -> None:
        raise AssertionError("an entry point of another group was loaded")

    groups = {"lora_fusion.methods": [FakeEntry("plugged", load)], "other.group": [FakeEntry("other", broken)]}
    monkeypatch.setattr(scratch_registry, "_entry_points_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: groups.get(group, []))
    assert get_method("plugged").name == "plugged"
    assert "plugged" in [spec.name for spec in scratch_registry.list_methods()]
    scratch_registry.list_methods()
    assert loads == [1]


# ================================================================================================ params.py


def test_a_field_default_given_by_the_method_overrides_the_declarations() -> None:
    @dataclass(frozen=True)
    class P(MethodParams):
        rounds: int = ROUNDS.field(7)
        other: int = Param("x", "an int", lambda v: isinstance(v, int), default=5).field()

    assert defaults(P) == {"rounds": 7, "other": 5} and P().rounds == 7


def test_in_range_is_closed_at_both_ends_unless_told() -> None:
    check = in_range(0.0, 1.0)
    assert check(0.0) and check(1.0) and check(0.5) and check(0) and check(1)
    assert not check(-0.01) and not check(1.01)


def test_in_range_open_ends_exclude_the_bound_only() -> None:
    low_open, high_open = in_range(0.0, 1.0, low_open=True), in_range(0.0, 1.0, high_open=True)
    assert not low_open(0.0) and low_open(1.0) and low_open(0.5) and not low_open(1.5)
    assert high_open(0.0) and not high_open(1.0) and high_open(0.5) and not high_open(-0.5)
    both = in_range(-1.0, 1.0, low_open=True, high_open=True)
    assert both(0.0) and not both(-1.0) and not both(1.0)


def test_in_range_refuses_what_is_not_a_finite_real_number() -> None:
    check = in_range(-10.0, 10.0)
    for value in ("0.5", None, True, float("nan"), float("inf"), [0.5]):
        assert not check(value), value


def test_one_of_takes_exactly_the_named_strings() -> None:
    check = one_of("full", "core")
    assert check("full") is True and check("core") is True
    assert not check("Full") and not check("") and not check(1) and not check(None)


def test_the_declared_checks_refuse_values_at_an_open_end(pair) -> None:
    with pytest.raises(InvalidParameterError, match="energy"):
        merge(pair, method="svd", energy=0.0, dry_run=True)
    assert planned(pair, "svd", energy=1.0)[0] == 8
    with pytest.raises(InvalidParameterError, match="space"):
        merge(pair, method="ties", space="dense", dry_run=True)


@dataclass(frozen=True)
class Typed(MethodParams):
    mode: Literal["a", "b"] = Param("mode", "'a' or 'b'", lambda v: v in ("a", "b")).field("a")
    weights: list[float] = Param("w", "a list", lambda v: isinstance(v, list)).field(None)
    count: int | None = Param("c", "an int", lambda v: isinstance(v, int)).field(None)
    share: float = Param("s", "a number", lambda v: isinstance(v, float)).field(0.5)


def test_value_type_names_the_python_type_of_a_declared_field() -> None:
    assert value_type(Typed, "mode") is str
    assert value_type(Typed, "weights") == list[float]
    assert value_type(Typed, "count") is int
    assert value_type(Typed, "share") is float


def test_a_plugin_method_is_found_by_its_alias_before_any_plugin_was_loaded(scratch_registry, monkeypatch) -> None:
    def load() -> None:
        register_method("plugged", aliases=("plug",), summary="s", formula="f", reference="r")(lambda g, p: None)

    monkeypatch.setattr(scratch_registry, "_entry_points_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [FakeEntry("plugged", load)])
    assert get_method("plug").name == "plugged"


def test_looking_up_a_built_in_method_loads_no_plugin(scratch_registry, monkeypatch) -> None:
    def broken(group=None):
        raise AssertionError("plugins were loaded for a built-in method")

    monkeypatch.setattr(scratch_registry, "_entry_points_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", broken)
    assert get_method("svd").name == "svd" and get_method("cat").name == "linear"


def test_an_unknown_method_lists_every_name_and_alias(scratch_registry, monkeypatch) -> None:
    from lora_fusion.errors import UnknownMethodError

    monkeypatch.setattr(scratch_registry, "_entry_points_loaded", True)
    with pytest.raises(UnknownMethodError, match=r"choose one of: breadcrumbs, breadcrumbs_ties, cat, dare_linear, "):
        get_method("svdd")


def test_a_method_may_declare_a_rank_without_an_energy_and_an_svd_without_a_space() -> None:
    @dataclass(frozen=True)
    class RankOnly(MethodParams):
        rank: int | None = ROUNDS.field(None)

    assert RankOnly(rank=3).rank == 3
    assert get_method("rapf").resolve({"svd": "exact"}).svd == "exact"  # rapf declares svd but no space
