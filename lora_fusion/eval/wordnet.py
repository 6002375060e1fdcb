"""Text classification tasks built from WordNet 3.0 glosses (Debian package ``wordnet-base``).

Each synset line of ``data.{noun,verb,adj,adv}`` reads
``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``.  The lexicographer file number is
the synset's supersense.  The text of an example is the gloss's definition only: the quoted
usage examples that follow it are dropped, since they usually contain the headword.

Tasks (4 balanced classes each):

* ``noun_supersense``: nouns of the supersenses animal, food, person, artifact.
* ``verb_supersense``: verbs of the supersenses motion, communication, contact, cognition.
* ``part_of_speech``: the part of speech of the glossed word: noun, verb, adj, adv
  (adjective satellites count as adj).

The tests read ``tests/data/wordnet-sample``: real lines of these files, enough for every task's
splits, so that they need no system package.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from lora_fusion.errors import SourceNotFoundError
from lora_fusion.eval.tasks import Example, TextTask, balanced_split

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"

# Lexicographer file names, indexed by lexicographer file number (WordNet's ``lexnames``).
NOUN_SUPERSENSES = (
    "Tops act animal artifact attribute body cognition communication event feeling food group "
    "location motive object person phenomenon plant possession process quantity relation shape "
    "state substance time"
).split()
VERB_SUPERSENSES = (
    "body change cognition communication competition consumption contact creation emotion motion "
    "perception possession social stative weather"
).split()
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    *(f"noun.{name}" for name in NOUN_SUPERSENSES),
    *(f"verb.{name}" for name in VERB_SUPERSENSES),
    "adj.ppl",
)

# Parts of speech, named like the data files (``data.adj`` also holds the adjective satellites).
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")


class Synset(NamedTuple):
    """The parts of a synset line used by the tasks."""

    lexname: str
    definition: str


def parse_synset(line: str) -> Synset | None:
    """Parse one data-file line; ``None`` for licence lines and glosses without a definition."""
    if line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    definition = gloss.split('; "', 1)[0].strip()
    if not definition or definition.startswith('"'):
        return None
    return Synset(LEXNAMES[int(head.split(maxsplit=2)[1])], definition)


@functools.cache
def read_synsets(data_file: Path) -> tuple[Synset, ...]:
    """All synsets of one WordNet data file, in file order."""
    if not data_file.is_file():
        # a LoraFusionError, so `lora-fusion icm train` reports it on one line (exit 2), not as a traceback
        raise SourceNotFoundError(
            f"WordNet data file {data_file} not found: install it with "
            "`apt-get install wordnet-base`, or pass the directory that holds "
            "data.noun, data.verb, data.adj and data.adv (--wordnet-dir, or `data_dirs: {wordnet: DIR}` "
            "in an ICM recipe)"
        )
    with data_file.open(encoding="utf-8", errors="replace") as lines:
        return tuple(synset for synset in map(parse_synset, lines) if synset is not None)


def supersense_task(name: str, pos: str, supersenses: tuple[str, ...]) -> TextTask:
    """Classify glosses of one part of speech by supersense (e.g. ``pos="noun"``, ``"animal"``)."""
    label_of = {f"{pos}.{supersense}": label for label, supersense in enumerate(supersenses)}

    def examples(wordnet_dir: Path) -> Iterator[Example]:
        for synset in read_synsets(wordnet_dir / f"data.{pos}"):
            if synset.lexname in label_of:
                yield synset.definition, label_of[synset.lexname]

    return TextTask(name, supersenses, examples)


def part_of_speech_task(name: str) -> TextTask:
    """Classify glosses by the part of speech of the word they define."""

    def examples(wordnet_dir: Path) -> Iterator[Example]:
        for label, pos in enumerate(PARTS_OF_SPEECH):
            for synset in read_synsets(wordnet_dir / f"data.{pos}"):
                yield synset.definition, label

    return TextTask(name, PARTS_OF_SPEECH, examples)


WORDNET_TASKS: dict[str, TextTask] = {
    task.name: task
    for task in (
        supersense_task("noun_supersense", "noun", ("animal", "food", "person", "artifact")),
        supersense_task(
            "verb_supersense", "verb", ("motion", "communication", "contact", "cognition")
        ),
        part_of_speech_task("part_of_speech"),
    )
}

TASKS: dict[str, list[str]] = {name: list(task.classes) for name, task in WORDNET_TASKS.items()}


def load_task(
    name: str, split: str, *, wordnet_dir: str | Path = DEFAULT_WORDNET_DIR, seed: int = 0
) -> list[Example]:
    """Return the ``(text, label)`` pairs of one split of a task (see ``balanced_split``)."""
    if name not in WORDNET_TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(WORDNET_TASKS)}")
    task = WORDNET_TASKS[name]
    return balanced_split(task.examples(Path(wordnet_dir)), len(task.classes), split, seed=seed)
