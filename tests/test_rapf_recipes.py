"""The shipped RAPF recipes are faithful to the official repository (linlany/RAPF at commit 81d41df).

Every `recipes/rapf_*.yaml` is read with the library's own loader (`lora_fusion.cil.load_recipe`), its classes are
put in order by the library's own task split, and the result is compared with the official class orders and
class-name lists shipped as data in `recipes/rapf-official/` (copied byte for byte; see its README). For the
image-folder datasets the comparison goes through `image_folder` on an empty stand-in of the dataset's layout, so
it checks the prompt names the trainer would really use, in the order it would use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lora_fusion.cil.data import array_dataset, image_folder, split_tasks
from lora_fusion.cil.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO / "recipes" / "rapf-official"
RECIPES = sorted((REPO / "recipes").glob("rapf_*.yaml"))
OFFLINE_ONLY = {"rapf_fashion_mnist"}  # the project's own offline evidence, no official counterpart

# Official settings (configs/class/*.yaml at 81d41df) → order file and class-name file of the dataset.
DATASETS = {
    "cifar100": ("class_orders/cifar100_order.yaml", None, 100),
    "imagenet100": ("class_orders/imagenet100.yaml", "dataset_reqs/imagenet100_classes.txt", 100),
    "imagenet_r": ("class_orders/imagenet_R_order.yaml", "dataset_reqs/imagenet_R_classes.txt", 200),
    "cub200": ("class_orders/cub200_order.yaml", "dataset_reqs/cub200_classes.txt", 200),
}
OFFICIAL_SETTINGS = {
    "cifar100_10-10", "cifar100_50-10", "cifar100_50-5", "cub200_20-20",
    "imagenet100_10-10", "imagenet100_20-20", "imagenet100_5-5", "imagenet100_50-10", "imagenet100_50-5",
    "imagenet_r_10-10", "imagenet_r_100-10", "imagenet_r_100-20", "imagenet_r_20-20", "imagenet_r_40-40",
}
# The order the CIFAR-100 recipes carried before: upstream commit edc57f7, replaced the same day by afbea62.
SUPERSEDED_CIFAR100_START = [99, 71, 95, 8, 57, 25, 87, 21, 65, 86]


def dataset_of(path: Path) -> str:
    return path.stem.removeprefix("rapf_").rsplit("_", 1)[0]


def official_order(dataset: str) -> list[int]:
    return yaml.safe_load((OFFICIAL / DATASETS[dataset][0]).read_text(encoding="utf-8"))["class_order"]


def official_classes(dataset: str) -> list[list[str]]:
    """The rows of the official class list (tab-separated fields), in label order."""
    text = (OFFICIAL / DATASETS[dataset][1]).read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def official_prompt_names(dataset: str) -> list[str]:
    # continual_clip/utils.py, get_dataset_class_names: the last tab-separated field of each line, in file order.
    return [row[-1] for row in official_classes(dataset)]


def stand_in_folder(root: Path, folders: list[str], split_file: str | None) -> tuple[Path, Path | None]:
    """Empty image files in the layout `image_folder` reads: root/{train,test}/<class>/…, or root/<class>/… with a
    split file listing them (the ImageNet-R layout)."""
    if split_file is None:
        for which in ("train", "test"):
            for folder in folders:
                (root / which / folder).mkdir(parents=True)
                (root / which / folder / "0.jpg").touch()
        return root, None
    lines = {"train": [], "test": []}
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for which, name in (("train", "train_0.jpg"), ("test", "test_0.jpg")):
            (root / folder / name).touch()
            lines[which].append(f"{folder}/{name}")
    listing = root / "split.txt"
    listing.write_text("train\n" + "\n".join(lines["train"]) + "\ntest\n" + "\n".join(lines["test"]) + "\n")
    return root, listing


def test_there_is_one_recipe_per_official_setting() -> None:
    settings = {p.stem.removeprefix("rapf_") for p in RECIPES if p.stem not in OFFLINE_ONLY}
    assert settings == OFFICIAL_SETTINGS


def test_the_shipped_official_files_are_complete_and_consistent() -> None:
    for dataset, (_, names_file, count) in DATASETS.items():
        order = official_order(dataset)
        assert sorted(order) == list(range(count)), dataset
        if names_file is None:
            continue
        rows = official_classes(dataset)
        assert len(rows) == count, dataset
        if dataset == "cub200":  # "1\tBlack_footed_Albatross": 1-based class ids, the NNN of the NNN.Name folders
            assert [int(row[0]) for row in rows] == list(range(1, count + 1))
        else:  # "0\tn01440764\ttench": index, WordNet id; the ids sorted, so label i is the i-th synset folder
            assert [int(row[0]) for row in rows] == list(range(count)), dataset
            wnids = [row[1] for row in rows]
            assert wnids == sorted(wnids) and len(set(wnids)) == count, dataset
    assert official_order("cifar100")[:10] == [87, 0, 52, 58, 44, 91, 68, 97, 51, 15]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_follows_the_official_class_order(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    if path.stem in OFFLINE_ONLY:
        return
    dataset = dataset_of(path)
    order = official_order(dataset)
    assert recipe.class_order == order, f"{path.name}: class_order differs from the official {DATASETS[dataset][0]}"
    assert recipe.class_order[:10] != SUPERSEDED_CIFAR100_START
    assert recipe.prompt == "a good photo of a {}."
    setting = path.stem.removeprefix("rapf_").rsplit("_", 1)[1]
    initial, increment = (int(n) for n in setting.split("-"))
    assert (recipe.initial_classes, recipe.increment) == (initial, increment)


@pytest.mark.parametrize("path", [p for p in RECIPES if dataset_of(p) == "cifar100"], ids=lambda p: p.stem)
def test_cifar100_recipes_split_tasks_in_the_official_order(path: Path) -> None:
    # CIFAR-100's prompt names are the dataset's own fine_label_names (official code: torchvision's `classes`, the
    # same list), so only the order is the recipe's: check it through the library's split.
    recipe = load_recipe(path)
    assert recipe.data.source == "cifar100" and recipe.data.class_names is None
    images, labels = torch.zeros(100, 3, 2, 2, dtype=torch.uint8), torch.arange(100)
    dataset = array_dataset("cifar100-labels", [f"class{i}" for i in range(100)], (images, labels), (images, labels))
    split = split_tasks(dataset, initial=recipe.initial_classes, increment=recipe.increment,
                        class_order=recipe.class_order)
    assert split.order == official_order("cifar100")
    assert [len(task) for task in split.tasks] == [recipe.initial_classes] + [recipe.increment] * (
        (100 - recipe.initial_classes) // recipe.increment)


@pytest.mark.parametrize("path", [p for p in RECIPES if dataset_of(p) in ("imagenet100", "imagenet_r", "cub200")],
                         ids=lambda p: p.stem)
def test_image_folder_recipes_prompt_the_official_class_names_in_the_official_order(path: Path,
                                                                                     tmp_path: Path) -> None:
    recipe = load_recipe(path)
    dataset = dataset_of(path)
    names = recipe.data.class_names
    assert recipe.data.source == "image_folder" and names, f"{path.name}: no data.class_names map"
    rows = official_classes(dataset)
    if dataset == "cub200":  # folders CUB_200_2011/images/NNN.Name
        folders = [f"{int(row[0]):03d}.{row[-1]}" for row in rows]
    else:  # synset folders
        folders = [row[1] for row in rows]
    assert sorted(names) == sorted(folders), f"{path.name}: class_names keys are not the dataset's class folders"

    root, split_file = stand_in_folder(tmp_path / "data", folders, recipe.data.split_file)
    data = image_folder(root, class_names=names, split_file=split_file)
    assert data.class_names == official_prompt_names(dataset), f"{path.name}: names differ from the official list"
    split = split_tasks(data, initial=recipe.initial_classes, increment=recipe.increment,
                        class_order=recipe.class_order)
    prompted = [data.class_names[label] for label in split.order]  # what run_cil formats into the prompts
    official = official_prompt_names(dataset)
    assert prompted == [official[i] for i in official_order(dataset)]
