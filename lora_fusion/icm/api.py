"""The public entry points of ICM-Fusion: fuse LoRAs through a trained F-VAE, read support files.

`lora-fusion merge A B C --method icm --fvae DIR --support FILE` calls [`icm_merge`]; `lora-fusion icm train`
writes the F-VAE directory it reads (see `lora_fusion.icm.minilm.train_minilm_fvae`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_fusion.adapter import LoraAdapter

from ..jsonl import json_objects
from .errors import BaseModelMismatchError, SupportFileError, UnknownSupportLabelError


def read_support(path: str | Path) -> list[dict[str, Any]]:
    """Read a support file: JSON lines `{"task": NAME, "label": CLASS (name or index), "text": …}` (text tasks) or
    `{"task": …, "label": …, "x": [floats]}` (the toy world). Blank lines are skipped.

    Raises:
        SupportFileError: the file is missing, a line is not a JSON object, or a line lacks `task` or `label`.
    """
    records = []
    for _, where, record in json_objects(path, SupportFileError, hint="a JSONL file of labelled examples"):
        if "task" not in record or "label" not in record:
            raise SupportFileError(f"{where}: each line needs \"task\" and \"label\" keys.")
        records.append(record)
    if not records:
        raise SupportFileError(f"support file {Path(path).expanduser()} holds no examples.")
    return records


def icm_merge(
    sources: Sequence[LoraAdapter],
    *,
    fvae: str | Path,
    support: str | Path,
    seed: int | None = 0,
    tasks: Sequence[str] | None = None,
    conflict_projection: bool = True,
    learn_weights: bool = True,
    condition_only: bool = False,
    steps: int = 200,
    refine_steps: int = 0,
) -> LoraAdapter:
    """Fuse LoRAs into one with ICM-Fusion's latent fusion through a meta-trained F-VAE (docs/icm.md).

    Each LoRA is encoded with its task vector (the F-VAE's mode: by default the mean hidden state of the base model
    carrying it over its task's support examples); the latent directions lose their pairwise conflicting parts
    (PCGrad, Yu et al. 2020, arXiv:2001.06782); the weights w = softmax(a) and an offset δ of
    z_f = (Σ wᵢρᵢ)·normalize(Σ wᵢuᵢ + δ) are fitted on the union of the support sets with the decoder frozen; the
    decoded l_f = D([z_f; Σ wᵢvᵢ]) is the fused LoRA, of the F-VAE's layout and rank. An interpretation of Shao et
    al., "ICM-Fusion", AAAI 2026 (arXiv:2508.04153), whose method section is not public.

    Args:
        sources: loaded LoRAs ([`load_adapter`]), all of the layout the F-VAE was trained on.
        fvae: an F-VAE directory written by `lora-fusion icm train` ([`TrainedFVAE.save`]).
        support: a JSONL support file ([`read_support`]): a few labelled examples of each source's task.
        seed: seeds the order of the conflict projection (None: 0); same inputs and seed, same adapter.
        tasks: the task of each source, in order (default: the support file's tasks in order of first appearance).
        conflict_projection: remove pairwise conflicting latent components (ablation: False).
        learn_weights: learn w and δ on the support sets (ablation: False, uniform weights).
        condition_only: decode z = 0 with the mean task vector (ablation: ICM-LoRA generation).
        steps: Adam steps of the weight and offset search.
        refine_steps: Eq. 8 refinement steps of the fused LoRA on the union of the support sets.

    Returns:
        An in-memory [`LoraAdapter`] (scale 1, float32) with the fusion's weights in `.provenance`; write it with
        `save_pretrained` (the writer).

    Raises:
        FVAECheckpointError: `fvae` is not an F-VAE directory.
        SupportFileError: the support file is unreadable, or its tasks do not match the sources.
        UnknownSupportLabelError: a support example names a task or class the F-VAE does not know.
        BaseModelMismatchError: a source adapts another base model than the F-VAE's.
        LayoutMismatchError: a source's modules, shapes or ranks differ from the F-VAE's layout.

    Example:
        ```python
        >>> from lora_fusion import load_adapter
        >>> from lora_fusion.icm import icm_merge
        >>> fused = icm_merge([load_adapter(p) for p in ("a", "b")], fvae="fvae/", support="support.jsonl")
        >>> fused.save_pretrained("fused/")
        ```
    """
    from .fusion import FusionConfig, fuse
    from .lora_io import adapter_factors, flatten, to_adapter
    from .meta import load_fvae

    seed = 0 if seed is None else seed
    trained = load_fvae(fvae)
    records = read_support(support)
    for index, adapter in enumerate(sources):
        base = adapter.base_model
        if base is not None and trained.base_model is not None and base != trained.base_model:
            raise BaseModelMismatchError(
                f"source {index + 1} adapts {base!r} but the F-VAE in {fvae} was trained for {trained.base_model!r}; "
                "train an F-VAE for this base model with `lora-fusion icm train`."
            )
        trained.layout.check(adapter, what=f"source {index + 1}")
    batches = trained.world.support_batches(records)
    order = list(tasks) if tasks is not None else list(dict.fromkeys(r["task"] for r in records))
    if len(order) != len(sources):
        raise SupportFileError(
            f"{len(sources)} sources but {len(order)} tasks ({', '.join(order)}); give one task per source, in order "
            "(the support file's tasks in order of first appearance, or tasks=…)."
        )
    for task in order:
        if task not in batches:
            if task not in trained.world.task_classes:
                known = sorted(trained.world.task_classes)
                raise UnknownSupportLabelError(f"unknown task {task!r}; the F-VAE knows {known}.")
            raise SupportFileError(f"the support file has no example of task {task!r}.")
    config = FusionConfig(conflict_projection=conflict_projection, learn_weights=learn_weights,
                          condition_only=condition_only, steps=steps, refine_steps=refine_steps, seed=seed)
    flats = [flatten(adapter_factors(adapter), trained.layout) for adapter in sources]
    result = fuse(trained, flats, [(task, batches[task]) for task in order], config)
    from ..provenance import merge_provenance

    provenance = merge_provenance(
        "icm",
        {"fvae": str(fvae), "support": str(support), "tasks": order, "seed": seed, **result.summary()},
        sources,
        [round(w, 4) for w in result.weights],
    )
    return to_adapter(result.flat, trained.layout, base_model=trained.base_model,
                      task_type=sources[0].config.task_type if sources else None, provenance=provenance)
