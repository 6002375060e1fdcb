"""The merge report (`lora-fusion report`, `merge --report`): what a merge did to each module, how much its sources
interfered layer by layer, and the singular-value spectra of its largest modules, as PNG figures, one self-contained
HTML page and `report.json` holding every number drawn.

[`build_report`] computes the numbers (a JSON-serialisable dict); [`write_report`] draws and writes them atomically.
Every update is handled through its factors: spectra come from a QR of B and Aᵀ and an SVD of the small core, never
from a dense out×in matrix. Sign conflicts are the one element-wise quantity: they are counted exactly on modules of
up to [`EXACT_SIGN_ENTRIES`] entries and estimated from a fixed random sample of entries on larger ones, which the
report says per module and in its notes.

Layers: a module belongs to the layer named by the first match of [`LAYER_PATTERN`] in its name, the name up to and
including the index (`model.layers.3.self_attn.q_proj` → `model.layers.3`; `unet.down_blocks.0.attentions.1.…` →
`unet.down_blocks.0.attentions.1`; `transformer.h.5.attn.c_attn` → `transformer.h.5`), so an encoder's and a
decoder's layer 3 stay apart. Modules without a match form the group [`NO_LAYER`].
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .diagnostics import overall_interference, sign_conflicts
from .errors import OutputProtectedError
from .writer import existing_output, special_folder, staged, swap_into_place
from .linalg import factored_svd
from .runtime import thread_limit, torch_thread_pool

if TYPE_CHECKING:
    from .adapter import LoraAdapter, ModuleFactors
    from .methods.base import ModuleStats

# The layer a module belongs to: the first `.layers.N.` (or blocks, h, transformer_blocks, …) in its name.
LAYER_PATTERN = re.compile(
    r"(?:^|\.)(?:layers|blocks|h|transformer_blocks|single_transformer_blocks|resnets|attentions)\.(\d+)\."
)
NO_LAYER = "(no layer)"
REPORT_JSON = "report.json"
INDEX_HTML = "index.html"
FIGURES = ("retained_energy.png", "interference.png", "spectra.png")
# What a report folder holds: the only files `overwrite` may delete.
REPORT_FILES = frozenset({REPORT_JSON, INDEX_HTML, *FIGURES})
# Significant digits of every number in the HTML tables (report.json holds them at full precision).
HTML_DIGITS = 6
# Modules of up to this many entries (m·n) get exactly counted sign conflicts (TIES' exact top-k trim of each dense
# update, as `inspect --interference` counts them); larger ones are estimated from `sign_sample` random entries.
EXACT_SIGN_ENTRIES = 1 << 20
SIGN_SAMPLE = 1 << 14


def layer_of(module: str) -> tuple[str, int | None]:
    """The layer group of `module` and its index: (`model.layers.3`, 3), or ([`NO_LAYER`], None)."""
    found = LAYER_PATTERN.search(module)
    if found is None:
        return NO_LAYER, None
    return module[: found.end() - 1], int(found[1])


def read_provenance(adapter: LoraAdapter) -> dict[str, Any] | None:
    """The lora-fusion provenance record of `adapter`: its in-memory `provenance` (a merge just made), else the
    `lora_fusion` entry of its safetensors metadata (a folder or file lora-fusion wrote); None when it has neither.

    Only the headers of the adapter's `.safetensors` files are read (8 bytes of length, then the JSON header).
    """
    if adapter.provenance:
        return dict(adapter.provenance)
    files = adapter.source.files if adapter.source else ()
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        try:
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size <= 100_000_000:
                    continue
                header = json.loads(handle.read(size))
            record = json.loads((header.get("__metadata__") or {}).get("lora_fusion", "null"))
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(record, dict):
            return record
    return None


def is_merge_output(record: Mapping[str, Any] | None) -> bool:
    """Whether a provenance record ([`read_provenance`]) is a merge's: it lists sources with their weights (a copy
    or a conversion lists its source without a weight; a trained adapter lists none)."""
    sources = (record or {}).get("sources")
    return isinstance(sources, list) and any(isinstance(s, dict) and "weight" in s for s in sources)


def _name(adapter: LoraAdapter, fallback: str) -> str:
    """The source as given, or its last component when that is an absolute path or climbs with `..` (a report may
    be shared: it names no user's folders, as the provenance does not)."""
    if adapter.source is None:
        return fallback
    text = adapter.source.source
    path = Path(text)
    return path.name or text if path.is_absolute() or ".." in path.parts else text


def _flat(factors: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m×r) with the scale folded in, and A (r×n), float64."""
    return factors.scale * factors.B.double(), factors.A.double().reshape(factors.A.shape[0], -1)


def _frobenius(factors: ModuleFactors) -> float:
    """‖s·B·A‖_F from the factors: ‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)."""
    b, a = _flat(factors)
    return float(((b.mT @ b) * (a @ a.mT)).sum().clamp_min(0.0)) ** 0.5


def _spectrum(factors: ModuleFactors) -> list[float]:
    """The singular values of ΔW = s·B·A, descending, from a QR of B and Aᵀ and an SVD of the r×r core."""
    b, a = _flat(factors)
    return [float(s) for s in factored_svd(b.float(), a.float()).S]


def sampled_sign_conflict(factors: Sequence[ModuleFactors], density: float, entries: int, seed: int) -> float:
    """[`sign_conflicts`] estimated on about `entries` sampled positions: each task keeps its top-`density`
    magnitudes among the sampled values, then the conflict fraction is counted as for the whole matrix.

    The positions are `entries / 64` blocks of 8 rows × 8 columns, rows and columns drawn uniformly (with replacement,
    from `seed`): every entry is equally likely, and each block costs one 8×r by r×8 product instead of 64 r-long
    gathers. With 16,384 entries that is 2,048 rows and 2,048 columns per module; the estimate's standard error is
    at most about 0.5/√(density·entries) plus the rows' and columns' share, ~1/√2048 of their spread.
    """
    m = factors[0].B.shape[0]
    n = factors[0].A.reshape(factors[0].A.shape[0], -1).shape[1]
    blocks = max(1, entries // 64)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(m, (blocks * 8,), generator=generator)
    cols = torch.randint(n, (blocks * 8,), generator=generator)
    values = []
    for f in factors:  # index first, then convert: only the sampled rows and columns are read
        left = f.B[rows].float().view(blocks, 8, -1)  # blocks × 8 × r
        right = f.A.reshape(f.A.shape[0], -1)[:, cols].float().mT.reshape(blocks, 8, -1).mT  # blocks × r × 8
        values.append(f.scale * torch.bmm(left, right).reshape(-1))
    values = torch.stack(values)
    total = values.shape[1]
    keep = int(density * total)
    if keep <= 0:
        return 0.0
    size = values.abs()
    threshold = size.kthvalue(total - keep + 1, dim=1, keepdim=True).values
    kept = torch.where(size >= threshold, values.sign(), torch.zeros_like(values))  # zeros count in no union
    union = int((kept != 0).any(0).sum())
    conflict = int(((kept > 0).any(0) & (kept < 0).any(0)).sum())
    return conflict / max(1, union)


def _interference(
    sources: Sequence[LoraAdapter], density: float, sign_sample: int | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Per module held by at least two sources with one layout: pairwise cosine and subspace overlap (the quantities
    of [`lora_fusion.diagnostics.interference_report`], each source's factors read and decomposed once)
    and the sign-conflict rate; and the modules that cannot be compared, with the reason (the same words)."""
    names = sorted({m for a in sources for m in a.modules})
    results = _each(names, lambda module: _compare(sources, module, density, sign_sample))
    modules = {name: found for name, found in zip(names, results) if isinstance(found, dict)}
    unmatched = {name: found for name, found in zip(names, results) if isinstance(found, str)}
    return modules, unmatched


def _compare(
    sources: Sequence[LoraAdapter], module: str, density: float, sign_sample: int | None
) -> dict[str, Any] | str:
    """One module's interference record, or why it cannot be compared."""
    holders = [(i, a.modules[module]) for i, a in enumerate(sources) if module in a.modules]
    if len(holders) < 2:
        return f"only in [{holders[0][0]}]"
    if len({(s.kind, s.shape) for _, s in holders}) > 1:
        listed = ", ".join(f"[{i}] {s.kind} {'×'.join(map(str, s.shape))}" for i, s in holders)
        return f"shapes differ: {listed}"
    present = [(i, sources[i].factors(module)) for i, _ in holders]
    # B = QR once per source: the overlap needs QᵢᵀQⱼ, and then BᵢᵀBⱼ = Rᵢᵀ(QᵢᵀQⱼ)Rⱼ costs r×r products only. The
    # m×r and r×n work runs in float32 (half the time of float64 on a 7B-shaped merge), the r×r products in float64;
    # the results match diagnostics' float64 ones to ~1e-6.
    prepared = {}
    for i, f in present:
        q, r = torch.linalg.qr(f.B.float())
        prepared[i] = (f.scale, q, r.double(), f.A.float().reshape(f.A.shape[0], -1))

    def inner(x: int, y: int, cross: torch.Tensor) -> float:
        """⟨ΔWₓ, ΔWᵧ⟩ = sₓsᵧ Σ (BₓᵀBᵧ) ⊙ (AₓAᵧᵀ), with `cross` = QₓᵀQᵧ."""
        sx, _, rx, ax = prepared[x]
        sy, _, ry, ay = prepared[y]
        return sx * sy * float(((rx.mT @ cross @ ry) * (ax @ ay.mT).double()).sum())

    own = {}
    for i, _ in present:
        r = prepared[i][2]
        own[i] = inner(i, i, torch.eye(r.shape[0], dtype=r.dtype))
    pairs = {}
    for (i, _), (j, _) in combinations(present, 2):
        qi, qj = prepared[i][1], prepared[j][1]
        cross = (qi.mT @ qj).double()
        norms = (own[i] * own[j]) ** 0.5
        pairs[f"{i}-{j}"] = {
            "cosine": inner(i, j, cross) / norms if norms > 0 else 0.0,
            "subspace_overlap": float(cross.pow(2).sum()) / min(qi.shape[1], qj.shape[1]),
        }
    m, n = holders[0][1].shape
    factors = [f for _, f in present]
    if sign_sample is None or m * n <= EXACT_SIGN_ENTRIES:
        conflict, sampled = sign_conflicts(factors, density), None
    else:
        conflict = sampled_sign_conflict(factors, density, sign_sample, zlib.crc32(module.encode()))
        sampled = sign_sample
    return {"layer": layer_of(module)[0], "pairs": pairs, "sign_conflict": conflict, "sign_conflict_sampled": sampled}


T = TypeVar("T")


def _each(items: Sequence[str], work: Callable[[str], T]) -> list[T]:
    """`work` on every item, in order: like the engine, on up to two threads of one torch thread each (many small
    QRs and products: more torch threads only spin when the cores are shared)."""
    workers = min(2, os.cpu_count() or 1)
    with thread_limit(1):
        if workers == 1 or len(items) < 2:
            return [work(item) for item in items]
        with torch_thread_pool(workers) as pool:
            return list(pool.map(work, items))


def _layers(modules: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per layer (in natural order of the names; [`NO_LAYER`] last): the mean of each pair's cosine and subspace
    overlap over its compared modules holding that pair, and the mean sign-conflict rate."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for module in modules.values():
        groups.setdefault(module["layer"], []).append(module)

    rows = []
    for name in sorted(groups, key=_natural):
        members = groups[name]
        keys = sorted({k for m in members for k in m["pairs"]}, key=_pair_order)
        rows.append({
            "layer": name,
            "index": layer_of(name + ".")[1] if name != NO_LAYER else None,
            "modules": len(members),
            "pairs": {
                key: {
                    stat: fmean(m["pairs"][key][stat] for m in members if key in m["pairs"])
                    for stat in ("cosine", "subspace_overlap")
                }
                for key in keys
            },
            "sign_conflict": fmean(m["sign_conflict"] for m in members),
        })
    return rows


def _natural(name: str) -> tuple[bool, list[tuple[int, str]]]:
    """Names in natural order (`layers.2` before `layers.10`), [`NO_LAYER`] last."""
    return name == NO_LAYER, [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", name)]


def _pair_order(key: str) -> tuple[int, ...]:
    return tuple(int(part) for part in key.split("-"))


def _output_stats(merged: LoraAdapter, record: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """rank, retained energy and relative error per module: the merge's `.stats`, else the provenance's "modules"
    record (a written output), else the module's rank with energy 1 and error 0 (nothing truncated)."""
    stats: Mapping[str, ModuleStats] = merged.stats
    recorded = (record or {}).get("modules") or {}
    rows = {}
    for name, spec in merged.modules.items():
        if name in stats:
            s = stats[name]
            rows[name] = {"rank": int(s.rank), "retained_energy": float(s.retained_energy),
                          "relative_error": float(s.relative_error)}
        elif isinstance(recorded.get(name), dict):
            r = recorded[name]
            rows[name] = {
                "rank": int(r.get("rank", spec.rank)),
                "retained_energy": float(r.get("retained_energy", 1.0)),
                "relative_error": float(r.get("relative_error", 0.0)),
            }
        else:
            rows[name] = {"rank": int(spec.rank), "retained_energy": 1.0, "relative_error": 0.0}
    return rows


def build_report(
    sources: Sequence[LoraAdapter],
    merged: LoraAdapter | None = None,
    *,
    density: float = 0.2,
    spectra: int = 6,
    sign_sample: int | None = SIGN_SAMPLE,
) -> dict[str, Any]:
    """Every number a merge report draws, as a JSON-serialisable dict.

    Per module of `merged`: output rank, retained energy, relative error (its `.stats`; for a written output, the
    provenance record in its metadata) and the effective weights (the provenance's `module_weights[module]` when
    recorded, else each source's weight). Per layer (see [`layer_of`]): the mean pairwise cosine and subspace overlap
    of the sources' updates and the mean top-`density` sign-conflict rate over the layer's comparable modules; modules
    held by one source only or with differing shapes are listed under "unmatched" with the reason. Spectra: the
    singular values of each source's ΔW (unweighted) and of the output's ΔW for the `spectra` largest modules by
    ‖ΔW‖_F of the output (of the first source without an output), all from the factors.

    Args:
        sources: the adapters that were merged (two or more for the interference part; may be empty with `merged`).
        merged (*optional*): the merge's output, in memory (from [`merge`]) or loaded from a folder lora-fusion wrote.
        density (`float`, *optional*, defaults to 0.2): the top-k fraction of each update kept before counting sign
            conflicts (TIES' trim).
        spectra (`int`, *optional*, defaults to 6): how many of the largest modules get their spectra drawn.
        sign_sample (`int`, *optional*, defaults to 16384): random entries per module for the sign-conflict estimate
            of modules larger than [`EXACT_SIGN_ENTRIES`] (1,048,576 entries); None counts every module exactly
            (a dense pass over each update: minutes for a 7B-shaped merge).

    Returns:
        A dict with "sources", "output", "density", "layer_rule", "modules" (per output module), "interference"
        ("pairs", "layers", "modules", "unmatched", "overall"), "spectra", "notes" and "html_digits".

    Raises:
        InvalidParameterError: `density` outside (0, 1], `spectra` negative, `sign_sample` below 1, or neither two
            sources nor a merged output given.

    Example:
        ```python
        >>> merged = merge([a, b], method="svd", rank=8)
        >>> write_report(build_report([a, b], merged), Path("report/"))
        ```
    """
    from . import __version__
    from .errors import InvalidParameterError

    if not 0.0 < density <= 1.0:
        raise InvalidParameterError("density", density, expected="a fraction in (0, 1], e.g. 0.2")
    if spectra < 0:
        raise InvalidParameterError("spectra", spectra, expected="a count of modules, 0 or more")
    if sign_sample is not None and sign_sample < 1:
        raise InvalidParameterError("sign_sample", sign_sample, expected="a number of entries, e.g. 16384, or None")
    if merged is None and len(sources) < 2:
        raise InvalidParameterError(
            "sources", len(sources), expected="two or more adapters to compare, or a merged output"
        )
    record = read_provenance(merged) if merged is not None else None
    notes: list[str] = []

    modules: dict[str, Any] = {}
    output: dict[str, Any] | None = None
    if merged is not None:
        recorded_sources = [
            {"source": s.get("source"), "weight": s.get("weight")} for s in (record or {}).get("sources", [])
        ]
        default_weights = [s["weight"] for s in recorded_sources] if recorded_sources else None
        module_weights = (record or {}).get("module_weights") or {}
        for name, row in _output_stats(merged, record).items():
            weights = module_weights.get(name, default_weights)
            modules[name] = {"layer": layer_of(name)[0], **row,
                             "weights": None if weights is None else [float(w) for w in weights]}
        output = {
            "name": _name(merged, "merged adapter"),
            "method": (record or {}).get("method"),
            "params": (record or {}).get("params", {}),
            "recorded_sources": recorded_sources,
            "modules": len(merged.modules),
        }
        if recorded_sources and sources and len(recorded_sources) != len(sources):
            notes.append(f"the output records {len(recorded_sources)} sources; {len(sources)} were given")

    interference: dict[str, Any] = {"pairs": [], "layers": [], "modules": {}, "unmatched": {}, "overall": None}
    if len(sources) >= 2:
        compared, unmatched = _interference(sources, density, sign_sample)
        layers = _layers(compared)
        pair_keys = sorted({k for m in compared.values() for k in m["pairs"]}, key=_pair_order)
        sampled = [name for name, m in compared.items() if m["sign_conflict_sampled"]]
        interference = {
            "pairs": pair_keys,
            "layers": layers,
            "modules": compared,
            "unmatched": unmatched,
            "overall": overall_interference(compared),
            "sign_conflict_counting": {
                "exact_up_to_entries": EXACT_SIGN_ENTRIES if sign_sample is not None else None,
                "sample_entries": sign_sample,
                "sampled_modules": len(sampled),
                "exact_modules": len(compared) - len(sampled),
            },
        }
        if sampled:
            notes.append(
                f"sign conflicts of {len(sampled)} of {len(compared)} modules (those over {EXACT_SIGN_ENTRIES:,} "
                f"entries) are estimates from {sign_sample:,} random entries each (in 8×8 blocks of random rows and "
                f"columns; standard error about {0.5 / max(1.0, (density * sign_sample)) ** 0.5:.1g}); the others are "
                "exact"
            )
        if unmatched:
            notes.append(f"{len(unmatched)} modules could not be compared (listed under 'Not compared')")
    else:
        notes.append("interference needs two or more sources")

    # Spectra of the largest modules: by the output's ‖ΔW‖_F, or the first source's without an output.
    reference = merged if merged is not None else sources[0]
    norms = dict(zip(reference.modules, _each(list(reference.modules), lambda n: _frobenius(reference.factors(n)))))
    largest = sorted(norms, key=lambda name: (-norms[name], name))[:spectra]

    def spectra_of(name: str) -> dict[str, Any]:
        layout = reference.modules[name].layout()
        return {
            "module": name,
            "layer": layer_of(name)[0],
            "norm": norms[name],
            "output": _spectrum(merged.factors(name)) if merged is not None else None,
            "sources": [
                _spectrum(s.factors(name)) if name in s.modules and s.modules[name].layout() == layout else None
                for s in sources
            ],
        }

    drawn = _each(largest, spectra_of)

    return {
        "report_version": 1,
        "lora_fusion_version": __version__,
        "sources": [{"index": i, "name": _name(s, f"adapter {i}"), "modules": len(s.modules)}
                    for i, s in enumerate(sources)],
        "output": output,
        "density": density,
        "layer_rule": f"first match of {LAYER_PATTERN.pattern} in the module name; the name up to the index",
        "html_digits": HTML_DIGITS,
        "modules": modules,
        "interference": interference,
        "spectra": drawn,
        "spectra_of": "output" if merged is not None else "source 0",
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------------------- writing


def check_report_folder(out: str | Path, *, overwrite: bool, protected: Sequence[str | Path] = ()) -> None:
    """Refuse a report folder whose replacement could lose data, before any work is done.

    Nothing to check when `out` does not exist. An existing `out` is refused without `overwrite`; with it, it is
    replaced only if it is a real folder (not a link or a file) holding nothing but the files a report writes
    ([`REPORT_FILES`]), and is none of the folders the adapter writer protects (the current directory, the home
    folder, a path of `protected` — the report's sources —, a folder containing one or inside one).

    Raises:
        OutputExistsError: `out` exists and `overwrite` is False.
        OutputProtectedError: replacing `out` could delete something a report did not write; the message says what.
    """
    target = Path(out).expanduser().absolute()
    if not existing_output(target, overwrite=overwrite, kind="folder"):
        return
    if not target.is_dir():
        raise OutputProtectedError(target, "it is a file, not a report folder", [], "Choose another --out.")
    reason = special_folder(target.resolve(), protected)
    if reason:
        raise OutputProtectedError(target, reason, [], "Choose another --out.")
    entries = sorted(target.iterdir(), key=lambda p: p.name)
    others = [
        f"{e.name}/" if e.is_dir() and not e.is_symlink() else e.name
        for e in entries
        if e.name not in REPORT_FILES or e.is_symlink() or not e.is_file()
    ]
    if others:
        raise OutputProtectedError(
            target, "it holds files a lora-fusion report does not write", others,
            "Choose another --out, or move those files out of it first.",
        )


def write_report(report: Mapping[str, Any], out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a report ([`build_report`]) to the folder `out`: `report.json`, the PNG figures and `index.html`.

    The page is self-contained: the figures are embedded as base64 `data:` URIs, the CSS is inline, and there is no
    script and no link to any other file or address. Its tables give every number with [`HTML_DIGITS`] significant
    digits (`f"{x:.6g}"`); `report.json` holds them at full precision. The folder is staged beside `out` and renamed
    into place: an interrupted write leaves `out` as it was.

    Args:
        report: what [`build_report`] returned.
        out: the folder to create, or to replace with `overwrite`.
        overwrite (`bool`, *optional*, defaults to False): replace an existing `out` holding only report files.

    Returns:
        `out`, absolute.

    Raises:
        OutputExistsError, OutputProtectedError: see [`check_report_folder`].
        OutputWriteError: the disk refused the write; nothing was written.
    """
    out = Path(out).expanduser().absolute()
    check_report_folder(out, overwrite=overwrite)
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    figures = draw_figures(report)
    page = render_html(report, figures)
    with staged(out) as stage:
        (stage / REPORT_JSON).write_text(text, encoding="utf-8")
        for name, data in figures.items():
            (stage / name).write_bytes(data)
        (stage / INDEX_HTML).write_text(page, encoding="utf-8")
        check_report_folder(out, overwrite=overwrite)  # again: something may have appeared there meanwhile
        swap_into_place(stage, out, overwrite=True)  # checked just above
    return out


# ----------------------------------------------------------------------------------------------------------- figures


def draw_figures(report: Mapping[str, Any]) -> dict[str, bytes]:
    """The report's PNG figures, file name → bytes (matplotlib's Agg canvas; pyplot and the global backend are left
    alone). Each file exists even when it has nothing to show (it then says so), so a report folder always holds the
    same files."""
    return {
        "retained_energy.png": _draw_modules(report),
        "interference.png": _draw_interference(report),
        "spectra.png": _draw_spectra(report),
    }


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A fixed layout: matplotlib's constrained layout draws each figure several times (seconds for the spectra).
    figure = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _empty(figure: Any, message: str) -> bytes:
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.text(0.5, 0.5, message, ha="center", va="center")
    return _png(figure)


def _draw_modules(report: Mapping[str, Any]) -> bytes:
    modules = report["modules"]
    figure = _figure(10, 5)
    if not modules:
        return _empty(figure, "no merged output given: no per-module stats")
    rows = list(modules.values())
    x = range(len(rows))
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(x, [r["retained_energy"] for r in rows], marker=".", linewidth=0.8, label="retained energy")
    top.plot(x, [r["relative_error"] for r in rows], marker=".", linewidth=0.8, label="relative error")
    top.set_ylim(-0.02, 1.02)
    top.set_title("per module: retained energy E(R) and relative error √(1−E(R))")
    top.legend(loc="center right")
    figure.subplots_adjust(left=0.08, right=0.98, top=0.93, bottom=0.1, hspace=0.08)
    bottom.step(x, [r["rank"] for r in rows], where="mid", color="tab:green")
    bottom.set_ylabel("output rank")
    bottom.set_xlabel(f"module (table order, {len(rows)} modules)")
    return _png(figure)


def _draw_interference(report: Mapping[str, Any]) -> bytes:
    part = report["interference"]
    layers = part["layers"]
    figure = _figure(10, 7)
    if not layers:
        return _empty(figure, "no comparable modules: interference needs two sources sharing modules")
    x = list(range(len(layers)))
    labels = [str(row["index"]) if row["index"] is not None else "–" for row in layers]
    cosine, overlap, signs = figure.subplots(3, 1, sharex=True)
    for key in part["pairs"]:
        present = [(i, row["pairs"][key]) for i, row in zip(x, layers) if key in row["pairs"]]
        cosine.plot([i for i, _ in present], [p["cosine"] for _, p in present], marker=".", label=key)
        overlap.plot([i for i, _ in present], [p["subspace_overlap"] for _, p in present], marker=".", label=key)
    signs.plot(x, [row["sign_conflict"] for row in layers], marker=".", color="tab:red")
    cosine.set_ylabel("cosine")
    overlap.set_ylabel("subspace overlap")
    signs.set_ylabel(f"sign conflicts\n(top {report['density']:g})")
    cosine.set_title("per layer: mean over the layer's compared modules, per source pair")
    if len(part["pairs"]) <= 10:
        cosine.legend(loc="upper right", fontsize="small", title="pair")
    figure.subplots_adjust(left=0.1, right=0.98, top=0.95, bottom=0.07, hspace=0.08)
    step = max(1, len(x) // 32)
    signs.set_xticks(x[::step], labels[::step])
    signs.set_xlabel("layer index")
    return _png(figure)


def _draw_spectra(report: Mapping[str, Any]) -> bytes:
    drawn = report["spectra"]
    if not drawn:
        return _empty(_figure(8, 2), "no modules")
    columns = min(3, len(drawn))
    rows = -(-len(drawn) // columns)
    figure = _figure(4 * columns, 3 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    names = [s["name"] for s in report["sources"]]
    figure.subplots_adjust(left=0.1, right=0.98, top=0.93, bottom=0.08, hspace=0.45, wspace=0.35)
    for number_of, (ax, item) in enumerate(zip(axes, drawn)):
        lines = [(f"[{i}] {names[i]}", values, 1.0) for i, values in enumerate(item["sources"]) if values]
        if item["output"] is not None:
            lines.append(("output", item["output"], 2.0))
        positive = False
        for label, values, width in lines:
            shown = [(j + 1, v) for j, v in enumerate(values) if v > 0]
            positive |= bool(shown)
            ax.plot([j for j, _ in shown], [v for _, v in shown], linewidth=width, marker=".", label=label)
        if positive:
            from matplotlib.ticker import LogLocator, NullLocator

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost most of the drawing time
        title = item["module"] if len(item["module"]) <= 48 else "…" + item["module"][-47:]
        ax.set_title(title, fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if number_of == 0:  # the same sources everywhere: one legend
            ax.legend(fontsize="x-small", loc="upper right")
        if number_of % columns == 0:
            ax.set_ylabel("σⱼ")
    for ax in axes[len(drawn):]:
        ax.set_axis_off()
    return _png(figure)


# -------------------------------------------------------------------------------------------------------------- page

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f0f0f0; }
td.name { text-align: left; font-family: monospace; }
img { max-width: 100%; border: 1px solid #eee; }
p.note { color: #555; }
"""


def number(value: float | int | None) -> str:
    """How the page writes a number: integers as they are, floats with [`HTML_DIGITS`] significant digits, None as
    an empty cell."""
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{HTML_DIGITS}g}"


def _cells(values: Sequence[Any], header: bool = False) -> str:
    tag = "th" if header else "td"
    out = []
    for value in values:
        if isinstance(value, str):
            css = "" if header else ' class="name"'
            out.append(f"<{tag}{css}>{html.escape(value)}</{tag}>")
        else:
            out.append(f"<{tag}>{number(value)}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    body = "\n".join(_cells(row) for row in rows)
    return f'<table id="{table_id}">\n<thead>{_cells(header, header=True)}</thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def render_html(report: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """The self-contained page: tables of the sources, per-module stats, per-layer interference, spectra and the
    modules not compared, and the figures embedded as `data:image/png;base64` URIs. Every name is HTML-escaped."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>lora-fusion merge report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>lora-fusion merge report</h1>"]
    output = report["output"]
    summary = f"lora-fusion {esc(str(report['lora_fusion_version']))}"
    if output is not None:
        summary += f" · output {esc(str(output['name']))} · method {esc(str(output['method']))}"
    parts.append(f"<p>{summary} · numbers with {report['html_digits']} significant digits (report.json: full "
                 f"precision) · sign conflicts among each update's top {number(report['density'])} entries</p>")
    for note in report["notes"]:
        parts.append(f'<p class="note">Note: {esc(note)}</p>')

    parts.append("<h2>Sources</h2>")
    parts.append(_table("sources", ["index", "source", "modules"],
                        [[s["index"], s["name"], s["modules"]] for s in report["sources"]]))
    if output is not None and output["recorded_sources"]:
        parts.append("<p>Sources as the output records them (the effective weights below are in this order):</p>")
        parts.append(_table("recorded-sources", ["position", "source", "weight"],
                            [[i, str(s["source"]), s["weight"]] for i, s in enumerate(output["recorded_sources"])]))
        parts.append(_table("params", ["parameter", "value"],
                            [[str(k), json.dumps(v)] for k, v in (output["params"] or {}).items()]))

    parts.append("<h2>Per module</h2>")
    if report["modules"]:
        parts.append(f'<img alt="retained energy per module" src="{_data_uri(figures["retained_energy.png"])}">')
        parts.append(_table(
            "modules", ["module", "layer", "rank", "retained energy", "relative error", "effective weights"],
            [[name, m["layer"], m["rank"], m["retained_energy"], m["relative_error"],
              ", ".join(number(w) for w in m["weights"]) if m["weights"] is not None else ""]
             for name, m in report["modules"].items()],
        ))
    else:
        parts.append("<p>No merged output was given.</p>")

    part = report["interference"]
    parts.append("<h2>Per layer: interference between the sources</h2>")
    if part["layers"]:
        parts.append(f'<img alt="interference per layer" src="{_data_uri(figures["interference.png"])}">')
        keys = part["pairs"]
        header = ["layer", "modules", *[f"cosine {k}" for k in keys], *[f"overlap {k}" for k in keys],
                  "sign conflict"]
        rows = []
        for row in part["layers"]:
            pairs = row["pairs"]
            rows.append([row["layer"], row["modules"],
                         *[pairs[k]["cosine"] if k in pairs else None for k in keys],
                         *[pairs[k]["subspace_overlap"] if k in pairs else None for k in keys],
                         row["sign_conflict"]])
        parts.append(_table("layers", header, rows))
    else:
        parts.append("<p>No comparable modules.</p>")
    if part["unmatched"]:
        parts.append("<h3>Not compared</h3>")
        parts.append(_table("unmatched", ["module", "reason"], [[k, v] for k, v in part["unmatched"].items()]))

    parts.append("<h2>Singular-value spectra of the largest modules</h2>")
    if report["spectra"]:
        parts.append(f'<img alt="spectra" src="{_data_uri(figures["spectra.png"])}">')
        rows = []
        for item in report["spectra"]:
            for label, values in [*((f"[{i}]", v) for i, v in enumerate(item["sources"])), ("output", item["output"])]:
                if values is not None:
                    rows.append([item["module"], label, ", ".join(number(v) for v in values)])
        parts.append(_table("spectra", ["module", "update", "singular values"], rows))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
