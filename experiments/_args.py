"""One way to declare and read a study's command line: the options every study shares, spelled and checked the same way.

    parser = study_parser(__doc__, seeds=[0, 1, 2], out=Path("docs/results"), threads=1, data_dirs=("wordnet",))
    parser.add_argument("--steps", type=int, default=200)   # the study's own options
    args = parse_study_args(parser, argv)                    # args.seeds, args.out, args.data_dirs, args.device

Shared options (each only where the study asks for it):

* `--seeds N [N ...]` (several training seeds) or `--seed N` (one); seeds are distinct and non-negative;
* `--out DIR`: the output folder;
* `--<source>-dir DIR` per data source of `lora_fusion.eval.catalog.SOURCES` (`--wordnet-dir`, `--fortunes-dir`),
  read into `args.data_dirs` (a `DataDirs`; unset folders fall back to where the Debian package installs them);
* `--threads N`: torch threads, set before the study starts;
* `--device auto|cpu|cuda`: `args.device` (`None` when not given: the study's or its recipe's own choice);
  `cuda` fails at once when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from lora_fusion.eval.catalog import SOURCES, DataDirs

DEVICES = ("auto", "cpu", "cuda")


def study_parser(
    doc: str | None,
    *,
    seeds: Sequence[int] | None = None,
    seed: int | None = None,
    out: Path | None = None,
    out_help: str = "output directory",
    data_dirs: Sequence[str] = (),
    threads: int | None = None,
    device: bool = False,
) -> argparse.ArgumentParser:
    """An argument parser for one study, with the shared options it asks for (none by default).

    Args:
        doc: the study module's docstring; its first line is the parser's description, and its usage line
            (`python -m experiments.<study> …`) gives the program name `--help` shows.
        seeds: default of `--seeds` (several seeds); `None`: no `--seeds`.
        seed: default of `--seed` (one seed); `None`: no `--seed`.
        out: default of `--out`; `None`: no `--out`.
        out_help: what `--out` holds, for `--help`.
        data_dirs: data sources (keys of `lora_fusion.eval.catalog.SOURCES`) that get a `--<source>-dir` option.
        threads: default of `--threads` (torch threads); `None`: no `--threads`, torch's own default.
        device: whether the study takes `--device`.

    Raises:
        ValueError: `seeds` and `seed` both given, or an unknown data source.
    """
    if seeds is not None and seed is not None:
        raise ValueError("a study takes either --seeds or --seed, not both")
    unknown = set(data_dirs) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown data sources {sorted(unknown)}; known: {sorted(SOURCES)}")
    command = re.search(r"python -m ([\w.]+)", doc or "")
    parser = argparse.ArgumentParser(
        prog=f"python -m {command.group(1)}" if command else None,
        description=doc.strip().splitlines()[0] if doc and doc.strip() else None,
    )
    if seeds is not None:
        parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), metavar="N",
                            help="training seeds (default: %(default)s)")
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed, metavar="N",
                            help="seed for splits, initialisation and data order (default: %(default)s)")
    if out is not None:
        parser.add_argument("--out", type=Path, default=Path(out), metavar="DIR",
                            help=f"{out_help} (default: %(default)s)")
    for source in data_dirs:
        _, default_dir, package = SOURCES[source]
        parser.add_argument(f"--{source}-dir", default=None, metavar="DIR",
                            help=f"{source} data directory (default: {default_dir}, from Debian's {package})")
    parser.set_defaults(_data_sources=tuple(data_dirs))
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, metavar="N",
                            help="torch threads (default: %(default)s)")
    if device:
        parser.add_argument("--device", choices=DEVICES, default=None,
                            help="where to compute (default: the study's recipe decides)")
    return parser


def parse_study_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (the command line when `None`), check the shared options and apply `--threads`.

    Adds `args.data_dirs` (a `DataDirs` of the `--<source>-dir` options; empty when the study has none). A wrong
    value exits with status 2 and one line, as argparse does for its own errors.
    """
    args = parser.parse_args(None if argv is None else list(argv))
    seeds = getattr(args, "seeds", None)
    if seeds is None and getattr(args, "seed", None) is not None:
        seeds = [args.seed]
    if seeds is not None:
        if any(s < 0 for s in seeds):
            parser.error(f"seeds must be non-negative, got {seeds}")
        if len(set(seeds)) != len(seeds):
            parser.error(f"seeds must be distinct, got {seeds}")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        parser.error(f"--threads must be at least 1, got {threads}")
    sources = getattr(args, "_data_sources", ())
    args.data_dirs = DataDirs({s: getattr(args, f"{s}_dir") for s in sources if getattr(args, f"{s}_dir")})
    if hasattr(args, "_data_sources"):
        del args._data_sources
    if threads is not None or getattr(args, "device", None) == "cuda":
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible (use --device cpu or auto)")
    return args
