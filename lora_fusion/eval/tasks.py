"""Source-agnostic text classification tasks and their fixed, balanced train/validation/test splits.

A task is a name, its class names and a function that reads a data directory and yields
``(text, label)`` pairs.  Data sources (WordNet glosses today, other corpora later) only have
to provide such a function; the splitting below is shared by all of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

Example = tuple[str, int]
SPLITS = ("train", "validation", "test")

TEST_PER_CLASS = 50
VAL_PER_CLASS = 50
MAX_TRAIN_PER_CLASS = 1500


@dataclass(frozen=True)
class TextTask:
    """A labelled text classification task read from a data directory."""

    name: str
    classes: tuple[str, ...]
    examples: Callable[[Path], Iterable[Example]]


def dedupe(examples: Iterable[Example]) -> list[Example]:
    """Keep the first occurrence of each text; drop texts that occur with more than one label."""
    labels: dict[str, set[int]] = {}
    for text, label in examples:
        labels.setdefault(text, set()).add(label)
    return [(text, next(iter(seen))) for text, seen in labels.items() if len(seen) == 1]


def balanced_split(
    examples: Iterable[Example],
    n_classes: int,
    split: str,
    *,
    seed: int,
    test_per_class: int = TEST_PER_CLASS,
    val_per_class: int = VAL_PER_CLASS,
    max_train_per_class: int = MAX_TRAIN_PER_CLASS,
) -> list[Example]:
    """Return one split with the same number of examples for every class.

    Each class is shuffled with ``seed``; its first ``test_per_class`` examples are the test
    split, the next ``val_per_class`` the validation split, and the train split takes the rest,
    truncated to the size of the smallest class (and to ``max_train_per_class``).  Test and
    validation therefore never depend on the train cap.  Output is ordered by class, then by
    the shuffled order.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    by_class: list[list[str]] = [[] for _ in range(n_classes)]
    for text, label in dedupe(examples):
        by_class[label].append(text)
    held_out = test_per_class + val_per_class
    smallest = min(len(texts) for texts in by_class)
    if smallest <= held_out:
        raise ValueError(f"smallest class has {smallest} examples, need more than {held_out}")
    n_train = min(smallest - held_out, max_train_per_class)
    bounds = {
        "test": (0, test_per_class),
        "validation": (test_per_class, held_out),
        "train": (held_out, held_out + n_train),
    }
    start, stop = bounds[split]
    out: list[Example] = []
    for label, texts in enumerate(by_class):
        shuffled = sorted(texts)
        random.Random(f"{seed}:{label}").shuffle(shuffled)
        out.extend((text, label) for text in shuffled[start:stop])
    return out
