"""Interference-aware merges against dense references computed independently: PEFT's merge_utils where the
semantics coincide, direct transcriptions of the papers' steps otherwise. Output rank is set to full so truncation
cannot hide a difference."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from lora_fusion.adapter import ModuleFactors
from lora_fusion.errors import InvalidParameterError, UnsupportedAdapterError
from lora_fusion.linalg import core_bases
from lora_fusion.methods import ModuleGroup, get_method
from lora_fusion.methods.elementwise import Crumbs, DenseTask, Drop, TopMagnitude, Trim, combine
from lora_fusion.methods.interference import seeded, stacked

M, N = 24, 36
FULL = min(M, N)


def make_group(seed: int = 0, ranks=(4, 6, 3), weights=(1.0, 0.6, -0.8)) -> ModuleGroup:
    g = torch.Generator().manual_seed(seed)
    factors = [
        ModuleFactors(torch.randn(r, N, generator=g), torch.randn(M, r, generator=g), scale=0.5 + 0.25 * i)
        for i, r in enumerate(ranks)
    ]
    return ModuleGroup("model.layers.0.mlp.up_proj", factors, list(weights))


def run(name: str, group: ModuleGroup, **given) -> torch.Tensor:
    spec = get_method(name)
    result = spec.fn(group, spec.resolve(given))
    return (result.B.double() @ result.A.double()).float()


def taus(group: ModuleGroup) -> list[torch.Tensor]:
    return [f.delta() for f in group.factors]


def weights_of(group: ModuleGroup) -> torch.Tensor:
    return torch.tensor(group.weights)


def assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    error = float((got - expected).norm() / expected.norm())
    assert error < tol, error


@pytest.mark.parametrize("majority", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_full_space_equals_peft_on_dense_updates(density, majority) -> None:
    group = make_group()
    expected = 0.7 * merge_utils.ties(taus(group), weights_of(group), density, majority)
    assert_close(run("ties", group, density=density, majority=majority, scale=0.7, rank=FULL), expected)


def test_magnitude_prune_full_space_equals_peft() -> None:
    group = make_group(1)
    expected = merge_utils.magnitude_prune(taus(group), weights_of(group), 0.3)
    assert_close(run("magnitude_prune", group, density=0.3, rank=FULL), expected)


def drop_and_rescale(task: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    # DARE as specified: one uniform draw per entry of the whole tensor in flat order, drop where ≥ d, rescale by 1/d
    return task.masked_fill(torch.rand(task.shape, generator=generator) >= density, 0.0) / density


def dare_masked(group: ModuleGroup, density: float, seed: int) -> list[torch.Tensor]:
    return [drop_and_rescale(t, density, seeded(seed, group.name, i)) for i, t in enumerate(taus(group))]


def test_dare_linear_and_ties_equal_peft_combination_of_the_same_masks() -> None:
    group = make_group(2)
    masked = dare_masked(group, 0.4, seed=7)
    linear = merge_utils.task_arithmetic(masked, weights_of(group))
    stack = torch.stack(masked)
    agree = merge_utils.calculate_majority_sign_mask(stack, "total")
    ties = merge_utils.disjoint_merge(stack * weights_of(group).view(-1, 1, 1), agree)
    assert_close(run("dare_linear", group, density=0.4, seed=7, rank=FULL), linear)
    assert_close(run("dare_ties", group, density=0.4, seed=7, rank=FULL), ties)


def test_dare_mask_keeps_density_and_rescales_in_flat_order_across_blocks() -> None:
    tensor = torch.randn(500, 300)  # 150,000 entries: three row blocks, the draws must continue across them
    dropped = combine([DenseTask.of(tensor.clone())], [Drop(0.3, seeded(1, "m", 0))], [1.0], majority=None)
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.01
    assert torch.allclose(dropped[kept], tensor[kept] / 0.3)
    assert torch.equal(dropped, drop_and_rescale(tensor, 0.3, seeded(1, "m", 0)))


def test_dare_is_seeded_and_order_independent() -> None:
    group = make_group(3)
    first = run("dare_ties", group, seed=5, rank=FULL)
    assert torch.equal(first, run("dare_ties", group, seed=5, rank=FULL))
    assert not torch.equal(first, run("dare_ties", group, seed=6, rank=FULL))


def breadcrumbs_reference(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    # mergekit's magnitude_outliers: keep int(d·N); remove the int(γ·N) largest and the smallest N − kept − top,
    # and if that is negative, fewer large ones. Ties: lower flat index ranks higher (mergekit leaves them to sort).
    values = tensor.flatten().tolist()
    count = len(values)
    order = sorted(range(count), key=lambda i: (-abs(values[i]), i))
    kept, top = int(density * count), int(gamma * count)
    bottom = count - kept - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    keep = set(order[top : count - bottom])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(values)]).reshape(tensor.shape)


@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.5, 0.7), (0.3, 0.0)])
def test_breadcrumbs_masks_equal_mergekit_counts(density, gamma) -> None:
    tensor = torch.randn(24, 36, generator=torch.Generator().manual_seed(9)).round(decimals=1)  # with ties
    masked = combine([DenseTask.of(tensor.clone())], [Crumbs.of(DenseTask.of(tensor), density, gamma)], [1.0],
                     majority=None)
    expected = breadcrumbs_reference(tensor, density, gamma)
    assert torch.equal(masked, expected)
    assert int(torch.count_nonzero(expected)) <= int(density * tensor.numel())  # exactly, but for zeros kept


@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.5, 0.7)])
def test_breadcrumbs_equals_a_transcription(density, gamma) -> None:
    group = make_group(4)
    masked = [breadcrumbs_reference(t, density, gamma) for t in taus(group)]
    expected = merge_utils.task_arithmetic(masked, weights_of(group))
    assert_close(run("breadcrumbs", group, density=density, gamma=gamma, rank=FULL), expected)
    stack = torch.stack(masked)
    agree = merge_utils.calculate_majority_sign_mask(stack, "total")
    expected_ties = merge_utils.disjoint_merge(stack * weights_of(group).view(-1, 1, 1), agree)
    assert_close(run("breadcrumbs_ties", group, density=density, gamma=gamma, rank=FULL), expected_ties)


def numerical_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    keep = int((S > 1e-6 * S[0]).sum())
    return U[:, :keep], S[:keep], Vh[:keep]


def test_knots_equals_the_official_steps_on_dense_updates() -> None:
    group = make_group(5)
    U, S, Vh = numerical_svd(torch.cat(taus(group), dim=1))
    reps = [(torch.diag(S) @ Vh[:, i * N : (i + 1) * N]).float() for i in range(len(group.factors))]
    expected = 0.9 * (U.float() @ merge_utils.ties(reps, weights_of(group), 0.2, "total"))
    assert_close(run("knots", group, scale=0.9), expected, tol=1e-4)


def polar(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def test_tsv_equals_the_official_steps_on_dense_updates() -> None:
    group = make_group(6)
    cut = FULL // len(group.factors)
    parts = [numerical_svd(w * t) for t, w in zip(taus(group), group.weights)]
    U = torch.cat([u[:, :cut] for u, _, _ in parts], 1)
    S = torch.cat([s[:cut] for _, s, _ in parts])
    V = torch.cat([vh[:cut].T for _, _, vh in parts], 1)
    expected = 1.3 * polar(U) @ torch.diag(S) @ polar(V).T
    assert_close(run("tsv", group, scale=1.3), expected.float(), tol=1e-4)


def test_iso_c_flattens_the_spectrum_of_the_sum() -> None:
    group = make_group(7)
    U, S, Vh = numerical_svd(sum(w * t for t, w in zip(taus(group), group.weights)))
    expected = 1.5 * S.mean() * U @ Vh
    assert_close(run("iso_c", group, scale=1.5), expected.float(), tol=1e-4)


def iso_cts_reference(tasks: list[torch.Tensor], *, fraction: float = 0.8, alpha: float = 1.0,
                      size: int | None = None) -> torch.Tensor:
    """Iso-CTS written from the paper (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025, arXiv:2502.04959, §4.2) and step for step as its official code runs it
    (danielm1405/iso-merging, src/utils/iso.py, `iso_cts`), not from this library:

    1. D = min(m, n); k_c = int(f·D); the task-specific total is round((D − k_c)/T)·T, then k_c = D − that total and
       each task gets t = (D − k_c)/T directions (Python's round, as the code).
    2. The common subspace: the top k_c singular triplets of Σ τ_t.
    3. Each task: the SVD of τ_t − U_c·U_cᵀ·τ_t (its part outside the common subspace), top t triplets.
    4. U = [U_1 | … | U_T | U_c], likewise S and V; U⊥ = P·Qᵀ for U = P·Σ·Qᵀ (whitening), and V⊥.
    5. Every singular value becomes mean(S): ΔW = α·mean(S)·U⊥·V⊥ᵀ.

    `size` replaces D by the numerical rank of a low-rank LoRA sum (the project's reading, METHODS.md c.9 "For
    LoRA": beyond it, singular vectors are arbitrary)."""
    tasks = [t.double() for t in tasks]
    D = min(tasks[0].shape) if size is None else size
    T = len(tasks)
    common = int(D * fraction)
    common = D - round((D - common) / T) * T
    per_task = (D - common) // T
    U, S, Vh = torch.linalg.svd(sum(tasks), full_matrices=False)
    U_c, S_c, Vh_c = U[:, :common], S[:common], Vh[:common]
    us, ss, vhs = [], [], []
    for tau in tasks:
        u, s, vh = torch.linalg.svd(tau - U_c @ (U_c.T @ tau), full_matrices=False)
        us.append(u[:, :per_task]), ss.append(s[:per_task]), vhs.append(vh[:per_task])
    U_all, S_all, V_all = torch.cat([*us, U_c], 1), torch.cat([*ss, S_c]), torch.cat([*vhs, Vh_c]).T
    return (alpha * S_all.mean() * polar(U_all) @ polar(V_all).T).float()


def full_rank_group(m: int, n: int, ranks: tuple[int, ...], weights: tuple[float, ...], seed: int) -> ModuleGroup:
    """Σ rᵢ ≥ min(m, n): the sum of the updates has full rank, the paper's own setting (D = min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    factors = [ModuleFactors(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), scale=0.5 + 0.25 * i)
               for i, r in enumerate(ranks)]
    return ModuleGroup("model.layers.0.mlp.up_proj", factors, list(weights))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.6, -0.8)], ids=["paper", "weighted"])
def test_iso_cts_equals_the_paper_on_full_rank_updates(weights) -> None:
    # D = 15, T = 3: k_c = 12, t = 1 each. Weights other than 1 make the tasks wᵢ·τᵢ (the project's extension).
    group = full_rank_group(15, 18, (5, 6, 5), weights, seed=8)
    tasks = [w * t for t, w in zip(taus(group), group.weights)]
    expected = iso_cts_reference(tasks, alpha=1.4)
    assert_close(run("iso_cts", group, scale=1.4), expected, tol=1e-4)
    # the task-specific part matters: Iso-C (the common part alone) is far from it
    assert float((run("iso_c", group, scale=1.4) - expected).norm() / expected.norm()) > 0.05


def test_iso_cts_of_low_rank_updates_uses_the_numerical_rank_of_their_sum() -> None:
    group = make_group(8)  # ranks 4, 6, 3 of 24×36 updates: the sum has rank D = 13 < min(m, n)
    tasks = [w * t for t, w in zip(taus(group), group.weights)]
    expected = iso_cts_reference(tasks, size=13)
    assert_close(run("iso_cts", group), expected, tol=1e-4)


def test_iso_cts_splits_the_task_specific_share_as_the_official_code_rounds_it() -> None:
    # D = 10, T = 3, f = 0.8: int(8.0) = 8 leaves 2 directions for 3 tasks; iso.py gives each round(2/3) = 1 and
    # shrinks the common subspace to 7.
    group = full_rank_group(10, 12, (4, 4, 4), (1.0, 1.0, 1.0), seed=9)
    assert_close(run("iso_cts", group), iso_cts_reference(taus(group)), tol=1e-4)


def test_core_space_cores_reconstruct_every_task_exactly() -> None:
    group = make_group(9)
    U_B, V_A = core_bases(*stacked(group))
    for f in group.factors:
        core = (U_B.T @ (f.scale * f.B)) @ (f.A @ V_A)
        assert_close(U_B @ core @ V_A.T, f.delta())


@pytest.mark.parametrize("name", ["dare_linear", "magnitude_prune"])
def test_linear_special_cases_are_equal_in_core_and_full_space(name) -> None:
    # density 1 makes these methods task arithmetic, which core space reproduces exactly (zero alignment error)
    group = make_group(10)
    expected = sum(w * t for t, w in zip(taus(group), group.weights))
    assert_close(run(name, group, density=1.0, space="core", rank=13), expected)
    assert_close(run(name, group, density=1.0, space="full", rank=FULL), expected)


def test_core_space_ties_differs_from_full_space_and_is_measured() -> None:
    group = make_group(11)
    full = run("ties", group, rank=FULL)
    core = run("ties", group, space="core", rank=13)
    difference = float((core - full).norm() / full.norm())
    assert 0.05 < difference < 2.0  # a different method, not an approximation; docs/methods.md reports it


def test_large_modules_use_seeded_randomized_svd() -> None:
    g = torch.Generator().manual_seed(12)
    factors = [ModuleFactors(torch.randn(4, 1100, generator=g), torch.randn(1050, 4, generator=g), 1.0) for _ in range(2)]
    group = ModuleGroup("big", factors, [1.0, 1.0])
    spec = get_method("dare_linear")
    first = spec.fn(group, spec.resolve({"density": 1.0, "rank": 8}))
    again = spec.fn(group, spec.resolve({"density": 1.0, "rank": 8}))
    assert torch.equal(first.A, again.A)
    assert first.stats.retained_energy == pytest.approx(1.0, abs=1e-5)
    assert_close(first.B @ first.A, sum(f.delta() for f in factors), tol=1e-4)


@pytest.mark.parametrize(
    ("method", "given"),
    [
        ("ties", {"density": 0.0}),
        ("ties", {"density": 1.5}),
        ("dare_ties", {"seed": -1}),
        ("dare_ties", {"seed": 1.5}),
        ("ties", {"majority": "loudest"}),
        ("tsv", {"space": "full"}),
        ("knots", {"space": "core"}),
        ("linear", {"density": 0.5}),
    ],
)
def test_bad_parameters_are_refused(method, given) -> None:
    with pytest.raises(InvalidParameterError):
        get_method(method).resolve(given)


def test_lora_bias_is_refused_by_element_wise_methods() -> None:
    group = make_group(13)
    biased = ModuleGroup(group.name, [ModuleFactors(f.A, f.B, f.scale, torch.ones(M)) for f in group.factors], group.weights)
    with pytest.raises(UnsupportedAdapterError, match="lora_bias"):
        run("ties", biased)


def test_interference_diagnostics(make_llama_lora) -> None:
    import json

    from typer.testing import CliRunner

    from lora_fusion import load_adapter
    from lora_fusion.diagnostics import cosine, sign_conflicts, subspace_overlap
    from lora_fusion_cli.main import app

    first = make_llama_lora(seed=1)
    second = make_llama_lora(seed=2, target_modules=["q_proj"])
    a, b = load_adapter(first), load_adapter(second)
    name = "model.layers.0.self_attn.q_proj"
    x, y = a.factors(name), b.factors(name)
    dense_cos = float((x.delta() * y.delta()).sum() / (x.delta().norm() * y.delta().norm()))
    assert cosine(x, y) == pytest.approx(dense_cos, abs=1e-6)
    assert cosine(x, x) == pytest.approx(1.0) and subspace_overlap(x, x) == pytest.approx(1.0)
    negated = ModuleFactors(x.A, -x.B, x.scale)
    assert sign_conflicts([x, negated], 0.2) == 1.0 and sign_conflicts([x, x], 0.2) == 0.0
    result = CliRunner().invoke(app, ["inspect", str(first), str(second), "--interference", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["overall"]["modules"] == 2  # q_proj in both layers; v_proj only in the first
    assert report["modules"][name]["pairs"]["0-1"]["cosine"] == pytest.approx(dense_cos, abs=1e-6)
    assert 0.0 <= report["overall"]["sign_conflict"] <= 1.0
    assert "sign conflicts" in CliRunner().invoke(app, ["inspect", str(first), str(second), "--interference"]).stdout


def test_sign_conflicts_equal_a_dense_count_across_row_blocks() -> None:
    # Integer factors: exact products with many ties, over several row blocks (1200×1000: the sampled threshold).
    from lora_fusion.diagnostics import sign_conflicts

    generator = torch.Generator().manual_seed(5)
    factors = [ModuleFactors(torch.randint(-2, 3, (3, 1000), generator=generator).float(),
                             torch.randint(-2, 3, (1200, 3), generator=generator).float(), 1.0) for _ in range(3)]
    kept = torch.stack([top_k_reference(f.delta(), int(0.2 * 1200 * 1000)) for f in factors]).sign()
    union = int((kept != 0).any(0).sum())
    conflict = int(((kept > 0).any(0) & (kept < 0).any(0)).sum())
    assert 0 < conflict < union
    assert sign_conflicts(factors, 0.2) == conflict / union


def trimmed(task: torch.Tensor, density: float) -> torch.Tensor:
    """The streamed top-k trim of a dense tensor, as the merges apply it (one task, weight 1)."""
    return combine([DenseTask.of(task)], [Trim.of(DenseTask.of(task), density)], [1.0], majority=None)


def top_k_reference(task: torch.Tensor, keep: int) -> torch.Tensor:
    flat = task.reshape(-1)
    expected = torch.zeros_like(flat)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]  # ties: lower flat index first
    expected[order] = flat[order]
    return expected.reshape(task.shape)


@pytest.mark.parametrize("values", ["continuous", "heavy ties", "mostly zeros", "constant"])
def test_sampled_threshold_selects_exactly_the_top_k_of_large_tensors(values) -> None:
    generator = torch.Generator().manual_seed(0)
    task = torch.randn(1100, 1000, generator=generator)  # above the size where the sampled bracket is used
    if values == "heavy ties":
        task = task.round()  # a handful of distinct magnitudes: the k-th value is shared by ~10⁵ entries
    elif values == "mostly zeros":
        task = task * (torch.rand(task.shape, generator=generator) < 0.1)  # the 20% kept reach into the zeros
    elif values == "constant":
        task = torch.full_like(task, -0.5)
    keep = int(0.2 * task.numel())
    size = task.abs().reshape(-1)
    selection = TopMagnitude.of(DenseTask.of(task), keep)
    assert selection.threshold == torch.topk(size, keep).values[-1]
    assert torch.equal(trimmed(task.clone(), 0.2), top_k_reference(task, keep))


@pytest.mark.parametrize(
    ("shape", "rank", "density"),
    [((768, 768), 8, 0.425), ((5, 100000), 7, 0.03), ((5, 100000), 7, 0.64), ((300, 5000), 16, 30 / 1.5e6)],
)
def test_streamed_trim_selects_the_top_k_of_the_values_it_merges(shape, rank, density) -> None:
    # A BLAS may round a block of rows differently from the whole product in the last bit; the selection must be
    # exact for the blocks' values (these cases once kept k ± 1 or failed when the threshold came from `L @ R`).
    generator = torch.Generator().manual_seed(0)
    task = DenseTask.product(torch.randn(shape[0], rank, generator=generator) * 0.01,
                             torch.randn(rank, shape[1], generator=generator) * 0.01)
    values = combine([task], [None], [1.0], majority=None)
    keep = int(density * values.numel())
    got = combine([task], [Trim.of(task, density)], [1.0], majority=None)
    assert torch.equal(got, top_k_reference(values, keep))


@pytest.mark.parametrize(("shape", "density"), [((3, 10), 0.7), ((192, 320), 0.7), ((1100, 1000), 0.3)])
def test_trim_keeps_as_many_entries_as_peft(shape, density) -> None:
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    expected = merge_utils.magnitude_based_pruning(tensor, density)
    assert torch.equal(trimmed(tensor.clone(), density), expected)


def test_dense_task_refuses_a_tensor_it_could_not_change_in_place() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        DenseTask.of(torch.randn(40, 30).mT)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_streamed_trim_of_a_product_equals_the_whole_tensor_trim(scale) -> None:
    # Integer factors: the product has few distinct magnitudes, so the k-th is tied across many row blocks and
    # the tie rule (lower flat index first) must hold across them; the blocks must equal the whole product.
    generator = torch.Generator().manual_seed(1)
    left = torch.randint(-2, 3, (1200, 3), generator=generator).float()
    right = torch.randint(-2, 3, (3, 1000), generator=generator).float()
    task = DenseTask.product(scale * left, right)
    dense = scale * left @ right
    for density in (0.2, 0.55):
        trim = TopMagnitude.of(task, int(density * dense.numel()))
        assert trim.tie_cutoff is not None
        got = combine([task], [Trim(trim)], [1.0], majority=None)
        assert torch.equal(got, top_k_reference(dense, int(density * dense.numel())))


def test_full_space_stats_report_the_error_of_the_written_factors() -> None:
    # Above 1024 rows and columns the SVD is randomized; the written factors are the projection of the dense merge
    # on the kept basis, so ‖M − B·A‖ / ‖M‖ is exactly what the stats say, if ‖M‖ is computed accurately.
    from lora_fusion.methods import interference

    generator = torch.Generator().manual_seed(0)
    factors = [ModuleFactors(torch.randn(16, 1800, generator=generator), torch.randn(1600, 16, generator=generator), 0.5)
               for _ in range(3)]
    group = ModuleGroup("big", factors, [0.5, 0.3, 0.2])
    captured = {}
    original = interference.dense_svd

    def capture(dense, **kwargs):
        captured["merged"] = dense.double().clone()
        return original(dense, **kwargs)

    interference.dense_svd = capture
    try:
        result = get_method("ties").fn(group, get_method("ties").resolve({"rank": 16}))
    finally:
        interference.dense_svd = original
    merged = captured["merged"]
    actual = float((merged - result.B.double() @ result.A.double()).norm() / merged.norm())
    assert result.stats.relative_error == pytest.approx(actual, rel=5e-7), (result.stats.relative_error, actual)


@pytest.mark.parametrize("magnitude", [1.0, 1e20, 1e-22])
def test_randomized_svd_measures_the_whole_energy_at_any_scale(magnitude) -> None:
    # The energy behind retained_energy and relative_error: float32 row norms in the usual range, the float64
    # reduction where float32 squares would overflow or underflow.
    from lora_fusion.linalg import dense_svd

    dense = torch.randn(1100, 1030, generator=torch.Generator().manual_seed(2)) * magnitude
    svd = dense_svd(dense, components=4, generator=torch.Generator().manual_seed(0))
    exact = float(torch.linalg.vector_norm(dense.double())) ** 2
    assert svd.total_energy == pytest.approx(exact, rel=1e-6)
