"""Every real text classification task available offline, with where its data lives.

A task comes from a data source (WordNet glosses, Debian fortunes) and reads its examples from
that source's directory.  ``load_split`` returns one of its fixed, balanced splits
(``tasks.balanced_split``: 50 test and 50 validation examples per class, the rest for training).
Nothing here imports torch, so tests and tools can list tasks and build splits cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lora_fusion.eval.fortunes import DEFAULT_FORTUNES_DIR, FORTUNE_TASKS
from lora_fusion.eval.tasks import Example, TextTask, balanced_split
from lora_fusion.eval.wordnet import DEFAULT_WORDNET_DIR, WORDNET_TASKS

# source name -> (its tasks, its default data directory, the Debian package that installs it)
SOURCES: dict[str, tuple[Mapping[str, TextTask], str, str]] = {
    "wordnet": (WORDNET_TASKS, DEFAULT_WORDNET_DIR, "wordnet-base"),
    "fortunes": (FORTUNE_TASKS, DEFAULT_FORTUNES_DIR, "fortunes"),
}
TASK_SOURCE: dict[str, str] = {
    name: source for source, (tasks, _, _) in SOURCES.items() for name in tasks
}
ALL_TASKS: dict[str, TextTask] = {
    name: task for tasks, _, _ in SOURCES.values() for name, task in tasks.items()
}
# The merge testbed's tasks: 3 WordNet gloss tasks and 1 fortune topic task, 4 classes each.
TESTBED_TASKS = ("noun_supersense", "verb_supersense", "part_of_speech", "fortune_topic")


@dataclass(frozen=True)
class DataDirs:
    """The data directory of each source (default: where its Debian package installs it)."""

    dirs: Mapping[str, str | Path] = field(default_factory=dict)

    def of(self, source: str) -> Path:
        return Path(self.dirs.get(source) or SOURCES[source][1])


def get_task(name: str) -> TextTask:
    if name not in ALL_TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(ALL_TASKS)}")
    return ALL_TASKS[name]


def load_split(name: str, split: str, *, dirs: DataDirs | None = None, seed: int = 0) -> list[Example]:
    """The ``(text, label)`` pairs of one split of a task (see ``tasks.balanced_split``)."""
    task = get_task(name)
    data_dir = (dirs or DataDirs()).of(TASK_SOURCE[name])
    return balanced_split(task.examples(data_dir), len(task.classes), split, seed=seed)
