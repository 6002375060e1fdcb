"""Properties of whole merges through the public API, over random adapters written to disk as PEFT files.

tests/test_exact.py checks the exact methods on in-memory factor groups; here the same laws must survive the file
round trip: ranks 1–64, alphas, rslora, rank patterns, different module subsets per adapter, float32/bfloat16/float16
files, and the writer's folding of every scale into the factors.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_fusion import LoraAdapter, load_adapter, merge

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (out, in) of each module of a toy two-layer model; module subsets are drawn from these names.
NAMES = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj", "o_proj")]


def write_lora(
    folder: Path,
    shapes: Mapping[str, tuple[int, int]],
    *,
    r: int,
    alpha: float,
    dtype: str = "float32",
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    seed: int = 0,
    base_model: str | None = "toy/base",
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter (PEFT's key layout and config fields) with random factors; return `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (m, n) in shapes.items():
        rank = (rank_pattern or {}).get(name, r)
        a = torch.randn(rank, n, generator=g) / math.sqrt(n)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(DTYPES[dtype])
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m, rank, generator=g).to(DTYPES[dtype])
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "rank_pattern": {k.replace(".", "\\."): v for k, v in (rank_pattern or {}).items()},
        "target_modules": sorted({name.rsplit(".", 1)[1] for name in shapes}),
        "bias": "none",
        **(extra or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@dataclass(frozen=True)
class Spec:
    """One random adapter: its modules (a subset of NAMES), rank, alpha, rslora, per-module rank, file dtype."""

    modules: tuple[str, ...]
    r: int
    alpha: float
    use_rslora: bool
    pattern: tuple[tuple[str, int], ...]
    dtype: str
    seed: int


def specs(max_adapters: int = 3) -> st.SearchStrategy[tuple[dict[str, tuple[int, int]], list[Spec]]]:
    """Module shapes shared by all adapters, and 1..max_adapters adapters over subsets of those modules."""
    dims = st.integers(1, 72)
    shapes = st.fixed_dictionaries({name: st.tuples(dims, dims) for name in NAMES})
    one = st.builds(
        Spec,
        modules=st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True).map(tuple),
        r=st.integers(1, 64),
        alpha=st.sampled_from([1, 4, 8, 16, 32, 3, 0.5, 12.5]),
        use_rslora=st.booleans(),
        pattern=st.lists(st.tuples(st.sampled_from(NAMES), st.integers(1, 64)), max_size=2).map(tuple),
        dtype=st.sampled_from(sorted(DTYPES)),
        seed=st.integers(0, 2**16),
    )
    return st.tuples(shapes, st.lists(one, min_size=1, max_size=max_adapters))


def materialise(root: Path, shapes: Mapping[str, tuple[int, int]], adapters: Sequence[Spec]) -> list[Path]:
    paths = []
    for i, spec in enumerate(adapters):
        pattern = {name: rank for name, rank in spec.pattern if name in spec.modules}
        paths.append(
            write_lora(
                root / f"a{i}",
                {name: shapes[name] for name in spec.modules},
                r=spec.r,
                alpha=spec.alpha,
                dtype=spec.dtype,
                use_rslora=spec.use_rslora,
                rank_pattern=pattern,
                seed=spec.seed,
            )
        )
    return paths


def weighted_sum(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·ΔWᵢ per module in float64, from each adapter's own `delta` (alpha, rslora and patterns resolved)."""
    total: dict[str, torch.Tensor] = {}
    for adapter, w in zip(adapters, weights):
        for name in adapter.modules:
            total[name] = total.get(name, 0) + w * adapter.delta(name).double()
    return total


def magnitudes(adapters: list, weights: list[float]) -> dict[str, float]:
    """Σ |wᵢ|·‖ΔWᵢ‖ per module: the scale of float32 rounding in a weighted sum, which cancellation
    (w = [1, −0.999] on near-equal updates) does not shrink, unlike ‖Σ wᵢΔWᵢ‖."""
    total: dict[str, float] = {}
    for adapter, w in zip(adapters, weights):
        for name in adapter.modules:
            total[name] = total.get(name, 0.0) + abs(w) * float(adapter.delta(name).double().norm())
    return total


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))


weights_st = st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 0.05)
# derandomize: CI runs the same examples every time (a new failure is found by raising max_examples locally)
FAST = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(specs(max_adapters=1))
def test_one_adapter_with_weight_one_round_trips(case) -> None:
    shapes, (spec,) = case
    with tempfile.TemporaryDirectory() as tmp:
        (source,) = materialise(Path(tmp), shapes, [spec])
        original = load_adapter(source)
        out = merge([source], method="linear").save_pretrained(Path(tmp) / "out")
        reloaded = load_adapter(out)
        assert set(reloaded.modules) == set(original.modules)
        for name, module in original.modules.items():
            assert reloaded.modules[name].dtype == module.dtype and reloaded.modules[name].rank == module.rank
            got, expected = reloaded.delta(name), original.delta(name)
            f = original.factors(name)
            info = torch.finfo(module.dtype)
            scaled = module.scale * f.B.float()
            normal = bool((scaled[scaled != 0].abs() >= info.smallest_normal).all())
            if math.log2(module.scale).is_integer() and normal:
                # a power-of-two scale folded into B is exact in every dtype while s·B stays out of the subnormal
                # range: the update is bit-identical
                assert torch.equal(got, expected), name
            else:
                # otherwise each entry of s·B is rounded once to the file dtype: relative error ≤ eps/2, or an
                # absolute smallest_normal·eps/2 for subnormals, so entry-wise |ΔW' − ΔW| ≤ (eps/2 + float32 matmul
                # rounding)·s·|B|·|A| + smallest_normal·eps/2·Σ|A|, however much the rank sum cancels
                eps = info.eps / 2 + module.rank * torch.finfo(torch.float32).eps
                bound = eps * abs(f.scale) * (f.B.float().abs() @ f.A.float().abs())
                bound += info.smallest_normal * info.eps / 2 * f.A.float().abs().sum(0, keepdim=True)
                assert bool(((got - expected).abs() <= bound * 1.01 + 1e-30).all()), name


@FAST
@given(specs(), st.data())
def test_linear_equals_the_weighted_sum_and_svd_at_full_rank_equals_linear(case, data) -> None:
    shapes, adapters = case
    weights = data.draw(st.lists(weights_st, min_size=len(adapters), max_size=len(adapters)))
    with tempfile.TemporaryDirectory() as tmp:
        paths = materialise(Path(tmp), shapes, adapters)
        loaded = [load_adapter(p) for p in paths]
        expected, scale = weighted_sum(loaded, weights), magnitudes(loaded, weights)
        linear = load_adapter(merge(paths, method="linear", weights=weights, dtype="float32").save_pretrained(Path(tmp) / "lin"))
        full = 64 * len(adapters)  # at least Σ rᵢ of every module; svd caps the rank at what exists
        svd = merge(paths, method="svd", weights=weights, rank=full, dtype="float32")
        assert set(linear.modules) == set(expected) == set(svd.modules)
        for name, dense in expected.items():
            assert float((linear.delta(name).double() - dense).norm()) <= 1e-5 * scale[name], name
            assert float((svd.delta(name).double() - linear.delta(name).double()).norm()) <= 1e-5 * scale[name], name


@FAST
@given(specs(), st.integers(1, 24), st.data())
def test_svd_at_rank_r_has_the_optimal_error(case, rank, data) -> None:
    shapes, adapters = case
    weights = data.draw(st.lists(weights_st, min_size=len(adapters), max_size=len(adapters)))
    with tempfile.TemporaryDirectory() as tmp:
        paths = materialise(Path(tmp), shapes, adapters)
        expected = weighted_sum([load_adapter(p) for p in paths], weights)
        merged = merge(paths, method="svd", weights=weights, rank=rank, dtype="float32")
        for name, dense in expected.items():
            singular = torch.linalg.svdvals(dense)
            optimal = float(singular[rank:].pow(2).sum().sqrt())  # Eckart–Young: the tail singular values
            error = float((merged.delta(name).double() - dense).norm())
            assert abs(error - optimal) <= 1e-4 * float(dense.norm()), name
            assert merged.stats[name].relative_error == pytest.approx(optimal / float(dense.norm()), abs=1e-4)


# Methods whose result must not depend on the order of the sources (with the weights permuted alike), in full and
# core space. The DARE family is not in the list: each source's random mask is drawn from (seed, module, position),
# so permuting the sources draws other masks, an equally valid sample (measured: 0.9-1.1 relative difference).
SYMMETRIC = [
    ("linear", {}),
    ("task_arithmetic", {"scale": 0.7}),
    ("svd", {"rank": 6}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "space": "core"}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune", {"density": 0.4, "space": "core"}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05, "space": "core"}),
    ("knots", {}),
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
]


@pytest.mark.parametrize(("method", "options"), SYMMETRIC, ids=[f"{m}-{o.get('space', 'default')}" for m, o in SYMMETRIC])
def test_symmetric_methods_do_not_depend_on_the_order_of_the_sources(method, options, tmp_path) -> None:
    shapes = {name: (24 + 4 * i, 20 + 3 * i) for i, name in enumerate(NAMES[:3])}
    paths = [
        write_lora(tmp_path / f"a{i}", shapes, r=r, alpha=alpha, use_rslora=i == 1, seed=i)
        for i, (r, alpha) in enumerate([(4, 8), (6, 3), (2, 2)])
    ]
    weights = [0.7, -0.4, 1.3]
    forward = merge(paths, method=method, weights=weights, dtype="float32", **options)
    order = [2, 0, 1]
    backward = merge([paths[i] for i in order], method=method, weights=[weights[i] for i in order], dtype="float32", **options)
    for name in forward.modules:
        assert rel(backward.delta(name), forward.delta(name)) < 1e-4, name


@FAST
@given(specs(), st.data())
def test_save_then_load_is_identical(case, data) -> None:
    shapes, adapters = case
    weights = data.draw(st.lists(weights_st, min_size=len(adapters), max_size=len(adapters)))
    with tempfile.TemporaryDirectory() as tmp:
        paths = materialise(Path(tmp), shapes, adapters)
        merged = merge(paths, method="svd", weights=weights, rank=data.draw(st.integers(1, 16)))
        first = merged.save_pretrained(Path(tmp) / "first")
        loaded = load_adapter(first)
        assert loaded.modules.keys() == merged.modules.keys()
        for name, spec in merged.modules.items():
            got, want = loaded.factors(name), merged.factors(name)
            assert loaded.modules[name].dtype == spec.dtype and got.scale == want.scale == 1.0
            assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B), name
        # writing what was loaded gives the same tensors and config again
        second = loaded.save_pretrained(Path(tmp) / "second")
        a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (first / "adapter_config.json").read_text() == (second / "adapter_config.json").read_text()
