"""`extract` / `lora-fusion extract`: a LoRA from a full fine-tune, loaded by PEFT (issue 15 §2, §5, §7).

Tiny Llamas (hidden 64, 2 layers, vocabulary 128) built here and saved in at least 3 shards, tied and untied; a
"fine-tuned" copy with every 2-D weight perturbed (the norms stay the base's unless a test changes them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_fusion import extract
from lora_fusion.errors import (
    IncompatibleAdaptersError,
    InvalidParameterError,
    NonFiniteError,
    UnsupportedAdapterError,
)
from lora_fusion.linalg import RankRule, choose_rank
from tests.test_cli import assert_user_error, invoke
from tests.test_hub import files_of

SHARD = "60KB"  # the tiny Llama (~0.4 MB in float32) in 5-7 shards


def build(*, tie: bool, vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def fine_tune(model, *, seed: int = 1, keep: tuple[str, ...] = (), size: float = 0.02):
    """Every 2-D weight plus a random update with a decaying spectrum (as fine-tunes have; its decay differs per
    module), except the weights named in `keep`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim != 2 or any(k in name for k in keep):
                continue
            m, n = weight.shape
            k = min(m, n)
            U = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q
            V = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q
            decay = 0.6 + 0.35 * float(torch.rand(1, generator=generator))  # spectra differ between modules
            S = size * math.sqrt(m * n) * decay ** torch.arange(k, dtype=torch.float32)
            weight.add_((U * S) @ V.T / math.sqrt(k))
    return model


def save(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size=SHARD)
    return path


def load(path: Path, *, vocab: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


def logits(model, vocab: int = 128) -> torch.Tensor:
    tokens = torch.arange(24).reshape(2, 12) * 5 % vocab
    with torch.no_grad():
        return model(tokens).logits


def peft_logits(base_dir: Path, adapter_dir: Path, *, vocab: int | None = None) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load(base_dir, vocab=vocab), adapter_dir).eval(), vocab or 128)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """(base folder, fine-tuned folder, fine-tuned logits); the fine-tune changes every 2-D weight."""
    root = tmp_path_factory.mktemp(f"pair-{request.param}")
    base = save(build(tie=request.param), root / "base")
    tuned = fine_tune(build(tie=request.param))
    return base, save(tuned, root / "tuned"), logits(tuned)


def shards(folder: Path) -> int:
    return len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_full_rank_recovers_the_fine_tune_through_peft(pair, tmp_path) -> None:
    base, tuned, expected = pair
    assert shards(base) >= 3 and shards(tuned) >= 3
    result = invoke("extract", base, tuned, "--energy", "1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    got = peft_logits(base, tmp_path / "out")
    assert relative(got, expected) < 1e-4
    assert relative(logits(load(base)), expected) > 1e-2  # the base alone is far off: the adapter did the work
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert {"lm_head", "model.embed_tokens", "model.layers.1.mlp.down_proj"} <= set(config["target_modules"])


def test_a_tied_lm_head_gets_the_embedding_update_transposed(tmp_path) -> None:
    base = save(build(tie=True), tmp_path / "base")
    tuned = save(fine_tune(build(tie=True)), tmp_path / "tuned")
    stored = json.loads((tuned / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in stored  # tied: only the embedding is stored
    adapter = extract(base, tuned, rank=64)
    embed, head = adapter.factors("model.embed_tokens"), adapter.factors("lm_head")
    torch.testing.assert_close(head.delta(), embed.delta().T)
    assert adapter.stats["lm_head"] == adapter.stats["model.embed_tokens"]


def test_rank_8_is_the_optimal_truncation_and_its_stats_are_exact(pair, tmp_path) -> None:
    base, tuned, expected = pair
    adapter = extract(base, tuned, rank=8)
    adapter.save_pretrained(tmp_path / "out")
    W0, W1 = _weights(base), _weights(tuned)
    for name, stats in adapter.stats.items():
        key = f"{name}.weight" if f"{name}.weight" in W1 else "model.embed_tokens.weight"
        delta = W1[key].double() - W0[key].double()
        S = torch.linalg.svdvals(delta)
        optimum = math.sqrt(float((S[8:] ** 2).sum() / (S**2).sum()))
        written = adapter.delta(name).double()
        written = written.T if name == "model.embed_tokens" else written
        assert stats.rank == 8
        assert stats.relative_error == pytest.approx(math.sqrt(1 - stats.retained_energy), rel=1e-9)
        assert stats.relative_error == pytest.approx(optimum, rel=1e-4)
        assert relative(written, delta) == pytest.approx(optimum, rel=1e-4)
    got, plain = peft_logits(base, tmp_path / "out"), logits(load(base))
    full = extract(base, tuned, rank=64)
    assert relative(got, expected) < 0.5 * relative(plain, expected)  # most of the fine-tune, not all of it
    assert max(s.relative_error for s in full.stats.values()) < 1e-5
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Truncated modules" in card and "model.layers.0.self_attn.q_proj" in card


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("rule", [
    {"energy": 0.9}, {"sv_fro": 0.95}, {"sv_ratio": 4.0}, {"sv_cumulative": 0.7}, {"rank": 12, "max_rank": 5},
])
def test_each_rank_rule_reaches_peft_intact(rule, tmp_path) -> None:
    from peft import PeftModel

    base = save(build(tie=False), tmp_path / "base")
    tuned = save(fine_tune(build(tie=False)), tmp_path / "tuned")
    adapter = extract(base, tuned, **rule)
    adapter.save_pretrained(tmp_path / "out")
    W0, W1 = _weights(base), _weights(tuned)
    peft_model = PeftModel.from_pretrained(load(base), tmp_path / "out")
    layers = dict(peft_model.named_modules())
    ranks = set()
    for name, stats in adapter.stats.items():
        S = torch.linalg.svdvals(W1[f"{name}.weight"].double() - W0[f"{name}.weight"].double())
        assert stats.rank == choose_rank(S, RankRule(**rule), default=16)
        layer = layers[f"base_model.model.{name}"]
        factor = layer.lora_embedding_A["default"] if name == "model.embed_tokens" else layer.lora_A["default"].weight
        assert factor.shape[0] == stats.rank
        ranks.add(stats.rank)
    assert len(ranks) > 1 or "rank" in rule  # the adaptive rules give per-module ranks: rank_pattern carries them


def test_rank_pattern_overrides_the_rule_per_module(pair, tmp_path) -> None:
    base, tuned, _ = pair
    result = invoke("extract", base, tuned, "--rank", "4", "--rank-pattern", r"mlp\.=6", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["rank_pattern"] == {k: 6 for k in config["rank_pattern"]} and len(config["rank_pattern"]) == 6
    assert config["alpha_pattern"] == config["rank_pattern"]


def test_unchanged_modules_are_skipped_and_listed(tmp_path) -> None:
    base = save(build(tie=False), tmp_path / "base")
    tuned = save(fine_tune(build(tie=False), keep=("layers.1.self_attn.q_proj", "lm_head")), tmp_path / "tuned")
    result = invoke("extract", base, tuned, "--rank", "4", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    listed = result.stdout.split("unchanged, skipped: 2 (")[1].split(")")[0]
    assert sorted(listed.split(", ")) == ["lm_head", "model.layers.1.self_attn.q_proj"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "lm_head" not in config["target_modules"]
    assert "model.layers.1.self_attn.q_proj" not in config["target_modules"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "unchanged_modules" in card and "model.layers.1.self_attn.q_proj" in card


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_resized_vocabulary_is_refused_unless_saved_whole(tie, tmp_path) -> None:
    base = save(build(tie=tie), tmp_path / "base")
    model = build(tie=tie)
    model.resize_token_embeddings(136, mean_resizing=False)
    tuned = save(fine_tune(model), tmp_path / "tuned")
    expected = logits(model, 136)
    refused = invoke("extract", base, tuned, "--out", tmp_path / "out")
    assert_user_error(refused, "model.embed_tokens", "[128, 64] in the base, [136, 64]", "--save-module")
    assert not (tmp_path / "out").exists()
    saved = ["--save-module", "model.embed_tokens"] + ([] if tie else ["--save-module", "lm_head"])
    result = invoke("extract", base, tuned, "--energy", "1", *saved, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens"]  # tied: the lm_head is saved with it
    # What the README tells users: resize the base model's embeddings first, then load the adapter.
    got = peft_logits(base, tmp_path / "out", vocab=136)
    assert relative(got, expected) < 1e-4


def test_a_changed_norm_is_refused_unless_saved_whole(tmp_path) -> None:
    base = save(build(tie=False), tmp_path / "base")
    model = fine_tune(build(tie=False))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    tuned = save(model, tmp_path / "tuned")
    assert_user_error(invoke("extract", base, tuned, "--out", tmp_path / "out"), "model.norm (weight changed")
    result = invoke("extract", base, tuned, "--energy", "1", "--save-module", "model.norm", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "written whole: model.norm" in result.stdout
    assert relative(peft_logits(base, tmp_path / "out"), logits(model)) < 1e-4
    with pytest.raises(InvalidParameterError, match="save_modules"):
        extract(base, tuned, save_modules=["model.nothing"])
    with pytest.raises(UnsupportedAdapterError, match="whole modules"):  # only PEFT folders hold modules_to_save
        extract(base, tuned, rank=2, save_modules=["model.norm"]).save_pretrained(tmp_path / "d", format="diffusers")
    assert not (tmp_path / "d").exists()


def test_hub_models_are_read_and_their_commits_recorded(hub, tmp_path) -> None:
    base = save(build(tie=False), tmp_path / "base")
    model = fine_tune(build(tie=False))
    tuned = save(model, tmp_path / "tuned")
    base_commit = hub.add_repo("org/tiny-base", files_of(base))
    tuned_commit = hub.add_repo("org/tiny-tuned", files_of(tuned))
    adapter = extract("org/tiny-base", f"org/tiny-tuned@{tuned_commit}", energy=1.0)
    assert [s["commit"] for s in adapter.provenance["sources"]] == [base_commit, tuned_commit]
    adapter.save_pretrained(tmp_path / "out")
    assert relative(peft_logits(base, tmp_path / "out"), logits(model)) < 1e-4


def test_modules_selects_and_a_bad_regex_or_an_empty_selection_is_refused(pair, tmp_path) -> None:
    base, tuned, _ = pair
    adapter = extract(base, tuned, rank=2, modules=r"self_attn\.(q|v)_proj")
    assert sorted(adapter.modules) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    assert_user_error(invoke("extract", base, tuned, "--modules", "(", "--out", tmp_path / "o"), "modules")
    assert_user_error(invoke("extract", base, tuned, "--modules", "nothing", "--out", tmp_path / "o"),
                      "no module", "left to extract")
    assert not (tmp_path / "o").exists()


def test_dry_run_lists_the_plan_and_writes_nothing(pair, tmp_path) -> None:
    base, tuned, _ = pair
    result = invoke("extract", base, tuned, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["modules"]["model.layers.0.mlp.up_proj"] == [128, 64]


def _corrupt(folder: Path, key: str, value: float) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    path = folder / index[key]
    tensors = load_file(path)
    tensors[key][0, 0] = value
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("which", ["base", "tuned"])
def test_nan_or_inf_in_either_model_is_refused_with_the_module_named(which, tmp_path) -> None:
    base = save(build(tie=False), tmp_path / "base")
    tuned = save(fine_tune(build(tie=False)), tmp_path / "tuned")
    _corrupt(base if which == "base" else tuned, "model.layers.1.mlp.gate_proj.weight", math.nan)
    line = assert_user_error(invoke("extract", base, tuned, "--out", tmp_path / "out"),
                             "model.layers.1.mlp.gate_proj", "NaN or Inf")
    assert (which == "base") == ("base" in line.split(":")[1])
    assert not (tmp_path / "out").exists()
    with pytest.raises(NonFiniteError):
        extract(base, tuned)


def test_other_architectures_shapes_and_broken_checkpoints_are_refused(tmp_path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    base = save(build(tie=False), tmp_path / "base")
    tuned = save(fine_tune(build(tie=False)), tmp_path / "tuned")
    mistral = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    other = save(mistral, tmp_path / "mistral")
    assert_user_error(invoke("extract", base, other, "--out", tmp_path / "out"), "llama", "mistral")
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = save(LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=96)), tmp_path / "wider")
    assert_user_error(invoke("extract", base, wider, "--out", tmp_path / "out"), "model.layers.0.mlp.down_proj",
                      "[64, 128] in the base, [64, 96]")
    index = tuned / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())
    outside = json.loads(index.read_text())
    first = next(iter(outside["weight_map"]))
    outside["weight_map"][first] = "../elsewhere.safetensors"
    index.write_text(json.dumps(outside))
    assert_user_error(invoke("extract", base, tuned, "--out", tmp_path / "out"), "outside the model folder")
    index.write_text(json.dumps(weight_map))
    (tuned / weight_map["weight_map"]["model.layers.1.mlp.up_proj.weight"]).unlink()
    assert_user_error(invoke("extract", base, tuned, "--out", tmp_path / "out"), "not a readable safetensors")
    assert not (tmp_path / "out").exists()
    with pytest.raises(IncompatibleAdaptersError):
        extract(base, other)
    with pytest.raises(InvalidParameterError, match="one rank rule"):
        extract(base, base, rank=4, energy=0.9)


def test_gpt2_conv1d_layers_and_its_tied_head_reach_peft(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    save(GPT2LMHeadModel(config).eval(), tmp_path / "base")
    torch.manual_seed(0)
    model = fine_tune(GPT2LMHeadModel(config).eval())
    save(model, tmp_path / "tuned")
    adapter = extract(tmp_path / "base", tmp_path / "tuned", energy=1.0)
    assert adapter.config.fan_in_fan_out  # Conv1D stores ΔWᵀ
    assert {"transformer.h.0.attn.c_attn", "transformer.wte", "lm_head"} <= set(adapter.modules)
    adapter.save_pretrained(tmp_path / "out")
    assert relative(peft_logits(tmp_path / "base", tmp_path / "out"), logits(model)) < 1e-4


def test_convolutions_are_extracted_with_their_kernels(tmp_path) -> None:
    from peft import PeftModel
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    save(ResNetForImageClassification(config).eval(), tmp_path / "base")
    torch.manual_seed(0)
    model = ResNetForImageClassification(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim == 4:
                weight.add_(0.05 * torch.randn_like(weight))
    save(model, tmp_path / "tuned")
    adapter = extract(tmp_path / "base", tmp_path / "tuned", energy=1.0, modules="convolution")
    spec = adapter.modules["resnet.embedder.embedder.convolution"]
    assert spec.kind == "conv" and spec.a_shape[1:] == (3, 7, 7) and spec.b_shape[2:] == (1, 1)
    adapter.save_pretrained(tmp_path / "out")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = ResNetForImageClassification.from_pretrained(tmp_path / "base").eval()
        got = PeftModel.from_pretrained(base, tmp_path / "out").eval()(pixel_values=images).logits
        expected = model(pixel_values=images).logits
    assert relative(got, expected) < 1e-4


def test_extract_help_shows_the_declared_rank_rules_without_importing_torch() -> None:
    import subprocess
    import sys

    from lora_fusion.params import ENERGY, SV_RATIO

    code = ("import sys; from lora_fusion_cli.main import main; main(['extract', '--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    flat = " ".join(run.stdout.split())
    for declaration in (ENERGY, SV_RATIO):
        assert " ".join(declaration.help.split()) in flat


@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
def test_auto_keeps_the_randomized_svd_only_where_its_excess_bound_is_tight(spectrum, monkeypatch) -> None:
    from lora_fusion import extraction, linalg

    generator = torch.Generator().manual_seed(0)
    m = n = 1100  # above EXACT_SVD_LIMIT: "auto" starts with the randomized SVD
    if spectrum == "decaying":
        U = torch.linalg.qr(torch.randn(m, 80, generator=generator)).Q
        V = torch.linalg.qr(torch.randn(n, 80, generator=generator)).Q
        delta = (U * 0.7 ** torch.arange(80.0)) @ V.T
    else:
        delta = torch.randn(m, n, generator=generator)
    exact_calls = []
    original = linalg.exact_svd

    def counting(dense: torch.Tensor) -> linalg.FactoredSVD:
        exact_calls.append(dense.shape)
        return original(dense)

    monkeypatch.setattr(linalg, "exact_svd", counting)
    B, A, stats = extraction.decompose(delta, RankRule(rank=8), svd="auto", seed=0, name="m")
    S = torch.linalg.svdvals(delta.double())
    optimum = math.sqrt(float((S[8:] ** 2).sum() / (S**2).sum()))
    assert len(exact_calls) == (1 if spectrum == "flat" else 0)
    assert relative((B @ A).double(), delta.double()) == pytest.approx(stats.relative_error, rel=1e-4)
    assert stats.relative_error - optimum < extraction.EXCESS_TOLERANCE


def test_device_auto_without_a_gpu_is_the_cpu_result_and_cuda_is_refused(pair, tmp_path) -> None:
    # Where a GPU is visible, auto runs there: benchmarks/gpu_check.py compares that path with the CPU one.
    base, tuned, _ = pair
    on_cpu, auto = extract(base, tuned, rank=4), extract(base, tuned, rank=4, device="auto")
    for name in on_cpu.modules:
        if torch.cuda.is_available():
            assert relative(auto.delta(name), on_cpu.delta(name)) < 1e-5
        else:
            assert torch.equal(auto.factors(name).B, on_cpu.factors(name).B)
            assert torch.equal(auto.factors(name).A, on_cpu.factors(name).A)
    assert_user_error(invoke("extract", base, tuned, "--device", "tpu", "--out", tmp_path / "o"), "device")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="no CUDA GPU"):
            extract(base, tuned, device="cuda")
        assert_user_error(invoke("extract", base, tuned, "--device", "cuda", "--out", tmp_path / "o"), "device",
                          "no CUDA GPU")
    assert not (tmp_path / "o").exists()
