"""Exact merges against dense references computed independently (docs/methods.md)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_fusion.adapter import ModuleFactors
from lora_fusion.errors import InvalidParameterError
from lora_fusion.linalg import RankRule, choose_rank
from lora_fusion.methods import ModuleGroup, get_method


def random_group(seed: int, m: int, n: int, ranks: list[int], weights: list[float]) -> ModuleGroup:
    g = torch.Generator().manual_seed(seed)
    factors = [
        ModuleFactors(A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g), scale=0.5 + i)
        for i, r in enumerate(ranks)
    ]
    return ModuleGroup(name="layer", factors=factors, weights=weights)


def dense_sum(group: ModuleGroup) -> torch.Tensor:
    return sum(w * f.scale * (f.B.double() @ f.A.double()) for f, w in zip(group.factors, group.weights))


def product(result) -> torch.Tensor:
    return result.B.double() @ result.A.double()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


groups = st.builds(
    random_group,
    seed=st.integers(0, 10_000),
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    weights=st.just(None),
).flatmap(
    lambda g: st.lists(
        st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3),
        min_size=len(g.factors),
        max_size=len(g.factors),
    ).map(lambda ws: ModuleGroup(g.name, g.factors, ws))
)


@settings(max_examples=60, deadline=None)
@given(groups)
def test_linear_equals_the_weighted_sum_of_deltas(group: ModuleGroup) -> None:
    result = get_method("linear").fn(group, get_method("linear").resolve({}))
    assert result.A.shape[0] == sum(f.rank for f in group.factors)
    assert rel(product(result), dense_sum(group)) < 1e-5


@settings(max_examples=60, deadline=None)
@given(groups, st.floats(-3, 3, allow_nan=False))
def test_task_arithmetic_is_lambda_times_the_sum(group: ModuleGroup, lam: float) -> None:
    result = get_method("task_arithmetic").fn(group, get_method("task_arithmetic").resolve({"scale": lam}))
    expected = lam * dense_sum(group)
    assert float((product(result) - expected).norm()) <= 1e-5 * float(dense_sum(group).norm()) * max(1, abs(lam))


@settings(max_examples=60, deadline=None)
@given(groups, st.integers(1, 12))
def test_svd_has_the_eckart_young_error(group: ModuleGroup, rank: int) -> None:
    result = get_method("svd").fn(group, get_method("svd").resolve({"rank": rank}))
    dense = dense_sum(group)
    singular = torch.linalg.svdvals(dense)
    kept = min(rank, sum(f.rank for f in group.factors))
    optimal = float(singular[kept:].pow(2).sum().sqrt())
    error = float((product(result) - dense).norm())
    assert error <= optimal + 1e-4 * float(dense.norm()) + 1e-9
    assert result.stats.relative_error == pytest.approx(optimal / float(dense.norm()), abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(groups)
def test_svd_at_full_rank_equals_linear(group: ModuleGroup) -> None:
    k = sum(f.rank for f in group.factors)
    result = get_method("svd").fn(group, get_method("svd").resolve({"rank": k}))
    assert rel(product(result), dense_sum(group)) < 1e-5
    assert result.stats.retained_energy == pytest.approx(1.0, abs=1e-9)


def test_svd_default_rank_is_the_largest_input_rank() -> None:
    group = random_group(1, 64, 48, [4, 8, 2], [1.0, 0.5, -1.0])
    assert get_method("svd").fn(group, get_method("svd").resolve({})).A.shape[0] == 8


def test_energy_picks_the_smallest_sufficient_rank() -> None:
    group = random_group(2, 64, 48, [8, 8], [1.0, 1.0])
    result = get_method("svd").fn(group, get_method("svd").resolve({"energy": 0.9}))
    singular = torch.linalg.svdvals(dense_sum(group))
    energy = singular.pow(2).cumsum(0) / singular.pow(2).sum()
    assert result.stats.rank == int((energy >= 0.9).nonzero()[0]) + 1
    assert result.stats.retained_energy >= 0.9


def test_linear_has_no_cross_terms_unlike_peft_linear() -> None:
    # weights [1, 0] must give exactly the first adapter (PEFT #1155 / #3004)
    group = random_group(3, 16, 12, [4, 4], [1.0, 0.0])
    first = group.factors[0]
    result = get_method("cat").fn(group, get_method("cat").resolve({}))
    assert rel(product(result), first.scale * first.B.double() @ first.A.double()) < 1e-6


def test_zero_sum_is_written_at_rank_one_with_full_energy() -> None:
    group = random_group(4, 10, 10, [3], [1.0])
    group = ModuleGroup("z", [group.factors[0], group.factors[0]], [1.0, -1.0])
    result = get_method("svd").fn(group, get_method("svd").resolve({"rank": 3}))
    assert result.stats.rank == 1 and result.stats.retained_energy == 1.0
    assert float(product(result).abs().max()) < 1e-5


def test_half_precision_factors_merge_in_float32() -> None:
    group = random_group(5, 32, 32, [4, 4], [1.0, 1.0])
    half = ModuleGroup("h", [ModuleFactors(f.A.bfloat16(), f.B.bfloat16(), f.scale) for f in group.factors], [1, 1])
    result = get_method("svd").fn(half, get_method("svd").resolve({"rank": 8}))
    assert result.A.dtype == torch.float32
    reference = sum(f.scale * f.B.double() @ f.A.double() for f in half.factors)
    assert rel(product(result), reference) < 1e-5


def test_bias_is_summed_exactly() -> None:
    g = torch.Generator().manual_seed(6)
    factors = [
        ModuleFactors(torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), s, torch.randn(3, generator=g))
        for s in (2.0, 0.5)
    ]
    result = get_method("svd").fn(ModuleGroup("b", factors, [0.3, -1.0]), get_method("svd").resolve({"scale": 2.0}))
    expected = 2.0 * (0.3 * 2.0 * factors[0].bias - 1.0 * 0.5 * factors[1].bias)
    assert torch.allclose(result.bias, expected)


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 0}, {"rank": -3}, {"energy": 0.0}, {"energy": 1.5}, {"scale": math.nan}, {"rank": 4, "energy": 0.9}],
)
def test_invalid_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(InvalidParameterError):
        get_method("svd").resolve(kwargs)


def test_choose_rank_caps_at_available() -> None:
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), RankRule(rank=10, energy=None), default=2) == 3
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), RankRule(rank=None, energy=None), default=2) == 2
    assert choose_rank(torch.tensor([1.0, 0.0]), RankRule(rank=None, energy=0.999), default=2) == 1
