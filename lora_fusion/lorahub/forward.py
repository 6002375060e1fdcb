"""The weighted-LoRA forward: hooks that add Σᵢ w[g,i]·sᵢ·Bᵢ(Aᵢx) to each adapted Linear's output.

The base weights are never changed: one evaluation of the weights costs the model's forward plus, per adapted
module, two thin matmuls through the concatenated factors (x·A_catᵀ, scaled per rank by its source's weight and
scale, then ·B_catᵀ), and it is differentiable in w (the gradient optimiser's parameter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..controls import layer_position
from ..errors import IncompatibleAdaptersError, UnsupportedAdapterError

if TYPE_CHECKING:
    from ..adapter import LoraAdapter

OTHER_GROUP = "other"  # the group of modules without a layer index (e.g. a pooler)


def layer_groups(modules: Sequence[str]) -> dict[str, str]:
    """Each module's layer group, as LoRA Soups' CAT learns one weight per layer: `stack.index` from
    [`layer_position`] (`model.layers.3.mlp.up_proj` → `model.layers.3`), or `other` without a layer index."""
    groups = {}
    for name in modules:
        position = layer_position(name)
        groups[name] = f"{position[0]}.{position[1]}" if position else OTHER_GROUP
    return groups


def group_order(groups: Mapping[str, str]) -> list[str]:
    """The groups in layer order (stack, then index), `other` last."""
    def key(group: str) -> tuple[int, str, int]:
        if group == OTHER_GROUP:
            return (1, "", 0)
        stack, _, index = group.rpartition(".")
        return (0, stack, int(index))

    return sorted(set(groups.values()), key=key)


@dataclass
class _ModuleLoras:
    """One module's factors from every source that adapts it, concatenated along the rank."""

    A: torch.Tensor  # k×n
    B: torch.Tensor  # m×k
    source: torch.Tensor  # (k,) the source of each rank
    scale: torch.Tensor  # (k,) that source's scale
    group: int
    bias: torch.Tensor | None = None  # p×m lora_B biases, scaled by their source's scale
    bias_source: torch.Tensor | None = None  # (p,)


class WeightedLoras:
    """Forward hooks on a model that add the weighted sum of several LoRAs to the modules they adapt.

    `weights` is a (groups × sources) tensor read at every forward: set it with [`set_weights`], or make it a
    parameter to optimise. [`remove`] takes the hooks off.

    Raises:
        IncompatibleAdaptersError: a module of the adapters that the model lacks, or of another shape.
        UnsupportedAdapterError: a LoRA on something other than an `nn.Linear` (embedding, convolution, Conv1D).
    """

    def __init__(self, model: torch.nn.Module, adapters: Sequence[LoraAdapter], groups: Mapping[str, str],
                 order: Sequence[str], device: torch.device) -> None:
        layers = dict(model.named_modules())
        self.weights = torch.zeros(len(order), len(adapters), device=device)
        self._modules: dict[str, _ModuleLoras] = {}
        self._handles: list[Any] = []
        for name in groups:
            present = [(i, a) for i, a in enumerate(adapters) if name in a.modules]
            spec = present[0][1].modules[name]
            layer = layers.get(name)
            if layer is None:
                raise IncompatibleAdaptersError(
                    f"the base model has no module {name}, which the adapters adapt; pass the base model they "
                    "were trained on (--base-model)."
                )
            if spec.kind != "linear" or not isinstance(layer, torch.nn.Linear):
                raise UnsupportedAdapterError(f"module {name}: lorahub evaluates LoRAs on nn.Linear layers only; "
                                              f"this one is a {spec.kind} LoRA on a {type(layer).__name__}.")
            if tuple(layer.weight.shape) != spec.shape:
                raise IncompatibleAdaptersError(
                    f"module {name}: the base model's weight is {list(layer.weight.shape)} but the adapters' update "
                    f"is {list(spec.shape)}; pass the base model they were trained on (--base-model)."
                )
            factors = [(i, a.factors(name)) for i, a in present]
            biased = [(i, f) for i, f in factors if f.bias is not None]
            self._modules[name] = _ModuleLoras(
                A=torch.cat([f.A.float() for _, f in factors]).to(device),
                B=torch.cat([f.B.float() for _, f in factors], dim=1).to(device),
                source=torch.tensor([i for i, f in factors for _ in range(f.rank)], device=device),
                scale=torch.tensor([f.scale for _, f in factors for _ in range(f.rank)], device=device),
                group=order.index(groups[name]),
                bias=torch.stack([f.scale * f.bias.float() for _, f in biased]).to(device) if biased else None,
                bias_source=torch.tensor([i for i, _ in biased], device=device) if biased else None,
            )
            self._handles.append(layer.register_forward_hook(self._hook(self._modules[name])))

    def _hook(self, loras: _ModuleLoras) -> Any:
        def add_update(_layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            row = self.weights[loras.group]
            x = inputs[0].to(loras.A.dtype)
            update = ((x @ loras.A.T) * (row[loras.source] * loras.scale)) @ loras.B.T
            if loras.bias is not None:
                update = update + row[loras.bias_source] @ loras.bias
            return output + update.to(output.dtype)

        return add_update

    def set_weights(self, weights: torch.Tensor) -> None:
        """Use `weights` (groups × sources, or one weight per source for every group) from the next forward on."""
        self.weights = weights.to(self.weights.device, torch.float32).expand_as(self.weights)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
