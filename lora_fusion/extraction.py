"""Extract a LoRA from a full fine-tune: per module ΔW = W_ft − W₀, back to low rank by SVD with the rank rules.

Both models are safetensors checkpoints read one tensor at a time from their shards ([`BaseWeights`], memory-mapped),
so neither is ever whole in memory. Each Linear, Conv or Embedding weight present in both with one shape gives a
dense ΔW (canonical out×in form, `lora_fusion.spec`), decomposed by `linalg.dense_svd` and truncated to the rank the
rule gives, √σ on each side (`linalg.truncate`): the best rank-R approximation (Eckart–Young–Mirsky), with no
clamping of the singular vectors (kohya's extractor clamps U and Vᴴ at their 0.99 quantile, which loses quality).

What cannot be a LoRA factor pair is refused by name unless `save_modules` names its module, which is then written
whole as PEFT's `modules_to_save`: a changed norm or bias, a module of another type, a weight whose shape differs
(a resized vocabulary) or that the base model lacks. Unchanged modules (ΔW = 0 exactly) are skipped and listed.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._lazy import torch
from .controls import ModuleControls, check_rule_values, rules_record, split_params, with_values
from .errors import IncompatibleAdaptersError, InvalidParameterError, NonFiniteError, SourceNotFoundError
from .params import SEED, SVD, RankedParams, declared
from .runtime import thread_limit, torch_thread_pool

if TYPE_CHECKING:
    import torch  # noqa: F811

    from .adapter import LoraAdapter
    from .base_weights import BaseWeights
    from .linalg import FactoredSVD, RankRule

T = TypeVar("T")
# The rank without a rule: mergekit-extract-lora 0.1.5's default `--max-rank` is 128; 16 is what PEFT examples and most
# published adapters use, and `--energy`/`--rank` say otherwise.
DEFAULT_RANK = 16
# With svd="auto", a randomized SVD (min(m, n) > 1024) is kept only where the excess-error bound, evaluated on the
# sketch's own spectrum, promises at most this much relative Frobenius error above the exact optimum; else the exact
# SVD is taken (docs/methods.md, "extract").
EXCESS_TOLERANCE = 1e-4
LORA_KINDS = ("linear", "embedding", "conv", "conv1d")


@dataclass(frozen=True)
class ExtractParams(RankedParams):
    """The rank rule (at most one of rank, energy, sv_fro, sv_ratio, sv_cumulative; max_rank caps it), the SVD
    choice and the seed of the randomized SVD's test matrices."""

    svd: str = SVD.field()
    seed: int = SEED.field()


@dataclass(frozen=True)
class Candidate:
    """One module whose weight becomes a LoRA: its stored key, kind, stored shape, and the modules tied to it that
    the fine-tuned checkpoint does not store (they get the same update, in their own orientation)."""

    name: str
    key: str
    kind: str
    shape: tuple[int, ...]
    tied: tuple[tuple[str, str], ...] = ()


@dataclass
class ExtractionPlan:
    """What an extraction will do, from the checkpoints' headers (and their 1-D tensors): the modules to decompose,
    the parameters written whole, the modules `modules` left out. Returned by `extract(..., dry_run=True)`."""

    base: str
    finetuned: str
    candidates: list[Candidate]
    saved: dict[str, tuple[int, ...]]
    saved_from: dict[str, str]
    left_out: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "finetuned": self.finetuned,
            "modules": {c.name: list(c.shape) for c in self.candidates},
            "tied": {partner: c.name for c in self.candidates for partner, _ in c.tied},
            "modules_to_save": {k: list(v) for k, v in self.saved.items()},
            "left_out": self.left_out,
        }

    def __str__(self) -> str:
        lines = [f"extract {self.finetuned} − {self.base}: {len(self.candidates)} modules to decompose, "
                 f"{len(self.saved)} tensors written whole, {len(self.left_out)} left out by --modules"]
        lines += [f"  {c.name} {c.kind} {'×'.join(map(str, c.shape))}" for c in self.candidates]
        lines += [f"  {key} (whole) {'×'.join(map(str, shape))}" for key, shape in self.saved.items()]
        return "\n".join(lines)


def extract(
    base: str | Path,
    finetuned: str | Path,
    *,
    rank: int | Sequence[Any] | None = None,
    energy: float | Sequence[Any] | None = None,
    sv_fro: float | Sequence[Any] | None = None,
    sv_ratio: float | Sequence[Any] | None = None,
    sv_cumulative: float | Sequence[Any] | None = None,
    max_rank: int | Sequence[Any] | None = None,
    modules: str | None = None,
    save_modules: Sequence[str] = (),
    svd: str = "auto",
    seed: int = 0,
    revision: str | None = None,
    token: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str = "cpu",
    dry_run: bool = False,
    progress: bool | None = None,
) -> LoraAdapter | ExtractionPlan:
    """A LoRA adapter whose update approximates `finetuned − base` in every Linear, Conv and Embedding module.

    Per module ΔW = W_ft − W₀ (float32), its SVD ΔW = U·Σ·Vᵀ (exact in float64 up to min(m, n) = 1024, above it
    randomized with a bound on the excess error, exact where that bound is loose), and B = U_R·√Σ_R, A = √Σ_R·V_Rᵀ
    for the rank R the rule gives: the best rank-R approximation (Eckart–Young–Mirsky). No clamping.

    Args:
        base, finetuned: local folders (or `.safetensors` files) or Hub ids `owner/name[@revision]` of safetensors
            checkpoints of one architecture (single file or sharded with its index).
        rank, energy, sv_fro, sv_ratio, sv_cumulative: the rank rule, at most one (`lora-fusion methods` and
            docs/methods.md define them; default: rank 16). Each takes a rule list per module as `merge` does
            (`[{"filter": "mlp", "value": 8}, {"value": 16}]`): the CLI's `--rank-pattern REGEX=R`.
        max_rank: a cap on every module's rank.
        modules: a regular expression (`re.search` on the module name): only matching modules are extracted
            (default: every Linear, Conv and Embedding module, the lm_head included).
        save_modules: module names (`model.norm`, `model.embed_tokens`) written whole from the fine-tuned model as
            PEFT's `modules_to_save` instead of refused: changed norms and biases, resized embeddings, other types.
        svd: "auto", "exact" or "randomized".
        seed: seed of the randomized SVD's Gaussian test matrices (per module: the result does not depend on order).
        revision: the Hub revision of ids given without `@revision`.
        token: Hub token (default: `HF_TOKEN` or the stored login); never written.
        dtype: the adapter's dtype, "float32", "float16" or "bfloat16" (default: the fine-tuned weights' dtype).
        device: where ΔW and its SVD are computed: `"cpu"`, `"cuda"` or `"auto"`. The weights are read on the CPU
            and each ΔW moved over; the randomized SVD's test matrices are drawn on the CPU, so the adapter does not
            depend on the device beyond float rounding.
        dry_run: return the [`ExtractionPlan`] (headers and 1-D tensors read, no SVD).
        progress: a progress bar on stderr (default: when stderr is a terminal).

    Returns:
        A [`LoraAdapter`] (`.save_pretrained(out)` writes a PEFT folder, `.push_to_hub(repo)` uploads it) with
        per-module `.stats` (rank, retained energy, relative error) and its provenance; or the plan.

    Raises:
        InvalidParameterError: a parameter outside its domain, two rank rules, an invalid `modules` regex, a
            `save_modules` name that is no module of the fine-tuned model.
        IncompatibleAdaptersError: different architectures or shapes (module named), modules that cannot be a LoRA
            (named; pass them to `save_modules`), nothing left to extract.
        NonFiniteError: NaN or Inf in a weight of either model (module named).
        SourceNotFoundError, HubError: a missing model, shard or index, or one naming files outside its folder.

    Example:
        ```python
        >>> adapter = extract("HuggingFaceTB/SmolLM2-135M", "me/smollm2-finetuned", rank=16)
        >>> adapter.save_pretrained("out/")   # peft.PeftModel.from_pretrained(base_model, "out/")
        ```
    """
    given = {"rank": rank, "energy": energy, "sv_fro": sv_fro, "sv_ratio": sv_ratio, "sv_cumulative": sv_cumulative,
             "max_rank": max_rank}
    scalars, rules = split_params(declared(ExtractParams), {k: v for k, v in given.items() if v is not None})
    params = ExtractParams(**scalars, svd=svd, seed=seed)
    check_rule_values(params, rules)
    selector = _compile(modules)
    from .api import parse_dtype, resolve_device

    out_dtype = parse_dtype(dtype) if dtype is not None else None
    target = resolve_device(device)
    base_weights, ft_weights = _open(base, revision, token), _open(finetuned, revision, token)
    plan = _plan(base_weights, ft_weights, selector=selector, save_modules=tuple(save_modules))
    if dry_run:
        return plan
    controls = ModuleControls.build([c.name for c in plan.candidates], weights=[1.0], params=rules)
    return _run(plan, base_weights, ft_weights, params, controls, device=target, out_dtype=out_dtype, progress=progress,
                rule_given=any(v is not None for v in given.values()), rule_lists=rules, modules=modules)


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise InvalidParameterError("modules", pattern, expected=f"a regular expression ({err})") from None


def _open(source: str | Path, revision: str | None, token: str | None) -> BaseWeights:
    from .base_weights import BaseWeights
    from .hub import is_repo_id

    text = str(source)
    if Path(text).expanduser().exists():
        return BaseWeights(Path(text).expanduser())
    repo_id, _, pinned = text.partition("@")
    if not is_repo_id(repo_id):
        raise SourceNotFoundError(f"{text}: no such file or directory, and not a Hub repo id (owner/name[@revision]).")
    return BaseWeights(repo_id, revision=pinned or revision, token=token)


def _plan(
    base: BaseWeights, finetuned: BaseWeights, *, selector: re.Pattern[str] | None, save_modules: tuple[str, ...]
) -> ExtractionPlan:
    """Check the two checkpoints against each other from their headers (and 1-D tensors) and sort every tensor of
    the fine-tuned one: a LoRA candidate, a tensor written whole, unchanged, or a problem (refused, named)."""
    base_config, ft_config = base.config(), finetuned.config()
    types = (base_config.get("model_type"), ft_config.get("model_type"))
    if None not in types and types[0] != types[1]:
        raise IncompatibleAdaptersError(
            f"{base.source} is a {types[0]} model and {finetuned.source} a {types[1]} one: extract needs the fine-tune "
            "and the model it was fine-tuned from."
        )
    kinds, tied = _layer_kinds(ft_config or base_config, finetuned.source)
    stored = finetuned.tensor_names()
    base_keys = set(base.tensor_names())
    parents = {key.rpartition(".")[0] for key in stored}
    unknown = [name for name in save_modules if name not in parents]
    if unknown:
        raise InvalidParameterError("save_modules", unknown[0], expected=f"a module of {finetuned.source} with "
                                    f"parameters, e.g. {next(iter(sorted(parents)), 'model.norm')}")
    saved_set = set(save_modules)
    candidates: list[Candidate] = []
    saved: dict[str, tuple[int, ...]] = {}
    saved_from: dict[str, str] = {}  # written key -> stored key (a tied partner is written from what is stored)
    left_out: list[str] = []
    problems: list[str] = []
    for key in stored:
        module, _, parameter = key.rpartition(".")
        shape = finetuned.shape(key)
        if module in saved_set:
            saved[key], saved_from[key] = shape, key
            for partner in tied.get(key, ()):  # a tied partner the checkpoint does not store is saved as well
                if partner not in stored:
                    saved[partner], saved_from[partner] = shape, key
            continue
        if key not in base_keys:
            problems.append(f"{module} ({parameter} not in the base model)")
            continue
        if base.shape(key) != shape:
            problems.append(f"{module} (shape {list(base.shape(key))} in the base, {list(shape)} fine-tuned)")
            continue
        kind = kinds.get(module)
        if parameter == "weight" and kind in LORA_KINDS:
            if selector is not None and not selector.search(module):
                left_out.append(module)
                continue
            partners = tuple((p.rpartition(".")[0], kinds.get(p.rpartition(".")[0], "linear"))
                             for p in tied.get(key, ()) if p not in stored)
            candidates.append(Candidate(module, key, kind, shape, partners))
        elif not _equal(base, finetuned, key):
            problems.append(f"{module} ({parameter} changed; not a Linear, Conv or Embedding weight)")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise IncompatibleAdaptersError(
            f"{len(problems)} module(s) cannot be extracted as LoRA: {shown}. Write them whole with --save-module "
            "NAME (PEFT's modules_to_save), or pass the base model this fine-tune came from."
        )
    if not candidates:
        raise IncompatibleAdaptersError(
            f"no module of {finetuned.source} is left to extract" + (f" (--modules {selector.pattern!r} matches "
                                                                     "none)" if selector is not None else "")
            + "; check --modules and that the fine-tune has Linear, Conv or Embedding weights."
        )
    return ExtractionPlan(base.source, finetuned.source, candidates, saved, saved_from, left_out)


def _equal(base: BaseWeights, finetuned: BaseWeights, key: str) -> bool:
    module = key.rpartition(".")[0]
    before, after = base.tensor(key), finetuned.tensor(key)
    _check_finite(before, base, module)
    _check_finite(after, finetuned, module)
    return torch.equal(before, after)


def _check_finite(tensor: torch.Tensor, where: BaseWeights, module: str) -> None:
    from .spec import all_finite

    if not all_finite(tensor):
        raise NonFiniteError(f"{where.source}: {module} holds NaN or Inf; the checkpoint is corrupt or diverged in "
                             "training: re-download or re-save it.")


def _layer_kinds(config: Mapping[str, Any], source: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Each module's kind (linear, conv1d, conv, embedding, other) and each parameter's tied partners, from the
    architecture built on the meta device (no memory, no weights; transformers' own classes only, never code from
    the checkpoint)."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    architecture = next(iter(config.get("architectures") or []), None)
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    model_type = config.get("model_type")
    if model_class is None or model_type not in transformers.CONFIG_MAPPING:
        raise IncompatibleAdaptersError(
            f"{source}: config.json names no architecture transformers {transformers.__version__} knows "
            f"({architecture!r}, model_type {model_type!r}), so its layer types are unknown; extract reads "
            "transformers models saved with save_pretrained."
        )
    model_config = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
    with torch.device("meta"):
        model = model_class(model_config)
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and module.groups == 1:
            kinds[name] = "conv"
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    tied = {name: [other for other in names if other != name] for names in owners.values() if len(names) > 1
            for name in names}
    return kinds, tied


def _run(
    plan: ExtractionPlan,
    base: BaseWeights,
    finetuned: BaseWeights,
    params: ExtractParams,
    controls: ModuleControls,
    *,
    device: torch.device,
    out_dtype: torch.dtype | None,
    progress: bool | None,
    rule_given: bool,
    rule_lists: Mapping[str, Any],
    modules: str | None,
) -> LoraAdapter:
    from . import __version__
    from .adapter import LoraAdapter
    from .methods import ModuleStats
    from .spec import AdapterConfig, MemoryStore, ModuleSpec

    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, ModuleSpec] = {}
    stats: dict[str, ModuleStats] = {}
    unchanged: list[str] = []
    dtype = out_dtype
    def one(candidate: Candidate) -> tuple[torch.dtype, Any]:
        before = base.tensor(candidate.key)
        after = finetuned.tensor(candidate.key)
        _check_finite(before, base, candidate.name)
        _check_finite(after, finetuned, candidate.name)
        stored = after.dtype
        delta = canonical(after.to(device).float() - before.to(device).float(), candidate.kind)
        del before, after
        if not bool(delta.any()):
            return stored, None
        rule = with_values(params, controls.params_for(candidate.name)).rank_rule()  # type: ignore[attr-defined]
        B, A, stats = decompose(delta, rule, svd=params.svd, seed=params.seed, name=candidate.name)
        return stored, (B.cpu(), A.cpu(), stats)

    # As the merge engine: one torch thread per module, two modules at a time. MKL/OpenMP threads spin badly when
    # the cores are shared (runtime.thread_limit), and one module's SVD gains little from a second thread.
    with thread_limit(1), torch_thread_pool(min(2, os.cpu_count() or 1)) as pool:
        done = list(_progress(pool.map(one, plan.candidates), len(plan.candidates), progress))
    for candidate, (stored, result) in zip(plan.candidates, done):
        if dtype is None:
            dtype = stored if stored in (torch.float16, torch.bfloat16) else torch.float32
        if result is None:
            unchanged.append(candidate.name)
            continue
        B, A, stats[candidate.name] = result
        for name, kind, factors in _with_partners(candidate, B, A):
            spec = module_spec(name, kind, candidate.shape, factors[0].shape[1], dtype)
            specs[name] = spec
            tensors[spec.b_key], tensors[spec.a_key] = factors
            stats[name] = stats[candidate.name]
    if not specs:
        raise IncompatibleAdaptersError(
            f"{plan.finetuned} equals {plan.base} in every extracted module ({len(unchanged)} unchanged): there is "
            "no update to extract; check that the fine-tuned model is the one you meant."
        )
    saved = {key: finetuned.tensor(stored) for key, stored in plan.saved_from.items()}
    for key, tensor in saved.items():
        _check_finite(tensor, finetuned, key.rpartition(".")[0])
    architecture = next(iter(finetuned.config().get("architectures") or []), "")
    config = AdapterConfig(
        base_model=str(base.source),
        task_type="CAUSAL_LM" if str(architecture).endswith("ForCausalLM") else None,
        r=max(spec.rank for spec in specs.values()),
        lora_alpha=1.0,
        fan_in_fan_out=any(c.kind == "conv1d" for c in plan.candidates),
    )
    recorded: dict[str, Any] = params.recorded()
    recorded.update({name: rules_record(rules) for name, rules in rule_lists.items()})
    if not rule_given:
        recorded["rank"] = DEFAULT_RANK
    recorded.update({"modules": modules, "modules_to_save": sorted({k.rpartition(".")[0] for k in saved}),
                     "unchanged_modules": unchanged, "left_out_by_modules": plan.left_out})
    provenance = {
        "lora_fusion_version": __version__,
        "method": "extract",
        "params": recorded,
        "sources": [_source_record(base, "base"), _source_record(finetuned, "finetuned")],
        "base_model": base.source,
        "finetuned": finetuned.source,
        "dtype": str(dtype).removeprefix("torch."),
    }
    local = [Path(w.source) for w in (base, finetuned) if Path(w.source).exists()]
    return LoraAdapter(config=config, modules=specs, store=MemoryStore(tensors), provenance=provenance, stats=stats,
                       inputs=local, saved_modules={k: v.to(dtype, copy=True) for k, v in saved.items()})


def canonical(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """A stored weight difference in the canonical m×n form of ΔW (`lora_fusion.spec`): an embedding's and a
    GPT-2 Conv1D's weight hold ΔWᵀ (in × out); a convolution's kernel is flattened into n = in·∏k."""
    if kind in ("embedding", "conv1d"):
        return delta.T.contiguous()
    return delta.reshape(delta.shape[0], -1)


def decompose(
    delta: torch.Tensor, rule: RankRule, *, svd: str, seed: int, name: str
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """B (m×R), A (R×n) with B·A the rank-R truncation of ΔW that `rule` chooses (√σ on each side), and its stats
    (rank, retained energy, relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F = √(1 − E(R)), exact for the written factors)."""
    from .linalg import choose_rank, dense_svd, exact_svd, relative_error, retained_energy, truncate
    from .methods import ModuleStats
    from .methods.interference import seeded

    default = rule.rank or DEFAULT_RANK
    found = dense_svd(delta, components=default, generator=seeded(seed, name, "extract"), rule=rule,
                      svd=svd)  # type: ignore[arg-type]
    chosen = choose_rank(found.S, rule, default=DEFAULT_RANK, total=found.total_energy)
    if svd == "auto" and found.S.numel() < min(delta.shape) and excess_estimate(found, chosen) > EXCESS_TOLERANCE:
        found = exact_svd(delta)  # the bound is loose here (a flat spectrum at the cut): take the optimum
        chosen = choose_rank(found.S, rule, default=DEFAULT_RANK, total=found.total_energy)
    kept = retained_energy(found.S, chosen, found.total_energy)
    B, A = truncate(found, chosen)
    stats = ModuleStats(rank=chosen, retained_energy=kept, relative_error=relative_error(kept),
                        sigma_max=float(found.S[0]),
                        sigma_next=float(found.S[chosen]) if chosen < found.S.numel() else 0.0)
    return B, A, stats


def excess_estimate(found: FactoredSVD, rank: int) -> float:
    """`linalg.randomized_excess_bound` for a randomized SVD's rank-`rank` truncation, evaluated on the sketch's own
    singular values with the energy it missed, ‖ΔW‖_F² − Σσ̃², placed right after them at σ̃_last (the most
    damaging place for the bound: a tail as high as it can be). A plug-in estimate, not a certificate: the sketch's
    values lie below the true ones (docs/methods.md)."""
    from .linalg import randomized_excess_bound

    S = found.S.double().cpu()  # a few dozen values; the tail below is built on the CPU (S is on the GPU with cuda)
    width = S.numel()
    last = float(S[-1])
    missed = max(0.0, found.total_energy - float((S**2).sum()))
    room = min(found.shape) - width  # singular values the sketch did not compute
    if last == 0.0 or missed > room * last**2:
        # the missed energy does not fit below σ̃_last: the sketch's values are far below the true ones
        return 0.0 if missed == 0.0 else math.inf
    count = int(missed / last**2)
    remainder = math.sqrt(max(0.0, missed - count * last**2))
    tail = torch.cat([torch.full((count,), last, dtype=torch.float64), torch.tensor([remainder], dtype=torch.float64)])
    return randomized_excess_bound(torch.cat([S, tail]), rank=rank, width=width)


def module_spec(name: str, kind: str, stored: tuple[int, ...], rank: int, dtype: torch.dtype) -> Any:
    """The written spec of one extracted module (scale 1; tensors in memory under `<name>.A` and `<name>.B`):
    an embedding's A is r×vocabulary and its B width×r (PEFT's lora_embedding_A/B); a convolution's A is
    r×in×kernel and its B out×r×1…; a Conv1D is a linear module with ΔWᵀ stored (fan_in_fan_out)."""
    from .spec import ModuleSpec

    if kind == "embedding":
        m, n, a_shape, b_shape = stored[1], stored[0], (rank, stored[0]), (stored[1], rank)
    elif kind == "conv1d":
        m, n, a_shape, b_shape = stored[1], stored[0], (rank, stored[0]), (stored[1], rank)
    else:
        m, n = stored[0], math.prod(stored[1:])
        a_shape, b_shape = (rank, *stored[1:]), (stored[0], rank, *(1,) * (len(stored) - 2))
    return ModuleSpec(name=name, kind="embedding" if kind == "embedding" else "conv" if kind == "conv" else "linear",
                      out_features=m, in_features=n, rank=rank, scale=1.0, dtype=dtype, a_shape=a_shape,
                      b_shape=b_shape, a_key=f"{name}.A", b_key=f"{name}.B")


def _with_partners(candidate: Candidate, B: torch.Tensor, A: torch.Tensor) -> Iterator[tuple[str, str, Any]]:
    """The candidate's factors, then the same update for each tied partner: an embedding's canonical ΔW is the
    transpose of its tied lm_head's, so the partner's B is Aᵀ and its A is Bᵀ."""
    yield candidate.name, candidate.kind, (B, A)
    for partner, kind in candidate.tied:
        flipped = (kind == "embedding") != (candidate.kind == "embedding")
        yield partner, kind, ((A.T.contiguous(), B.T.contiguous()) if flipped else (B, A))


def _source_record(weights: BaseWeights, role: str) -> dict[str, Any]:
    local = Path(weights.source).exists()
    return {"source": Path(weights.source).name if local else weights.source, "revision": None if local else
            weights.revision, "subfolder": None, "commit": weights.commit(), "weight": role}


def _progress(items: Iterable[T], total: int, enabled: bool | None) -> Iterator[T]:
    if not (sys.stderr.isatty() if enabled is None else enabled):
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc="extracting", unit="module", file=sys.stderr, leave=False)


