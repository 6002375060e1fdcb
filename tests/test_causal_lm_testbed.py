"""The causal-LM merge testbed (experiments/causal_lm.py) on a tiny LlamaForCausalLM built in code with tiny in-code
tasks: the cached-prefix forward equals the full model at the answer positions, teacher-forced exact match equals
greedy generation, and the study's main() runs end to end and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import causal_lm
from lora_fusion.eval.testbed import TaskData, lora_applied
from lora_fusion.icm.lora_io import flatten, to_adapter

TASKS = {
    "noun_supersense": ("animal", "food", "person", "artifact"),
    "part_of_speech": ("noun", "verb", "adj", "adv"),
}
WORDS = ["red", "green", "blue", "gold"]  # the first word of a text gives its class


class WordTokenizer:
    """One id per whitespace-separated word (a leading space or newline is its own word), EOS = 1, unknown = 2."""

    eos_token_id = 1

    def __init__(self) -> None:
        words = {"\n", *WORDS, "item", "x"}
        for task, classes in TASKS.items():
            words |= set(causal_lm.QUESTIONS[task].split()) | {causal_lm.answer_word(c) for c in classes}
        self.vocab = {word: index for index, word in enumerate(sorted(words), start=3)}

    def ids(self, text: str) -> list[int]:
        out = [self.vocab["\n"]] if text.startswith("\n") else []
        return out + [self.vocab.get(word, 2) for word in text.split()]


def tiny_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def tiny_data(task: str) -> TaskData:
    """4 examples per class in each split; the class is the text's first word (learnable by a tiny LoRA)."""
    def split(tag: int) -> list[tuple[str, int]]:
        return [(f"{WORDS[label]} item {'x ' * ((i + tag) % 3)}", label) for label in range(4) for i in range(4)]

    return TaskData(task, TASKS[task], split(0), split(1), split(2))


def tiny_testbed() -> causal_lm.Testbed:
    return causal_lm.Testbed(tiny_model(), WordTokenizer(), [tiny_data(t) for t in TASKS], base_model="tiny-llama",
                              note="a random 3-layer LlamaForCausalLM built in code")


def random_factors(world: causal_lm.TopLayersWorld, seed: int) -> causal_lm.Factors:
    generator = torch.Generator().manual_seed(seed)
    return {m.name: (torch.randn(m.rank, m.in_features, generator=generator),
                     torch.randn(m.out_features, m.rank, generator=generator) * 0.5)
            for m in world.layout().modules}


def encoded(testbed: causal_lm.Testbed) -> list[causal_lm.Encoded]:
    data = testbed.data[0]
    return causal_lm.encode(testbed.tokenizer, data.name, data.classes, data.test[::3], max_text_tokens=4)


@pytest.mark.parametrize("with_lora", [False, True])
def test_cached_prefix_forward_equals_the_full_model_at_answer_positions(with_lora: bool) -> None:
    testbed = tiny_testbed()
    world = causal_lm.TopLayersWorld(testbed.model, TASKS, top_layers=1, rank=2)
    factors = random_factors(world, 1) if with_lora else None
    sequences = encoded(testbed)
    assert len({len(s.ids) for s in sequences}) > 1  # right padding is exercised
    batch = world.prefix(sequences)
    ours = world.logits("noun_supersense", factors, batch.inputs)
    adapter = to_adapter(flatten(factors, world.layout()), world.layout(), base_model="tiny") if factors else None
    with torch.no_grad(), lora_applied(testbed.model, adapter):
        for row, sequence in enumerate(sequences):
            full = testbed.model(input_ids=torch.tensor([sequence.ids])).logits[0]
            count = len(sequence.answer)
            expected = full[sequence.prompt_length - 1 : sequence.prompt_length - 1 + count]
            torch.testing.assert_close(ours[row, :count], expected, rtol=1e-4, atol=1e-5)
    if factors is not None:  # the LoRA reaches the logits
        assert not torch.allclose(ours, world.logits("noun_supersense", None, batch.inputs))


def test_teacher_forced_exact_match_equals_greedy_generation() -> None:
    testbed = tiny_testbed()
    world = causal_lm.TopLayersWorld(testbed.model, TASKS, top_layers=2, rank=2)
    sequences = encoded(testbed)
    # a LoRA trained to answer makes some matches; the base model makes none: both outcomes are compared
    data = world.prefix(causal_lm.encode(testbed.tokenizer, "noun_supersense", TASKS["noun_supersense"],
                                         testbed.data[0].train, max_text_tokens=4))
    trained, _ = causal_lm.train_joint_lora(world, [("noun_supersense", data)], world.layout(), steps=25, seed=0,
                                            lr=0.05, batch_size=8)
    batch = world.prefix(sequences)
    outcomes = []
    for factors in (None, trained):
        forced = causal_lm.exact_matches(world.logits("", factors, batch.inputs), batch.labels)
        adapter = to_adapter(flatten(factors, world.layout()), world.layout(), base_model="tiny") if factors else None
        with torch.no_grad(), lora_applied(testbed.model, adapter):
            for row, sequence in enumerate(sequences):
                generated = testbed.model.generate(torch.tensor([sequence.ids[: sequence.prompt_length]]),
                                                   max_new_tokens=len(sequence.answer), do_sample=False,
                                                   eos_token_id=1, pad_token_id=1)
                greedy = tuple(generated[0, sequence.prompt_length :].tolist()) == sequence.answer
                assert greedy == bool(forced[row])
                outcomes.append(greedy)
    assert set(outcomes) == {True, False}  # both a match and a miss were compared


def test_main_runs_end_to_end_on_the_tiny_setup_and_writes_its_report(tmp_path: Path) -> None:
    argv = ["--seeds", "0", "1", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
            "--tasks", *TASKS, "--threads", str(torch.get_num_threads()),
            "--top-layers", "2", "--rank", "2", "--steps", "40", "--batch-size", "8", "--learning-rate", "0.1",
            "--oracle-batch-size", "4", "--train-per-class", "4", "--support-per-class", "1", "--tune-per-class", "2",
            "--test-per-class", "4", "--max-text-tokens", "1", "--lorahub-budget", "6", "--icm-snapshots", "2",
            "--icm-snapshot-every", "2", "--icm-meta-steps", "2", "--icm-meta-batch", "2",
            "--icm-fusion-steps", "2", "--generate-checks", "2"]
    report = causal_lm.main(argv, testbed=tiny_testbed())
    written = json.loads((tmp_path / "out" / "causal_lm.json").read_text())
    assert written["seeds"] == json.loads(json.dumps(report["seeds"]))
    assert [s["seed"] for s in written["seeds"]] == [0, 1]
    for seed in written["seeds"]:
        assert set(seed["variants"]) == {"task_arithmetic", "ties", "dare_linear", "tsv", "lorahub", "icm"}
        assert len(seed["variants"]["lorahub"]["details"]["weights"]) == len(TASKS)
    check = written["exactness"]
    assert check["generate_agrees"] == check["examples"] > 0
    assert check["max_abs_logit_difference"] < 1e-4
    pairs = {(p["pair"], p["setting"]) for p in written["paired"]}
    assert ("icm − task_arithmetic", "tuned") in pairs and ("lorahub − ties", "default") in pairs
    markdown = (tmp_path / "out" / "causal_lm.md").read_text()
    assert "oracle: multi-task LoRA" in markdown and "Paired differences" in markdown
    # a second run reuses the trained LoRAs from the cache, and a new seed is scored next to the cached ones
    again = causal_lm.main([*argv, "--seeds", "0", "2"], testbed=tiny_testbed())
    assert again["seeds"][0] == written["seeds"][0]
    assert again["seeds"][1]["seed"] == 2 and again["seeds"][1]["timings"]["train_seconds_this_run"] > 0
    # --render rewrites the page from the JSON alone
    page = tmp_path / "out" / "causal_lm.md"
    written_page = page.read_text()
    page.unlink()
    causal_lm.main(["--render", str(tmp_path / "out" / "causal_lm.json"), "--out", str(tmp_path / "out")])
    assert page.read_text() == written_page
