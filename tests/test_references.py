"""Independent references for what a merge writes (issue 20 §2): PEFT running the input adapters, transcriptions of
the papers' procedures written here from the papers and their official code (never by calling the library's own
algorithm), and the written factors checked against what the README promises."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from lora_fusion import load_adapter, merge
from lora_fusion.adapter import ModuleFactors
from lora_fusion.errors import OutputWriteError
from lora_fusion.methods import ModuleGroup, get_method
from lora_fusion.methods.interference import seeded
from tests.test_adapters import close, logits, peft_model
from tests.test_interference import breadcrumbs_reference
from tests.test_properties import write_lora

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 24), "model.layers.0.self_attn.v_proj": (16, 24),
          "model.layers.1.self_attn.q_proj": (32, 24)}


def peft_weighted(base: torch.nn.Module, adapters: Sequence[Path], weights: Sequence[float]) -> torch.nn.Module:
    """PEFT running every adapter at once (it sums their outputs), each LoRA layer's own scale, as PEFT resolved it
    from r, lora_alpha, use_rslora, rank_pattern and alpha_pattern, multiplied by the adapter's weight."""
    from peft.tuners.lora import LoraLayer

    model = peft_model(base, *adapters)
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert layers
    for layer in layers:
        for i, weight in enumerate(weights):
            if f"a{i}" in layer.scaling:
                layer.scaling[f"a{i}"] *= weight
    return model


# ------------------------------------------------------------------------- rslora with rank and alpha patterns

RSLORA_PATTERNS = [
    {"r": 8, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"layers.1.self_attn.q_proj": 2, "v_proj": 5},
     "alpha_pattern": {"layers.0.self_attn.q_proj": 3, "v_proj": 40}},
    {"r": 4, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {"layers.0.self_attn.v_proj": 7},
     "alpha_pattern": {"q_proj": 11}, "target_modules": ["q_proj", "v_proj", "o_proj"]},
]


def test_rslora_with_rank_and_alpha_patterns_merges_as_peft_runs_the_inputs(make_llama_lora, load_llama, tmp_path):
    # One adapter combining rslora, rank_pattern and alpha_pattern (each module its own r and alpha, s = alpha/√r),
    # merged exactly; the expected forward is PEFT's own, with its own scales, not a formula of this library.
    sources = [make_llama_lora(seed=i + 1, **config) for i, config in enumerate(RSLORA_PATTERNS)]
    weights = [0.7, -1.3]
    out = merge(sources, method="linear", weights=weights).save_pretrained(tmp_path / "merged")
    expected = logits(peft_weighted(load_llama(), sources, weights))
    assert not close(expected, logits(load_llama()), 1e-2)  # the adapters do change the output
    assert close(logits(peft_model(load_llama(), out)), expected)
    single = merge(sources[:1], method="linear").save_pretrained(tmp_path / "single")  # weight 1, one adapter
    assert close(logits(peft_model(load_llama(), single)), logits(peft_model(load_llama(), sources[0])))


# ------------------------------------------------------------------------------ saving a loaded adapter


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 0.5},
        {"r": 8, "lora_alpha": 3, "use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 5}},
        {"r": 4, "lora_alpha": 12, "lora_bias": True, "target_modules": ["q_proj", "o_proj"]},
        {"r": 4, "lora_alpha": 2, "target_modules": ["q_proj", "embed_tokens", "down_proj"]},
    ],
    ids=["alpha", "small_alpha", "rslora_patterns", "lora_bias", "embedding"],
)
def test_a_loaded_adapter_with_scale_not_one_saves_to_the_same_forward(config, make_llama_lora, load_llama, tmp_path):
    # load → save_pretrained (no merge, as convert): the factors are kept and each module's scale is recorded in the
    # config as alpha = scale·rank (alpha_pattern, no rslora), which PEFT turns back into the scale.
    source = make_llama_lora(**config)
    adapter = load_adapter(source)
    assert any(spec.scale != 1.0 for spec in adapter.modules.values())
    out = adapter.save_pretrained(tmp_path / "saved")
    written = json.loads((out / "adapter_config.json").read_text())
    assert not written["use_rslora"]
    assert written["lora_alpha"] != written["r"] or written["alpha_pattern"]  # the scales are in the config
    assert close(logits(peft_model(load_llama(), out)), logits(peft_model(load_llama(), source)))


# --------------------------------------------------------------------------------- Core Space, transcribed
#
# Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025,
# arXiv:2509.17786; official code apanariello4/core-space-merging, task_merger.py
# (MatrixPerLayerMerger.get_core_matrices and merge; docs: METHODS.md c.10):
#   A_stack = [A₁; …; A_T], B_stack = [B₁ | … | B_T] of the tasks' own factors (no merge weight in them);
#   U_B = left singular vectors of B_stack, V_A = right singular vectors of A_stack (thin SVDs, float64);
#   Mᵢ = U_Bᵀ·Bᵢ·Aᵢ·V_A (the "optimized version" of the code's per-factor SVD alignment);
#   M = F(M₁, …, M_T) with the element-wise merge F run on the k×k cores; ΔW = λ·U_B·M·V_Aᵀ.
# Project conventions (METHODS.md c.10, c.0): each adapter's scale sᵢ is folded into Bᵢ before stacking; the user
# weights wᵢ enter only inside F, in PEFT's order (trim/drop, elect signs on the unweighted cores, then weight).
# F is PEFT's merge_utils (ties, magnitude_prune, task_arithmetic, disjoint_merge); DARE masks are one uniform draw
# per core entry in flat order from the adapter's seeded generator, as the full-space DARE test draws them.

M, N = 24, 36
NAME = "model.layers.0.mlp.up_proj"


def core_group(seed: int, *, paper: bool) -> ModuleGroup:
    """Three tasks of ranks 4, 6, 3 (k = 13); `paper`: scales and weights 1 (the paper's setting), else not."""
    g = torch.Generator().manual_seed(seed)
    factors = [
        ModuleFactors(torch.randn(r, N, generator=g), torch.randn(M, r, generator=g),
                      scale=1.0 if paper else 0.5 + 0.25 * i)
        for i, r in enumerate((4, 6, 3))
    ]
    return ModuleGroup(NAME, factors, [1.0, 1.0, 1.0] if paper else [1.0, 0.6, -0.8])


def core_space_reference(group: ModuleGroup, merge_cores: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
                         scale: float) -> torch.Tensor:
    B_stack = torch.cat([f.scale * f.B.double() for f in group.factors], dim=1)
    A_stack = torch.cat([f.A.double() for f in group.factors], dim=0)
    U_B = torch.linalg.svd(B_stack, full_matrices=False)[0]
    V_A = torch.linalg.svd(A_stack, full_matrices=False)[2].T
    cores = [(U_B.T @ (f.scale * f.B.double()) @ f.A.double() @ V_A).float() for f in group.factors]
    merged = merge_cores(cores, torch.tensor(group.weights))
    return (scale * U_B @ merged.double() @ V_A.T).float()


def dare_masks(cores: list[torch.Tensor], density: float, seed: int, name: str) -> list[torch.Tensor]:
    return [c.masked_fill(torch.rand(c.shape, generator=seeded(seed, name, i)) >= density, 0.0) / density
            for i, c in enumerate(cores)]


def consensus(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stack = torch.stack(tensors)
    agree = merge_utils.calculate_majority_sign_mask(stack, "total")
    return merge_utils.disjoint_merge(stack * weights.view(-1, 1, 1), agree)


CORE_METHODS = {
    "ties": ({"density": 0.2}, lambda cores, w: merge_utils.ties(cores, w, 0.2, "total")),
    "magnitude_prune": ({"density": 0.3}, lambda cores, w: merge_utils.magnitude_prune(cores, w, 0.3)),
    "dare_linear": ({"density": 0.5, "seed": 3},
                    lambda cores, w: merge_utils.task_arithmetic(dare_masks(cores, 0.5, 3, NAME), w)),
    "dare_ties": ({"density": 0.4, "seed": 3}, lambda cores, w: consensus(dare_masks(cores, 0.4, 3, NAME), w)),
    "breadcrumbs": ({"density": 0.7, "gamma": 0.05},
                    lambda cores, w: merge_utils.task_arithmetic([breadcrumbs_reference(c, 0.7, 0.05) for c in cores],
                                                                 w)),
}


@pytest.mark.parametrize("paper", [True, False], ids=["paper_setting", "scales_and_weights"])
@pytest.mark.parametrize("method", sorted(CORE_METHODS))
def test_core_space_merge_equals_the_papers_procedure(method, paper) -> None:
    group = core_group(20 + sorted(CORE_METHODS).index(method), paper=paper)
    given, merge_cores = CORE_METHODS[method]
    scale = 1.0 if paper else 0.7
    spec = get_method(method)
    params = spec.resolve({**given, "space": "core", "rank": 13, **({} if paper else {"scale": scale})})
    result = spec.fn(group, params)
    got = (result.B.double() @ result.A.double()).float()
    expected = core_space_reference(group, merge_cores, scale)
    full = spec.fn(group, spec.resolve({**given, "space": "full", "rank": 24}))
    # the core-space merge is a different merge from the full-space one (so comparing with it means something)
    assert float(((full.B @ full.A) - expected).norm() / expected.norm()) > 0.05
    error = float((got - expected).norm() / expected.norm())
    assert error < 1e-4, error


# ------------------------------------------------------------------------------------ the --overwrite swap


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_error", "ctrl_c"])
def test_overwrite_restores_the_previous_output_when_the_final_rename_fails(failure, tmp_path, monkeypatch):
    sources = tmp_path / "sources"
    first = load_adapter(write_lora(sources / "a", SHAPES, r=4, alpha=8, seed=1))
    second = load_adapter(write_lora(sources / "b", SHAPES, r=4, alpha=8, seed=2))
    parent = tmp_path / "outputs"
    out = first.save_pretrained(parent / "out")
    before = snapshot(out)
    real, attempted = os.replace, []

    def replace(src, dst):
        if Path(dst) == out and Path(src).name.endswith(".incomplete"):  # the staged adapter moving into place
            attempted.append(src)
            raise failure
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputWriteError if isinstance(failure, OSError) else KeyboardInterrupt):
        second.save_pretrained(out, overwrite=True)
    monkeypatch.undo()
    assert attempted, "the final rename was never tried"
    assert snapshot(out) == before  # the previous output, byte for byte
    assert sorted(p.name for p in parent.iterdir()) == ["out"]  # neither the moved-aside copy nor the stage is left
    second.save_pretrained(out, overwrite=True)  # and the next try succeeds
    assert snapshot(out) != before


# ------------------------------------------------------------------------ merges that nearly cancel


def scaled_copy(source: Path, folder: Path, factor: float) -> Path:
    """The adapter at `source` with every lora_B multiplied by `factor` (same A, same config)."""
    folder.mkdir(parents=True)
    tensors = load_file(str(source / "adapter_model.safetensors"))
    save_file({k: v * factor if ".lora_B." in k else v for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    return folder


@pytest.mark.parametrize("magnitude", [1.0, 1e-6])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "svd"])
def test_a_merge_that_nearly_cancels_keeps_its_one_percent_residue(method, magnitude, tmp_path):
    # A and 0.99·A with weights 1 and −1: ΔW = 0.01·ΔW_A, not zero, at any magnitude (a zero-merge threshold must be
    # relative to the inputs, and far below 1 %).
    first = scaled_copy(write_lora(tmp_path / "raw", SHAPES, r=4, alpha=8, seed=3), tmp_path / "a", magnitude)
    second = scaled_copy(first, tmp_path / "b", 0.99)
    out = merge([first, second], method=method, weights=[1.0, -1.0]).save_pretrained(tmp_path / "out")
    written, source = load_adapter(out), load_adapter(first)
    for name in SHAPES:
        expected = 0.01 * source.delta(name).double()
        got = written.delta(name).double()
        assert float((got - expected).norm() / expected.norm()) < 1e-3, name


# -------------------------------------------------------------------------------------- the √σ split


def test_svd_output_splits_sigma_evenly_between_b_and_a(tmp_path):
    # README: "Outputs fold every scale into the factors (lora_alpha = r, s = 1) and split √σ evenly between B and A":
    # B' = U·√Σ and A' = √Σ·Vᵀ, so B'ᵀB' = A'A'ᵀ = diag(σ) and B'A' is the best rank-R approximation.
    sources = [write_lora(tmp_path / f"s{i}", SHAPES, r=4 + 2 * i, alpha=8 + i, use_rslora=i == 1, seed=i)
               for i in range(2)]
    weights, rank = [0.6, -0.4], 5
    out = merge(sources, method="svd", weights=weights, rank=rank).save_pretrained(tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == rank and not config["use_rslora"] and not config["alpha_pattern"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for name in SHAPES:
        dense = sum(w * load_adapter(s).delta(name).double() for s, w in zip(sources, weights))
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        A = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        assert B.shape[1] == A.shape[0] == rank
        sigma = torch.diag(S[:rank])
        tolerance = 1e-5 * float(S[0])
        assert float((B.T @ B - sigma).abs().max()) < tolerance, name
        assert float((A @ A.T - sigma).abs().max()) < tolerance, name
        best = U[:, :rank] @ sigma @ Vh[:rank]
        assert float((B @ A - best).norm() / best.norm()) < 1e-5, name
