"""benchmarks/gpu_check.py (issue 19 §1): its CPU half runs here, its GPU half is rehearsed with the CPU standing in,
and the verdicts it prints are checked on results made to fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402

CASES = ("svd", "ties_full", "ties_core", "dare_ties", "knots", "tsv", "rapf", "ties_with_dora")


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--scale", "tiny", "--workdir",
                           str(tmp_path), *args], capture_output=True, text=True, env=env, timeout=300)
    return done, json.loads(done.stdout)


def test_the_cpu_half_runs_says_no_gpu_and_exits_0(tmp_path: Path) -> None:
    done, figures = run_check(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    if torch.cuda.is_available():  # then the whole check runs, GPU half included
        assert figures["gpus"] >= 1 and "no GPU" not in done.stderr
        return
    assert "no GPU" in done.stderr and figures["device"] == "no GPU" and figures["ok"] and not figures["failures"]
    parts = figures["parts"]
    for name in gpu_check.GPU_ONLY_PARTS:
        assert parts[name] == {"skipped": "no GPU"}
    for case in CASES:  # the CPU references, timed, beside the plan's estimate
        merged = parts["merges"][case]
        assert merged["cpu_s"] > 0 and merged["plan_one_module_bytes"] > 0 and "device_vs_cpu" not in merged
    assert parts["bake_extract"]["extract_cpu_relative_error_max"] < 1e-4  # a rank-8 bake, extracted at rank 8
    bf16 = parts["training"]["against_float32"]["bf16"]
    assert bf16["rapf"]["within_tolerance"] and bf16["rapf"]["finite"]
    assert 0 < bf16["rapf"]["weight_relative_distance"] <= gpu_check.TRAINING_TOLERANCES["rapf_weight"]
    assert bf16["fvae"]["within_tolerance"] and bf16["fvae"]["finite"]
    assert 0 < bf16["fvae"]["meta_loss_relative_difference"]  # bf16 did change the arithmetic
    assert set(parts["training"]["runs"]) == {"no", "bf16"}  # fp16 needs a GPU (its GradScaler)


def test_the_gpu_half_rehearsed_on_the_cpu_compares_every_path(tmp_path: Path) -> None:
    partial = tmp_path / "partial.json"
    done, figures = run_check(tmp_path, "--rehearse", "--parts", "merges,bake_extract,sharded",
                              "--partial", str(partial))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(partial.read_text())["parts"] == figures["parts"]  # written after the last part too
    if torch.cuda.is_available():
        return  # the GPU itself ran (test above); --rehearse changes nothing there
    assert figures["device"] == "cpu (rehearsal)" and figures["ok"]
    parts = figures["parts"]
    for case in CASES:
        compared = parts["merges"][case]["device_vs_cpu"]
        assert compared["within_tolerance"] and compared["relative"] <= compared["tolerance"]
    others = parts["merges"]["other_methods_tiny"]  # every other per-module method, and rapf without W₀
    from lora_fusion.methods import list_methods

    expected = {s.name for s in list_methods() if s.kind == "module"} - {"svd", "ties", "dare_ties", "knots", "tsv",
                                                                         "rapf"}
    assert set(others) == expected | {"rapf_adapter_only"}
    assert all(entry["device_vs_cpu"]["within_tolerance"] for entry in others.values())
    assert parts["bake_extract"]["bake_device_vs_cpu"]["unchanged_tensors_identical"]
    assert parts["bake_extract"]["bake_device_vs_cpu"]["changed_tensors"] == 14  # 7 projections × 2 layers
    assert parts["bake_extract"]["extract_device_vs_cpu"]["within_tolerance"]
    assert parts["sharded"]["identical"] and "adapter_model.safetensors" in parts["sharded"]["files"]


def test_distance_and_the_verdicts_it_feeds() -> None:
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(64, 4, generator=generator), torch.randn(4, 32, generator=generator)
    reference = {"m": (B, A), "n": (B, A)}
    other = {"m": (B * 1.01, A), "n": (B, A)}
    measured = gpu_check.distance(reference, other, ["m", "n"])
    assert measured["worst_module"] == pytest.approx(0.01, rel=1e-6)
    assert measured["relative"] == pytest.approx(0.01 / 2**0.5, rel=1e-6)  # one of two equal modules off
    assert gpu_check.judged(measured, 1e-2, "x")["within_tolerance"]
    assert not gpu_check.judged(measured, 1e-3, "x")["within_tolerance"]


def test_failed_checks_names_each_failure_and_not_a_missed_speed_target() -> None:
    results = {
        "merges": {"svd": {"device_vs_cpu": {"within_tolerance": False}}, "tsv": {"device_vs_cpu": {
            "within_tolerance": True}}},
        "sharded": {"identical": False},
        "training": {"against_float32": {"fp16": {"rapf": {"finite": False, "within_tolerance": True}}}},
        "svd_7b": {"target_within_1_2x_floor": False},  # a target is reported as measured, not a failure
        "bake_extract": {"error": "RuntimeError: boom"},
    }
    assert sorted(gpu_check.failed_checks(results)) == [
        "bake_extract", "merges.svd.device_vs_cpu.within_tolerance", "sharded.identical",
        "training.against_float32.fp16.rapf.finite",
    ]
