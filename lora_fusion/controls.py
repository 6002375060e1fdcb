"""Per-module control of a merge: weights and method parameters given as rule lists, and the modules to merge.

A source's weight (or a per-module parameter such as `density`) is a number, or a list of rules; each rule has an
optional `filter` (a regular expression, `re.search` on the module name) and a `value`: a number, or a gradient
`[v₀, …, vₙ₋₁]` interpolated linearly over the module's layer position t = i / (L − 1), with the anchors evenly
spaced on [0, 1] as in mergekit's gradients. The first rule whose filter matches a module gives its value; a rule
without a filter matches every module. `include` keeps only matching modules, `exclude` leaves matching ones out.

The layer index i and the depth L (the number of layers: the largest index in the sources, plus one) are per stack
of layers: `model.layers.N.`, `encoder.layer.N.`, `h.N.`, `blocks.N.`, `transformer_blocks.N.` and
`single_transformer_blocks.N.` each number their own stack (a Flux transformer's double and single blocks are two
stacks); a diffusion UNet (`unet.…`) is one stack numbered as the Stable Diffusion tools' block weights are, in the
original SGM order: input blocks, middle block, output blocks (`down_blocks.b.{resnets,attentions}.j` is input block
1 + 3b + j, its downsampler 3(b + 1); `mid_block` follows the input blocks; `up_blocks.b.….j` is output block
3b + j, its upsampler 3b + 2). A module without a layer index takes v₀ and is listed in a warning.

Torch-free: checked and planned before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidParameterError
from .params import RANK_RULES, MethodParams, Param, is_real, value_type

Value = float | tuple[float, ...]


@dataclass(frozen=True)
class Rule:
    """One rule of a per-module value: `value` (a number or gradient anchors) where `filter` matches (None: all)."""

    value: Value
    filter: str | None = None

    def matches(self, module: str) -> bool:
        return self.filter is None or re.search(self.filter, module) is not None


Rules = tuple[Rule, ...]


def parse_rules(given: Any, *, what: str) -> float | Rules:
    """A number as it is, or a rule list (`[{filter: "mlp", value: 0.2}, {value: [0, 1]}]`, or [`Rule`]s) checked.

    Raises:
        InvalidParameterError: naming `what` (e.g. "weights[0]") and the rule: not a number or list of rules, an
            unknown key, a filter that is not a regular expression, a value that is not a number or a list of two or
            more numbers.
    """
    if is_real(given):
        return float(given)
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or not given:
        raise InvalidParameterError(what, given, expected="a number, or a list of rules {filter: REGEX, value: V}")
    rules = []
    for position, item in enumerate(given):
        where = f"{what} rule {position + 1}"
        if isinstance(item, Rule):
            item = {"filter": item.filter, "value": list(item.value) if isinstance(item.value, tuple) else item.value}
        if not isinstance(item, Mapping) or set(item) - {"filter", "value"} or "value" not in item:
            raise InvalidParameterError(where, item, expected="a mapping with `value` and an optional `filter`")
        pattern = item.get("filter")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise InvalidParameterError(f"{where} filter", pattern, expected="a regular expression (a string)")
            try:
                re.compile(pattern)
            except re.error as err:
                raise InvalidParameterError(f"{where} filter", pattern,
                                            expected=f"a regular expression ({err})") from None
        rules.append(Rule(_value(item["value"], where), pattern))
    return tuple(rules)


def _value(value: Any, where: str) -> Value:
    if is_real(value):
        return float(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) >= 2 and all(
        is_real(v) for v in value
    ):
        return tuple(float(v) for v in value)
    raise InvalidParameterError(f"{where} value", value, expected="a number, or a gradient of two or more numbers")


_STACK = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|layer|h|blocks|transformer_blocks|single_transformer_blocks))"
                    r"\.(?P<index>\d+)\.")
_UNET = re.compile(r"^(?P<prefix>(?:.*\.)?unet)\.(?:(?P<part>down_blocks|up_blocks)\.(?P<block>\d+)\."
                   r"(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<item>\d+)\.|(?P<mid>mid_block)\.)")
# Positions of a UNet stack: input blocks first, then the middle block, then output blocks (SGM order).
_MIDDLE, _OUTPUT = 1000, 2000


def layer_position(module: str) -> tuple[str, int] | None:
    """(stack, index) of `module`'s layer (see the module docstring), or None when it has no layer index."""
    unet = _UNET.match(module)
    if unet:
        if unet["mid"]:
            return unet["prefix"], _MIDDLE
        block, item, kind = int(unet["block"]), int(unet["item"]), unet["kind"]
        if unet["part"] == "down_blocks":
            return unet["prefix"], 3 * (block + 1) if kind == "downsamplers" else 1 + 3 * block + item
        return unet["prefix"], _OUTPUT + (3 * block + 2 if kind == "upsamplers" else 3 * block + item)
    match = _STACK.match(module)
    return (match["stack"], int(match["index"])) if match else None


@dataclass
class ModuleControls:
    """The per-module weights and parameters of one merge, resolved against its modules (built by [`build`])."""

    weights: Sequence[float | Rules]
    params: Mapping[str, Rules]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    positions: dict[str, float | None] = field(default_factory=dict)
    unindexed: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        modules: Collection[str],
        *,
        weights: Sequence[float | Rules],
        params: Mapping[str, Rules] | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> ModuleControls:
        """Resolve the rules against `modules` (every module of the sources) and check them.

        Raises:
            InvalidParameterError: an include/exclude that is not a regular expression, a selection that keeps no
                module, a filter that matches no module of the sources, a gradient where no module it applies to has
                a layer index.
        """
        for name, patterns in (("include", include), ("exclude", exclude)):
            for pattern in patterns:
                parse_rules([{"filter": pattern, "value": 0}], what=name)
        controls = cls(weights=list(weights), params=dict(params or {}), include=tuple(include),
                       exclude=tuple(exclude))
        selected = controls.selected(modules)
        if not selected:
            raise InvalidParameterError("include/exclude", {"include": list(include), "exclude": list(exclude)},
                                        expected=f"a selection that keeps some of the {len(modules)} modules "
                                        f"(e.g. {sorted(modules)[0] if modules else 'none'})")
        controls.positions = _positions(selected)
        weight_lists = [(f"weights[{i}]", w) for i, w in enumerate(weights) if isinstance(w, tuple)]
        for what, rules in weight_lists:  # a source's weight must exist for every module; a parameter has a default
            unmatched = next((m for m in selected if _first(rules, m) is None), None)
            if unmatched is not None:
                raise InvalidParameterError(
                    what, rules_record(rules), expected=f"a rule for every module ({unmatched} matches none): end "
                    "the list with a rule without filter")
        unindexed: set[str] = set()
        for what, rules in [*weight_lists, *controls.params.items()]:
            for position, rule in enumerate(rules):
                if rule.filter is None:
                    continue
                if not any(rule.matches(m) for m in selected):
                    raise InvalidParameterError(
                        f"{what} rule {position + 1} filter", rule.filter,
                        expected=f"a regular expression matching some module (they look like {sorted(selected)[0]})")
            graded = [m for m in selected if isinstance(_first(rules, m), tuple)]
            if graded and all(controls.positions[m] is None for m in graded):
                raise InvalidParameterError(
                    what, "a gradient", expected="a number: the modules it applies to have no layer index "
                    f"(e.g. {graded[0]}), so a gradient has nothing to follow")
            unindexed.update(m for m in graded if controls.positions[m] is None)
        controls.unindexed = tuple(sorted(unindexed))
        return controls

    def selected(self, modules: Collection[str]) -> list[str]:
        """The modules to merge: matching an `include` pattern (if any) and no `exclude` pattern, in their order."""
        return [m for m in modules
                if (not self.include or any(re.search(p, m) for p in self.include))
                and not any(re.search(p, m) for p in self.exclude)]

    def weights_for(self, module: str) -> list[float]:
        """The weight of each source for `module`."""
        return [w if isinstance(w, float) else self._value(w, module) for w in self.weights]

    def params_for(self, module: str) -> dict[str, float]:
        """The per-module parameter values for `module` (only the parameters given as rule lists)."""
        return {name: self._value(rules, module) for name, rules in self.params.items()
                if _first(rules, module) is not None}

    def _value(self, rules: Rules, module: str) -> float:
        # A rule matches: `build` checked it for weights, and `params_for` asks only where one does.
        value = _first(rules, module)
        assert value is not None
        if isinstance(value, float):
            return value
        return interpolate(value, self.positions.get(module))

    @property
    def uniform(self) -> bool:
        """No rule lists and no selection: every module gets the same weights and parameters."""
        return not self.params and all(isinstance(w, float) for w in self.weights) and not (self.include or self.exclude)


def _first(rules: Rules, module: str) -> Value | None:
    return next((rule.value for rule in rules if rule.matches(module)), None)


def interpolate(anchors: tuple[float, ...], t: float | None) -> float:
    """The gradient `anchors` (evenly spaced on [0, 1]) at position t, linearly; v₀ when t is None."""
    if t is None:
        return anchors[0]
    x = t * (len(anchors) - 1)
    low = min(int(x), len(anchors) - 2)
    return anchors[low] + (x - low) * (anchors[low + 1] - anchors[low])


def _positions(modules: Sequence[str]) -> dict[str, float | None]:
    """t = i / (L − 1) per module, L counted per stack over `modules` (a one-layer stack sits at 0)."""
    found = {m: layer_position(m) for m in modules}
    ranks: dict[str, list[int]] = {}
    for position in found.values():
        if position is not None:
            ranks.setdefault(position[0], []).append(position[1])
    # A UNet's positions are sparse codes (input, middle, output): number the distinct ones densely, in order.
    order = {stack: sorted(set(indices)) for stack, indices in ranks.items()}
    positions: dict[str, float | None] = {}
    for module, position in found.items():
        if position is None:
            positions[module] = None
            continue
        stack, index = position
        seen = order[stack]
        depth = (max(seen) + 1) if max(seen) < _MIDDLE else len(seen)
        i = index if max(seen) < _MIDDLE else seen.index(index)
        positions[module] = i / (depth - 1) if depth > 1 else 0.0
    return positions


def split_params(declared: Mapping[str, Param], params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Rules]]:
    """The method's parameters as given: one value for the whole merge, and the per-module ones given as rule lists.

    Raises:
        InvalidParameterError: a rule list for a parameter that takes one value for the whole merge.
    """
    scalars: dict[str, Any] = {}
    rules: dict[str, Rules] = {}
    for name, value in params.items():
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and name in declared:
            if not declared[name].per_module:
                per_module = ", ".join(sorted(n for n, p in declared.items() if p.per_module))
                raise InvalidParameterError(name, value, expected=f"one value for the whole merge (rule lists are "
                                            f"taken by {per_module})")
            parsed = parse_rules(value, what=name)
            assert not isinstance(parsed, float)
            rules[name] = parsed
        else:
            scalars[name] = value
    return scalars, rules


def with_values(params: MethodParams, values: Mapping[str, float]) -> MethodParams:
    """`params` with per-module `values` (integer parameters rounded to the nearest integer), checked again.

    Raises:
        InvalidParameterError: a value outside the parameter's domain.
    """
    if not values:
        return params
    typed = {name: int(round(v)) if value_type(type(params), name) is int else v for name, v in values.items()}
    chosen = [name for name in RANK_RULES if name in typed]
    if len(chosen) == 1:  # a module's own rank rule replaces the global one (as PEFT's rank_pattern does `r`)
        typed.update({name: None for name in RANK_RULES if name not in typed and hasattr(params, name)})
    return dataclasses.replace(params, **typed)


def check_rule_values(params: MethodParams, rules: Mapping[str, Rules]) -> None:
    """Check every value and gradient anchor of the per-module `rules` against the parameter's domain, before any
    tensor is read (interpolated values lie between anchors, so checking the anchors suffices for intervals)."""
    for name, listed in rules.items():
        for rule in listed:
            for value in rule.value if isinstance(rule.value, tuple) else (rule.value,):
                with_values(params, {name: value})


def rules_record(rules: Rules) -> list[dict[str, Any]]:
    """A rule list as the provenance records it (JSON): `[{"filter": ..., "value": ...}, ...]`."""
    return [{"filter": r.filter, "value": list(r.value) if isinstance(r.value, tuple) else r.value} for r in rules]
