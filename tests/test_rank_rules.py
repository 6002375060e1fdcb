"""The rank rules (issue 15 §4): rank, energy, sv_fro, sv_ratio, sv_cumulative, max_rank and --rank-pattern, each on
a known spectrum, against kohya sd-scripts' definitions, through dense SVDs, merges, the CLI and PEFT's loader."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_fusion import load_adapter, merge
from lora_fusion.errors import InvalidParameterError
from lora_fusion.linalg import RankRule, choose_rank, dense_svd, exact_svd
from tests.test_cli import assert_user_error, invoke
from tests.test_reliability import lora

# Σσ² = 130.25, Σσ = 18.5
KNOWN = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (RankRule(rank=3), 3),
        (RankRule(rank=9), 5),  # at most what is there
        (RankRule(), 4),  # the method's default
        (RankRule(energy=0.9), 2),  # 125 / 130.25 = 0.960 ≥ 0.9 > 100 / 130.25
        (RankRule(energy=0.97), 3),  # 129 / 130.25 = 0.990
        (RankRule(sv_fro=0.95), 2),  # ‖ΔW_2‖_F / ‖ΔW‖_F = √0.960 = 0.980 ≥ 0.95
        (RankRule(sv_fro=0.99), 3),  # √0.990 = 0.995; √0.960 falls short
        (RankRule(sv_ratio=4), 2),  # σ > 2.5
        (RankRule(sv_ratio=5), 2),  # σ > 2: the 2 itself is not kept
        (RankRule(sv_ratio=10), 3),  # σ > 1
        (RankRule(sv_ratio=1), 1),  # σ > σ₁ keeps none: at least 1
        (RankRule(sv_cumulative=0.8), 2),  # Σσ: 15 / 18.5 = 0.81
        (RankRule(sv_cumulative=0.9), 3),  # 17 / 18.5 = 0.92
        (RankRule(energy=0.999, max_rank=3), 3),  # the cap wins
        (RankRule(rank=2, max_rank=3), 2),
        (RankRule(max_rank=2), 2),  # the default, capped
    ],
)
def test_each_rule_on_a_known_spectrum(rule: RankRule, expected: int) -> None:
    assert choose_rank(KNOWN, rule, default=4) == expected


def kohya_index(S: torch.Tensor, method: str, target: float) -> int:
    """kohya sd-scripts networks/resize_lora.py's definitions, written from their documentation, without the final
    clamp to len(S) − 1 (the cases below never reach it)."""
    if method == "sv_ratio":
        return max(1, int((S > S[0] / target).sum()))
    if method == "sv_cumulative":
        shares = torch.cumsum(S, 0) / S.sum()
        return int(torch.searchsorted(shares, target)) + 1
    shares = torch.cumsum(S**2, 0) / (S**2).sum()
    return int(torch.searchsorted(shares, target**2)) + 1  # sv_fro


@pytest.mark.parametrize("method", ["sv_fro", "sv_ratio", "sv_cumulative"])
@pytest.mark.parametrize("seed", range(5))
def test_the_kohya_rules_agree_with_kohyas_definitions_on_random_spectra(method: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    S = torch.sort(torch.rand(40, generator=generator, dtype=torch.float64) ** 3, descending=True).values
    target = {"sv_fro": 0.9, "sv_ratio": 8.0, "sv_cumulative": 0.7}[method]
    assert choose_rank(S, RankRule(**{method: target}), default=1) == kohya_index(S, method, target)


def test_a_partial_spectrum_does_not_settle_the_rules_that_need_its_tail() -> None:
    head = KNOWN[:2]  # the first two of five, with ‖ΔW‖_F² known
    total = float((KNOWN**2).sum())
    assert RankRule(sv_ratio=10).resolve(head, default=1, total=total) is None  # σ₃ = 2 > 1 may still come
    assert RankRule(sv_ratio=4).resolve(head, default=1, total=total) is None  # both kept: is σ₃ above 2.5?
    assert RankRule(sv_ratio=1.5).resolve(head, default=1, total=total) == 1  # σ₂ = 5 ≤ 10/1.5: settled
    assert RankRule(sv_cumulative=0.1).resolve(head, default=1, total=total) is None  # Σσ unknown
    assert RankRule(energy=0.99).resolve(head, default=1, total=total) is None
    assert RankRule(energy=0.7).resolve(head, default=1, total=total) == 1
    assert RankRule(rank=2).resolve(head, default=1, total=total) == 2


def with_spectrum(values: list[float], m: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = len(values)
    U = torch.linalg.qr(torch.randn(m, n, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64)).Q
    return (U * torch.tensor(values, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize(
    "rule", [RankRule(sv_ratio=20), RankRule(sv_fro=0.99), RankRule(sv_cumulative=0.8), RankRule(energy=0.95)]
)
def test_a_randomized_svd_reaches_the_rank_the_exact_spectrum_gives(rule: RankRule) -> None:
    dense = with_spectrum([0.85**j for j in range(64)], m=80).float()
    exact = exact_svd(dense)
    found = dense_svd(dense, components=2, generator=torch.Generator().manual_seed(0), rule=rule, svd="randomized")
    expected = choose_rank(exact.S, rule, default=2)
    assert choose_rank(found.S, rule, default=2, total=found.total_energy) == expected
    if rule.needs_whole_spectrum:
        assert found.S.numel() == 64  # decomposed exactly: Σσ needs every singular value


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank-rules")
    return [lora(root / "a", seed=1, r=6), lora(root / "b", seed=2, r=6)]


def exact_spectrum(sources, module: str) -> torch.Tensor:
    adapters = [load_adapter(s) for s in sources]
    return torch.linalg.svdvals(sum(a.delta(module) for a in adapters).double())


@pytest.mark.parametrize("method", ["svd", "ties"])
@pytest.mark.parametrize(
    "rule", [{"sv_fro": 0.9}, {"sv_ratio": 3.0}, {"sv_cumulative": 0.75}, {"energy": 0.9, "max_rank": 3}]
)
def test_merges_keep_the_rank_each_rule_gives(pair, method: str, rule: dict) -> None:
    merged = merge(pair, method=method, **({"density": 1.0} if method == "ties" else {}), **rule)
    for module, stats in merged.stats.items():
        S = exact_spectrum(pair, module) if method == "svd" else None
        if S is not None:  # svd: the sum's own spectrum; ties at density 1 with no sign conflict is not the sum
            assert stats.rank == choose_rank(S, RankRule(**rule), default=6)
        if "max_rank" in rule:
            assert stats.rank <= 3
        assert merged.modules[module].rank == stats.rank
        assert math.isclose(stats.relative_error, math.sqrt(max(0.0, 1 - stats.retained_energy)), abs_tol=1e-9)


def test_one_source_resize_with_a_rule(pair) -> None:
    resized = merge(pair[:1], method="svd", sv_ratio=2.0)
    S = exact_spectrum(pair[:1], "model.layers.0.self_attn.q_proj")
    assert resized.stats["model.layers.0.self_attn.q_proj"].rank == int((S > S[0] / 2).sum())


def test_two_rank_rules_at_once_are_refused(pair) -> None:
    with pytest.raises(InvalidParameterError, match="one rank rule, not energy and sv_fro"):
        merge(pair, method="svd", energy=0.9, sv_fro=0.9)
    with pytest.raises(InvalidParameterError, match="sv_ratio"):
        merge(pair, method="svd", sv_ratio=0.5)  # below 1 nothing would pass


def test_rank_pattern_on_the_cli_sets_per_module_ranks_that_peft_loads(pair, tmp_path) -> None:
    out = tmp_path / "out"
    result = invoke("merge", *pair, "--method", "svd", "--energy", "0.999", "--rank-pattern", r"layers\.1\..*v_proj=2",
                    "--rank-pattern", "v_proj=3", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {name: module.rank for name, module in load_adapter(out).modules.items()}
    assert ranks["model.layers.1.self_attn.v_proj"] == 2 and ranks["model.layers.0.self_attn.v_proj"] == 3
    energy_ranks = {m: choose_rank(exact_spectrum(pair, m), RankRule(energy=0.999), default=6)
                    for m in ranks if m.endswith("q_proj")}
    assert {m: ranks[m] for m in energy_ranks} == energy_ranks
    assert config["rank_pattern"]  # per-module ranks are written as PEFT's rank_pattern
    loaded = peft_ranks(out)
    assert loaded == ranks


def peft_ranks(folder) -> dict[str, int]:
    """The rank PEFT gives each module when it injects `folder`'s config into a model with the test adapters' module names."""
    from peft import LoraConfig, inject_adapter_in_model

    def block() -> torch.nn.Module:
        attention = torch.nn.Module()
        attention.q_proj, attention.v_proj = torch.nn.Linear(24, 32), torch.nn.Linear(24, 32)
        layer = torch.nn.Module()
        layer.self_attn = attention
        return layer

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([block(), block()])
    inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), model)
    return {name.removesuffix(".lora_A.default"): module.weight.shape[0]
            for name, module in model.named_modules() if name.endswith("lora_A.default")}


def test_rank_pattern_before_a_scalar_rank(pair, tmp_path) -> None:
    out = tmp_path / "out"
    assert invoke("merge", *pair, "--method", "svd", "--rank", "5", "--rank-pattern", "q_proj=1", "--out", out,
                  "--quiet").exit_code == 0
    ranks = {name.rsplit(".", 1)[1]: module.rank for name, module in load_adapter(out).modules.items()}
    assert ranks == {"q_proj": 1, "v_proj": 5}


@pytest.mark.parametrize("item", ["q_proj", "q_proj=0", "q_proj=two", "=3"])
def test_a_malformed_rank_pattern_is_a_user_error(pair, tmp_path, item: str) -> None:
    result = invoke("merge", *pair, "--method", "svd", "--rank-pattern", item, "--out", tmp_path / "out")
    assert_user_error(result, "--rank-pattern")
    assert not (tmp_path / "out").exists()


def test_each_rule_is_a_cli_option(pair, tmp_path) -> None:
    out = tmp_path / "out"
    result = invoke("merge", *pair, "--method", "svd", "--sv-cumulative", "0.6", "--max-rank", "2", "--out", out,
                    "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert max(json.loads(result.stdout)["ranks"]) <= 2
