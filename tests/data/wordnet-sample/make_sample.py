"""Rebuild this WordNet sample from the full WordNet 3.0 data files (how the committed files were made).

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wordnet-base
    .venv/bin/python tests/data/wordnet-sample/make_sample.py /tmp/wordnet-base/usr/share/wordnet

Each sample file keeps the full file's licence header (the lines that start with two spaces) and, for each class of
the WordNet tasks (`lora_fusion.eval.wordnet`), `PER_CLASS` synset lines copied unchanged and in file order, spread
evenly over that class's short lines (at most `MAX_LINE` characters, which keeps the sample small).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lora_fusion.eval.wordnet import PARTS_OF_SPEECH, WORDNET_TASKS, parse_synset

# balanced_split holds out 50 test and 50 validation examples per class, so 120 leave 20 for training
PER_CLASS = 120
MAX_LINE = 200


def spread(lines: list[str], count: int) -> list[str]:
    """`count` lines evenly spaced over `lines`, in their order."""
    if len(lines) < count:
        raise SystemExit(f"only {len(lines)} eligible lines, need {count}")
    return [lines[i * len(lines) // count] for i in range(count)]


def sample_file(source: Path, classes: list[str] | None) -> str:
    """The licence header plus `PER_CLASS` lines of each lexicographer file in `classes` (all lines if None)."""
    header, eligible = [], {}
    for line in source.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        synset = parse_synset(line)
        if synset is None:
            header += [line] if line.startswith("  ") else []
        elif len(line) <= MAX_LINE and (classes is None or synset.lexname in classes):
            eligible.setdefault(None if classes is None else synset.lexname, []).append(line)
    chosen = {line for lines in eligible.values() for line in spread(lines, PER_CLASS)}
    body = [line for lines in eligible.values() for line in lines if line in chosen]
    return "".join(header + sorted(body, key=lambda line: int(line.split(maxsplit=1)[0])))


def main(wordnet_dir: str) -> None:
    out = Path(__file__).resolve().parent
    wanted = {"noun": WORDNET_TASKS["noun_supersense"].classes, "verb": WORDNET_TASKS["verb_supersense"].classes}
    for pos in PARTS_OF_SPEECH:
        classes = [f"{pos}.{name}" for name in wanted[pos]] if pos in wanted else None
        (out / f"data.{pos}").write_text(sample_file(Path(wordnet_dir) / f"data.{pos}", classes), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
