"""LoRAHub's support examples: a JSONL file of `{"input", "output"}` pairs (causal LMs: the loss is the
cross-entropy of the output tokens) or of `{"text", "label"}` pairs (encoders with a classification head).

Reading checks only the file (every line, numbered in errors); [`encode`] checks the examples against the base
model's tokenizer, labels and context length, before the model's weights are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..jsonl import json_objects
from .errors import SupportDataError

SupportKind = Literal["causal", "classification"]
# The keys of each kind of example, and what the loss is taken on.
KEYS: Mapping[SupportKind, tuple[str, str]] = {"causal": ("input", "output"), "classification": ("text", "label")}


@dataclass(frozen=True)
class SupportExample:
    """One example: its line in the file, the text the model reads, and the target (output text or label)."""

    line: int
    text: str
    target: str | int


@dataclass(frozen=True)
class SupportSet:
    """The examples of one support file, all of one kind."""

    path: str
    kind: SupportKind
    examples: tuple[SupportExample, ...]

    def __len__(self) -> int:
        return len(self.examples)


def read_support(path: str | Path) -> SupportSet:
    """Read a LoRAHub support file: one JSON object per line, every line `{"input": str, "output": str}` (causal
    LM) or every line `{"text": str, "label": str | int}` (sequence classification); blank lines are skipped.

    Raises:
        SupportDataError: the file is missing or holds no example, a line is not a JSON object, lacks its kind's
            keys, has a value of the wrong type, or is of another kind than the first line (the line is named).
    """
    kind: SupportKind | None = None
    examples = []
    for number, where, record in json_objects(path, SupportDataError, hint="a JSONL file of examples (--support)"):
        line_kind = _kind(record, where)
        if kind is not None and line_kind != kind:
            raise SupportDataError(
                f"{where}: a {line_kind} example ({'/'.join(KEYS[line_kind])}) in a file of {kind} examples "
                f"({'/'.join(KEYS[kind])}); use one kind per file."
            )
        kind = line_kind
        examples.append(_example(record, kind, number, where))
    if kind is None:
        raise SupportDataError(f"support file {Path(path).expanduser()} holds no examples; write one JSON object per "
                               'line, e.g. {"input": "…", "output": "…"} or {"text": "…", "label": "…"}.')
    return SupportSet(str(path), kind, tuple(examples))


def _kind(record: Mapping[str, Any], where: str) -> SupportKind:
    for kind, keys in KEYS.items():
        if all(key in record for key in keys):
            return kind
    raise SupportDataError(f"{where}: each line needs \"input\" and \"output\" (causal LM) or \"text\" and \"label\" "
                           f"(classification); this one has {sorted(record)}.")


def _example(record: Mapping[str, Any], kind: SupportKind, number: int, where: str) -> SupportExample:
    source_key, target_key = KEYS[kind]
    text, target = record[source_key], record[target_key]
    if not isinstance(text, str):
        raise SupportDataError(f"{where}: \"{source_key}\" must be a string.")
    if kind == "causal":
        if not isinstance(target, str) or not target:
            raise SupportDataError(f"{where}: \"output\" must be a non-empty string (the loss is taken on it).")
    elif isinstance(target, bool) or not isinstance(target, (str, int)):
        raise SupportDataError(f"{where}: \"label\" must be a class name or a class index.")
    return SupportExample(number, text, target)


@dataclass(frozen=True)
class EncodedSupport:
    """The support set as padded batches of token ids on the CPU: `labels` are the output tokens' ids (−100
    elsewhere) for a causal LM, the class indices for classification. `targets` counts what the loss averages over
    (output tokens, or examples)."""

    kind: SupportKind
    batches: tuple[dict[str, Any], ...]
    targets: int


# Examples per forward pass: small enough for a 2-core machine, large enough to amortise the hooks' overhead.
BATCH_SIZE = 16


def encode(support: SupportSet, tokenizer: Any, config: Any) -> EncodedSupport:
    """Tokenise the support set for the base model and check it against the model's config.

    Causal LM: the tokens of `input` (with the tokenizer's special tokens) followed by those of `output` and the
    end-of-sequence token; the loss is on the output and end tokens. Classification: `text` with the special
    tokens; a label is a name of `config.label2id` or an index below `config.num_labels`.

    Raises:
        SupportDataError: a label the head does not know, an output with no tokens, or an example longer than the
            model's context (`max_position_embeddings`), with its line.
    """
    import torch

    context = _context_length(config)
    rows: list[tuple[list[int], list[int] | int]] = []
    for example in support.examples:
        where = f"{support.path}:{example.line}"
        ids = list(tokenizer(example.text, add_special_tokens=True)["input_ids"])
        target: list[int] | int
        if support.kind == "causal":
            out = list(tokenizer(str(example.target), add_special_tokens=False)["input_ids"])
            if tokenizer.eos_token_id is not None:
                out.append(tokenizer.eos_token_id)
            if not out:
                raise SupportDataError(f"{where}: the output has no tokens for this tokenizer.")
            ids, target = ids + out, [-100] * len(ids) + out
        else:
            target = _label_index(example.target, config, where)
        if context is not None and len(ids) > context:
            raise SupportDataError(f"{where}: {len(ids)} tokens, longer than the model's context of {context} "
                                   "(max_position_embeddings); shorten the example.")
        rows.append((ids, target))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(rows), BATCH_SIZE):
        chunk = rows[start : start + BATCH_SIZE]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (tokens, _) in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        if support.kind == "causal":
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (_, target) in enumerate(chunk):
                labels[row, : len(target)] = torch.tensor(target)  # type: ignore[arg-type]
        else:
            labels = torch.tensor([target for _, target in chunk], dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    targets = sum(int((b["labels"] != -100).sum()) for b in batches) if support.kind == "causal" else len(rows)
    return EncodedSupport(support.kind, tuple(batches), targets)


def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _label_index(label: str | int, config: Any, where: str) -> int:
    label2id: Mapping[str, int] = getattr(config, "label2id", None) or {}
    count = int(getattr(config, "num_labels", len(label2id)))
    if isinstance(label, int) and 0 <= label < count:
        return label
    if isinstance(label, str) and label in label2id:
        return int(label2id[label])
    known: Sequence[Any] = sorted(label2id, key=lambda name: label2id[name]) or list(range(count))
    raise SupportDataError(f"{where}: label {label!r} is not one the classification head knows; use one of "
                           f"{list(known)} or an index below {count}.")
