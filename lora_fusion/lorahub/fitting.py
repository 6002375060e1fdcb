"""Fitting LoRAHub's weights: read and check the support data, load the base model through transformers onto
Accelerate's device, hook the weighted LoRAs into it, and run one of the two searches (`search`).

The objective is LoRAHub's (Huang et al., COLM 2024, arXiv:2307.13269, `lorahub/algorithm.py`): the support loss of
the model carrying the weighted LoRAs plus 0.05·mean|w|. [`plan`] states the budget without loading the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidParameterError
from .errors import SupportDataError
from .forward import group_order, layer_groups
from .support import BATCH_SIZE, SupportSet, encode, read_support

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter

Optimizer = Literal["gradient-free", "gradient"]
LORAHUB_EXTRA = 'pip install "lora-fusion[lorahub]"'  # the gradient-free search's CMA-ES (`cma`)


@dataclass(frozen=True)
class LorahubSettings:
    """The search's settings: evaluations (or Adam steps), optimiser, one weight per layer group or per source,
    seed, the L1 penalty α, and the device (`cpu`, `cuda` or `auto`, through Accelerate)."""

    budget: int = 40
    optimizer: Optimizer = "gradient-free"
    per_group: bool = False
    seed: int = 0
    penalty: float = 0.05
    device: str = "cpu"


@dataclass(frozen=True)
class LorahubFit:
    """The fitted weights, `weights[g][i]` for group `groups[g]` and source i (one group, `all`, unless per group),
    the support loss at w = 0 (the base model), with the uniform weights w = 1 and with the found weights, and the
    search's trajectory."""

    groups: list[str]
    weights: list[list[float]]
    loss_base: float
    loss_uniform: float
    loss_found: float
    objective: float
    trajectory: list[float]
    evaluations: int
    support_examples: int
    support_kind: str

    def summary(self) -> dict[str, Any]:
        """What the model card records of the fit."""
        return {
            "groups": self.groups, "found_weights": self.weights, "loss_base": round(self.loss_base, 6),
            "loss_uniform": round(self.loss_uniform, 6), "loss_found": round(self.loss_found, 6),
            "objective": round(self.objective, 6), "objective_trajectory": [round(v, 6) for v in self.trajectory],
            "evaluations": self.evaluations, "support_examples": self.support_examples,
            "support_kind": self.support_kind,
        }


@dataclass(frozen=True)
class LorahubPlan:
    """What a LoRAHub fit would do (`--dry-run`): weights to fit, evaluations, support examples, forward passes."""

    sources: list[str]
    base_model: str
    support: str
    support_kind: str
    support_examples: int
    optimizer: str
    budget: int
    groups: list[str]
    weights: int
    forward_passes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (`--dry-run --json`)."""
        return {"method": "lorahub", **self.__dict__}

    def __str__(self) -> str:
        unit = "loss evaluations" if self.optimizer == "gradient-free" else "Adam steps (one forward and backward each)"
        lines = [
            f"lorahub: {len(self.sources)} sources on {self.base_model} (model not loaded)",
            f"  support: {self.support_examples} {self.support_kind} examples from {self.support}",
            f"  weights: {self.weights} ({len(self.sources)} sources × {len(self.groups)} group(s))",
            f"  budget: {self.budget} {unit} ({self.optimizer})",
            f"  forward passes: {self.forward_passes} of at most {BATCH_SIZE} examples each, plus 2 to report the base "
            "and uniform losses",
        ]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def plan(adapters: Sequence[LoraAdapter], *, base_model: str, support: str | Path,
         settings: LorahubSettings) -> LorahubPlan:
    """The budget of a fit, from the adapters' headers and the support file alone (the model is not loaded).

    Raises:
        SupportDataError: the support file cannot be read (see [`read_support`]).
    """
    examples = read_support(support)
    groups = _groups(adapters, settings.per_group)
    batches = math.ceil(len(examples) / BATCH_SIZE)
    origin = [a.source.source if a.source else "in-memory adapter" for a in adapters]
    return LorahubPlan(origin, str(base_model), str(support), examples.kind, len(examples), settings.optimizer,
                       settings.budget, groups, len(groups) * len(adapters), settings.budget * batches,
                       ["labels and lengths are checked against the model's tokenizer and config when it runs"])


def fit(adapters: Sequence[LoraAdapter], *, base_model: str, support: str | Path,
        settings: LorahubSettings) -> LorahubFit:
    """Fit LoRAHub's weights of `adapters` on the support examples: minimise L(w) + α·mean|w| over
    w ∈ [−1.5, 1.5]^(groups × sources) from w = 0, with `settings.optimizer` and `settings.budget` evaluations.

    L is the mean cross-entropy of the output tokens (causal LM) or of the labels (classification) over the support
    set, of the base model whose adapted Linear layers add Σᵢ w[g,i]·sᵢ·Bᵢ(Aᵢx) (g: the module's layer group).

    Raises:
        SupportDataError: the support file is missing, empty or malformed, names a label the head does not know,
            or holds a text longer than the model's context — all before the model's weights are read.
        IncompatibleAdaptersError: the base model lacks an adapted module or has another shape for it; or an
            encoder checkpoint without a trained classification head.
        SourceNotFoundError: the base model is neither a folder nor a Hub id.
        InvalidParameterError: the gradient-free search without `cma` installed (the `lorahub` extra).
    """
    import torch
    from accelerate import Accelerator

    from .forward import WeightedLoras
    from .search import gradient, gradient_free

    if settings.optimizer == "gradient-free" and find_spec("cma") is None:
        raise InvalidParameterError("optimizer", settings.optimizer, expected=f"'gradient', or install CMA-ES for the "
                                    f"gradient-free search: {LORAHUB_EXTRA}")
    examples = read_support(support)
    tokenizer, config, source = _tokenizer_and_config(base_model)
    encoded = encode(examples, tokenizer, config)
    model = _load_model(source, examples)
    accelerator = Accelerator(cpu=settings.device == "cpu")
    device = accelerator.device
    model = model.to(device).eval().requires_grad_(False)
    groups = layer_groups(_modules(adapters))
    order = group_order(groups) if settings.per_group else ["all"]
    hooks = WeightedLoras(model, adapters, groups if settings.per_group else dict.fromkeys(groups, "all"), order,
                          device)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in encoded.batches]
    shape = (len(order), len(adapters))

    def loss(weights: torch.Tensor) -> torch.Tensor:
        hooks.set_weights(weights.reshape(shape))
        total = sum(_batch_loss(model, batch, encoded.kind) for batch in batches)
        return total / encoded.targets  # type: ignore[operator]

    def objective(weights: torch.Tensor) -> torch.Tensor:
        return loss(weights) + settings.penalty * weights.abs().mean()

    try:
        if settings.optimizer == "gradient":
            found = gradient(objective, math.prod(shape), budget=settings.budget, seed=settings.seed)
        else:
            with torch.no_grad():
                found = gradient_free(lambda w: float(objective(w)), math.prod(shape), budget=settings.budget,
                                      seed=settings.seed)
        with torch.no_grad():
            base_loss, uniform_loss = float(loss(torch.zeros(shape))), float(loss(torch.ones(shape)))
            found_loss = float(loss(torch.tensor(found.weights)))
    finally:
        hooks.remove()
    weights = torch.tensor(found.weights).reshape(shape).tolist()
    return LorahubFit(order, weights, base_loss, uniform_loss, found_loss, found.best, found.trajectory,
                      found.evaluations, len(examples), examples.kind)


def _batch_loss(model: Any, batch: dict[str, Any], kind: str) -> Any:
    """The summed cross-entropy of one batch's targets (output tokens, or labels)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if kind == "causal":  # token t predicts token t + 1
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                               reduction="sum")
    return F.cross_entropy(logits, batch["labels"], reduction="sum")


def _modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    return list(dict.fromkeys(name for adapter in adapters for name in adapter.modules))


def _groups(adapters: Sequence[LoraAdapter], per_group: bool) -> list[str]:
    return group_order(layer_groups(_modules(adapters))) if per_group else ["all"]


def _tokenizer_and_config(base_model: str) -> tuple[Any, Any, dict[str, Any]]:
    """The base model's tokenizer and config (no weights yet), and how to load it: a local folder, or a Hub id
    `owner/name[@revision]`. Remote code is never run."""
    from transformers import AutoConfig, AutoTokenizer

    from ..errors import SourceNotFoundError
    from ..hub import is_repo_id

    text = str(base_model)
    if Path(text).expanduser().is_dir():
        source: dict[str, Any] = {"pretrained_model_name_or_path": str(Path(text).expanduser())}
    else:
        repo_id, _, revision = text.partition("@")
        if not is_repo_id(repo_id):
            raise SourceNotFoundError(f"--base-model {text}: no such folder, and not a Hub repo id "
                                      "(owner/name[@revision]); lorahub loads the model with transformers.")
        source = {"pretrained_model_name_or_path": repo_id, "revision": revision or None}
    try:
        config = AutoConfig.from_pretrained(**source)
        tokenizer = AutoTokenizer.from_pretrained(**source)
    except (OSError, ValueError) as err:
        raise SourceNotFoundError(f"--base-model {text}: transformers cannot load its config and tokenizer "
                                  f"({str(err).splitlines()[0]}).") from None
    return tokenizer, config, source


def _load_model(source: dict[str, Any], support: SupportSet) -> Any:
    """The base model with a causal-LM head (input/output examples) or its trained classification head."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..errors import IncompatibleAdaptersError

    auto = AutoModelForCausalLM if support.kind == "causal" else AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns of newly initialised heads: checked below instead
        try:
            model, info = auto.from_pretrained(**source, output_loading_info=True)
        except (OSError, ValueError) as err:
            raise IncompatibleAdaptersError(
                f"{source['pretrained_model_name_or_path']}: transformers cannot load it as "
                f"{auto.__name__} for {support.kind} examples ({str(err).splitlines()[0]})."
            ) from None
    if support.kind == "classification" and info.get("missing_keys"):
        raise SupportDataError(
            f"{source['pretrained_model_name_or_path']} has no trained classification head (missing "
            f"{sorted(info['missing_keys'])[:3]}); {{text, label}} examples need a sequence-classification "
            "checkpoint whose head knows the labels."
        )
    return model.float()
