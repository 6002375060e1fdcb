"""Issue 12 §1: on CI a test may skip only for a missing GPU (the policy lives in tests/conftest.py)."""

from __future__ import annotations

import types

import pytest

from tests.conftest import _fail_disallowed_skip


def skipped_report(reason: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(skipped=True, outcome="skipped", longrepr=("test_x.py", 3, f"Skipped: {reason}"))


@pytest.mark.parametrize("strict", ["1", "true"])
def test_a_skip_for_missing_data_fails_on_ci(strict, monkeypatch) -> None:
    monkeypatch.setenv("LORA_FUSION_STRICT_SKIPS", strict)
    report = skipped_report("WordNet not installed")
    _fail_disallowed_skip(report)
    assert report.outcome == "failed" and "other than a missing GPU" in report.longrepr


@pytest.mark.parametrize("reason", ["no GPU", "CUDA is not available", "needs 2 GPUs"])
def test_a_skip_for_a_missing_gpu_stays_a_skip(reason, monkeypatch) -> None:
    monkeypatch.setenv("LORA_FUSION_STRICT_SKIPS", "1")
    report = skipped_report(reason)
    _fail_disallowed_skip(report)
    assert report.outcome == "skipped"


def test_outside_ci_any_skip_stays_a_skip(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("LORA_FUSION_STRICT_SKIPS", "0")
    report = skipped_report("WordNet not installed")
    _fail_disallowed_skip(report)
    assert report.outcome == "skipped"
