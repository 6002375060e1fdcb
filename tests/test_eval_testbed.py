"""The merge testbed's pieces that need no training: the fortunes reader, the task catalogue and its
splits, normalised accuracy and the result tables. No Debian package is needed: fortunes are
written to a temporary folder, and WordNet is read from the real sample in tests/data/wordnet-sample."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lora_fusion.eval.catalog import ALL_TASKS, TESTBED_TASKS, DataDirs, load_split
from lora_fusion.eval.fortunes import FORTUNE_TOPICS, parse_fortunes, read_fortunes, topic_task
from lora_fusion.eval.scores import (
    collect_rows,
    findings,
    format_mean_std,
    format_params,
    markdown_table,
    mean_std,
    normalised,
    results_table,
)
from lora_fusion.errors import LoraFusionError
from lora_fusion.eval.tasks import SPLITS, balanced_split
from lora_fusion.eval.wordnet import WORDNET_TASKS

WORDNET_SAMPLE = Path(__file__).resolve().parent / "data" / "wordnet-sample"


def write_fortunes(folder: Path, topics: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for topic, quotes in topics.items():
        (folder / topic).write_text("\n%\n".join(quotes) + "\n%\n", encoding="utf-8")
    return folder


@pytest.fixture
def fortunes_dir(tmp_path: Path) -> Path:
    """120 distinct quotes per topic of the fortune task, one quote shared by two topics."""
    topics = {
        topic: [f"{topic} quote number {i}\n\t\t-- Author {i % 7}" for i in range(120)]
        for topic in FORTUNE_TOPICS
    }
    topics[FORTUNE_TOPICS[0]].append("A quote filed under two topics.")
    topics[FORTUNE_TOPICS[1]].append("A quote filed under two topics.")
    return write_fortunes(tmp_path / "fortunes", topics)


def test_parse_fortunes_splits_on_percent_lines_and_cleans_text() -> None:
    raw = (
        "First quote,\n  on two lines.\n%\n"
        "B\x08Bo\x08ol\x08ld and _\x08u_\x08n_\x08d_\x08e_\x08r\x07.\n%\n"
        "%\n"  # an empty entry is dropped
        "   \n%\n"  # so is a blank one
        "50% of a quote with a % sign\n"
        "%\n"
        "Last quote without a final separator"
    )
    assert parse_fortunes(raw) == [
        "First quote, on two lines.",
        "Bold and under.",
        "50% of a quote with a % sign",
        "Last quote without a final separator",
    ]


def test_read_fortunes_reads_a_topic_file_and_names_the_apt_package_when_missing(tmp_path: Path) -> None:
    folder = write_fortunes(tmp_path / "f", {"science": ["E = mc^2", "Gravity:\n it's the law"]})
    assert read_fortunes(folder / "science") == ("E = mc^2", "Gravity: it's the law")
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y fortunes"):
        read_fortunes(folder / "computers")


def test_topic_task_labels_quotes_by_topic(tmp_path: Path) -> None:
    folder = write_fortunes(tmp_path / "f", {"a": ["x", "y"], "b": ["z"]})
    task = topic_task("ab", ["a", "b"])
    assert task.classes == ("a", "b")
    assert list(task.examples(folder)) == [("x", 0), ("y", 0), ("z", 1)]


def test_catalogue_holds_the_four_testbed_tasks_with_four_classes() -> None:
    assert len(TESTBED_TASKS) >= 4
    for name in TESTBED_TASKS:
        assert len(ALL_TASKS[name].classes) == 4
    assert ALL_TASKS["fortune_topic"].classes == FORTUNE_TOPICS


def test_fortune_splits_are_balanced_disjoint_and_deterministic(fortunes_dir: Path) -> None:
    dirs = DataDirs({"fortunes": fortunes_dir})
    splits = {split: load_split("fortune_topic", split, dirs=dirs) for split in SPLITS}
    assert {split: len(examples) for split, examples in splits.items()} == {
        "train": 4 * 20,  # 120 per class − 50 test − 50 validation
        "validation": 4 * 50,
        "test": 4 * 50,
    }
    for examples in splits.values():
        assert set(Counter(label for _, label in examples).values()) == {len(examples) // 4}
    texts = {split: {text for text, _ in examples} for split, examples in splits.items()}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert all("two topics" not in text for split in texts.values() for text in split)  # ambiguous: dropped
    assert splits == {split: load_split("fortune_topic", split, dirs=dirs) for split in SPLITS}
    reseeded = load_split("fortune_topic", "test", dirs=dirs, seed=1)
    assert reseeded != splits["test"] and Counter(l for _, l in reseeded) == Counter(l for _, l in splits["test"])


def test_balanced_split_keeps_test_and_validation_when_the_train_cap_changes() -> None:
    examples = [(f"text {label} {i}", label) for label in range(3) for i in range(40)]
    kwargs = {"seed": 3, "test_per_class": 5, "val_per_class": 5}
    small = {s: balanced_split(examples, 3, s, max_train_per_class=4, **kwargs) for s in SPLITS}
    large = {s: balanced_split(examples, 3, s, max_train_per_class=100, **kwargs) for s in SPLITS}
    assert small["test"] == large["test"] and small["validation"] == large["validation"]
    assert len(small["train"]) == 12 and len(large["train"]) == 90


def test_missing_fortunes_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fortunes"):
        load_split("fortune_topic", "test", dirs=DataDirs({"fortunes": tmp_path}))


@pytest.mark.parametrize("task", sorted(WORDNET_TASKS))
def test_every_wordnet_task_splits_from_the_shipped_sample(task: str) -> None:
    dirs = DataDirs({"wordnet": WORDNET_SAMPLE})
    splits = {split: load_split(task, split, dirs=dirs) for split in SPLITS}
    assert len(splits["test"]) == len(splits["validation"]) == 4 * 50
    assert len(splits["train"]) >= 4 * 15  # 120 lines per class, less the few glosses two synsets share
    for examples in splits.values():
        assert set(Counter(label for _, label in examples).values()) == {len(examples) // 4}
    texts = [text for examples in splits.values() for text, _ in examples]
    assert len(set(texts)) == len(texts)
    assert not any("Princeton" in text for text in texts)  # the licence header is not a synset


def test_wordnet_sample_glosses_are_labelled_by_supersense() -> None:
    # two real lines of the sample (data.noun, data.verb); usage examples after the definition are dropped
    examples = dict(WORDNET_TASKS["noun_supersense"].examples(WORDNET_SAMPLE))
    assert examples["an animal that has undergone mutation"] == WORDNET_TASKS["noun_supersense"].classes.index("animal")
    verbs = dict(WORDNET_TASKS["verb_supersense"].examples(WORDNET_SAMPLE))
    # ... | fly over; "The plane passed over Damascus"
    assert verbs["fly over"] == WORDNET_TASKS["verb_supersense"].classes.index("motion")
    assert not any("Damascus" in text for text in verbs) and len(verbs) > 4 * 100


def test_missing_wordnet_is_a_one_line_user_error_naming_the_package(tmp_path: Path) -> None:
    with pytest.raises(LoraFusionError, match=r"apt-get install wordnet-base.*data_dirs") as caught:
        load_split("noun_supersense", "test", dirs=DataDirs({"wordnet": tmp_path}))
    assert isinstance(caught.value, FileNotFoundError) and "\n" not in str(caught.value)


def test_normalised_accuracy_and_seed_statistics() -> None:
    assert normalised({"a": 0.45, "b": 0.9}, {"a": 0.9, "b": 0.9}) == {"a": 0.5, "b": 1.0}
    with pytest.raises(ValueError, match="cannot normalise"):
        normalised({"a": 0.5}, {"a": 0.0})
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std
    assert mean_std([0.7]) == (0.7, 0.0)
    assert format_mean_std([0.5, 0.7]) == "0.600 ± 0.141"
    assert format_mean_std([0.5]) == "0.500"


def test_format_params_shows_agreement_once_and_disagreement_per_seed() -> None:
    assert format_params([{"scale": 0.5, "density": 0.1}, {"scale": 0.5, "density": 0.1}]) == "λ=0.5, d=0.1"
    assert format_params([{"scale": 0.5, "density": 0.1}, {"scale": 1.0, "density": 0.1}]) == "λ=0.5/1, d=0.1"
    assert format_params([{}]) == "–"


def score(accuracy: dict[str, float], own: dict[str, float]) -> dict[str, dict[str, float]]:
    return {"accuracy": accuracy, "normalised": normalised(accuracy, own)}


def seed_result(shift: float) -> dict:
    own = {"t1": 0.9, "t2": 0.8}
    scores = {
        "base": {"t1": 0.45, "t2": 0.4},
        "average": {"t1": 0.72, "t2": 0.64},
        "linear": {"t1": 0.81, "t2": 0.72},
        "ties_default": {"t1": 0.36 + shift, "t2": 0.32},
        "ties_tuned": {"t1": 0.9, "t2": 0.8 - shift},
    }
    test = {name: {"test": score(acc, own)} for name, acc in scores.items()}
    return {
        "references": {
            "base": test["base"],
            "average": test["average"],
            "individual": {"test": score(own, own)},
        },
        "variants": {
            "linear": {"default": {"params": {}, "test": test["linear"]["test"]}},
            "ties/full": {
                "default": {"params": {"scale": 1.0, "density": 0.2}, "test": test["ties_default"]["test"]},
                "tuned": {"params": {"scale": 0.5 + shift, "density": 0.1}, "test": test["ties_tuned"]["test"]},
            },
        },
    }


def test_result_table_rows_and_formatting() -> None:
    rows = collect_rows([seed_result(0.0), seed_result(0.08)], ["t1", "t2"])
    assert [(r.method, r.space, r.kind) for r in rows] == [
        ("base model (no LoRA)", "–", "reference"),
        ("individual LoRAs", "–", "reference"),
        ("average", "–", "reference"),
        ("linear", "–", "default"),
        ("ties", "full", "default"),
        ("ties", "full", "tuned"),
    ]
    assert rows[3].setting == "default (no parameters)"
    assert rows[5].setting == "tuned: λ=0.5/0.58, d=0.1"
    assert rows[5].normalised["t2"] == pytest.approx([1.0, 0.9])
    assert rows[5].mean_normalised() == pytest.approx([1.0, 0.95])

    table = results_table(rows, ["t1", "t2"]).splitlines()
    assert table[0] == "| method | space | setting | t1 | t2 | mean acc. | mean norm. acc. |"
    assert table[1] == "| --- | --- | --- | ---: | ---: | ---: | ---: |"
    assert table[2] == "| base model (no LoRA) | – | heads only | 0.450 ± 0.000 | 0.400 ± 0.000 | 0.425 ± 0.000 | 0.500 ± 0.000 |"
    assert table[7] == (
        "| ties | full | tuned: λ=0.5/0.58, d=0.1 | 0.900 ± 0.000 | 0.760 ± 0.057 | 0.830 ± 0.028 | 0.975 ± 0.035 |"
    )
    assert len(table) == 2 + len(rows)


def test_markdown_table_right_aligns_only_numeric_columns() -> None:
    table = markdown_table(["name", "dash", "score"], [["a", "–", "0.5 ± 0.1"], ["b", "–", "–"]])
    assert table.splitlines()[1] == "| --- | --- | ---: |"


def test_findings_restate_the_table() -> None:
    rows = collect_rows([seed_result(0.0), seed_result(0.08)], ["t1", "t2"])
    text = findings(rows, n_seeds=2)
    assert "no LoRA scores 0.500 ± 0.000" in text
    assert "plain average of the LoRAs scores 0.800 ± 0.000" in text
    assert "best merge is linear (0.900 ± 0.000)" in text
    assert "1 of 2 default merges score below the base model (ties (full) 0.422)" in text
    assert "highest means are ties (full) (0.975 ± 0.035), linear (0.900 ± 0.000)." in text
    assert "2 of 2 methods at their tuned setting beat the plain average on every seed" in text
    assert "0 score below it on every seed; the other 0 are mixed." in text
    assert "vary by up to 0.000 (std)" in text
    one_seed = findings(collect_rows([seed_result(0.0)], ["t1", "t2"]), n_seeds=1)
    assert "±" not in one_seed and "no estimate of seed noise" in one_seed


def test_lora_applied_in_memory_matches_peft_and_restores_the_weights(tmp_path: Path) -> None:
    """The evaluator adds ΔW to the base weights instead of loading the adapter with PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    from lora_fusion import load_adapter
    from lora_fusion.eval.testbed import adapter_digest, lora_applied

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    base = BertModel(config).eval()
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        plain = base(input_ids=ids).last_hidden_state
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
        peft_model = get_peft_model(base, lora).eval()
        peft_model.save_pretrained(str(tmp_path / "lora"))
        expected = peft_model(input_ids=ids).last_hidden_state
        base = peft_model.unload()
        adapter = load_adapter(tmp_path / "lora")
        with lora_applied(base, adapter) as model:
            got = model(input_ids=ids).last_hidden_state
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.equal(base(input_ids=ids).last_hidden_state, plain)
    assert adapter_digest(adapter) == adapter_digest(load_adapter(tmp_path / "lora"))
