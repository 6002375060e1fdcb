"""Fast tests that kill mutants found by `make mutation` (docs/testing.md) in lora_fusion/methods/interference.py,
rapf.py, subspace.py and icm.py.

Each test checks observable behaviour (a `--dry-run` plan figure, a merged update, a recorded statistic, an error),
not the text of a mutant. Plan figures are worked out by hand for one 8×6 module merged from two float32 adapters of
ranks 2 and 3 (Σr = 5, two tasks, 4 bytes an entry, min(m, n) = 6, so `svd="auto"` is exact), from the cost model
each method's docstring states; the arithmetic is written out next to each number.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_fusion import merge
from lora_fusion.errors import InvalidParameterError
from lora_fusion.methods.rapf import fuse_update_factored, fusion_mask, rapf_fuse_weights
from tests.test_properties import write_lora

NAME = "model.layers.0.self_attn.q_proj"
M, N = 8, 6


def two_adapters(tmp_path: Path) -> list[Path]:
    """Two adapters of one 8×6 module, ranks 2 and 3, float32."""
    return [
        write_lora(tmp_path / "a", {NAME: (M, N)}, r=2, alpha=4, seed=0),
        write_lora(tmp_path / "b", {NAME: (M, N)}, r=3, alpha=6, seed=1),
    ]


def planned(tmp_path: Path, method: str, **params: object) -> tuple[int, float, int]:
    """(output rank, FLOPs, working bytes) the dry-run plan gives the one module."""
    plan = merge(two_adapters(tmp_path), method=method, dry_run=True, **params)
    (module,) = plan.modules
    return module.output_rank, module.flops, module.working_bytes


# Exact SVD of the dense 8×6 update: 4·m·n·min(m,n) = 4·48·6 = 1152 FLOPs;
# bytes 16·m·n + 8·(m+n)·min(m,n) + 32·min(m,n)² = 768 + 672 + 1152 = 2592.
# Randomized SVD to rank 3 (sketch 3 + 20 oversampling = 23): 12·48·23 = 13248 FLOPs; bytes 8·(m+n)·23 = 2576.
# A factored merge (k = Σr = 5, T = 2, output rank R): 4·(m+n)·k² + 10·k³·T + 2·(m+n)·k·R FLOPs
# and 16·(m+n)·k + 8·k²·(T+2) + 4·(m+n)·R bytes; with R = 4: 1400 + 2500 + 560 = 4460 and 1120 + 800 + 224 = 2144.
FACTORED_RANK_4 = (4, 4460.0, 2144)


# ============================================================================= interference.elementwise_cost


def test_full_space_elementwise_plan_streams_the_updates_then_takes_an_exact_svd(tmp_path) -> None:
    # out = largest input rank 3; FLOPs: streaming 4·48·5 = 960, element-wise work 10·48·2 = 960, SVD 1152;
    # bytes: merged float32 update 4·48 = 192, SVD 2592, output factors 4·(8+6)·3 = 168.
    assert planned(tmp_path, "ties") == (3, 960.0 + 960.0 + 1152.0, 192 + 2592 + 168)


def test_full_space_elementwise_plan_with_a_rank_writes_that_rank(tmp_path) -> None:
    # out = 5; output factors 4·14·5 = 280
    assert planned(tmp_path, "magnitude_prune", rank=5) == (5, 3072.0, 192 + 2592 + 280)


def test_full_space_elementwise_plan_with_energy_bounds_the_rank_by_min_m_n(tmp_path) -> None:
    # energy: the rank is bounded by min(m, n) = 6 (not Σr = 5), the SVD planned exact; factors 4·14·6 = 336
    assert planned(tmp_path, "dare_linear", energy=0.9) == (6, 3072.0, 192 + 2592 + 336)


def test_full_space_elementwise_plan_with_a_randomized_svd_counts_the_sketch(tmp_path) -> None:
    assert planned(tmp_path, "breadcrumbs", svd="randomized") == (3, 960.0 + 960.0 + 13248.0, 192 + 2576 + 168)


def test_core_space_elementwise_plan_is_a_factored_merge(tmp_path) -> None:
    assert planned(tmp_path, "ties", space="core", rank=4) == FACTORED_RANK_4


# ============================================================================= interference.elementwise_merge


def test_full_space_energy_target_is_met_with_a_randomized_svd(tmp_path) -> None:
    """The randomized sketch grows until the energy target is reached: the kept rank holds ≥ 99% of ‖ΔW‖²."""
    shapes = {NAME: (64, 64)}
    sources = [write_lora(tmp_path / f"{i}", shapes, r=4, alpha=4, seed=i) for i in range(2)]
    whole = merge(sources, method="ties", rank=64, svd="exact").delta(NAME).double()
    kept = merge(sources, method="ties", energy=0.99, svd="randomized").delta(NAME).double()
    assert float(kept.norm() ** 2) >= 0.99 * float(whole.norm() ** 2) * (1 - 1e-4)
    # and it is the best approximation of that rank: what it leaves out is orthogonal to what it keeps
    assert float((whole - kept).norm() ** 2) == pytest.approx(float(whole.norm() ** 2 - kept.norm() ** 2), rel=1e-3)


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_a_tiny_scale_scales_the_elementwise_merge_instead_of_zeroing_it(method, tmp_path) -> None:
    sources = two_adapters(tmp_path)
    full = merge(sources, method=method).delta(NAME).double()
    tiny = merge(sources, method=method, scale=1e-7).delta(NAME).double()
    assert float(full.norm()) > 0
    assert float((tiny - 1e-7 * full).norm()) <= 1e-4 * 1e-7 * float(full.norm())


# ============================================================================= rapf.rapf_cost


def test_adapter_only_rapf_plan_is_a_factored_merge(tmp_path) -> None:
    assert planned(tmp_path, "rapf", rank=4) == FACTORED_RANK_4


def test_base_aware_rapf_plan_fuses_each_update_against_a_dense_weight(tmp_path) -> None:
    # No base weights are read for a dry run. rank 6 = min(m, n) is allowed (the update is dense);
    # FLOPs: forming the updates 2·48·5 = 480, one 4·48·6 SVD of W_o per adapter: 2·1152 = 2304, final SVD 1152;
    # bytes: float64 working set 44·48 = 2112, SVD 2592, output factors 4·14·6 = 336.
    assert planned(tmp_path, "rapf", rank=6, base_model=str(tmp_path / "base")) == (
        6, 480.0 + 2304.0 + 1152.0, 2112 + 2592 + 336
    )


def test_base_aware_rapf_plan_with_a_randomized_svd_counts_the_sketch(tmp_path) -> None:
    assert planned(tmp_path, "rapf", svd="randomized", base_model=str(tmp_path / "base")) == (
        3, 480.0 + 2304.0 + 13248.0, 2112 + 2576 + 168
    )


# ====================================================== rapf.fusion_mask, completed_left_basis, fuse_update_factored


def test_the_fusion_mask_of_an_all_zero_change_is_at_most_one() -> None:
    assert torch.equal(fusion_mask(torch.zeros(2, 3), 1.0), torch.ones(2, 3))
    assert float(fusion_mask(torch.zeros(2, 3), 1.5).max()) <= 1.0  # M = min(1, …) whatever b


def test_zero_size_weights_and_factors_fuse_to_zero_size_results() -> None:
    fused = rapf_fuse_weights(torch.zeros(0, 3), torch.zeros(0, 3), bias=0.5)
    assert fused.shape == (0, 3)
    B, A = fuse_update_factored((torch.zeros(0, 2), torch.ones(2, 3)), (torch.zeros(0, 2), torch.ones(2, 3)), bias=0.5)
    assert (B @ A).shape == (0, 3)


def test_a_singular_value_at_exactly_the_tolerance_is_a_numerical_zero_of_the_old_weight() -> None:
    from tests.test_mutation_kills import canonical_fusion

    # W_o = diag(1, 1e-6) in a 3×2 weight: σ₂ is exactly 1e-6·σ₁, not above it, so U₁ = [e₁] and the rest of the
    # basis is the canonical completion from the change (docs/rapf.md), not W_o's own second singular vector
    old = torch.zeros(3, 2, dtype=torch.float64)
    old[0, 0], old[1, 1] = 1.0, 1e-6
    S = torch.linalg.svdvals(old)
    assert float(S[1]) == 1e-6 * float(S[0])
    new = old + torch.randn(3, 2, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    expected = canonical_fusion(old, new, 0.3)
    assert float((rapf_fuse_weights(old, new, bias=0.3) - expected).abs().max()) < 1e-10


# ============================================================================= subspace.full_rank_result


def rank_two_lora(folder: Path, sigma: tuple[float, float]) -> Path:
    """An adapter of one 8×40 module whose update has singular values `sigma` (alpha = r: scale 1)."""
    write_lora(folder, {NAME: (8, 40)}, r=2, alpha=2)
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(8, 2, generator=g)).Q
    V = torch.linalg.qr(torch.randn(40, 2, generator=g)).Q
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[f"base_model.model.{NAME}.lora_B.weight"] = (U * torch.tensor(sigma)).contiguous()
    tensors[f"base_model.model.{NAME}.lora_A.weight"] = V.mT.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_subspace_default_rank_is_the_merged_updates_numerical_rank_even_when_one(tmp_path) -> None:
    # KnOTS trims the aligned task S·Vᵀ (2×40) to its top 20% entries: all 16 from the σ=10 row, none from the
    # σ=0.01 row (entries ≤ 0.01 < the 16th largest of 40 entries of 10·v, v a unit vector), so ΔW has rank 1.
    merged = merge([rank_two_lora(tmp_path / "a", (10.0, 0.01))], method="knots")
    assert merged.stats[NAME].rank == 1
    assert int(torch.linalg.matrix_rank(merged.delta(NAME).double(), rtol=1e-5)) == 1


def test_subspace_energy_target_picks_the_rank(tmp_path) -> None:
    # Iso-C flattens the spectrum of the sum of two rank-4 updates: 8 equal σ, so 99% of the energy needs all 8,
    # more than the largest input rank (4).
    sources = [write_lora(tmp_path / f"{i}", {NAME: (16, 12)}, r=4, alpha=4, seed=i) for i in range(2)]
    merged = merge(sources, method="iso_c", energy=0.99)
    assert merged.stats[NAME].rank == 8 and merged.stats[NAME].retained_energy >= 0.99


def test_a_tiny_scale_scales_a_subspace_merge_instead_of_zeroing_it(tmp_path) -> None:
    sources = two_adapters(tmp_path)
    full = merge(sources, method="iso_c").delta(NAME).double()
    tiny = merge(sources, method="iso_c", scale=1e-7).delta(NAME).double()
    assert float(full.norm()) > 0
    assert float((tiny - 1e-7 * full).norm()) <= 1e-4 * 1e-7 * float(full.norm())


# ============================================================================= icm.IcmParams


def test_icm_without_support_data_is_a_parameter_error_naming_support(tmp_path) -> None:
    with pytest.raises(InvalidParameterError, match="icm needs --support"):
        merge([tmp_path / "never-read"], method="icm", fvae=str(tmp_path / "fvae"))
