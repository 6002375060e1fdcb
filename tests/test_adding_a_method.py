"""The README's "Adding a method" example, run as written: a method with its own parameter, defined in one file
outside the package, works from `merge()`, from a recipe and from the CLI (`--param` and the generated option),
found through the `lora_fusion.methods` entry-point group, without editing the package."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_fusion import load_adapter
from tests.test_reliability import lora

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent


def readme_example() -> tuple[str, str]:
    """The Python file and the entry-point table of the README's "Adding a method" section."""
    section = README.read_text(encoding="utf-8").split("### Adding a method", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S)
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    assert python and toml, "the README's Adding a method section lost its example"
    return python.group(1), toml.group(1)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """A folder holding the README's power_sum.py and a distribution that declares it as an entry point."""
    folder = tmp_path_factory.mktemp("plugin")
    code, table = readme_example()
    (folder / "power_sum.py").write_text(code, encoding="utf-8")
    group, entry = re.search(r'\[project\.entry-points\."([\w.]+)"\]\n(.+)', table).groups()
    name, _, target = (part.strip().strip('"') for part in entry.partition("="))
    info = folder / "power_sum_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: power-sum-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {target}\n")
    return folder


def run(plugin: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO)])})
    assert done.returncode == 0, done.stderr
    return done


def expected_delta(sources: list[Path], weights: list[float], power: float, module: str) -> torch.Tensor:
    shares = [abs(w) ** power for w in weights]
    return sum((share / sum(shares)) * load_adapter(s).delta(module) for s, share in zip(sources, shares))


def test_the_readme_method_works_from_the_api_a_recipe_and_the_cli(plugin: Path, tmp_path: Path) -> None:
    sources = [lora(tmp_path / "a", seed=1), lora(tmp_path / "b", seed=2)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: power_sum\npower: 3\nweights: [0.7, 0.3]\nsources: [{sources[0]}, {sources[1]}]\n"
                      f"out: {tmp_path / 'from_recipe'}\n")
    # One process, which never imports power_sum itself: the CLI finds it through the entry point.
    cli = (
        "import sys; from lora_fusion_cli.main import main\n"
        "a, b, out = sys.argv[1:4]\n"
        "common = [a, b, '--method', 'power_sum', '--weights', '0.7,0.3', '--quiet']\n"
        "assert main(['merge', *common, '--param', 'power=2', '--out', out + '/param']) == 0\n"
        "assert main(['merge', *common, '--power', '0.5', '--out', out + '/option']) == 0\n"
        "assert main(['merge', '--recipe', sys.argv[4]]) == 0\n"
        "assert main(['merge', *common, '--param', 'powr=2', '--out', out + '/never']) == 2\n"
        "assert main(['methods', '--json']) == 0\n"
    )
    done = run(plugin, cli, *map(str, sources), str(tmp_path), str(recipe))
    listed = {row["name"]: row for row in json.loads(done.stdout[done.stdout.index("[\n"):])}
    assert listed["power_sum"]["params"] == {
        "power": {"default": 1.0, "help": "Exponent p of the weights: wᵢ ← |wᵢ|ᵖ / Σⱼ |wⱼ|ᵖ."}
    }
    assert "unknown key 'powr'; power_sum takes power," in done.stderr  # refused with the method's parameters
    assert not (tmp_path / "never").exists()
    module = next(iter(load_adapter(sources[0]).modules))
    for folder, power in (("param", 2.0), ("option", 0.5), ("from_recipe", 3.0)):
        with safe_open(tmp_path / folder / "adapter_model.safetensors", "pt") as written:
            provenance = json.loads(written.metadata()["lora_fusion"])
        assert provenance["method"] == "power_sum" and provenance["params"] == {"power": power}
        merged = load_adapter(tmp_path / folder)
        torch.testing.assert_close(merged.delta(module), expected_delta(sources, [0.7, 0.3], power, module))


def test_the_readme_method_works_from_merge_after_an_import(plugin: Path, tmp_path: Path) -> None:
    sources = [lora(tmp_path / "a", seed=3), lora(tmp_path / "b", seed=4)]
    api = (
        "import sys; import power_sum; from lora_fusion import merge\n"
        "from lora_fusion.errors import InvalidParameterError\n"
        "merged = merge(sys.argv[1:3], method='power_sum', weights=[2.0, 1.0], power=2.0)\n"
        "merged.save_pretrained(sys.argv[3])\n"
        "try:\n"
        "    merge(sys.argv[1:3], method='power_sum', power=-1)\n"
        "except InvalidParameterError as err:\n"
        "    print(err)\n"
    )
    done = run(plugin, api, *map(str, sources), str(tmp_path / "out"))
    assert "invalid power -1: expected a number above 0, e.g. 2." in done.stdout
    module = next(iter(load_adapter(sources[0]).modules))
    merged = load_adapter(tmp_path / "out")
    torch.testing.assert_close(merged.delta(module), expected_delta(sources, [2.0, 1.0], 2.0, module))
