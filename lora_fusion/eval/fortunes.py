"""Text classification by topic of Unix fortunes (Debian package ``fortunes``).

Each topic is a file ``/usr/share/games/fortunes/<topic>`` whose quotes are separated by lines
holding only ``%`` (the ``.dat`` index files beside them are not needed).  An example's text is
one quote with its attribution, whitespace collapsed to single spaces, terminal overstriking
(``X\\bX``) and other control characters removed.  Its label is the topic.

Task ``fortune_topic`` (4 balanced classes): computers, politics, work, men-women (1050, 703, 630
and 582 quotes).  They were picked with a linear probe on frozen all-MiniLM-L6-v2 embeddings
(200 training / 100 test quotes per topic, every 4-topic set of computers, politics, science,
work, people, men-women, songs-poems, art, definitions and platitudes; measured once): they
score 0.83, against 0.73 for computers/politics/science/work.  The few sets that scored higher
(up to 0.84) need art or platitudes (500 quotes or fewer) or definitions, whose joke-dictionary
entries are recognisable by their format rather than their topic.  A quote filed under two of
the topics is dropped by the shared splitting (``tasks.dedupe``).

The fortune program is BSD-licensed; the copyright status of the individual quotations is not
stated, so the testbed reads them from the installed package and never ships them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from lora_fusion.errors import SourceNotFoundError
from lora_fusion.eval.tasks import Example, TextTask

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
APT_PACKAGE = "fortunes"
SEPARATOR = "%"
FORTUNE_TOPICS = ("computers", "politics", "work", "men-women")

_OVERSTRIKE = re.compile(r".\x08")  # "X\bX" (bold) and "_\bX" (underline): keep what is printed last
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(quote: str) -> str:
    """One quote as a single line: overstriking and control characters removed, spaces collapsed."""
    return " ".join(_CONTROL.sub("", _OVERSTRIKE.sub("", quote)).split())


def parse_fortunes(raw: str) -> list[str]:
    """The non-empty quotes of a fortune file's text, in file order, each cleaned by ``clean``."""
    quotes, lines = [], []
    for line in raw.splitlines():
        if line.strip() == SEPARATOR:
            quotes.append(clean("\n".join(lines)))
            lines = []
        else:
            lines.append(line)
    quotes.append(clean("\n".join(lines)))
    return [quote for quote in quotes if quote]


@functools.cache
def read_fortunes(path: Path) -> tuple[str, ...]:
    """All quotes of one fortune file (UTF-8, undecodable bytes replaced)."""
    if not path.is_file():
        # a LoraFusionError, so `lora-fusion icm train` reports it on one line (exit 2), not as a traceback
        raise SourceNotFoundError(
            f"fortune file {path} not found: install Debian's `{APT_PACKAGE}` package "
            f"(`apt-get install -y {APT_PACKAGE}`), or pass the directory that holds the topic files "
            "(--fortunes-dir, or `data_dirs: {fortunes: DIR}` in an ICM recipe)"
        )
    return tuple(parse_fortunes(path.read_bytes().decode("utf-8", errors="replace")))


def topic_task(name: str, topics: Sequence[str]) -> TextTask:
    """Classify quotes by the fortune file (topic) they come from; label i is ``topics[i]``."""

    def examples(fortunes_dir: Path) -> Iterator[Example]:
        for label, topic in enumerate(topics):
            for quote in read_fortunes(Path(fortunes_dir) / topic):
                yield quote, label

    return TextTask(name, tuple(topics), examples)


FORTUNE_TASKS: dict[str, TextTask] = {
    task.name: task for task in (topic_task("fortune_topic", FORTUNE_TOPICS),)
}
