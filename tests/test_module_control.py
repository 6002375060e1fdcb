"""Per-module control (issue 16 §1): weights and parameters as rule lists with gradients over the layer position,
include/exclude, from Python, recipes and the CLI; each checked module by module against a dense reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft.utils import merge_utils

from lora_fusion import load_adapter, merge
from lora_fusion.controls import ModuleControls, interpolate, layer_position, parse_rules
from lora_fusion.errors import InvalidParameterError
from tests.test_cli import assert_user_error, invoke
from tests.test_properties import write_lora

LAYERS = 4
SHAPES = {
    **{f"model.layers.{i}.self_attn.{p}": (24, 20) for i in range(LAYERS) for p in ("q_proj", "v_proj")},
    **{f"model.layers.{i}.mlp.up_proj": (30, 20) for i in range(LAYERS)},
    "model.head_proj": (16, 20),
}
RULES_A = [{"filter": "mlp", "value": 0.2}, {"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]


@pytest.fixture
def pair(tmp_path):
    a = write_lora(tmp_path / "a", SHAPES, r=4, alpha=8, seed=1)
    b = write_lora(tmp_path / "b", SHAPES, r=3, alpha=3, seed=2)
    return a, b


def layer(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def weight_a(name: str) -> float:
    """RULES_A by hand: mlp 0.2; attention 0 → 1 over the 4 layers; the rest 0.5."""
    if "mlp" in name:
        return 0.2
    if "self_attn" in name:
        return layer(name) / (LAYERS - 1)
    return 0.5


def test_linear_with_per_module_weights_equals_the_weighted_sum_in_every_module(pair) -> None:
    a, b = pair
    merged = merge([a, b], method="linear", weights=[RULES_A, 0.5])
    da, db = load_adapter(a), load_adapter(b)
    for name in SHAPES:
        expected = weight_a(name) * da.delta(name) + 0.5 * db.delta(name)
        assert torch.allclose(merged.delta(name), expected, atol=1e-5), name
    assert merged.provenance["module_weights"]["model.layers.2.self_attn.q_proj"] == pytest.approx([2 / 3, 0.5])
    assert merged.provenance["sources"][0]["weight"][0] == {"filter": "mlp", "value": 0.2}


def test_svd_with_per_module_weights_and_rank_equals_the_truncated_dense_sum(pair) -> None:
    a, b = pair
    ranks = [{"filter": "mlp", "value": 2}, {"value": [1, 5]}]
    merged = merge([a, b], method="svd", weights=[RULES_A, -0.3], rank=ranks)
    da, db = load_adapter(a), load_adapter(b)
    for name in SHAPES:
        dense = weight_a(name) * da.delta(name) - 0.3 * db.delta(name)
        t = layer(name) / (LAYERS - 1) if layer(name) is not None else 0.0
        rank = 2 if "mlp" in name else round(1 + 4 * t)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert merged.stats[name].rank == rank, name
        assert torch.allclose(merged.delta(name), best, atol=1e-4), name


def test_ties_with_per_module_weights_and_density_equals_peft_module_by_module(pair) -> None:
    a, b = pair
    density = [{"filter": "v_proj", "value": 0.5}, {"value": [0.1, 0.9]}]
    merged = merge([a, b], method="ties", weights=[RULES_A, 0.7], density=density, rank=30)
    da, db = load_adapter(a), load_adapter(b)
    for name in SHAPES:
        t = layer(name) / (LAYERS - 1) if layer(name) is not None else 0.0
        d = 0.5 if "v_proj" in name else 0.1 + 0.8 * t
        weights = torch.tensor([weight_a(name), 0.7])
        expected = merge_utils.ties([da.delta(name), db.delta(name)], weights, d, "total")
        error = float((merged.delta(name) - expected).norm() / expected.norm())
        assert error < 1e-5, (name, error)


def test_include_and_exclude_choose_the_modules_written(pair) -> None:
    a, b = pair
    merged = merge([a, b], include=["self_attn", "head_proj"], exclude=[r"layers\.0\."])
    assert sorted(merged.modules) == sorted(
        n for n in SHAPES if ("self_attn" in n or n == "model.head_proj") and not n.startswith("model.layers.0."))


def test_gradient_positions_follow_each_stack_and_the_sgm_order_of_a_unet() -> None:
    assert layer_position("model.layers.7.mlp.up_proj") == ("model.layers", 7)
    assert layer_position("encoder.layer.3.attention.self.query") == ("encoder.layer", 3)
    assert layer_position("transformer.single_transformer_blocks.2.attn.to_q")[1] == 2
    assert layer_position("model.head_proj") is None
    unet = ["unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",   # input block 2
            "unet.down_blocks.1.resnets.0.conv1",                                # input block 4
            "unet.mid_block.attentions.0.proj_in",                               # middle
            "unet.up_blocks.0.upsamplers.0.conv",                                # output block 2
            "unet.up_blocks.1.attentions.2.proj_out"]                            # output block 5
    codes = [layer_position(n)[1] for n in unet]
    assert codes == sorted(codes) and len(set(codes)) == 5  # SGM order: inputs, middle, outputs
    controls = ModuleControls.build(unet, weights=[parse_rules([{"value": [0.0, 1.0]}], what="w")])
    assert [controls.weights_for(n)[0] for n in unet] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert interpolate((0.0, 1.0, 0.0), 0.25) == pytest.approx(0.5)


def test_a_gradient_gives_modules_without_a_layer_index_its_first_value_with_a_warning(pair) -> None:
    a, b = pair
    with pytest.warns(UserWarning, match="model.head_proj"):
        merged = merge([a, b], weights=[[{"value": [0.3, 1.0]}], 1.0])
    expected = 0.3 * load_adapter(a).delta("model.head_proj") + load_adapter(b).delta("model.head_proj")
    assert torch.allclose(merged.delta("model.head_proj"), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"weights": [[{"filter": "[", "value": 1}], 1]}, "regular expression"),
        ({"weights": [[{"filter": "mlpx", "value": 1}, {"value": 1}], 1]}, "matching some module"),
        ({"weights": [[{"filte": "mlp", "value": 1}], 1]}, "optional `filter`"),
        ({"weights": [[{"value": "high"}], 1]}, "gradient of two or more numbers"),
        ({"include": ["nothing-matches"]}, "keeps some of the"),
        ({"weights": [[{"filter": "mlp", "value": 1}], 1]}, "a rule for every module"),
        ({"density": [{"value": 1.5}], "method": "ties"}, "density"),
        ({"seed": [{"value": 1}], "method": "dare_linear"}, "one value for the whole merge"),
        ({"weights": [[{"filter": "head_proj", "value": [0, 1]}, {"value": 1}], 1]}, "no layer index"),
    ],
    ids=["bad-regex", "empty-match", "unknown-key", "bad-value", "empty-selection", "no-rule-for-a-module",
         "density-domain",
         "not-per-module", "gradient-without-layers"],
)
def test_bad_rules_are_refused_before_any_merge(pair, kwargs, fragment) -> None:
    a, b = pair
    with pytest.raises(InvalidParameterError, match=fragment):
        merge([a, b], **kwargs)


def test_cli_module_weight_include_exclude_and_a_recipe_give_the_same_merge(pair, tmp_path) -> None:
    a, b = pair
    out_cli, out_recipe = tmp_path / "cli", tmp_path / "recipe"
    result = invoke("merge", a, b, "--weights", "0.5,0.5", "--module-weight", "mlp=0.2,0.5",
                    "--module-weight", "self_attn=1.0,0.0", "--include", "layers", "--exclude", "v_proj",
                    "--out", out_cli)
    assert result.exit_code == 0, result.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "linear", "include": ["layers"], "exclude": ["v_proj"], "out": str(out_recipe),
        "sources": [{"source": str(a), "weight": [{"filter": "mlp", "value": 0.2},
                                                  {"filter": "self_attn", "value": 1.0}, {"value": 0.5}]},
                    {"source": str(b), "weight": [{"filter": "mlp", "value": 0.5},
                                                  {"filter": "self_attn", "value": 0.0}, {"value": 0.5}]}],
    }))
    result = invoke("merge", "--recipe", recipe)
    assert result.exit_code == 0, result.output
    first, second = load_adapter(out_cli), load_adapter(out_recipe)
    assert set(first.modules) == set(second.modules) == {n for n in SHAPES if "layers" in n and "v_proj" not in n}
    for name in first.modules:
        assert torch.equal(first.delta(name), second.delta(name)), name
    da = load_adapter(a)
    assert torch.allclose(first.delta("model.layers.1.self_attn.q_proj"), da.delta("model.layers.1.self_attn.q_proj"),
                          atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(out_cli / "adapter_model.safetensors"), "pt") as file:
        record = json.loads(file.metadata()["lora_fusion"])
    assert record["module_weights"]["model.layers.1.self_attn.q_proj"] == [1.0, 0.0]
    assert record["exclude"] == ["v_proj"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--module-weight", "mlp=0.2"], "one weight per source"),
        (["--module-weight", "mlp"], "REGEX=w1,w2"),
        (["--include", "("], "regular expression"),
        (["--exclude", "."], "keeps some of the"),
        (["--method", "ties", "--param", "seed=[1]"], "one value for the whole merge"),
    ],
)
def test_cli_rule_errors_are_one_line(pair, tmp_path, args, fragment) -> None:
    a, b = pair
    assert_user_error(invoke("merge", a, b, *args, "--out", tmp_path / "o"), fragment)
    assert not (tmp_path / "o").exists()


def test_dry_run_plans_per_module_ranks(pair) -> None:
    a, b = pair
    plan = merge([a, b], method="svd", rank=[{"filter": "mlp", "value": 2}, {"value": 3}], dry_run=True)
    ranks = {m.name: m.output_rank for m in plan.modules}
    assert ranks["model.layers.0.mlp.up_proj"] == 2 and ranks["model.head_proj"] == 3
    assert "per module" in str(plan) or all(isinstance(w, float) for w in plan.weights)


def test_uniform_merges_take_the_plain_path(pair) -> None:
    a, b = pair
    plain = merge([a, b], weights=[0.6, 0.4])
    ruled = merge([a, b], weights=[[{"value": 0.6}], [{"value": 0.4}]])
    assert "module_weights" not in plain.provenance
    for name in SHAPES:
        assert torch.equal(plain.delta(name), ruled.delta(name))
