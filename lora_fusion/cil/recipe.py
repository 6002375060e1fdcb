"""YAML recipes of `lora-fusion cil run`: encoders, data, task split and RAPF's hyperparameters, validated whole.

```yaml
encoders: {kind: clip, model: openai/clip-vit-base-patch16}
data: {source: image_folder, root: /data/imagenet-r}
initial_classes: 20
increment: 20
train: {batch_size: 64}
rapf: {beta: 1, replay_classes: 5, threshold: 0.65, bias: 0.7, shrinkage: true}
out: ../runs/imagenet_r_20_20
```
Defaults are the official code's common settings (docs/rapf.md); relative paths (data, cache, `out`) resolve against
the recipe's folder, as in every recipe. Unknown keys, wrong types and out-of-range values are refused with one line
naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..recipe import read_recipe_file, recipe_path
from .errors import InvalidParameterError, RecipeError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderSpec(_Section):
    """The frozen encoders: a Hugging Face CLIPModel, or the offline EfficientNet-Lite0 + all-MiniLM-L6-v2 pair."""

    kind: Literal["clip", "efficientnet_minilm"] = "clip"
    model: str = "openai/clip-vit-base-patch16"
    revision: str | None = None
    image_size: int = Field(112, ge=16, description="efficientnet_minilm only: the resized image side, in pixels.")


class DataSpec(_Section):
    """Where the images come from, and optional per-class caps (first images of each class in file order)."""

    source: Literal["fashion_mnist", "image_folder", "cifar100"]
    root: str | None = None
    train_per_class: int | None = Field(None, ge=1)
    test_per_class: int | None = Field(None, ge=1)
    class_names: dict[str, str] | None = None
    split_file: str | None = None


class TrainSpec(_Section):
    """The optimisation of each task (official code: Adam 1e-3, 15 epochs, LR ×0.1 after epochs 4 and 10)."""

    epochs: int = Field(15, ge=1)
    batch_size: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    milestones: list[int] = [4, 10]
    lr_gamma: float = Field(0.1, gt=0)
    logit_scale: float = Field(100.0, gt=0)
    # micro-batches of `batch_size` whose gradients add up to one step (Accelerate; 1 in the official code)
    gradient_accumulation: int = Field(1, ge=1)


class RapfSpec(_Section):
    """RAPF's components and hyperparameters (docs/rapf.md), with switches for the ablations."""

    replay: bool = True
    hinge: bool = True
    fusion: Literal["decomposed", "raw", "none"] = "decomposed"
    beta: float = Field(2.0, gt=0, description="Replay volume: 10·β samples per replayed class, 20·β per pair.")
    replay_classes: int = Field(2, ge=1, description="Old classes replayed per batch (k).")
    threshold: float = Field(0.55, description="α: (old i, new j) is a hard pair iff ‖t̂_j − t̂_i‖ < α.")
    margin: float = Field(0.1, ge=0)
    bias: float = Field(0.6, description="b of the fusion mask M = min(1, D/max D + b).")
    shrinkage: bool = False
    ridge: float = Field(1e-4, ge=0)

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, value: float) -> float:
        # Distances between unit vectors lie in [0, 2]: α ≤ 0 selects no pair, α > 2 every pair.
        if not 0.0 < value <= 2.0:
            raise InvalidParameterError("rapf.threshold (α)", value, expected="a distance in (0, 2], e.g. 0.55")
        return value

    @field_validator("bias")
    @classmethod
    def _bias_range(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise InvalidParameterError("rapf.bias (b)", value, expected="a number in [0, 1], e.g. 0.6")
        return value


class CILRecipe(_Section):
    """A whole class-incremental run."""

    name: str = "rapf"
    encoders: EncoderSpec = EncoderSpec()
    data: DataSpec
    class_order: list[int | str] | int | None = None
    initial_classes: int = Field(10, ge=1)
    increment: int = Field(10, ge=1)
    prompt: str = "a good photo of a {}."
    train: TrainSpec = TrainSpec()
    rapf: RapfSpec = RapfSpec()
    joint: bool = Field(False, description="Upper bound: one task with every class (no replay, hinge or fusion).")
    seed: int = Field(2, ge=0)
    # None: the launcher's choice (`accelerate launch --mixed_precision bf16`), else no
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    cpu: bool = False
    feature_batch_size: int = Field(64, ge=1)
    cache_dir: str | None = None
    out: str = "runs/rapf"

    @field_validator("prompt")
    @classmethod
    def _prompt_has_slot(cls, value: str) -> str:
        if "{}" not in value:
            raise ValueError("the prompt needs a {} where the class name goes, e.g. 'a good photo of a {}.'")
        return value


def validated(data: dict[str, Any], *, origin: str) -> CILRecipe:
    """A [`CILRecipe`] from a mapping.

    Raises:
        RecipeError: the first unknown key, wrong type or out-of-range value, with its location.
        InvalidParameterError: α or b out of range (a [`RecipeError`] is raised for the other fields).
    """
    try:
        return CILRecipe.model_validate(data)
    except ValidationError as err:
        problem = err.errors()[0]
        cause = problem.get("ctx", {}).get("error")
        if isinstance(cause, InvalidParameterError):
            raise InvalidParameterError(cause.name, cause.value, expected=f"{cause.expected} ({origin})") from None
        location = ".".join(str(p) for p in problem["loc"])
        if problem["type"] == "extra_forbidden":
            raise RecipeError(f"{origin}: unknown key {location!r}; check its spelling against docs/rapf.md.") from None
        message = f"{location or 'recipe'}: {problem['msg']} (got {problem.get('input')!r})"
        raise RecipeError(f"{origin}: {message}.") from None


def load_recipe(path: str | Path) -> CILRecipe:
    """Read and validate a YAML recipe (`lora_fusion.recipe.read_recipe_file`, the reader of every recipe kind);
    relative `data.root`, `data.split_file`, `cache_dir` and `out` resolve against the recipe's folder.

    Raises:
        RecipeError: a missing file, invalid YAML, or an invalid field.
    """
    recipe = validated(read_recipe_file(path), origin=str(path))

    def local(value: str | None) -> str | None:
        return None if value is None else recipe_path(value, path)

    return recipe.model_copy(update={
        "data": recipe.data.model_copy(update={"root": local(recipe.data.root),
                                                "split_file": local(recipe.data.split_file)}),
        "cache_dir": local(recipe.cache_dir),
        "out": local(recipe.out),
    })
