"""LoRAHub (`--method lorahub`): weights fitted on support examples through a tiny Llama and a tiny BERT
classifier built in code, with real PEFT LoRAs; the answer is known because the support outputs are what the base
model carrying LoRA 1 produces."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lora_fusion import load_adapter, merge
from lora_fusion.lorahub import LorahubSettings, fit, read_support
from lora_fusion.lorahub.errors import SupportDataError
from tests.test_cli import assert_user_error, invoke

WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer(folder: Path, *, bert: bool) -> None:
    """A whitespace word-level tokenizer over WORDS, saved next to the model (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token=specials[1]))
    core.pre_tokenizer = Whitespace()
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token"), specials)) if bert else dict(
        zip(("pad_token", "unk_token", "bos_token", "eos_token"), specials))
    PreTrainedTokenizerFast(tokenizer_object=core, **names).save_pretrained(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (vocab 64, hidden 32, 2 layers, context 32) with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    path = tmp_path_factory.mktemp("lorahub-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    word_tokenizer(path, bert=False)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with a 3-class head (labels neg, neu, pos; weights of std 2) and its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=24, num_labels=3,
                        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    path = tmp_path_factory.mktemp("lorahub-bert")
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a head of BERT's init (std 0.02) gives near-uniform logits: no loss signal to fit
        model.classifier.weight.normal_(0.0, 2.0)
    model.save_pretrained(path)
    word_tokenizer(path, bert=True)
    return path


def peft_lora(base: Path, out: Path, *, seed: int, targets: list[str], causal: bool, gain: float = 4.0) -> Path:
    """A real PEFT LoRA with random A and B (init_lora_weights=False, B times `gain`), r 4, alpha 8."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        task_type="CAUSAL_LM" if causal else None)
    model = get_peft_model(auto.from_pretrained(base), config)
    with torch.no_grad():  # PEFT's random B is small; a larger one makes the LoRAs tell apart on a few examples
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(gain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_loras(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("lorahub-llama-loras")
    return [peft_lora(llama, root / f"lora{i}", seed=10 + i, targets=["q_proj", "v_proj", "down_proj"], causal=True)
            for i in range(3)]


@pytest.fixture(scope="module")
def bert_loras(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("lorahub-bert-loras")
    return [peft_lora(bert, root / f"lora{i}", seed=20 + i, targets=["query", "value", "intermediate.dense"],
                      causal=False, gain=16.0) for i in range(2)]


def sentences(count: int, length: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=generator))
            for _ in range(count)]


@pytest.fixture(scope="module")
def causal_support(llama: Path, llama_loras: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 prompts, each with the 3 words the base model carrying LoRA 1 continues it with (greedy, through PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), llama_loras[0]).eval()
    path = tmp_path_factory.mktemp("lorahub-support") / "causal.jsonl"
    lines = []
    for prompt in sentences(24, 5, seed=1):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(3):  # greedy among the words, so the output reads back as the same tokens
                logits = model(input_ids=ids).logits[0, -1, 4:]
                ids = torch.cat([ids, torch.tensor([[4 + int(logits.argmax())]])], dim=1)
        lines.append(json.dumps({"input": prompt, "output": tokenizer.decode(ids[0, -3:])}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def classification_support(bert: Path, bert_loras: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 texts, each labelled with the class whose logit LoRA 1 raises most over the base classifier (through
    PEFT): the random head alone gives every text one class, so LoRA 1's own predictions would teach nothing."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert)
    base = AutoModelForSequenceClassification.from_pretrained(bert).eval()
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert), bert_loras[0]).eval()
    path = tmp_path_factory.mktemp("lorahub-support") / "classes.jsonl"
    texts = sentences(30, 6, seed=2)
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt")
        predicted = (model(**batch).logits - base(**batch).logits).argmax(-1).tolist()
    labels = ["neg", "neu", "pos"]
    path.write_text("".join(json.dumps({"text": t, "label": labels[p]}) + "\n" for t, p in zip(texts, predicted)),
                    encoding="utf-8")
    return path


def lorahub(loras: list[Path], base: Path, support: Path, **params: object):
    return merge([str(p) for p in loras], method="lorahub", base_model=str(base), support=str(support),
                 progress=False, **params)


# --------------------------------------------------------------------------------------------- the known answer


@pytest.mark.parametrize("optimizer", ["gradient-free", "gradient"])
def test_the_fit_finds_the_lora_that_made_the_support_outputs(llama, llama_loras, causal_support, optimizer):
    merged = lorahub(llama_loras, llama, causal_support, optimizer=optimizer, budget=60, seed=0)
    fitted = merged.provenance["params"]
    (weights,) = fitted["found_weights"]
    assert weights[0] > 0.5 and weights[0] > 2 * max(abs(weights[1]), abs(weights[2])), weights
    assert fitted["loss_found"] < fitted["loss_uniform"] and fitted["loss_found"] < fitted["loss_base"], fitted
    assert fitted["evaluations"] == 60 and len(fitted["objective_trajectory"]) == 10
    assert fitted["objective_trajectory"] == sorted(fitted["objective_trajectory"], reverse=True)


def test_a_classifier_fit_puts_the_mass_on_the_lora_that_labelled_the_support(bert, bert_loras,
                                                                                classification_support):
    merged = lorahub(bert_loras, bert, classification_support, budget=40, seed=1)
    fitted = merged.provenance["params"]
    (weights,) = fitted["found_weights"]
    assert weights[0] > 0.5 and abs(weights[1]) < weights[0], weights
    assert fitted["loss_found"] < min(fitted["loss_uniform"], fitted["loss_base"]), fitted
    assert fitted["support_kind"] == "classification" and fitted["support_examples"] == 30


def test_per_group_fits_one_weight_per_source_and_layer(llama, llama_loras, causal_support):
    merged = lorahub(llama_loras, llama, causal_support, per_group=True, optimizer="gradient", budget=30)
    fitted = merged.provenance["params"]
    assert fitted["groups"] == ["model.layers.0", "model.layers.1"]
    assert len(fitted["found_weights"]) == 2 and all(len(row) == 3 for row in fitted["found_weights"])
    assert fitted["found_weights"][0] != fitted["found_weights"][1]
    layer = {0: fitted["found_weights"][0], 1: fitted["found_weights"][1]}
    sources = [load_adapter(p) for p in llama_loras]
    for name in merged.modules:
        weights = layer[int(name.split(".layers.")[1].split(".")[0])]
        expected = sum(w * s.delta(name) for w, s in zip(weights, sources))
        torch.testing.assert_close(merged.delta(name), expected, rtol=1e-5, atol=1e-6)


def test_the_result_is_the_exact_weighted_sum_with_the_found_weights(llama, llama_loras, causal_support):
    merged = lorahub(llama_loras, llama, causal_support, budget=12)
    (weights,) = merged.provenance["params"]["found_weights"]
    sources = [load_adapter(p) for p in llama_loras]
    assert set(merged.modules) == set(sources[0].modules)
    for name in merged.modules:
        expected = sum(w * s.delta(name) for w, s in zip(weights, sources))
        torch.testing.assert_close(merged.delta(name), expected, rtol=1e-5, atol=1e-6)
        assert merged.modules[name].rank == 12  # Σ rᵢ: concatenated factors, nothing truncated
    assert [s["weight"] for s in merged.provenance["sources"]] == [round(w, 6) for w in weights]


@pytest.mark.parametrize("optimizer", ["gradient-free", "gradient"])
def test_the_same_seed_gives_the_same_weights_bit_for_bit(llama, llama_loras, causal_support, optimizer):
    runs = [lorahub(llama_loras, llama, causal_support, budget=15, seed=3, optimizer=optimizer) for _ in range(2)]
    assert runs[0].provenance["params"]["found_weights"] == runs[1].provenance["params"]["found_weights"]
    name = next(iter(runs[0].modules))
    assert torch.equal(runs[0].factors(name).B, runs[1].factors(name).B)
    if optimizer == "gradient-free":
        other = lorahub(llama_loras, llama, causal_support, budget=15, seed=4, optimizer=optimizer)
        assert other.provenance["params"]["found_weights"] != runs[0].provenance["params"]["found_weights"]


def test_the_output_loads_with_peft_and_behaves_as_the_hooked_model(llama, llama_loras, causal_support, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_fusion.lorahub import WeightedLoras, layer_groups

    merged = lorahub(llama_loras, llama, causal_support, budget=8)
    out = merged.save_pretrained(tmp_path / "out")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "found_weights" in card and "lorahub" in card
    ids = torch.tensor([[2, 5, 9, 11, 40]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), out).eval()
    hooked = AutoModelForCausalLM.from_pretrained(llama).eval()
    sources = [load_adapter(p) for p in llama_loras]
    groups = dict.fromkeys(layer_groups(list(sources[0].modules)), "all")
    hooks = WeightedLoras(hooked, sources, groups, ["all"], torch.device("cpu"))
    hooks.set_weights(torch.tensor(merged.provenance["params"]["found_weights"]))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, hooked(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
        hooks.remove()
        plain = hooked(input_ids=ids).logits
    assert not torch.allclose(plain, peft_model(input_ids=ids).logits, atol=1e-3)


# --------------------------------------------------------------------------------------------- CLI, plan, recipe


def test_the_cli_fits_and_writes_the_weights_into_the_card(llama, llama_loras, causal_support, tmp_path):
    out = tmp_path / "merged"
    result = invoke("merge", *llama_loras[:2], "--method", "lorahub", "--base-model", llama, "--support",
                    causal_support, "--budget", "6", "--optimizer", "gradient", "--seed", "2", "--out", out)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "found_weights" in card and "gradient" in card
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_dry_run_states_the_budget_without_loading_the_model(llama_loras, causal_support, tmp_path):
    missing = tmp_path / "no-model-here"
    missing.mkdir()  # a folder with no model: a dry run must not read it
    result = invoke("merge", *llama_loras, "--method", "lorahub", "--base-model", missing, "--support",
                    causal_support, "--budget", "50", "--per-group", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "24 causal examples" in result.stdout and "budget: 50 loss evaluations" in result.stdout
    assert "6 (3 sources × 2 group(s))" in result.stdout and "forward passes: 100" in result.stdout
    plan = json.loads(invoke("merge", *llama_loras, "--method", "lorahub", "--base-model", missing, "--support",
                             causal_support, "--dry-run", "--json").stdout)
    assert plan["budget"] == 40 and plan["weights"] == 3 and plan["support_examples"] == 24


def test_a_recipe_takes_the_lorahub_keys(llama, llama_loras, causal_support, tmp_path):
    recipe = tmp_path / "lorahub.yaml"
    recipe.write_text(
        f"method: lorahub\nbase_model: {llama}\nsupport: {causal_support}\nbudget: 4\noptimizer: gradient\n"
        f"per_group: true\nsources:\n" + "".join(f"  - {p}\n" for p in llama_loras[:2]),
        encoding="utf-8",
    )
    result = invoke("merge", "--recipe", recipe, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "model.layers.1" in card and "per_group" in card  # the per-layer groups of the fit are recorded


# --------------------------------------------------------------------------------------------- bad input (exit 2)


def bad_support(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "support.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


CAUSAL_CASES = [
    ("", "holds no examples"),
    ('{"input": "w1", "output": "w2"}\n{"input": "w1", "output": \n', "support.jsonl:2: not JSON"),
    ('{"input": "w1", "answer": "w2"}\n', 'support.jsonl:1: each line needs "input" and "output"'),
    ('{"input": "w1", "output": "w2"}\n{"text": "w1", "label": "neg"}\n', "support.jsonl:2: a classification example"),
    ('{"input": "w1", "output": ""}\n', "must be a non-empty string"),
    ('[1, 2]\n', "not an object"),
    (json.dumps({"input": " ".join(["w1"] * 40), "output": "w2"}) + "\n", "longer than the model's context of 32"),
]


@pytest.mark.parametrize(("text", "fragment"), CAUSAL_CASES)
def test_bad_causal_support_exits_2_before_any_training(llama, llama_loras, tmp_path, text, fragment, monkeypatch):
    import lora_fusion.lorahub.fitting as fitting

    monkeypatch.setattr(fitting, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    result = invoke("merge", *llama_loras[:2], "--method", "lorahub", "--base-model", llama, "--support",
                    bad_support(tmp_path, text), "--out", tmp_path / "out")
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("label", "fragment"), [
    ('"maybe"', "label 'maybe' is not one the classification head knows; use one of ['neg', 'neu', 'pos']"),
    ("3", "label 3 is not one"),
    ("true", '"label" must be a class name or a class index'),
])
def test_a_label_the_head_does_not_know_exits_2(bert, bert_loras, tmp_path, label, fragment, monkeypatch):
    import lora_fusion.lorahub.fitting as fitting

    monkeypatch.setattr(fitting, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    support = bad_support(tmp_path, '{"text": "w1 w2", "label": "pos"}\n{"text": "w3", "label": ' + label + "}\n")
    result = invoke("merge", *bert_loras, "--method", "lorahub", "--base-model", bert, "--support", support,
                    "--out", tmp_path / "out")
    line = assert_user_error(result, fragment)
    assert "support.jsonl:2" in line or "label" in line


def test_a_base_model_without_the_adapted_modules_exits_2(bert, llama_loras, tmp_path):
    support = bad_support(tmp_path, '{"text": "w1 w2", "label": "pos"}\n')
    result = invoke("merge", *llama_loras[:2], "--method", "lorahub", "--base-model", bert, "--support", support,
                    "--out", tmp_path / "out")
    assert_user_error(result, "the base model has no module model.layers.0.")


def test_an_encoder_without_a_trained_head_exits_2(bert, bert_loras, tmp_path):
    from transformers import BertConfig, BertModel

    bare = tmp_path / "bare"
    BertModel(BertConfig.from_pretrained(bert)).save_pretrained(bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (bert / name).exists():
            (bare / name).write_bytes((bert / name).read_bytes())
    support = bad_support(tmp_path, '{"text": "w1 w2", "label": "pos"}\n')
    result = invoke("merge", *bert_loras, "--method", "lorahub", "--base-model", bare, "--support", support,
                    "--out", tmp_path / "out")
    assert_user_error(result, "has no trained classification head")


@pytest.mark.parametrize(("args", "fragment"), [
    ((), "lorahub needs --support"),
    (("--support", "{support}", "--budget", "0"), "budget"),
    (("--support", "{support}", "--optimizer", "nevergrad"), "'gradient-free' or 'gradient'"),
    (("--support", "{support}", "--penalty", "-1"), "penalty"),
    (("--support", "{missing}"), "does not exist"),
])
def test_bad_lorahub_options_exit_2(llama, llama_loras, causal_support, tmp_path, args, fragment):
    filled = [a.format(support=causal_support, missing=tmp_path / "nope.jsonl") for a in args]
    result = invoke("merge", *llama_loras[:2], "--method", "lorahub", "--base-model", llama, *filled,
                    "--out", tmp_path / "out")
    assert_user_error(result, fragment)


def test_lorahub_without_a_base_model_exits_2(llama_loras, causal_support, tmp_path):
    result = invoke("merge", *llama_loras[:2], "--method", "lorahub", "--support", causal_support,
                    "--out", tmp_path / "out")
    assert_user_error(result, "--base-model")


def test_read_support_names_the_kind_and_lines(causal_support, classification_support):
    assert read_support(causal_support).kind == "causal" and len(read_support(causal_support)) == 24
    assert read_support(classification_support).examples[0].line == 1
    with pytest.raises(SupportDataError):
        read_support(causal_support.parent / "absent.jsonl")


def test_fit_reports_the_base_and_uniform_losses(llama, llama_loras, causal_support):
    sources = [load_adapter(p) for p in llama_loras]
    found = fit(sources, base_model=str(llama), support=causal_support,
                settings=LorahubSettings(budget=1, optimizer="gradient-free"))
    # one evaluation: only w = 0 was tried, so the found weights are the base model's
    assert found.weights == [[0.0, 0.0, 0.0]] and found.loss_found == found.loss_base
    assert found.objective == pytest.approx(found.loss_base) and found.evaluations == 1



def test_the_gradient_free_search_without_cma_says_how_to_install_it(llama, llama_loras, causal_support, tmp_path,
                                                                     monkeypatch):
    import lora_fusion.lorahub.fitting as fitting

    monkeypatch.setattr(fitting, "find_spec", lambda name: None)
    result = invoke("merge", *llama_loras[:2], "--method", "lorahub", "--base-model", llama, "--support",
                    causal_support, "--out", tmp_path / "out")
    assert_user_error(result, 'pip install "lora-fusion[lorahub]"', "'gradient'")
