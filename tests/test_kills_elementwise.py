"""Fast tests that kill mutants found by `make mutation` in lora_fusion/methods/elementwise.py (docs/testing.md).

Each test checks what a caller of the module sees (a selection, a merged update, its dtype and device, the state of
torch's global generator, an error), against values worked out by hand or from a dense torch computation (`top`:
the entries at or above the k-th largest of distinct magnitudes), not the text of a mutant. Selections are compared
as the entries they keep (`selected`), not as a `TopMagnitude`, since (threshold, tie cutoff) pairs that keep the
same entries are equally right.

Where a test is about devices it makes "meta" torch's default device around a merge of CPU tasks, as
torch.set_default_device("cuda") would: a buffer allocated without an explicit device then lands beside the tasks on
another device, which is an error. (Tasks on the meta device itself would cost ~1 s of torch's meta initialisation.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from lora_fusion.methods.elementwise import DenseTask, Drop, TopMagnitude, Trim, combine, row_blocks
from tests.test_mutation_kills import selected

LARGE = (1025, 1024)  # 1 049 600 entries: just over 2²⁰, where the selection samples a bracket instead of a topk


def tied_product(dtype: torch.dtype = torch.float32) -> DenseTask:
    """τ = [[2, −1, 2, 1]] in each of 3 rows: six entries tie at |τ| = 2 (flat 0, 2, 4, 6, 8, 10)."""
    return DenseTask.product(torch.ones(3, 1, dtype=dtype), torch.tensor([[2.0, -1.0, 2.0, 1.0]], dtype=dtype))


# The top 4 of `tied_product`: four of the six tied 2s, the lower flat indices first (rows 0 and 1).
TIED_TOP_4 = [[2.0, 0.0, 2.0, 0.0], [2.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


# --------------------------------------------------------------------------------------------- DenseTask


def test_the_whole_of_a_float64_product_is_its_float64_matrix_product() -> None:
    g = torch.Generator().manual_seed(0)
    left = torch.randn(70, 3, generator=g, dtype=torch.float64)
    right = torch.randn(3, 1000, generator=g, dtype=torch.float64)
    whole = DenseTask.product(left, right).whole()  # 70 rows of 1000: two row blocks on the CPU
    assert whole.dtype == torch.float64
    assert float((whole - left @ right).abs().max()) < 1e-14


def test_sampled_entries_of_a_product_are_its_entries() -> None:
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(8, 3, generator=g), torch.randn(3, 5, generator=g)
    positions = torch.tensor([0, 7, 12, 39, 21])
    sample = DenseTask.product(left, right).sample(positions)
    assert float((sample - (left @ right).reshape(-1)[positions]).abs().max()) < 1e-5


# --------------------------------------------------------------------------------------------- row_blocks


@pytest.mark.parametrize(
    ("shape", "device", "blocks"),
    [
        ((5, 30_000), "cpu", [(0, 2), (2, 4), (4, 5)]),  # two rows fit in 2¹⁶ entries, three do not
        ((3, 40_000), "cpu", [(0, 1), (1, 2), (2, 3)]),  # a row wider than half the budget is a block of its own
        ((70_000, 1), "cpu", [(0, 65_536), (65_536, 70_000)]),  # a column: 2¹⁶ rows per block
        ((40, 65_536), "cpu", [(i, i + 1) for i in range(40)]),
        ((40, 65_536), "cuda", [(0, 16), (16, 32), (32, 40)]),  # on an accelerator: 2²⁰ entries per block
    ],
)
def test_row_blocks_hold_as_many_rows_as_fit_in_the_devices_block(shape, device, blocks) -> None:
    assert row_blocks(shape, torch.device(device)) == blocks


# --------------------------------------------------------------------------------------------- TopMagnitude


def test_keeping_no_entries_selects_none_even_infinite_ones() -> None:
    values = torch.tensor([[math.inf, 1.0], [-math.inf, 2.0]])  # an infinite magnitude first in flat order
    selection = TopMagnitude.of(DenseTask.of(values), 0)
    assert selection.kept(values.abs().reshape(-1), 0, torch.empty(4)).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_selecting_the_top_magnitudes_of_a_large_update_leaves_torchs_global_generator_alone() -> None:
    values = torch.randn(*LARGE, generator=torch.Generator().manual_seed(2))
    before = torch.random.get_rng_state()
    TopMagnitude.of(DenseTask.of(values), 300_000)
    assert torch.equal(torch.random.get_rng_state(), before)


def top(values: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` largest of distinct |values| as a flat 0/1 mask: those at or above the keep-th largest."""
    size = values.abs().reshape(-1)
    mask = (size >= size.kthvalue(size.numel() - keep + 1).values).float()
    assert int(torch.count_nonzero(mask)) == keep  # no tie at the threshold
    return mask


def test_the_sampled_top_k_of_a_large_float64_update_is_exact() -> None:
    values = torch.randn(*LARGE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(selected(DenseTask.of(values), 300_000).float(), top(values, 300_000))


@dataclass(frozen=True)
class Misestimated(DenseTask):
    """A given task whose sampled estimate (`DenseTask.sample`, only good for estimates) is `estimate(u)` at the
    relative flat position u ∈ [0, 1): the bracket it suggests may be far from the truth."""

    estimate: Callable[[torch.Tensor], torch.Tensor] | None = None

    def sample(self, positions: torch.Tensor) -> torch.Tensor:
        return self.estimate(positions / self.given.numel()).to(self.given.dtype)


def three_levels() -> torch.Tensor:
    """|τ| ∈ {0.5, 1, 2}, about a third each, signs mixed."""
    g = torch.Generator().manual_seed(4)
    levels = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, LARGE, generator=g)]
    return levels * (torch.randint(0, 2, LARGE, generator=g) * 2 - 1)


def uniform(high: float, seed: int) -> torch.Tensor:
    return torch.rand(*LARGE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * high


@pytest.mark.parametrize(
    ("values", "estimate", "expected"),
    [
        # |τ| uniform on [0, 20), estimated uniform on [10, 20): keep 60%, the threshold (≈ 8) is below any estimate
        (lambda: uniform(20.0, 5), lambda u: 10.0 + 10.0 * u, lambda v: top(v, 629_760)),
        # every estimate is 1, which is the threshold: keep every |τ| ≥ 1 (the ties at 1 whole), or every |τ| > 1
        (three_levels, torch.ones_like, lambda v: (v.abs() >= 1.0).reshape(-1).float()),
        (three_levels, torch.ones_like, lambda v: (v.abs() > 1.0).reshape(-1).float()),
        # |τ| uniform on [0, 1), estimated 0 at 90% of the positions and 0.7 at the rest: keep 10% (threshold ≈ 0.9)
        (lambda: uniform(1.0, 6), lambda u: torch.where(u < 0.9, 0.0, 0.7), lambda v: top(v, 104_960)),
    ],
    ids=["estimate-too-high", "threshold-is-the-estimate", "threshold-above-the-estimate", "estimate-skewed"],
)
def test_the_sampled_top_k_is_exact_however_wrong_the_estimate(values, estimate, expected) -> None:
    values = values()
    expected = expected(values)
    mask = selected(Misestimated(given=values, estimate=estimate), int(expected.sum()))
    assert torch.equal(mask.float(), expected)


# Found by make mutation, fixed: `_count` summed a 0/1 mask in the mask's dtype, the task's. In bfloat16 that sum is
# inexact above 256 and in float16 inf from 65 520 on, so Trim.of(a 1100×1024 bfloat16 task of randn, seed 0; density
# 0.25) kept 281 537 entries, not 281 600, and a float16 task raised "cannot convert float infinity to integer". The
# merges upcast to float32, so only direct callers of the module (DenseTask.of takes any dtype) saw it.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_counting_a_half_precision_mask_is_exact(dtype: torch.dtype) -> None:
    from lora_fusion.methods.elementwise import _count

    assert _count(torch.ones(65_537, dtype=dtype)) == 65_537


# --------------------------------------------------------------------------------------------- combine


def two_products(dtype: torch.dtype) -> list[DenseTask]:
    g = torch.Generator().manual_seed(8)
    def factor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    return [DenseTask.product(factor(70, 3), factor(3, 1000)) for _ in range(2)]


def test_a_float64_weighted_sum_is_computed_and_returned_in_float64() -> None:
    tasks = two_products(torch.float64)
    merged = combine(tasks, [None, None], [0.5, -2.0], majority=None)
    assert merged.dtype == torch.float64
    expected = 0.5 * (tasks[0].left @ tasks[0].right) - 2.0 * (tasks[1].left @ tasks[1].right)
    assert float((merged - expected).abs().max()) < 1e-13


def test_the_top_k_of_a_float64_product_with_ties_keeps_the_first_ties_in_float64() -> None:
    task = tied_product(torch.float64)
    merged = combine([task], [Trim(TopMagnitude.of(task, 4))], [1.0], majority=None)
    assert merged.dtype == torch.float64
    assert merged.tolist() == TIED_TOP_4


def test_a_trimmed_merge_does_not_depend_on_torchs_default_device() -> None:
    task = tied_product()  # on the CPU
    with torch.device("meta"):  # a default device other than the tasks', as torch.set_default_device("cuda") sets
        merged = combine([task], [Trim(TopMagnitude.of(task, 4))], [1.0], majority=None)
    assert merged.device.type == "cpu"
    assert merged.tolist() == TIED_TOP_4


# Found by make mutation, fixed: DARE's uniform buffer was allocated on torch's default device, not on the CPU where
# DARE's generator draws, so under torch.set_default_device("cuda") a DARE merge of CPU tasks raised (a CPU generator
# cannot fill a CUDA tensor); "meta" here shows the same. The sample positions of a selection over 2²⁰ entries
# (`torch.randint` in `_bracketed`) had the same flaw.
def test_a_dare_merge_does_not_depend_on_torchs_default_device() -> None:
    task = DenseTask.of(torch.ones(3, 4))  # on the CPU
    with torch.device("meta"):
        merged = combine([task], [Drop(0.5, torch.Generator().manual_seed(0))], [1.0], majority=None)
    assert merged.device.type == "cpu"
