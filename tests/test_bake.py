"""`lora-fusion bake`: merged adapters added into a tiny Llama saved in several shards, checked against PEFT's
`merge_and_unload` and hand-built references, with transformers loading the result; bad inputs end in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_fusion import bake, merge
from lora_fusion.errors import IncompatibleAdaptersError
from test_cli import assert_user_error, invoke
from test_hub import files_of
from test_reliability import hidden_leftovers, snapshot

SHARD = "60KB"  # the tiny Llama (≈ 0.5 MB in float32) in 8 shards
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0, 3, 64]])


def tiny_llama(folder: Path, *, tied: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=tied)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder, max_shard_size=SHARD)
    return folder


def peft_lora(base: Path, folder: Path, *, seed: int, targets: list[str], r: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, target_modules=targets, r=r,
                                                  lora_alpha=2 * r))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(folder, save_embedding_layers=False)
    return folder


def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(IDS).logits


def peft_merged_logits(base: Path, lora: Path) -> torch.Tensor:
    """PEFT's reference: the base with one LoRA, `merge_and_unload()`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora)
    with torch.no_grad():
        return model.merge_and_unload().eval()(IDS).logits


def peft_deltas(base: Path, lora: Path) -> dict[str, torch.Tensor]:
    """Each LoRA module's ΔW as PEFT computes it (`get_delta_weight`), in the base weight's layout, float32."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora)
    return {
        name.removeprefix("base_model.model.") + ".weight": module.get_delta_weight("default").float()
        for name, module in model.named_modules() if isinstance(module, LoraLayer)
    }


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def model_logits(base: Path, state: dict[str, torch.Tensor], **config_changes: object) -> torch.Tensor:
    """Logits of the base model's architecture with the weights `state` set by hand."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        return model(IDS).logits


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((got - want).norm() / want.norm()) <= rel


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """An untied and a tied tiny Llama in 8 shards, a bfloat16 copy, and PEFT LoRAs of them."""
    root = tmp_path_factory.mktemp("bake")
    paths = {
        "untied": tiny_llama(root / "untied", tied=False),
        "tied": tiny_llama(root / "tied", tied=True, seed=1),
        "bf16": tiny_llama(root / "bf16", tied=False, dtype=torch.bfloat16),
    }
    paths["qv1"] = peft_lora(paths["untied"], root / "qv1", seed=1, targets=["q_proj", "v_proj"])
    paths["qv2"] = peft_lora(paths["untied"], root / "qv2", seed=2, targets=["q_proj", "v_proj"], r=8)
    paths["embed"] = peft_lora(paths["tied"], root / "embed", seed=3, targets=["embed_tokens", "q_proj"])
    paths["head"] = peft_lora(paths["tied"], root / "head", seed=4, targets=["lm_head"])
    paths["bf16_lora"] = peft_lora(paths["bf16"], root / "bf16_lora", seed=5, targets=["q_proj", "v_proj"])
    return paths


def test_one_source_equals_peft_merge_and_unload(models, tmp_path) -> None:
    base, lora, out = models["untied"], models["qv1"], tmp_path / "baked"
    result = invoke("bake", base, lora, "--out", out)
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards  # same layout
    assert close(logits(out), peft_merged_logits(base, lora))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = state_of(out)
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert (out / "config.json").read_bytes() and (out / "generation_config.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "Model baked with lora-fusion" in card and "qv1" in card and str(tmp_path) not in card
    with safe_open(str(out / shards[0]), "pt") as file:
        metadata = file.metadata()
    assert metadata["format"] == "pt" and json.loads(metadata["lora_fusion"])["method"] == "linear"
    unchanged = [k for k in written if "q_proj" not in k and "v_proj" not in k]
    original = state_of(base)
    assert all(torch.equal(written[k], original[k]) for k in unchanged)


def test_two_sources_equal_the_weighted_sum_of_peft_updates(models, tmp_path) -> None:
    base, (a, b) = models["untied"], (models["qv1"], models["qv2"])
    out = bake(base, [a, b], out=tmp_path / "linear", weights=[0.7, -0.3])
    state = state_of(base)
    for weight, lora in ((0.7, a), (-0.3, b)):
        for key, delta in peft_deltas(base, lora).items():
            state[key] = state[key] + weight * delta
    assert close(logits(out), model_logits(base, state))


def test_svd_bake_equals_peft_merge_of_the_svd_merged_adapter(models, tmp_path) -> None:
    base, sources = models["untied"], [models["qv1"], models["qv2"]]
    out = bake(base, sources, out=tmp_path / "svd", method="svd", rank=6, weights=[0.6, 0.4])
    adapter = merge(sources, method="svd", rank=6, weights=[0.6, 0.4]).save_pretrained(tmp_path / "svd-adapter")
    assert close(logits(out), peft_merged_logits(base, adapter))


def test_bfloat16_update_is_added_in_float32_and_rounded_once(models, tmp_path) -> None:
    base, lora = models["bf16"], models["bf16_lora"]
    out = bake(base, [lora], out=tmp_path / "bf16")
    original, written = state_of(base), state_of(out)
    deltas = peft_deltas(base, lora)
    assert deltas and all(t.dtype == torch.bfloat16 for t in written.values())
    for key, delta in deltas.items():
        assert torch.equal(written[key], (original[key].float() + delta).to(torch.bfloat16)), key
        # rounding ΔW to bfloat16 first, then the sum, rounds twice: differs somewhere
        assert not torch.equal(written[key], original[key] + delta.to(torch.bfloat16)), key
    wide = bake(base, [lora], out=tmp_path / "f32", dtype="float32")
    widened = state_of(wide)
    assert all(t.dtype == torch.float32 for t in widened.values())
    assert all(torch.equal(widened[k], original[k].float() + d) for k, d in deltas.items())
    assert json.loads((wide / "config.json").read_text())["dtype" if "dtype" in json.loads(
        (base / "config.json").read_text()) else "torch_dtype"] == "float32"


@pytest.mark.parametrize("lora, changed", [("embed", "model.embed_tokens"), ("head", "lm_head")])
def test_tied_embeddings_are_refused_or_untied_explicitly(models, tmp_path, lora, changed) -> None:
    base, source = models["tied"], models[lora]
    assert "lm_head.weight" not in state_of(base)  # a tied checkpoint stores the shared weight once
    out = tmp_path / "tied"
    assert_user_error(invoke("bake", base, source, "--out", out), changed, "--untie-embeddings")
    assert not out.exists()
    result = invoke("bake", base, source, "--out", out, "--untie-embeddings")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    written, state = state_of(out), state_of(base)
    shared = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = shared.clone()
    for key, delta in peft_deltas(base, source).items():
        state[key] = state[key] + delta
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(written)
    untouched = "lm_head.weight" if lora == "embed" else "model.embed_tokens.weight"
    assert torch.equal(written[untouched], shared)  # the other one keeps the original shared weight
    assert close(logits(out), model_logits(base, state, tie_word_embeddings=False))


def test_hub_base_is_downloaded_shard_by_shard(models, hub, tmp_path) -> None:
    base, lora = models["untied"], models["qv1"]
    commit = hub.add_repo("org/tiny-base", {**files_of(base), "modeling_evil.py": b"raise SystemExit"})
    out = bake("org/tiny-base", [lora], out=tmp_path / "from-hub", revision="main")
    local = bake(base, [lora], out=tmp_path / "from-disk")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local.iterdir())  # no .py copied
    assert all(torch.equal(t, state_of(local)[k]) for k, t in state_of(out).items())
    assert commit in (out / "README.md").read_text()


def test_dry_run_prints_shards_and_bytes_and_writes_nothing(models, tmp_path) -> None:
    out = tmp_path / "planned"
    result = invoke("bake", models["untied"], models["qv1"], "--out", out, "--dry-run", "--json", "--dtype",
                    "bfloat16")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert not out.exists()
    real = bake(models["untied"], [models["qv1"]], out=out, dtype="bfloat16")
    sizes = {shard.name: sum(t.numel() * t.element_size() for t in load_file(shard).values())
             for shard in real.glob("*.safetensors")}
    assert {s["name"]: s["bytes"] for s in plan["shards"]} == sizes
    assert sum(len(s["modules"]) for s in plan["shards"]) == plan["merge"]["modules"] == 4


def test_overwrite_rules_for_model_folders(models, tmp_path) -> None:
    base, lora = models["untied"], models["qv1"]
    out = bake(base, [lora], out=tmp_path / "baked")
    assert_user_error(invoke("bake", base, lora, "--out", out), "already exists", "--overwrite")
    assert invoke("bake", base, models["qv2"], "--out", out, "--overwrite").exit_code == 0  # ours: replaced
    (out / "notes.txt").write_text("mine")
    assert_user_error(invoke("bake", base, lora, "--out", out, "--overwrite"), "notes.txt")
    copy = shutil.copytree(base, tmp_path / "someone-elses-model")  # a model folder lora-fusion did not write
    assert_user_error(invoke("bake", base, lora, "--out", copy, "--overwrite"), "did not write")
    assert_user_error(invoke("bake", base, lora, "--out", base, "--overwrite"), "input")
    assert snapshot(copy) == snapshot(base)


def bad_base(tmp_path: Path, base: Path, change) -> Path:
    """A copy of `base` as one model.safetensors, with `change(state)` applied."""
    folder = tmp_path / "bad-base"
    folder.mkdir(parents=True)
    shutil.copy(base / "config.json", folder / "config.json")
    state = state_of(base)
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_bad_bases_are_one_line_errors_and_write_nothing(models, tmp_path) -> None:
    base, lora, out = models["untied"], models["qv1"], tmp_path / "never"
    q0 = "model.layers.0.self_attn.q_proj"

    def nan(state):
        state[f"{q0}.weight"][3, 4] = float("nan")

    def reshaped(state):
        state[f"{q0}.weight"] = state[f"{q0}.weight"][:, :32].clone()

    def gone(state):
        del state[f"{q0}.weight"]

    cases = [(bad_base(tmp_path / "nan", base, nan), ["NaN", q0]),
             (bad_base(tmp_path / "shape", base, reshaped), [q0, "shape [64, 32]"]),
             (bad_base(tmp_path / "gone", base, gone), [q0, "no weight"])]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    cases.append((pickled, ["pytorch_model.bin", "safetensors"]))
    missing = shutil.copytree(base, tmp_path / "missing")
    next(missing.glob("model-00002-*.safetensors")).unlink()
    cases.append((missing, ["model-00002-", "missing"]))
    outside = shutil.copytree(base, tmp_path / "outside")
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    index["weight_map"][f"{q0}.weight"] = "../elsewhere.safetensors"
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    cases.append((outside, ["outside the model folder"]))
    for bad, fragments in cases:
        assert_user_error(invoke("bake", bad, lora, "--out", out), *fragments)
        assert not out.exists() and hidden_leftovers(tmp_path) == []


def test_an_adapter_of_another_shape_is_refused_naming_the_module(models, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "narrow"

    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(other, max_shard_size=SHARD)
    lora = peft_lora(other, tmp_path / "narrow-lora", seed=6, targets=["q_proj"])
    with pytest.raises(IncompatibleAdaptersError, match="model.layers.0.self_attn.q_proj"):
        bake(models["untied"], [lora], out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_full_disk_mid_bake_leaves_the_old_output_intact(models, tmp_path, monkeypatch) -> None:
    import errno
    import os

    from lora_fusion import writer

    base, out = models["untied"], tmp_path / "baked"
    bake(base, [models["qv1"]], out=out)
    before = snapshot(out)
    real_write, calls = writer._write_tensor, []

    def full_disk(file, tensor):
        calls.append(file.name)
        if len(set(calls)) == 3:  # in the third shard: two are already in the staging folder
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(file, tensor)

    monkeypatch.setattr(writer, "_write_tensor", full_disk)
    result = invoke("bake", base, models["qv2"], "--out", out, "--overwrite")
    assert_user_error(result, "No space left on device", "nothing was written")
    assert len(set(calls)) == 3 and snapshot(out) == before
    assert hidden_leftovers(tmp_path) == []


def test_dequantize_nf4_uses_bitsandbytes_or_is_refused(models, tmp_path) -> None:
    base, lora, out = models["untied"], models["qv1"], tmp_path / "nf4"
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except Exception:  # not installed (the `qlora` extra), or no backend here: refused, saying so
        assert_user_error(invoke("bake", base, lora, "--out", out, "--dequantize", "nf4"), "bitsandbytes",
                          "lora-fusion[qlora]")
        assert not out.exists()
        return
    written, original = state_of(bake(base, [lora], out=out, dequantize="nf4")), state_of(base)
    for key, delta in peft_deltas(base, lora).items():
        packed, state = quantize_4bit(original[key], blocksize=64, quant_type="nf4", compress_statistics=False)
        assert torch.equal(written[key], dequantize_4bit(packed, state).float() + delta), key
        assert not torch.equal(written[key], original[key] + delta)
    assert_user_error(invoke("bake", base, lora, "--out", out, "--dequantize", "int3"), "nf4")


def test_bake_help_imports_no_heavy_modules() -> None:
    probe = (
        "import sys; from lora_fusion_cli.main import main; code = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'huggingface_hub') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", probe, "bake", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--untie-embeddings" in done.stdout and "--rank" in done.stdout and "--push-to-hub" not in done.stdout


def test_bake_takes_merges_declared_options_less_those_of_adapter_outputs() -> None:
    import re

    from lora_fusion_cli.bake import BAKE_SKIPPED

    def options(command: str) -> set[str]:
        text = invoke(command, "--help").stdout.split("Options:", 1)[1]
        return {name.replace("-", "_") for name in re.findall(r"^\s+(?:-\w, )?--([a-z][a-z-]*)", text, re.M)}

    merge_only = {"recipe", "report"}  # a bake has no recipe key for its base, and no adapter report
    bake_only = {"revision", "untie_embeddings", "dequantize"}
    assert options("bake") == (options("merge") - BAKE_SKIPPED - merge_only) | bake_only


@pytest.mark.parametrize(("kind", "fan_in_fan_out", "stored"), [
    ("linear", False, (300, 70)), ("linear", True, (70, 300)), ("embedding", False, (70, 300)),
    ("conv", False, (300, 7, 3, 3)),
])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_the_blocked_update_is_bit_for_bit_the_dense_one_in_every_orientation(
    monkeypatch, kind, fan_in_fan_out, stored, scale
) -> None:
    from types import SimpleNamespace

    from lora_fusion import baking
    from lora_fusion.adapter import ModuleFactors

    monkeypatch.setattr(baking, "ROW_BLOCK_BYTES", 4 * 64 * 70)  # several blocks, the last one short
    generator = torch.Generator().manual_seed(0)
    m, n = (300, 70) if kind != "conv" else (300, 63)
    factors = ModuleFactors(A=torch.randn(5, n, generator=generator), B=torch.randn(m, 5, generator=generator),
                            scale=scale)
    merged = SimpleNamespace(factors=lambda name: factors)
    original = torch.randn(stored, generator=generator).to(torch.bfloat16)
    delta = scale * (factors.B @ factors.A)
    if kind == "embedding" or fan_in_fan_out:
        delta = delta.T
    expected = (original.float() + delta.reshape(stored)).to(torch.bfloat16)
    written = baking._updated(original, merged, SimpleNamespace(kind=kind, name="m.x"), "weight", fan_in_fan_out,
                              None, torch.bfloat16)
    assert written.shape == original.shape and torch.equal(written.view(torch.int16), expected.view(torch.int16))
