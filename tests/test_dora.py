"""DoRA sources given the base weights (issue 15 §3): each module's update diag(μ/‖W₀ + sBA‖)(W₀ + sBA) − W₀ is
formed and merged as any update, checked against PEFT's own DoRA (its merge_and_unload weights and its forward)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lora_fusion import load_adapter, merge
from lora_fusion.dora import dora_factors
from lora_fusion.errors import InvalidParameterError, UnsupportedAdapterError
from lora_fusion.linalg import exact_svd
from tests.test_cli import assert_user_error, invoke

MODULES = ("q_proj", "v_proj")


def dora_adapter(load_llama, folder: Path, *, seed: int, r: int = 4) -> Path:
    """A real PEFT DoRA adapter of the tiny Llama with random factors and magnitudes away from ‖W₀‖ (so every part
    of the update matters)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_llama(), LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, init_lora_weights=False,
                                                    target_modules=list(MODULES)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * torch.rand_like(parameter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def doras(load_llama, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("dora")
    return [dora_adapter(load_llama, root / "d1", seed=1), dora_adapter(load_llama, root / "d2", seed=2, r=2)]


def peft_updates(load_llama, folder: Path) -> dict[str, torch.Tensor]:
    """ΔW of every adapted module as PEFT's merge_and_unload gives it: merged weight minus base weight."""
    from peft import PeftModel

    base = load_llama()
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(load_llama(), str(folder)).merge_and_unload()
    return {name.removesuffix(".weight"): p.detach() - before[name] for name, p in merged.named_parameters()
            if name.endswith(("q_proj.weight", "v_proj.weight"))}


def test_the_update_of_each_dora_module_is_peft_s(load_llama, llama_dir, doras) -> None:
    # at full rank the svd merge of one source is its update itself
    merged = merge(doras[:1], method="svd", rank=64, base_model=llama_dir)
    expected = peft_updates(load_llama, doras[0])
    assert set(merged.modules) == set(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(merged.delta(name), delta, rtol=0, atol=2e-6 * float(delta.abs().max()) + 1e-7)


def test_a_merged_dora_gives_peft_s_dora_forward(load_llama, llama_dir, doras, tmp_path) -> None:
    from peft import PeftModel

    out = merge(doras[:1], method="svd", rank=64, base_model=llama_dir).save_pretrained(tmp_path / "plain")
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dora_logits = PeftModel.from_pretrained(load_llama(), str(doras[0])).eval()(tokens).logits
        plain_logits = PeftModel.from_pretrained(load_llama(), str(out)).eval()(tokens).logits
    assert float((plain_logits - dora_logits).norm() / dora_logits.norm()) < 1e-5


def test_svd_merges_dora_and_lora_updates_as_any_update(load_llama, llama_dir, doras, make_llama_lora) -> None:
    plain = make_llama_lora(seed=5, r=4, lora_alpha=8)
    merged = merge([doras[0], doras[1], plain], method="svd", weights=[0.5, 0.3, 0.7], rank=6, base_model=llama_dir)
    updates = [peft_updates(load_llama, doras[0]), peft_updates(load_llama, doras[1])]
    lora = load_adapter(plain)
    for name, stats in merged.stats.items():
        exact = 0.5 * updates[0][name] + 0.3 * updates[1][name] + 0.7 * lora.delta(name)
        S = exact_svd(exact).S
        assert stats.rank == 6
        assert stats.retained_energy == pytest.approx(float((S[:6] ** 2).sum() / (S**2).sum()), abs=1e-6)
        residual = torch.linalg.matrix_norm(exact - merged.delta(name)) ** 2
        assert float(residual) == pytest.approx(float((S[6:] ** 2).sum()), rel=1e-3)  # Eckart–Young optimum


def test_an_exact_sum_with_a_dora_source_is_limited_to_the_trained_ranks(load_llama, llama_dir, doras) -> None:
    merged = merge(doras, method="linear", base_model=llama_dir)
    updates = [peft_updates(load_llama, d) for d in doras]
    for name, stats in merged.stats.items():
        exact = updates[0][name] + updates[1][name]
        S = exact_svd(exact).S
        assert stats.rank == 4 + 2 and merged.modules[name].rank == 6
        assert stats.retained_energy == pytest.approx(float((S[:6] ** 2).sum() / (S**2).sum()), abs=1e-6)
        assert stats.retained_energy < 1  # a DoRA update is full-rank: the stats say what the sum kept


def test_element_wise_methods_take_dora_updates(llama_dir, doras, monkeypatch) -> None:
    merged = merge(doras, method="ties", density=0.5, rank=8, base_model=llama_dir)
    assert {stats.rank for stats in merged.stats.values()} == {8}
    # The dense update is taken as given, not multiplied by the identity: the same bits (a product with I is exact),
    # without the m·m·n multiply-adds.
    import dataclasses

    from lora_fusion import engine
    from lora_fusion.methods import elementwise

    given = dataclasses.replace
    products = []
    product = elementwise.DenseTask.product.__func__
    monkeypatch.setattr(elementwise.DenseTask, "product",
                        classmethod(lambda cls, left, right: products.append(left.shape) or product(cls, left, right)))
    again = merge(doras, method="ties", density=0.5, rank=8, base_model=llama_dir)
    assert not products  # every source is DoRA: no task was formed as a product
    monkeypatch.setattr(engine, "dora_factors", lambda base, f: given(dora_factors(base, f), update=None))
    through_identity = merge(doras, method="ties", density=0.5, rank=8, base_model=llama_dir)
    assert products  # now each is the product of the identity and ΔW
    for name in merged.modules:
        assert torch.equal(again.delta(name), merged.delta(name))
        assert torch.equal(through_identity.delta(name), merged.delta(name))


def test_dora_without_the_base_model_is_refused_naming_the_module(doras, tmp_path) -> None:
    with pytest.raises(UnsupportedAdapterError, match=r"module model\.layers\.0\.self_attn\.q_proj is DoRA.*--base-model"):
        merge(doras, method="svd")
    result = invoke("merge", *doras, "--method", "svd", "--out", tmp_path / "out")
    assert_user_error(result, "is DoRA, whose update depends on the base weights")
    assert not (tmp_path / "out").exists()


def test_base_weights_nothing_reads_are_still_refused(llama_dir, make_llama_lora) -> None:
    with pytest.raises(InvalidParameterError, match="svd reads no base weights and no source is DoRA"):
        merge([make_llama_lora(seed=1)], method="svd", base_model=llama_dir)


def test_a_dora_source_cannot_be_converted_without_its_base(doras, tmp_path) -> None:
    result = invoke("convert", doras[0], "--to", "peft", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "DoRA" in result.stderr
    assert not (tmp_path / "x").exists()


def test_dora_on_a_convolution_matches_peft(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3)
            self.proj = torch.nn.Linear(8, 5)

    torch.manual_seed(0)
    base = Net()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "model.safetensors"))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=2, use_dora=True, init_lora_weights=False,
                                            target_modules=["conv", "proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.2)
    model.save_pretrained(tmp_path / "dora")
    merged = merge([tmp_path / "dora"], method="svd", rank=27, base_model=tmp_path / "model.safetensors")
    weights = model.merge_and_unload().state_dict()
    for module in ("conv", "proj"):
        expected = (weights[f"{module}.weight"] - before[f"{module}.weight"]).reshape(merged.modules[module].shape)
        torch.testing.assert_close(merged.delta(module), expected, rtol=0, atol=1e-5)


def test_bake_forms_dora_updates_from_its_base(load_llama, llama_dir, doras, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_fusion import bake

    out = bake(llama_dir, doras[:1], method="svd", rank=64, out=tmp_path / "baked")  # full rank: the update itself
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_llama(), str(doras[0])).merge_and_unload()(tokens).logits
        baked = AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
    assert float((baked - expected).norm() / expected.norm()) < 1e-5
