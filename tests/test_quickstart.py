"""The demo: the shipped real adapters merge with the quickstart recipe, and the evaluation scores them."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from lora_fusion import load_adapter
from lora_fusion.eval.quickstart import Evaluator
from lora_fusion_cli.main import app

QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart"
TASKS = ["noun_supersense", "part_of_speech", "verb_supersense"]


def test_shipped_adapters_are_real_minilm_loras() -> None:
    for task in TASKS:
        adapter = load_adapter(QUICKSTART / "adapters" / task)
        assert adapter.base_model == "sentence-transformers/all-MiniLM-L6-v2"
        assert len(adapter.modules) == 12 and {s.rank for s in adapter.modules.values()} == {8}


def test_quickstart_recipe_merges_and_each_adapter_wins_its_own_task(tmp_path) -> None:
    out = tmp_path / "quickstart"
    result = CliRunner().invoke(app, ["merge", "--recipe", str(QUICKSTART.parent / "quickstart.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {s.rank for s in load_adapter(out).modules.values()} == {24}

    evaluator = Evaluator(QUICKSTART / "heads", QUICKSTART / "eval", TASKS)
    evaluator.eval_sets = {task: examples[::5] for task, examples in evaluator.eval_sets.items()}  # 40 per task
    evaluator.texts = [text for examples in evaluator.eval_sets.values() for text, _ in examples]
    base = evaluator.accuracies(None)
    merged = evaluator.accuracies(out)
    for task in TASKS:
        own = evaluator.accuracies(QUICKSTART / "adapters" / task)[task]
        assert own > base[task], task  # each trained LoRA beats the base model with the same head
        assert 0.0 <= merged[task] <= 1.0
