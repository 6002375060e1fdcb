"""The CLI in-process (Typer's CliRunner), plus a few real subprocesses for what `--help` imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_fusion import load_adapter
from lora_fusion_cli.main import app, main

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> str:
    """Assert the CLI's contract for user errors (exit 2, one `Error:` line, no traceback); return the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def two_loras(make_llama_lora) -> tuple[Path, Path]:
    return make_llama_lora(seed=1, r=4, lora_alpha=8), make_llama_lora(seed=2, r=8, lora_alpha=8, use_rslora=True)


def test_merge_svd_writes_a_peft_adapter(two_loras, tmp_path) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", *two_loras, "--method", "svd", "--rank", "6", "--weights", "0.6,0.4", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    merged = load_adapter(out)
    assert {s.rank for s in merged.modules.values()} == {6}
    card = (out / "README.md").read_text()
    assert "svd" in card and two_loras[0].name in card and str(tmp_path) not in card and "retained energy" in card
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.library_name == "peft"  # the Hub reads its metadata
    metadata = json.loads(_metadata(out / "adapter_model.safetensors")["lora_fusion"])
    assert metadata["method"] == "svd" and metadata["params"]["rank"] == 6
    assert [s["weight"] for s in metadata["sources"]] == [0.6, 0.4]
    assert 0 < min(m["retained_energy"] for m in metadata["modules"].values()) <= 1


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_same_inputs_give_byte_identical_files(two_loras, tmp_path) -> None:
    for name in ("one", "two"):
        assert invoke("merge", *two_loras, "--method", "svd", "--energy", "0.9", "--out", tmp_path / name).exit_code == 0
    for file in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes(), file


def test_dry_run_prints_the_plan_and_writes_nothing(two_loras, tmp_path) -> None:
    out = tmp_path / "planned"
    result = invoke("merge", *two_loras, "--method", "svd", "--out", out, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["modules"] == 4 and set(plan["output_ranks"].values()) == {8}
    assert plan["estimated_flops"] > 0 and plan["output_bytes"] == 4 * 8 * (64 + 64) * 4 - 2 * 8 * 32 * 4
    assert not out.exists()
    text = invoke("merge", *two_loras, "--method", "svd", "--dry-run")
    assert "output ranks" in text.stdout and "peak memory" in text.stdout


def test_dry_run_memory_of_full_space_ties_does_not_grow_with_the_adapters(make_llama_lora) -> None:
    # The adapters' dense updates are streamed in row blocks; only the merged one is held (methods/elementwise.py).
    loras = [make_llama_lora(seed=s, r=4, lora_alpha=8) for s in range(6)]

    def peak(count: int, method: str) -> int:
        result = invoke("merge", *loras[:count], "--method", method, "--dry-run", "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["estimated_peak_bytes"]

    assert peak(2, "ties") == peak(6, "ties")
    assert peak(6, "svd") > peak(2, "svd")  # factored methods hold the stacked factors: k = Σ rᵢ grows


def test_existing_output_is_refused_without_overwrite(two_loras, tmp_path) -> None:
    out = tmp_path / "out"
    assert invoke("merge", *two_loras, "--out", out).exit_code == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert_user_error(invoke("merge", *two_loras, "--weights", "1,2", "--out", out), "already exists", "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert invoke("merge", *two_loras, "--weights", "1,2", "--out", out, "--overwrite").exit_code == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_write_leaves_the_previous_output_intact(two_loras, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    assert invoke("merge", *two_loras, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lora_fusion.formats.stores.write_tensor_bytes", disk_full)
    assert_user_error(invoke("merge", *two_loras, "--out", out, "--overwrite"), "No space left", "nothing was written")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_recipe_merges_and_flags_override(two_loras, tmp_path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: svd\nrank: 3\nsources:\n  - {two_loras[0]}\n  - source: {two_loras[1]}\n    weight: 0.5\nout: merged\n"
    )
    assert invoke("merge", "--recipe", recipe).exit_code == 0
    assert {s.rank for s in load_adapter(tmp_path / "merged").modules.values()} == {3}
    assert invoke("merge", "--recipe", recipe, "--rank", "5", "--overwrite").exit_code == 0
    assert {s.rank for s in load_adapter(tmp_path / "merged").modules.values()} == {5}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("method: svd\nrnak: 3\nsources: [a]\n", "unknown key 'rnak'"),
        ("method: svd\nrank: three\nsources: [a]\n", "rank"),
        ("method: svd\nsources: []\n", "sources"),
        ("method: [svd\n", "not valid YAML"),
    ],
)
def test_bad_recipes_are_refused_by_name(tmp_path, text, fragment) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert_user_error(invoke("merge", "--recipe", recipe), fragment)


def test_inspect_json_describes_modules(two_loras) -> None:
    result = invoke("inspect", two_loras[1], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ranks"] == [8] and report["scales"] == [pytest.approx(8 / 8**0.5, rel=1e-5)]
    assert len(report["modules"]) == 4
    assert "4 modules" in invoke("inspect", *two_loras).stdout


def test_methods_lists_name_formula_and_reference() -> None:
    rows = {row["name"]: row for row in json.loads(invoke("methods", "--json").stdout)}
    assert {"linear", "task_arithmetic", "svd"} <= set(rows)
    assert rows["linear"]["aliases"] == ["cat"] and "arXiv" in rows["task_arithmetic"]["reference"]


def corrupt(path: Path) -> Path:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return path


def with_nan(path: Path) -> Path:
    tensors = load_file(path / "adapter_model.safetensors")
    next(t for k, t in tensors.items() if "lora_A" in k)[0, 0] = float("inf")
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def test_user_errors_exit_2_with_one_line(two_loras, make_llama_lora, llama_dir, tmp_path) -> None:
    a, b = two_loras
    out = tmp_path / "never"
    cases = [
        (["merge", tmp_path / "missing", b, "--out", out], "no such file"),
        (["merge", llama_dir, b, "--out", out], "full model"),
        (["merge", corrupt(make_llama_lora(seed=3)), b, "--out", out], "safetensors"),
        (["merge", with_nan(make_llama_lora(seed=4)), b, "--out", out], "NaN or Inf"),
        (["merge", a, b, "--weights", "0.5", "--out", out], "one weight per source"),
        (["merge", a, b, "--weights", "0.5,x", "--out", out], "comma-separated"),
        (["merge", a, b, "--method", "fancy", "--out", out], "unknown method"),
        (["merge", a, b, "--method", "svd", "--rank", "0", "--out", out], "rank"),
        (["merge", a, b, "--method", "linear", "--rank", "4", "--out", out], "linear takes no parameters"),
        (["merge", a, b, "--method", "svd", "--energy", "1.5", "--out", out], "energy"),
        (["merge", a, b, "--device", "cuda", "--out", out] if not torch.cuda.is_available() else ["merge"], ""),
        (["merge", a, b], "--out"),
        (["push", tmp_path, "me/x"], "adapter"),
    ]
    for args, fragment in cases:
        assert_user_error(invoke(*args), fragment)
    assert not out.exists()


def test_parse_errors_are_one_line_too(capsys) -> None:
    assert main(["merge", "--rnak", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error:") and "--rnak" in err[0]


def test_version_and_help_import_no_heavy_modules() -> None:
    probe = (
        "import sys; from lora_fusion_cli.main import main; code = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'huggingface_hub') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(code)"
    )
    for args in (["--help"], ["--version"], ["merge", "--help"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    import lora_fusion

    script = Path(sys.executable).parent / "lora-fusion"  # the console script installed next to this interpreter
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"lora-fusion {lora_fusion.__version__}"


def test_package_import_is_lazy_and_every_public_name_resolves() -> None:
    code = "import lora_fusion, sys; assert 'torch' not in sys.modules; print(len(lora_fusion.__all__))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
    import lora_fusion

    for name in lora_fusion.__all__:
        assert getattr(lora_fusion, name) is not None


def test_interference_method_errors_exit_2(two_loras, tmp_path, capsys) -> None:
    a, b = two_loras
    out = tmp_path / "never"
    cases = [
        (["merge", a, b, "--method", "ties", "--density", "0", "--out", out], "density"),
        (["merge", a, b, "--method", "ties", "--density", "1.2", "--out", out], "density"),
        (["merge", a, b, "--method", "knots", "--space", "core", "--out", out], "knots takes"),
        (["merge", a, b, "--method", "tsv", "--space", "full", "--out", out], "no full form"),
        (["merge", a, b, "--method", "dare_ties", "--seed", "-3", "--out", out], "seed"),
        (["merge", a, b, "--method", "ties", "--majority", "loud", "--out", out], "majority"),
        (["inspect", a, "--interference"], "at least two"),
    ]
    for args, fragment in cases:
        assert_user_error(invoke(*args), fragment)
    assert main(["merge", str(a), "--method", "dare_ties", "--seed", "abc", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed" in err[0]
    assert not out.exists()


def test_ties_merge_records_its_resolved_parameters(two_loras, tmp_path) -> None:
    out = tmp_path / "ties"
    result = invoke("merge", *two_loras, "--method", "ties", "--space", "core", "--out", out)
    assert result.exit_code == 0, result.output
    metadata = json.loads(_metadata(out / "adapter_model.safetensors")["lora_fusion"])
    assert metadata["params"] == {
        "density": 0.2, "energy": None, "majority": "total", "max_rank": None, "rank": None, "scale": 1.0, "seed": 0,
        "space": "core", "sv_cumulative": None, "sv_fro": None, "sv_ratio": None, "svd": "auto",
    }
    assert "ties" in (out / "README.md").read_text()
