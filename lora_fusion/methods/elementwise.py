"""Sparsify-and-combine on dense task updates, streamed in row blocks (docs/methods.md).

TIES, DARE, magnitude pruning and Breadcrumbs are defined entry by entry on dense updates τᵢ. A 5504×2048 update
is 45 MB: forming T of them, then a magnitude, a mask, a sign vote, an agreement mask per task, a numerator and a
count, each as a whole tensor, made a merge spend most of its time on memory traffic and first-touch page faults.
Here each τᵢ is formed one block of rows at a time (≈ 2¹⁶ entries on the CPU, so a block and its scratch stay in
cache) into buffers reused for the whole module, and every step up to the merged entries runs on that block; only
the merged update is written whole. Trimming needs each task's exact k-th largest magnitude first, which one
streamed pass finds ([`TopMagnitude.of`]); the blocks of τᵢ are then recomputed, since a rank-r product costs less
than storing and re-reading it.

Selections, draws and combinations are exactly those of the whole-tensor definitions: the top-k is exact with the
same tie rule (lower flat index first), DARE's Bernoulli draws consume the generator in flat order as one
`torch.rand` of the whole shape would, and the election and mean give the same values (`_consensus_mean`;
`tests/test_interference.py` compares with PEFT's `merge_utils`). Only the entries of τᵢ themselves may differ
from one whole `B @ A` in the last bit, since a BLAS may order the r-term sums differently for a block of rows than
for the whole matrix; every pass (and the whole-tensor fallback) computes τᵢ from the same row blocks, so the
selection is exact for the values that are merged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .._lazy import torch

if TYPE_CHECKING:
    import torch  # noqa: F811

_CPU_BLOCK = 1 << 16  # entries per block on the CPU: with its scratch (~10 blocks) it stays within L2/L3
_DEVICE_BLOCK = 1 << 20  # on an accelerator: kernel launches do not dominate; (T + 8) buffers of 4 MB of scratch
_SAMPLE = 1 << 16
_SAMPLED_SELECT_MIN = 1 << 20  # below this, topk over everything is fast enough and the bracket would cover most


@dataclass(frozen=True)
class DenseTask:
    """A dense task update τ (m×n), produced one block of rows at a time: either the product L·R of factors
    L (m×r) and R (r×n), computed per block (held whole only for the exact top-k of a small update, see
    `TopMagnitude.of`), or a given contiguous tensor, whose blocks are views (sparsifying them changes it)."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    given: torch.Tensor | None = None

    @classmethod
    def product(cls, left: torch.Tensor, right: torch.Tensor) -> DenseTask:
        """τ = L·R (a LoRA's ΔW = (s·B)·A: the scale folded into the m×r factor costs nothing per entry)."""
        return cls(left=left, right=right)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> DenseTask:
        """τ = `tensor`, seen as shape[0] rows; it must be contiguous, so that sparsifying its blocks changes it."""
        if tensor.dim() == 0 or not tensor.is_contiguous():
            raise ValueError("DenseTask.of needs a contiguous tensor of at least one dimension; pass .contiguous()")
        return cls(given=tensor.view(tensor.shape[0], -1))

    @property
    def shape(self) -> tuple[int, int]:
        if self.given is not None:
            return tuple(self.given.shape)  # type: ignore[return-value]
        return self.left.shape[0], self.right.shape[1]

    @property
    def device(self) -> torch.device:
        return (self.given if self.given is not None else self.left).device

    @property
    def dtype(self) -> torch.dtype:
        return (self.given if self.given is not None else self.left).dtype

    def rows(self, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of τ, flat: computed into `buffer` (at least (stop − start)·n entries) or a view."""
        if self.given is not None:
            return self.given[start:stop].view(-1)
        n = self.right.shape[1]
        block = buffer[: (stop - start) * n]
        torch.mm(self.left[start:stop], self.right, out=block.view(stop - start, n))
        return block

    def blocks(self, buffer: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(flat offset, rows flat) for every row block in order; product blocks share `buffer`."""
        n = self.shape[1]
        for start, stop in row_blocks(self.shape, self.device):
            yield start * n, self.rows(start, stop, buffer)

    def whole(self) -> torch.Tensor:
        """τ as one m×n tensor, entry for entry equal to the blocks (the fallback of a streamed selection)."""
        if self.given is not None:
            return self.given
        whole = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for start, stop in row_blocks(self.shape, self.device):
            self.rows(start, stop, whole[start:stop].view(-1))
        return whole

    def sample(self, positions: torch.Tensor) -> torch.Tensor:
        """τ at the given flat positions, without forming τ (for products: the r-term dot products, rounded
        differently from the matrix product; only good for estimates)."""
        if self.given is not None:
            return self.given.reshape(-1)[positions]
        n = self.right.shape[1]
        return (self.left[positions // n] * self.right.mT.contiguous()[positions % n]).sum(1)


def row_blocks(shape: tuple[int, int], device: torch.device) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of about `_CPU_BLOCK` (or `_DEVICE_BLOCK`) entries each, at least one row."""
    m, n = shape
    rows = max(1, (_CPU_BLOCK if device.type == "cpu" else _DEVICE_BLOCK) // max(1, n))
    return [(start, min(m, start + rows)) for start in range(0, m, rows)]


def block_entries(shape: tuple[int, int], device: torch.device) -> int:
    """Entries in the largest block of `row_blocks(shape, device)`."""
    start, stop = row_blocks(shape, device)[0]
    return (stop - start) * shape[1]


class Scratch:
    """Per-module block buffers, allocated once and reused by every block (see the module docstring)."""

    def __init__(self, tasks: int, entries: int, device: torch.device, dtype: torch.dtype) -> None:
        def floats() -> torch.Tensor:
            return torch.empty(entries, device=device, dtype=dtype)

        self.tasks = [floats() for _ in range(tasks)]
        self.size, self.kept, self.other, self.votes, self.sign, self.numerator, self.count, self.part = (
            floats() for _ in range(8)
        )
        self.mask = torch.empty(entries, dtype=torch.bool, device=device)
        # DARE's draws come from a CPU generator, whatever the device (and whatever torch's default device is)
        self.uniform = torch.empty(entries, device="cpu")


@dataclass(frozen=True)
class TopMagnitude:
    """The `keep` entries of τ with the largest |value|, ties at the threshold resolved towards the lower flat index:
    every entry with |τ| > `threshold`, and those with |τ| = `threshold` at flat positions below `tie_cutoff` (all
    of them when `tie_cutoff` is None)."""

    threshold: float
    tie_cutoff: int | None = None

    @classmethod
    def of(cls, task: DenseTask, keep: int) -> TopMagnitude:
        """The exact selection, found by streaming τ once (more only when ties or an odd distribution need it).

        `torch.topk` over millions of entries costs ~25 ns per entry on one core; instead a fixed sample of 2¹⁶
        entries brackets the wanted quantile with a wide margin (±8 standard errors), one streamed pass counts the
        entries above the bracket and collects those inside it (~2.5%), and the threshold is the right order
        statistic of that small set. If the bracket misses (ties or odd data), topk over the whole τ decides.
        """
        m, n = task.shape
        count = m * n
        if keep >= count:
            return cls(0.0)  # magnitudes are never below 0: everything is kept
        if keep <= 0:
            return cls(math.inf, 0)
        found = _bracketed(task, keep) if count > _SAMPLED_SELECT_MIN else None
        if found is None:
            size = task.whole().abs().reshape(-1)
            threshold = torch.topk(size, keep, sorted=False).values.min()
            found = threshold, int(torch.count_nonzero(size > threshold)), int(torch.count_nonzero(size >= threshold))
        threshold, above, at_or_above = found
        if at_or_above == keep:
            return cls(float(threshold))
        return cls(float(threshold), _tie_position(task, float(threshold), keep - above))

    def kept(self, size: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Into the float tensor `out`: 1 where the block (magnitudes `size`, from flat `offset`) is selected, else 0.
        Float masks, because on the CPU a comparison writing floats and a multiply cost a tenth of a comparison
        writing bools and `masked_fill`."""
        torch.ge(size, self.threshold, out=out)
        if self.tie_cutoff is not None and offset + size.numel() > self.tie_cutoff:
            ties = (size == self.threshold).nonzero().squeeze(1)
            out[ties[ties >= self.tie_cutoff - offset]] = 0.0
        return out


def _bracketed(task: DenseTask, keep: int) -> tuple[torch.Tensor, int, int] | None:
    """(threshold, count above it, count at or above it) from a sampled bracket and one streamed pass, or None."""
    m, n = task.shape
    count = m * n
    positions = torch.randint(count, (_SAMPLE,), generator=torch.Generator().manual_seed(0), device="cpu")
    positions = positions.to(task.device)
    sample = task.sample(positions).abs()
    quantile = 1.0 - keep / count
    margin = 8.0 * (quantile * (1.0 - quantile) / _SAMPLE) ** 0.5 + 2.0 / _SAMPLE
    low = float(torch.kthvalue(sample, max(0, int((quantile - margin) * _SAMPLE)) + 1).values)
    high = float(torch.kthvalue(sample, min(_SAMPLE - 1, int((quantile + margin) * _SAMPLE)) + 1).values)
    scratch = Scratch(1, block_entries(task.shape, task.device), task.device, task.dtype)
    above, band = 0, []
    for _, block in task.blocks(scratch.tasks[0]):
        entries = block.numel()
        size = torch.abs(block, out=scratch.size[:entries])
        over = torch.gt(size, high, out=scratch.kept[:entries])
        above += _count(over)
        inside = torch.ge(size, low, out=scratch.other[:entries]).sub_(over)
        band.append(size.masked_select(scratch.mask[:entries].copy_(inside)))
    values = torch.cat(band)
    if low == high:  # the k-th value is shared by a large share of the entries (zeros of a sparse task)
        if above < keep <= above + values.numel():
            return values.new_tensor(high), above, above + values.numel()
    if 0 < keep - above <= values.numel():
        threshold = torch.topk(values, keep - above, sorted=False).values.min()
        return (threshold, above + int(torch.count_nonzero(values > threshold)),
                above + int(torch.count_nonzero(values >= threshold)))
    return None


def _count(kept: torch.Tensor) -> int:
    """The number of ones in a float 0/1 mask: a sum accumulated in float32 (whatever the mask's dtype: a bfloat16 or
    float16 sum is inexact above 256 or overflows), exact up to 2²⁴ entries (any block but a single row wider than
    that), where counting into int64 costs five times as much."""
    return int(kept.sum(dtype=torch.float32)) if kept.numel() <= 1 << 24 else int(torch.count_nonzero(kept))


def _tie_position(task: DenseTask, threshold: float, kept: int) -> int:
    """The flat position of the (kept + 1)-th entry with |τ| = threshold: ties from there on are dropped."""
    scratch = Scratch(1, block_entries(task.shape, task.device), task.device, task.dtype)
    seen = 0
    for offset, block in task.blocks(scratch.tasks[0]):
        ties = (block.abs() == threshold).nonzero().squeeze(1)
        if seen + ties.numel() > kept:
            return offset + int(ties[kept - seen])
        seen += ties.numel()
    raise AssertionError("fewer ties than counted")  # the counts came from these same blocks


class Sparsifier(Protocol):
    """Zeroes (and may rescale) entries of a block of one task, in place; blocks come in flat order."""

    def apply_(self, block: torch.Tensor, offset: int, scratch: Scratch) -> None: ...


@dataclass(frozen=True)
class Trim:
    """TIES trim: keep the top ⌊d·numel⌋ magnitudes."""

    selection: TopMagnitude

    @classmethod
    def of(cls, task: DenseTask, density: float) -> Trim:
        m, n = task.shape
        count = m * n
        return cls(TopMagnitude.of(task, int(density * count)))  # d·(m·n), rounded as PEFT rounds d·numel

    def apply_(self, block: torch.Tensor, offset: int, scratch: Scratch) -> None:
        size = torch.abs(block, out=scratch.size[: block.numel()])
        block.mul_(self.selection.kept(size, offset, scratch.kept[: block.numel()]))


@dataclass(frozen=True)
class Drop:
    """DARE: keep each entry with probability d (uniform draws from `generator`, on the CPU, in flat order, so the
    masks do not depend on the device or the block size) and divide the kept entries by d."""

    density: float
    generator: torch.Generator

    def apply_(self, block: torch.Tensor, offset: int, scratch: Scratch) -> None:
        uniform = torch.rand(
            block.numel(), generator=self.generator, device="cpu", out=scratch.uniform[: block.numel()]
        )
        kept = torch.lt(uniform.to(block.device), self.density, out=scratch.kept[: block.numel()])
        block.mul_(kept).div_(self.density)


@dataclass(frozen=True)
class Crumbs:
    """Model Breadcrumbs: the entries ranked (by descending |value|, ties by lower flat index) from `large.keep`
    to `outer.keep`: selected by `outer`, not selected by `large`."""

    outer: TopMagnitude
    large: TopMagnitude

    @classmethod
    def of(cls, task: DenseTask, density: float, gamma: float) -> Crumbs:
        """Keep ⌊d·N⌋ entries: remove the ⌊γ·N⌋ largest |entries| and the smallest ones down to ⌊d·N⌋; if that
        leaves fewer than none to remove at the bottom, remove fewer large ones (mergekit's `magnitude_outliers`)."""
        m, n = task.shape
        count = m * n
        kept = int(density * count)
        drop_large = min(int(gamma * count), count - kept)
        return cls(TopMagnitude.of(task, kept + drop_large), TopMagnitude.of(task, drop_large))

    def apply_(self, block: torch.Tensor, offset: int, scratch: Scratch) -> None:
        size = torch.abs(block, out=scratch.size[: block.numel()])
        kept = self.outer.kept(size, offset, scratch.kept[: block.numel()])
        block.mul_(kept.sub_(self.large.kept(size, offset, scratch.other[: block.numel()])))  # large ⊂ outer


def combine(
    tasks: Sequence[DenseTask],
    sparsifiers: Sequence[Sparsifier | None],
    weights: Sequence[float],
    *,
    majority: str | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """The merged m×n update λ·combine(sparsify(τ₁), …, sparsify(τ_T)), one row block at a time.

    With `majority` None, the weighted sum Σᵢ wᵢ·τ̂ᵢ. With "total" or "frequency", the TIES election and disjoint
    mean on the sparsified, unweighted τ̂ᵢ: γ_p = sign of Σᵢ τ̂ᵢ[p] ("total") or of Σᵢ sign(τ̂ᵢ[p]) ("frequency"),
    +1 where the sum is zero (PEFT's rule); τ_m[p] = Σ_{i∈A_p} wᵢ·τ̂ᵢ[p] / max(1, |A_p|) with
    A_p = {i : τ̂ᵢ[p] ≠ 0 and sign(τ̂ᵢ[p]) = γ_p}.
    """
    merged = torch.empty(tasks[0].shape, device=tasks[0].device, dtype=tasks[0].dtype)
    for start, stop, blocks, scratch in sparsified_blocks(tasks, sparsifiers):
        out = merged[start:stop].view(-1)
        if majority is None:
            torch.mul(blocks[0], weights[0], out=out)
            for block, weight in zip(blocks[1:], weights[1:]):
                out.add_(block, alpha=weight)
        else:
            _consensus_mean(blocks, weights, majority, scratch, out)
        out.mul_(scale)
    return merged


def sparsified_blocks(
    tasks: Sequence[DenseTask], sparsifiers: Sequence[Sparsifier | None]
) -> Iterator[tuple[int, int, list[torch.Tensor], Scratch]]:
    """(start row, stop row, each task's block of those rows sparsified, the scratch) for every row block in order.
    The blocks live in reused buffers: each is overwritten by the next."""
    shape, device = tasks[0].shape, tasks[0].device
    scratch = Scratch(len(tasks), block_entries(shape, device), device, tasks[0].dtype)
    for start, stop in row_blocks(shape, device):
        blocks = [task.rows(start, stop, buffer) for task, buffer in zip(tasks, scratch.tasks)]
        for block, sparsifier in zip(blocks, sparsifiers):
            if sparsifier is not None:
                sparsifier.apply_(block, start * shape[1], scratch)
        yield start, stop, blocks, scratch


def _consensus_mean(
    blocks: Sequence[torch.Tensor], weights: Sequence[float], majority: str, scratch: Scratch, out: torch.Tensor
) -> None:
    """TIES on one block (see `combine`). With γ = ±1, wᵢ·τ̂ᵢ[p] for an agreeing entry is γ·wᵢ·max(0, γ·τ̂ᵢ[p]) and
    the entry agrees iff γ·τ̂ᵢ[p] > 0: one product per task instead of two masks (multiplying by ±1 is exact)."""
    entries = blocks[0].numel()
    votes, sign, part = scratch.votes[:entries], scratch.sign[:entries], scratch.part[:entries]
    numerator, count = scratch.numerator[:entries], scratch.count[:entries]
    for i, block in enumerate(blocks):
        vote = block if majority == "total" else torch.sign(block, out=part)
        if i == 0:
            votes.copy_(vote)
        else:
            votes.add_(vote)
    torch.ge(votes, 0, out=sign).mul_(2.0).sub_(1.0)
    for i, (block, weight) in enumerate(zip(blocks, weights)):
        torch.mul(block, sign, out=part).clamp_(min=0.0)
        if i == 0:
            torch.mul(part, weight, out=numerator)
            torch.sign(part, out=count)
        else:
            numerator.add_(part, alpha=weight)
            count.add_(part.sign_())
    torch.div(numerator.mul_(sign), count.clamp_(min=1.0), out=out)
