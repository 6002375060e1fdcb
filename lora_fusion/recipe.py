"""YAML merge recipes: the same options as `lora-fusion merge`, validated whole before any download.

```yaml
method: svd
rank: 16
sources:
  - org/math-lora@v2                      # short form: owner/name[@revision] or a path
  - {source: org/code-lora, weight: 0.4, subfolder: adapters/code}
out: merged/math-code
```
Relative paths are resolved against the recipe's folder. Unknown keys and wrong types are refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .errors import InvalidParameterError, RecipeError
from .hub import check_push_repo_id
from .params import MERGE_OPTIONS


class WeightRule(BaseModel):
    """One rule of a per-module value (`lora_fusion.controls`): `value` (a number or a gradient) where `filter`
    (a regular expression on the module name) matches; no filter matches every module."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    filter: str | None = None
    value: float | list[float]


# A weight: one number for every module, or a rule list.
WeightValue = float | list[WeightRule]


class SourceEntry(BaseModel):
    """One adapter of a recipe."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    source: str
    weight: WeightValue | None = None
    revision: str | None = None
    subfolder: str | None = None
    weight_name: str | None = None


def _merge_option_fields() -> dict[str, Any]:
    """The recipe keys of the merge-wide options, from their one declaration (`lora_fusion.params.MERGE_OPTIONS`)."""
    # `weights` entries may be rule lists in a recipe (the command line gives rules with --module-weight)
    types = {name: list[WeightValue] if name == "weights" else option.type for name, option in MERGE_OPTIONS.items()}
    return {
        name: (types[name] if option.default is not None else types[name] | None, option.default)
        for name, option in MERGE_OPTIONS.items()
    }


class _RecipeKeys(BaseModel):
    # strict types; unknown keys are allowed here and checked against the methods' declarations in `validated`
    model_config = ConfigDict(extra="allow", strict=True)

    sources: list[str | SourceEntry] = Field(min_length=1)


class Recipe(create_model("_RecipeFields", __base__=_RecipeKeys, **_merge_option_fields())):  # type: ignore[misc]
    """A merge recipe: the sources, the merge-wide options (`lora_fusion.params.MERGE_OPTIONS`) and the method's
    parameters (as the method declares them), each a key; every key mirrors a `lora-fusion merge` option."""

    @field_validator("push_to_hub")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        # checked with the rest of the recipe, so a bad id stops the merge (and --dry-run) before any work
        if value is not None:
            try:
                check_push_repo_id(value)
            except InvalidParameterError as err:
                raise ValueError(str(err)) from None
        return value

    @property
    def params(self) -> dict[str, Any]:
        """The method's parameters given in the recipe (every key that is not a merge-wide option)."""
        return dict(self.model_extra or {})

    def path_params(self) -> dict[str, Any]:
        """The method's parameters that are files or folders (an F-VAE, a support file, …), as declared."""
        from .methods import declared_params

        declared = declared_params()
        return {name: value for name, value in self.params.items() if name in declared and declared[name][0].path}

    def entries(self) -> list[SourceEntry]:
        """Sources in long form."""
        return [s if isinstance(s, SourceEntry) else SourceEntry(source=s) for s in self.sources]

    def source_weights(self) -> list[Any] | None:
        """The weights, from `weights:` or from per-source `weight:` (not both): numbers, or rule lists as
        mappings (`lora_fusion.controls.parse_rules` reads them)."""
        per_source = [e.weight for e in self.entries()]
        if any(w is not None for w in per_source):
            if self.weights is not None:
                raise RecipeError("recipe: give weights either as `weights:` or per source, not both.")
            chosen: list[Any] = [1.0 if w is None else w for w in per_source]
        elif self.weights is None:
            return None
        else:
            chosen = list(self.weights)
        return [[rule.model_dump() for rule in w] if isinstance(w, list) else w for w in chosen]


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML recipe file holds: the one reader of merge, `cil run` and `icm train` recipes.

    Raises:
        RecipeError: the file is missing or unreadable, not YAML (with the line), nested too deeply, or not a mapping.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} not found; pass the path of a YAML recipe.") from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise RecipeError(f"{path}: not valid YAML{line}; fix the file.") from None
    except RecursionError:  # the YAML composer recurses once per nesting level
        raise RecipeError(f"{path}: nested too deeply to be a recipe; a recipe is a mapping of a few levels.") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of keys (method:, sources:, … or encoders:, data:, …).")
    return data


def recipe_path(value: str, recipe: str | Path, *, if_exists: bool = False) -> str:
    """A path written in `recipe`: an absolute one as it is, a relative one against the recipe's folder (every
    recipe kind resolves paths this way). With `if_exists`, for values that may also be Hub ids (sources, base
    model), a relative path is resolved only when that file or folder exists."""
    if Path(value).is_absolute():
        return value
    candidate = Path(recipe).parent / value
    return value if if_exists and not candidate.exists() else os.path.normpath(candidate)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML merge recipe; relative local paths (sources, base model, F-VAE, support, `out`)
    resolve against the recipe's folder.

    Raises:
        RecipeError: unreadable YAML, an unknown key or a wrong type, named with its location.
    """
    return _resolved(validated(read_recipe_file(path), origin=str(path)), Path(path))


def validated(data: dict[str, Any], *, origin: str) -> Recipe:
    """A [`Recipe`] from a mapping (a YAML file or command-line options).

    Raises:
        RecipeError: naming the first unknown key or wrongly typed value, and where it came from.
        UnknownMethodError, InvalidParameterError: the method is unknown, or does not take a parameter given, or a
            value is outside its declared domain.
    """
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{origin}: {_first_problem(err)}") from None
    from .methods import declared_params, get_method
    from .methods.base import load_entry_points

    load_entry_points()
    spec = get_method(recipe.method)
    declared = declared_params()
    for key in recipe.params:
        if key not in declared:  # no method's parameter: a misspelled parameter or recipe key
            takes = ", ".join(sorted(spec.declared)) or "no parameters"
            raise RecipeError(f"{origin}: unknown key {key!r}; {spec.name} takes {takes}, and every recipe takes "
                              f"{', '.join(Recipe.model_fields)}.")
    from .controls import check_rule_values, split_params

    scalars, rules = split_params(spec.declared, recipe.params)
    check_rule_values(spec.resolve(scalars), rules)  # another method's parameter, or a value outside its domain
    return recipe



def _first_problem(err: ValidationError) -> str:
    problem = err.errors()[0]
    location = ".".join(str(p) for p in problem["loc"] if not str(p).startswith(("str", "SourceEntry")))
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if problem["type"] == "value_error":  # our own validators' messages already name the value and what to do
        return f"{location}: {problem['ctx']['error']}"
    return f"{location or 'recipe'}: {problem['msg']} (got {problem.get('input')!r}){more}."


def _resolved(recipe: Recipe, path: Path) -> Recipe:
    entries: list[str | SourceEntry] = [
        e.model_copy(update={"source": recipe_path(e.source, path, if_exists=True)}) for e in recipe.entries()
    ]
    update: dict[str, Any] = {"sources": entries}
    if recipe.base_model:
        update["base_model"] = recipe_path(recipe.base_model, path, if_exists=True)
    paths = {name: recipe_path(value, path, if_exists=True) for name, value in recipe.path_params().items()}
    if recipe.out:
        update["out"] = recipe_path(recipe.out, path)
    resolved = recipe.model_copy(update=update)
    if paths:
        resolved.model_extra.update(paths)  # type: ignore[union-attr]
    return resolved
