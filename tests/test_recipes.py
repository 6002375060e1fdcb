"""One recipe loader for merge, `cil run` and `icm train` recipes (issue 13 §8): the same refusals, and relative paths
resolved against the recipe file's folder in every kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_fusion.cil.recipe import load_recipe as load_cil_recipe
from lora_fusion.errors import RecipeError
from lora_fusion.icm.pipeline import ICMRecipe
from lora_fusion.recipe import load_recipe

LOADERS = {"merge": load_recipe, "cil": load_cil_recipe, "icm": ICMRecipe.from_file}


def test_relative_paths_resolve_against_the_recipe_folder_in_every_kind(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "recipes"
    (folder / "adapters" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "recipes" / "adapters")  # somewhere else: the working directory must not matter
    merge = folder / "merge.yaml"
    merge.write_text("sources: [adapters/a, org/hub-lora]\nout: ../out/merged\n")
    recipe = load_recipe(merge)
    assert [e.source for e in recipe.entries()] == [str(folder / "adapters" / "a"), "org/hub-lora"]
    assert recipe.out == str(tmp_path / "out" / "merged")
    cil = folder / "cil.yaml"
    cil.write_text("encoders: {kind: clip, model: openai/clip-vit-base-patch16}\n"
                   "data: {source: image_folder, root: data/imagenet-r}\ninitial_classes: 2\nincrement: 2\n"
                   "cache_dir: cache\nout: ../runs/x\n")
    spec = load_cil_recipe(cil)
    assert (spec.data.root, spec.cache_dir, spec.out) == (
        str(folder / "data" / "imagenet-r"), str(folder / "cache"), str(tmp_path / "runs" / "x"))
    icm = folder / "icm.yaml"
    icm.write_text("data_dirs: {wordnet: ../wordnet, fortunes: /abs/fortunes}\n")
    assert dict(ICMRecipe.from_file(icm).data_dirs) == {"wordnet": str(tmp_path / "wordnet"),
                                                         "fortunes": "/abs/fortunes"}


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "not found; pass the path of a YAML recipe"),
        ("method: [svd\n", r"not valid YAML \(line 2\); fix the file"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("- a list\n", "a recipe is a YAML mapping of keys"),
    ],
    ids=["missing", "invalid", "nested", "not-a-mapping"],
)
def test_every_recipe_kind_refuses_the_same_way(kind, text, message, tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        LOADERS[kind](path)
