"""What an adapter is before any factor is read: its config, each module's shapes, rank, scale and tensor addresses,
and the store its tensors come from. The formats read files into these; [`LoraAdapter`] is built on them.

Conventions (docs/methods.md):

* Module names are the base model's module paths (`model.layers.0.self_attn.q_proj`), not a file's state-dict keys;
  each format maps its keys to these names and back.
* Every module is held in a canonical "out × in" form: `B` is m×r, `A` is r×n and the update is ΔW = scale·B·A.
  Embeddings use m = embedding width, n = vocabulary (PEFT applies (B·A)ᵀ to `nn.Embedding.weight`);
  convolutions flatten A's kernel into n = in·∏k (PEFT reshapes B·A back to the kernel).
* `scale` already resolves `lora_alpha`, `alpha_pattern`, `rank_pattern` and rslora for the module.

Nothing here reads a file or imports a format, so the formats and the writer can build on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from .errors import NonFiniteError

if TYPE_CHECKING:
    from .methods.base import ModuleStats

ModuleKind = Literal["linear", "embedding", "conv"]


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`: one min-max pass (NaN propagates to both, an infinity is an extreme), several
    times cheaper than `isfinite(tensor).all()` or `abs().amax()`."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(low.item()) and math.isfinite(high.item())  # two numbers: no more tensor ops


def is_lora_pair(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    """Whether factors of these shapes form a LoRA pair: A r×in (×kernel), B out×r (×1…), r ≥ 1. The one shape
    check of every format's reader."""
    rank = a_shape[0] if a_shape else 0
    return (
        len(a_shape) >= 2
        and len(b_shape) == len(a_shape)
        and b_shape[1] == rank
        and all(d == 1 for d in b_shape[2:])
        and rank > 0
    )


@dataclass(frozen=True)
class ModuleSpec:
    """What is known about one module from file headers alone: shapes, rank, scale and where its tensors live.

    `a_key`, `b_key`, `bias_key` and `magnitude_key` (DoRA's μ) address the module's tensors in the adapter's [`TensorStore`]: a file's own keys
    for an adapter that was read, names of this module for one built in memory.
    """

    name: str
    kind: ModuleKind
    out_features: int
    in_features: int
    rank: int
    scale: float
    dtype: torch.dtype
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_key: str
    b_key: str
    bias_key: str | None = None
    magnitude_key: str | None = None

    @property
    def dora(self) -> bool:
        """A DoRA module (Liu et al., ICML 2024): a magnitude vector μ rescales each row of W₀ + s·B·A, so its update
        depends on the base weights (`lora_fusion.dora`)."""
        return self.magnitude_key is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the canonical update."""
        return (self.out_features, self.in_features)

    @property
    def kernel(self) -> tuple[int, ...]:
        """The trailing dimensions of A beyond the input channels (the kernel of a convolution; empty otherwise)."""
        return self.a_shape[2:]

    def layout(self) -> tuple[ModuleKind, tuple[int, int], tuple[int, ...]]:
        """What must agree between adapters for their updates of this module to be added."""
        return (self.kind, self.shape, self.kernel)

    def written(self, *, rank: int, dtype: torch.dtype, bias: bool = False) -> ModuleSpec:
        """The spec of this module as lora-fusion writes it: same kind and shapes, rank `rank`, every scale folded
        into the factors (scale 1), its tensors held in memory under `<name>.A`, `<name>.B` and `<name>.bias` (the
        output format names them in the file)."""
        return ModuleSpec(
            name=self.name,
            kind=self.kind,
            out_features=self.out_features,
            in_features=self.in_features,
            rank=rank,
            scale=1.0,
            dtype=dtype,
            a_shape=(rank, *self.a_shape[1:]),
            b_shape=(self.b_shape[0], rank, *self.b_shape[2:]),
            a_key=f"{self.name}.A",
            b_key=f"{self.name}.B",
            bias_key=f"{self.name}.bias" if bias else None,
        )


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of an adapter's config that decide what the tensors mean; `raw` keeps the file's content (a single
    LoRA file's: its `layout`). `kohya_names`: the name each module had in the kohya file(s) it was read or merged
    from, by canonical name, which kohya output writes again."""

    base_model: str | None
    task_type: str | None
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict)
    kohya_names: Mapping[str, str] = field(default_factory=dict)

    def expected_rank(self, module: str) -> int:
        """The rank PEFT would give `module`: the first matching `rank_pattern` key, else `r`."""
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def scale_for(self, module: str, rank: int) -> float:
        """alpha/r, or alpha/√r with rslora, with alpha from the first matching `alpha_pattern` key (as PEFT)."""
        alpha = float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's get_pattern_key: a key is a regex matched against a dotted suffix of the module name; first wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class TensorStore(Protocol):
    """Where an adapter's tensors live: a file opened lazily, or memory. A store may also offer
    `known_finite(key) -> bool` (True: that tensor holds no NaN or Inf; False: unknown), which spares
    [`read_factors`] a pass over each factor."""

    def read(self, key: str) -> torch.Tensor: ...


class MemoryStore:
    """Tensors already in memory (merged adapters)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]


@dataclass(frozen=True)
class AdapterContents:
    """What a format reads from an adapter's files: the config, the modules (from headers) and the open store.

    `files` are the files read, config first: a local source is identified by their hash. `stats`: what reading
    made of a module where it is not the file's own factors (a LyCORIS module read as its dense update).
    """

    config: AdapterConfig
    modules: Mapping[str, ModuleSpec]
    store: TensorStore
    files: tuple[Path, ...] = ()
    stats: Mapping[str, ModuleStats] = field(default_factory=dict)


def shaped(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`tensor` reshaped to `shape`, itself when it has that shape already (the usual case for a linear module's
    factors: a LoRA file holds thousands of them, and a reshape costs a couple of microseconds each)."""
    return tensor if tensor.shape == shape else tensor.reshape(shape)


def read_factors(
    spec: ModuleSpec, store: TensorStore, *, where: str, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One module's A (r×n), B (m×r) and lora_B bias (or None) from `store`, in canonical form and the file's dtype.

    `check_finite=False` leaves the check to a caller that checks what it computes from the factors (a NaN or Inf
    in a factor reaches that result), and reads again with the check to name the cause.

    Raises:
        NonFiniteError: a factor holds NaN or Inf; the message names `where` (the adapter) and the module.
    """
    a = shaped(store.read(spec.a_key), (spec.rank, spec.in_features))
    b = shaped(store.read(spec.b_key), (spec.out_features, spec.rank))
    bias = store.read(spec.bias_key) if spec.bias_key else None
    keys = (spec.a_key, spec.b_key, spec.bias_key)
    known = getattr(store, "known_finite", None)  # a file store checks its tensors a run at a time
    for tensor, key in zip((a, b) if bias is None else (a, b, bias), keys) if check_finite else ():
        if not ((known is not None and known(key)) or all_finite(tensor)):
            raise NonFiniteError(
                f"{where}: module {spec.name} holds NaN or Inf values; the adapter is corrupted or diverged in "
                "training. Re-download it, or leave it out of the merge."
            )
    return a, b, bias
