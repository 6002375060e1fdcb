"""Fast tests that kill mutants which survived `make mutation` in lora_fusion/linalg.py and lora_fusion/hub.py
(docs/testing.md; the survivor table with the reason for each one kept is recorded there).

Each test checks behaviour a caller sees (a value, a shape, an error and its message), with expected values from an
outside reference (a float64 torch computation, or by hand). The Hub tests use the local fake Hub of tests/conftest.py
and tests/hub_server.py (the `hub` fixture), never the network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_fusion import linalg
from lora_fusion.errors import InvalidParameterError, SourceNotFoundError
from lora_fusion.hub import check_push_repo_id, commit_of, push_folder
from lora_fusion.linalg import exact_svd, factored_svd, randomized_svd, truncate


def with_spectrum(values: list[float], m: int = 150, seed: int = 0) -> torch.Tensor:
    """A dense m×n update (n = len(values)) whose singular values are `values`, with random singular vectors."""
    n = len(values)
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, n, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    return (U * torch.tensor(values, dtype=torch.float32)) @ V.mT


def squared_norm(dense: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(dense.double()) ** 2)


# ============================================================================================== linalg
# --------------------------------------------------------------------------------------------- total energy


def test_an_exact_svd_reports_the_updates_squared_frobenius_norm() -> None:
    dense = with_spectrum([3.0, 2.0, 1.0, 0.5], m=7)
    assert exact_svd(dense).total_energy == pytest.approx(9 + 4 + 1 + 0.25, rel=1e-6)
    assert exact_svd(dense).total_energy == pytest.approx(squared_norm(dense), rel=1e-6)


def test_a_factored_svd_reports_the_products_squared_frobenius_norm() -> None:
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(12, 3, generator=g), torch.randn(3, 10, generator=g)  # k = 3 < min(m, n): the QR route
    assert factored_svd(B, A).total_energy == pytest.approx(squared_norm(B.double() @ A.double()), rel=1e-5)


# --------------------------------------------------------------------------------------------- more components than computed


def low_rank(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)


@pytest.mark.parametrize(
    ("build", "rank", "shape"),
    [
        (lambda: (exact_svd(low_rank(6, 3, 3)), low_rank(6, 3, 3)), 5, (6, 3)),
        (lambda: (exact_svd(low_rank(3, 6, 3)), low_rank(3, 6, 3)), 5, (3, 6)),
        # rank-4 LoRAs of 6×3 and 3×6 modules: k ≥ min(m, n), the dense route
        (lambda: (factored_svd(torch.ones(6, 4) + torch.eye(6, 4), torch.eye(4, 3) - 0.5),
                  (torch.ones(6, 4) + torch.eye(6, 4)) @ (torch.eye(4, 3) - 0.5)), 4, (6, 3)),
        (lambda: (factored_svd(torch.eye(3, 4) + 0.25, torch.ones(4, 6) + torch.eye(4, 6)),
                  (torch.eye(3, 4) + 0.25) @ (torch.ones(4, 6) + torch.eye(4, 6))), 4, (3, 6)),
        # a 4-wide sketch of a rank-4 10×8 update: 4 components computed, 6 asked for
        (lambda: (randomized_svd(low_rank(10, 8, 4), width=4, generator=torch.Generator().manual_seed(0),
                                 total=squared_norm(low_rank(10, 8, 4))), low_rank(10, 8, 4)), 6, (10, 8)),
    ],
    ids=["exact-tall", "exact-wide", "factored-dense-tall", "factored-dense-wide", "randomized"],
)
def test_truncating_to_more_components_than_the_svd_has_gives_all_of_them(build, rank, shape) -> None:
    svd, dense = build()
    computed = svd.S.numel()
    B, A = truncate(svd, rank)
    assert B.shape == (shape[0], computed) and A.shape == (computed, shape[1])
    assert torch.allclose(B @ A, dense, atol=1e-4)  # the whole update (of rank ≤ computed)


# --------------------------------------------------------------------------------------------- dense_svd's sketch


def test_a_target_reached_within_the_first_half_of_the_first_sketch_keeps_that_sketch() -> None:
    dense = with_spectrum([1.0] * 10 + [1e-3] * 38, m=60)  # 60×48; energy 0.99 needs exactly 10 components
    found = linalg.dense_svd(dense, components=1, generator=torch.Generator().manual_seed(0),
                             rule=linalg.RankRule(energy=0.99), svd="randomized")
    assert found.S.numel() == 4 * 1 + linalg.OVERSAMPLING  # 24 computed: 10 lies within its first 12
    assert linalg.energy_rank(found.S, 0.99, found.total_energy) == 10


def test_a_whole_width_sketch_is_trusted_without_an_exact_svd(monkeypatch) -> None:
    calls = []
    exact = linalg.exact_svd
    monkeypatch.setattr(linalg, "exact_svd", lambda dense: calls.append(dense) or exact(dense))
    dense = with_spectrum([1.0] * 30 + [1e-3] * 18, m=60)  # 60×48; energy 0.999 needs 30: past half of each sketch
    found = linalg.dense_svd(dense, components=1, generator=torch.Generator().manual_seed(0), 
                             rule=linalg.RankRule(energy=0.999), svd="randomized")
    assert found.S.numel() == 48 and calls == []  # a 24-wide sketch, then the whole 48: it spans ΔW, exact already
    assert linalg.energy_rank(found.S, 0.999, found.total_energy) == 30


def test_a_target_the_capped_sketch_misses_is_reached_by_the_exact_svd_without_repeating_a_width(monkeypatch) -> None:
    monkeypatch.setattr(linalg, "EXACT_SVD_LIMIT", 99)  # 100×100 takes the auto sketch, capped at 100 / 4 = 25
    widths = []
    randomized = linalg.randomized_svd

    def each_width_once(dense, *, width, **kwargs):
        if width in widths:  # the same sketch again can never reach more: it would go on for ever
            raise AssertionError(f"width {width} sketched twice: {widths}")
        widths.append(width)
        return randomized(dense, width=width, **kwargs)

    monkeypatch.setattr(linalg, "randomized_svd", each_width_once)
    dense = with_spectrum([0.9**j for j in range(100)], m=100)  # energy 0.9999 needs 44 components, past the cap
    found = linalg.dense_svd(dense, components=1, generator=torch.Generator().manual_seed(0),
                             rule=linalg.RankRule(energy=0.9999))
    assert torch.equal(found.S, linalg.exact_svd(dense).S)


def test_the_randomized_svd_is_unaffected_by_torchs_default_dtype() -> None:
    dense = with_spectrum([0.9**j for j in range(40)], m=50)
    expected = linalg.dense_svd(dense, components=4, generator=torch.Generator().manual_seed(0), svd="randomized")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as some scientific code does
    try:
        found = linalg.dense_svd(dense, components=4, generator=torch.Generator().manual_seed(0), svd="randomized")
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(found.S, expected.S)  # the same Gaussian draws: the seed alone decides the result


# ============================================================================================== hub
# --------------------------------------------------------------------------------------------- check_push_repo_id


@pytest.mark.parametrize(
    ("repo_id", "problem"),
    [
        ("bare", "it has no owner; write owner/name (your user or organisation name, then the repo name)"),
        ("me/.hidden", "owner and name may hold only letters, digits, '-', '_' and '.', not starting or ending with "
                       "'-' or '.'"),
        ("me/x--y", "it may not contain '--' or '..' or end with '.git'"),
    ],
)
def test_a_refused_push_repo_id_says_what_is_wrong_with_it(repo_id, problem) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        check_push_repo_id(repo_id)
    assert str(caught.value) == f"invalid Hub repo id {repo_id!r}: expected owner/name ({problem}), e.g. me/math-code."


# --------------------------------------------------------------------------------------------- commit_of


def test_commit_of_reads_the_folder_after_snapshots_and_nothing_from_the_snapshots_folder_itself() -> None:
    cache = Path("/cache/models--me--a")
    assert commit_of(cache / "snapshots" / "abc123" / "adapters" / "adapter_config.json") == "abc123"
    assert commit_of(cache / "snapshots") is None
    assert commit_of(Path("/data/adapter_config.json")) is None


# --------------------------------------------------------------------------------------------- push_folder


def test_a_push_to_a_branch_the_hub_does_not_have_names_that_branch(hub, tmp_path, monkeypatch) -> None:
    from huggingface_hub import HfApi

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    hub.add_repo("me/x", {"README.md": b"main"})
    monkeypatch.setattr(HfApi, "create_branch", lambda self, *args, **kwargs: None)  # the branch never appears
    with pytest.raises(SourceNotFoundError, match=r"^me/x: revision 'dev' not found"):
        push_folder(folder, "me/x", revision="dev")
