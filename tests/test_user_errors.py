"""Issue 12 §3 and §6: the user errors that used to escape as tracebacks, Ctrl-C, and the warnings on results that are
probably not what was meant. docs/reliability.md lists each case with the test here."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_fusion import load_adapter, merge
from lora_fusion.errors import CorruptAdapterError, DegenerateMergeWarning, LoraFusionError
from lora_fusion.methods import list_methods
from lora_fusion_cli.main import app, main
from tests.test_cli import assert_user_error
from tests.test_properties import write_lora
from tests.test_reliability import SHAPES, lora, rewrite_config, snapshot


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]


# --------------------------------------------------------------------------------------------- nesting


def test_deeply_nested_adapter_config_is_refused_by_name(tmp_path) -> None:
    folder = lora(tmp_path / "nested")
    (folder / "adapter_config.json").write_text("[" * 1000 + "]" * 1000)
    line = assert_user_error(invoke("merge", folder, "--out", tmp_path / "out"), "nested too deeply", "adapter_config")
    assert str(folder) in line and not (tmp_path / "out").exists()


def test_deeply_nested_adapter_config_from_the_hub_is_refused_by_name(hub, tmp_path) -> None:
    files = snapshot(lora(tmp_path / "a"))
    files["adapter_config.json"] = b"{\"r\": " + b"[" * 1000 + b"]" * 1000 + b"}"
    hub.add_repo("org/nested", files)
    assert_user_error(invoke("merge", "org/nested", "--out", tmp_path / "out"), "org/nested", "nested too deeply")


def test_deeply_nested_recipe_is_refused_by_name(tmp_path) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("sources: " + "[" * 5000 + "]" * 5000 + "\n")
    assert_user_error(invoke("merge", "--recipe", recipe), str(recipe), "nested too deeply")


def test_deeply_nested_icm_recipe_is_refused_by_name(tmp_path) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("meta: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n")
    assert_user_error(invoke("icm", "train", recipe, "--out", tmp_path / "run"), "nested too deeply")


# --------------------------------------------------------------------------------------------- interference


def test_interference_of_partly_different_adapters_compares_what_matches(tmp_path) -> None:
    first = lora(tmp_path / "a", seed=1)
    wide = {**SHAPES, "model.layers.0.self_attn.q_proj": (48, 24)}  # another base model's q_proj
    second = write_lora(tmp_path / "b", {**wide, "model.layers.0.mlp.up_proj": (64, 24)}, r=4, alpha=8, seed=2)
    result = invoke("inspect", first, second, "--interference")
    assert result.exit_code == 0, result.output
    assert "3 shared modules" in result.stdout and "2 modules not compared" in result.stdout
    assert "model.layers.0.mlp.up_proj: only in [1]" in result.stdout
    assert "model.layers.0.self_attn.q_proj: shapes differ: [0] linear 32×24, [1] linear 48×24" in result.stdout
    report = json.loads(invoke("inspect", first, second, "--interference", "--json").stdout)
    assert sorted(report["modules"]) == sorted(set(SHAPES) - {"model.layers.0.self_attn.q_proj"})
    assert sorted(report["unmatched"]) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]


# --------------------------------------------------------------------------------------------- Hub repo ids


@pytest.mark.parametrize("repo_id", ["me/bad name", "not a repo id", "me/x--y", "a/b/c", "me/.hidden", "bare"])
def test_bad_push_repo_ids_are_refused_before_any_work(repo_id, hub, tmp_path) -> None:
    folder = lora(tmp_path / "a")
    for dry_run in ((), ("--dry-run",)):
        line = assert_user_error(invoke("merge", folder, "--push-to-hub", repo_id, *dry_run), repr(repo_id))
        assert "owner/name" in line
    assert_user_error(invoke("push", folder, repo_id), repr(repo_id), "owner/name")
    recipe = tmp_path / "push.yaml"
    recipe.write_text(json.dumps({"sources": [str(folder)], "push_to_hub": repo_id}))
    assert_user_error(invoke("merge", "--recipe", recipe, "--dry-run"), repr(repo_id))
    assert hub.requests == []  # refused before a single request


def test_a_bare_name_that_is_neither_a_path_nor_a_repo_is_explained(hub, tmp_path) -> None:
    line = assert_user_error(invoke("merge", "my-lora", "--out", tmp_path / "out"), "my-lora")
    assert "no such local file or directory" in line and "owner/name" in line and "someone/my-lora" in line


# --------------------------------------------------------------------------------------------- values


def base_model_with(tmp_path: Path, poisoned: str | None) -> Path:
    folder = tmp_path / "base"
    folder.mkdir()
    weights = {f"{name}.weight": torch.randn(m, n) for name, (m, n) in SHAPES.items()}
    if poisoned:
        weights[f"{poisoned}.weight"][3, 5] = float("nan")
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def test_nan_in_base_model_weights_is_refused_with_the_module_named(tmp_path) -> None:
    first, second = lora(tmp_path / "a", seed=1), lora(tmp_path / "b", seed=2)
    module = "model.layers.1.self_attn.v_proj"
    base = base_model_with(tmp_path, module)
    result = invoke("merge", first, second, "--method", "rapf", "--base-model", base, "--out", tmp_path / "out")
    assert_user_error(result, f"{module}.weight", "NaN or Inf", str(base))
    assert not (tmp_path / "out").exists()


def test_finite_base_model_weights_still_merge(tmp_path) -> None:
    first, second = lora(tmp_path / "a", seed=1), lora(tmp_path / "b", seed=2)
    result = invoke("merge", first, second, "--method", "rapf", "--base-model", base_model_with(tmp_path, None),
                    "--rank", "8", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_a_scale_beyond_float32_is_refused_when_the_config_is_read(tmp_path) -> None:
    folder = rewrite_config(lora(tmp_path / "a"), alpha_pattern={"v_proj": 1e40})
    with pytest.raises(CorruptAdapterError) as caught:
        load_adapter(folder)  # headers only: no tensor is read before the refusal
    message = str(caught.value)
    assert "model.layers.0.self_attn.v_proj" in message and "2.5e+39" in message and "float32" in message


def test_a_scale_beyond_the_output_dtype_is_refused_before_merging(tmp_path) -> None:
    folder = write_lora(tmp_path / "half", SHAPES, r=4, alpha=4e5, dtype="float16")  # scale 1e5 > 65504
    line = assert_user_error(invoke("merge", folder, "--out", tmp_path / "out"), "scale 100000.0", "float16", "--dtype float32")
    assert "model.layers.0.self_attn.q_proj" in line and not (tmp_path / "out").exists()
    # the same adapter written in float32 is fine: the scale fits there
    result = invoke("merge", folder, "--dtype", "float32", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("targets", "error"),
    [
        (["../../etc"], "target_modules=['../../etc'] does not select it"),
        (["proj"], "does not select it"),  # a suffix must be a whole dotted segment, as in PEFT
        (r".*\.q_proj", "model.layers.0.self_attn.v_proj has LoRA tensors"),  # a string is a full-match regex
        (["q_proj", "v_proj"], None),
        (r".*\.(q|v)_proj", None),
        ("all-linear", None),
        (None, None),
        (["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "v_proj"], None),
    ],
)
def test_tensors_outside_target_modules_are_refused_as_peft_would(targets, error, tmp_path) -> None:
    folder = rewrite_config(lora(tmp_path / "a"), target_modules=targets)
    if error is None:
        assert load_adapter(folder).modules.keys() == SHAPES.keys()
    else:
        with pytest.raises(CorruptAdapterError, match="PEFT would refuse to load"):
            load_adapter(folder)
        assert_user_error(invoke("merge", folder, "--out", tmp_path / "out"), error)


def test_our_target_module_matching_agrees_with_peft(tmp_path) -> None:
    # the reference: PEFT itself decides which modules of a real model a config targets
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft import LoraConfig

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
    from lora_fusion.formats.peft import _selects

    for targets in (["q_proj"], ["self_attn.v_proj"], ["proj"], r".*\.(q|up)_proj", r"q_proj", ["layers.0.mlp.up_proj"]):
        config = LoraConfig(target_modules=targets)
        for name in names:
            assert _selects(targets, name, "test") == bool(check_target_module_exists(config, name)), (targets, name)


def test_excluded_modules_with_tensors_are_refused(tmp_path) -> None:
    folder = rewrite_config(lora(tmp_path / "a"), exclude_modules=["v_proj"])
    with pytest.raises(CorruptAdapterError, match="exclude_modules"):
        load_adapter(folder)


# --------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_the_merge_prints_one_line_and_exits_130(tmp_path, monkeypatch, capfd) -> None:
    import lora_fusion.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_fusion.api, "merge", interrupted)
    out = tmp_path / "out"
    assert main(["merge", str(lora(tmp_path / "a")), "--out", str(out)]) == 130
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"interrupted; nothing written; {out} not created."]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["a"]


def test_ctrl_c_while_writing_leaves_the_previous_output(tmp_path, monkeypatch, capfd) -> None:
    import lora_fusion.writer

    folder, out = lora(tmp_path / "a"), tmp_path / "out"
    assert main(["merge", str(folder), "--out", str(out), "--quiet"]) == 0
    before = snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_fusion.writer, "_check_written", interrupted)  # after the files are staged
    capfd.readouterr()
    assert main(["merge", str(folder), "--method", "svd", "--rank", "2", "--out", str(out), "--overwrite"]) == 130
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"interrupted; nothing written; {out} untouched."]
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]


# --------------------------------------------------------------------------------------------- warnings


def test_low_retained_energy_at_the_default_rank_is_warned_even_with_quiet(tmp_path) -> None:
    first, second = lora(tmp_path / "a", seed=1), lora(tmp_path / "b", seed=2)
    result = invoke("merge", first, second, "--method", "svd", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    [line] = warnings_of(result)
    assert "keep less than 0.9" in line and "--energy 0.99" in line
    # with an explicit rank or energy the user chose the truncation: no warning
    for option in (("--rank", "4"), ("--energy", "0.5")):
        chosen = invoke("merge", first, second, "--method", "svd", *option, "--out", tmp_path / "o", "--overwrite")
        assert chosen.exit_code == 0 and warnings_of(chosen) == [], chosen.output


def zero_lora(folder: Path) -> Path:
    """An untrained PEFT LoRA: B is zero (PEFT's default initialisation)."""
    lora(folder)
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


def test_all_zero_inputs_and_outputs_are_warned(tmp_path) -> None:
    trained, untrained = lora(tmp_path / "a", seed=1), zero_lora(tmp_path / "zero")
    result = invoke("merge", trained, untrained, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    [line] = warnings_of(result)
    assert line.startswith("Warning: source 2") and "all zeros" in line
    cancelled = invoke("merge", trained, trained, "--weights", "1,-1", "--method", "ties", "--density", "1",
                       "--out", tmp_path / "cancel")
    assert cancelled.exit_code == 0, cancelled.output
    assert any("the merged adapter is all zeros" in line for line in warnings_of(cancelled)), cancelled.stderr


def test_the_same_source_twice_is_warned(tmp_path) -> None:
    folder = lora(tmp_path / "a")
    with pytest.warns(DegenerateMergeWarning, match="source 2 .* is the same adapter as source 1"):
        merge([folder, tmp_path / "." / "a"])
    result = invoke("merge", folder, lora(tmp_path / "b", seed=3), "--out", tmp_path / "out")
    assert warnings_of(result) == []


def test_cli_sources_replacing_a_recipes_sources_are_warned(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"sources": [str(lora(tmp_path / "a")), str(lora(tmp_path / "b", seed=1))]}))
    result = invoke("merge", "--recipe", recipe, lora(tmp_path / "c", seed=2), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == [f"Warning: the sources given on the command line replace the 2 of {recipe}."]


def test_dry_run_with_an_existing_out_is_warned(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("merge", lora(tmp_path / "a"), "--dry-run", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == [f"Warning: --out {out} already exists: a real run would need --overwrite."]


# --------------------------------------------------------------------------------------------- help


def test_each_parameter_help_names_every_method_that_takes_it() -> None:
    text = " ".join(invoke("merge", "--help").stdout.split())  # Typer wraps the help text
    assert "default: linear" in text
    for name in ("rank", "energy", "density", "svd", "bias"):
        takers = sorted(m.name for m in list_methods() if name in m.declared)
        assert len(takers) >= 1
        option = text.index(f"--{name} <")
        assert f"Taken by: {', '.join(takers)}." in text[option:option + 600], name


def test_library_errors_are_one_line(tmp_path) -> None:
    # every message above is printed on one line by the CLI: none may hold a newline
    folder = rewrite_config(lora(tmp_path / "a"), target_modules=["x\ny"])
    with pytest.raises(LoraFusionError) as caught:
        load_adapter(folder)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------- a Hub that hangs


def test_a_hub_that_hangs_ends_in_one_line_within_the_timeout(hub, tmp_path, monkeypatch) -> None:
    import time

    monkeypatch.setenv("LORA_FUSION_HUB_TIMEOUT", "2")
    hub.add_repo("org/hangs", snapshot(lora(tmp_path / "a")))
    hub.delay_next(5.0, 1000, "adapter_config.json")  # every request hangs longer than the limit
    start = time.monotonic()
    result = invoke("merge", "org/hangs", "--out", tmp_path / "out")
    elapsed = time.monotonic() - start
    assert_user_error(result, "org/hangs", "did not answer for 2 s", "LORA_FUSION_HUB_TIMEOUT")
    assert elapsed < 4.5, elapsed  # the limit plus one polling interval, with margin for a loaded machine
    assert not (tmp_path / "out").exists()
    # the abandoned download thread must not outlive the test: later tests count requests and backoff sleeps
    hub.clear_faults()
    for thread in threading.enumerate():
        if thread.name.startswith("lora-fusion-hub-"):
            thread.join(timeout=30)
            assert not thread.is_alive()


def test_a_slow_transfer_that_keeps_moving_is_not_cut(monkeypatch) -> None:
    import time

    from lora_fusion.errors import HubError
    from lora_fusion.hub import call_hub

    monkeypatch.setenv("LORA_FUSION_HUB_TIMEOUT", "1")
    received = [0]

    def slow() -> str:
        for _ in range(30):  # 3 s in all, bytes arriving every 0.1 s
            time.sleep(0.1)
            received[0] += 1
        return "done"

    assert call_hub(slow, repo_id="org/slow", progress=lambda: received[0]) == "done"
    with pytest.raises(HubError, match="did not answer for 1 s"):
        call_hub(lambda: time.sleep(3), repo_id="org/silent", progress=lambda: 0)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_a_bad_hub_timeout_setting_is_a_user_error(value, hub, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LORA_FUSION_HUB_TIMEOUT", value)
    hub.add_repo("org/a", snapshot(lora(tmp_path / "a")))
    assert_user_error(invoke("merge", "org/a", "--out", tmp_path / "out"), "LORA_FUSION_HUB_TIMEOUT", repr(value))


def test_a_hub_that_hangs_during_a_push_ends_in_one_line(hub, tmp_path, monkeypatch) -> None:
    import time

    monkeypatch.setenv("LORA_FUSION_HUB_TIMEOUT", "1")
    hub.delay_next(4.0, 1000, "/api/repos/create")  # huggingface_hub's uploads have no timeout of their own
    folder = lora(tmp_path / "a")
    start = time.monotonic()
    result = invoke("push", folder, "me/hangs")
    assert_user_error(result, "me/hangs", "did not answer for 1.0")  # 1 s + the folder's size at 100 kB/s
    assert time.monotonic() - start < 4
    hub.clear_faults()  # the abandoned call ends (a CLI process exits at once; in the API it may finish later)
    for thread in threading.enumerate():
        if thread.name.startswith("lora-fusion-hub-"):
            thread.join(timeout=30)
