"""Issue 14's speed targets for the diffusion formats, side by side in one process, reported as ratios.

1. `lora_fusion.convert` of an SDXL-shaped kohya file (fp16, SGM block names `lora_unet_input_blocks_4_1_…`,
   `lora_te1_…`/`lora_te2_…`, `.alpha` present; rank 32, about 225 MB) `--to diffusers`, `--to peft` and
   `--to kohya`, against the I/O floor: `safetensors.torch.load_file` of the same file (read every byte) followed
   by `save_file` of the same tensors (write as many bytes), then their release (a convert releases its map of the
   source before it returns). Target: within 1.2x the floor. Timed in-process after a warm-up, interleaved with
   the floor; the cold first call (diffusers' one-time import) is timed in fresh subprocesses and reported as its
   own figure. Where the time goes is measured with timers wrapped around the library's own functions
   (instrumentation in this process only; no library code is changed).
2. `lora_fusion.merge([a, b], method="svd", weights=[0.6, 0.4], rank=32)` of two SDXL-shaped kohya LoRAs (rank 32 and
   rank 64, UNet attention + feed-forward modules, both text encoders) against kohya sd-scripts'
   `networks/svd_merge_lora.py` algorithm, re-written here from the published script (sd-scripts is not on PyPI;
   it was not run): factors cast to float32 on load, per module the dense ΔW = Σ ratioᵢ·(alphaᵢ/rᵢ)·upᵢ·downᵢ,
   `torch.linalg.svd(ΔW)` (its default full_matrices=True), U[:, :32]·diag(S[:32]) as up and Vh[:32] as down, then
   both clamped to ±q where q = torch.quantile(cat(up, down), CLAMP_QUANTILE = 0.99) (the signed values' 0.99
   quantile, as the script does). Target: >= 50x faster at <= its error. kohya's dense SVDs of all 964 modules take
   tens of minutes on 2 cores, so both sides are timed on a fixed subset (every k-th module, `--every`), files holding
   only those modules; lora-fusion's full merge is timed too. Errors (both sides, same subset; lora-fusion also on
   all modules) are relative Frobenius errors against the exact sum and against the Eckart–Young rank-32
   truncation, computed in float64 from the factors (no dense matrix).

Every file lives in a temporary folder outside the repository and is deleted at the end.

Usage: python benchmarks/bench_formats.py [--runs 5] [--every 31] [--kohya-runs 2] [--threads N]
                                          [--wait-load 1.3 --wait-max 0]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import CpuShare, emit, log, machine, rounded, wait_for_idle

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLAMP_QUANTILE = 0.99  # kohya sd-scripts networks/svd_merge_lora.py
CROSS_DIM = 2048  # SDXL's text-embedding width (attn2 to_k/to_v input)
CONVERT_RANK, CONVERT_ALPHA = 32, 16.0
MERGE_RANKS = ((32, 16.0), (64, 32.0))  # (rank, alpha) of the two merged LoRAs; the first is the convert file
MERGE_WEIGHTS = (0.6, 0.4)
NEW_RANK = 32
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# The SDXL module table: canonical (diffusers) name, kohya name, (out, in)
# ---------------------------------------------------------------------------------------------------------------

def _transformer_block(dim: int) -> list[tuple[str, tuple[int, int]]]:
    return [
        ("attn1.to_q", (dim, dim)), ("attn1.to_k", (dim, dim)), ("attn1.to_v", (dim, dim)),
        ("attn1.to_out.0", (dim, dim)),
        ("attn2.to_q", (dim, dim)), ("attn2.to_k", (dim, CROSS_DIM)), ("attn2.to_v", (dim, CROSS_DIM)),
        ("attn2.to_out.0", (dim, dim)),
        ("ff.net.0.proj", (8 * dim, dim)),  # GEGLU: out 2·4·dim
        ("ff.net.2", (dim, 4 * dim)),
    ]


def sdxl_modules() -> list[tuple[str, str, tuple[int, int]]]:
    """Every module of an SDXL LoRA on the UNet's transformer blocks and both text encoders.

    SGM numbering with layers_per_block 2: down_blocks.b.attentions.l is input_blocks_(1 + 3b + l)_1; up_blocks.b
    (3 layers each) attentions.l is output_blocks_(3b + l)_1; the mid block is middle_block_1. SDXL's down_blocks.0
    and up_blocks.2 have no attentions, so the input blocks 4, 5, 7, 8 and the output blocks 0–5 carry them.
    """
    attentions: list[tuple[str, str, int, int]] = []  # canonical prefix, SGM prefix, dim, transformer depth
    for block, dim, depth in ((1, 640, 2), (2, 1280, 10)):
        for layer in (0, 1):
            attentions.append((f"unet.down_blocks.{block}.attentions.{layer}",
                               f"input_blocks_{1 + 3 * block + layer}_1", dim, depth))
    attentions.append(("unet.mid_block.attentions.0", "middle_block_1", 1280, 10))
    for block, dim, depth in ((0, 1280, 10), (1, 640, 2)):
        for layer in (0, 1, 2):
            attentions.append((f"unet.up_blocks.{block}.attentions.{layer}", f"output_blocks_{3 * block + layer}_1",
                               dim, depth))
    modules = []
    for canonical, sgm, dim, depth in attentions:
        for t in range(depth):
            for part, shape in _transformer_block(dim):
                modules.append((f"{canonical}.transformer_blocks.{t}.{part}",
                                f"lora_unet_{sgm}_transformer_blocks_{t}_{part.replace('.', '_')}", shape))
    for component, prefix, layers, width, mlp in (("text_encoder", "lora_te1_", 12, 768, 3072),
                                                  ("text_encoder_2", "lora_te2_", 32, 1280, 5120)):
        for i in range(layers):
            for part, shape in (("self_attn.q_proj", (width, width)), ("self_attn.k_proj", (width, width)),
                                ("self_attn.v_proj", (width, width)), ("self_attn.out_proj", (width, width)),
                                ("mlp.fc1", (mlp, width)), ("mlp.fc2", (width, mlp))):
                path = f"text_model.encoder.layers.{i}.{part}"
                modules.append((f"{component}.{path}", prefix + path.replace(".", "_"), shape))
    return sorted(modules)


def synthesise(path: Path, modules: list[tuple[str, str, tuple[int, int]]], rank: int, alpha: float,
               seed: int) -> None:
    """A kohya SDXL LoRA file, fp16: down ~ N(0, 1/in), up ~ N(0, 0.01²) with column j scaled by 1/√(j+1) (a
    decaying spectrum, as trained LoRAs have, rather than a flat one), `.alpha` = `alpha` (float32 scalar)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    decay = (torch.arange(rank, dtype=torch.float32) + 1) ** -0.5
    tensors: dict[str, torch.Tensor] = {}
    for _, kohya, (out_f, in_f) in modules:
        down = torch.randn(rank, in_f, generator=generator) * in_f ** -0.5
        up = torch.randn(out_f, rank, generator=generator) * 0.01 * decay
        tensors[f"{kohya}.lora_down.weight"] = down.to(torch.float16)
        tensors[f"{kohya}.lora_up.weight"] = up.to(torch.float16)
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})


def subset_file(source: Path, target: Path, kohya_names: set[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as file:
        tensors = {k: file.get_tensor(k) for k in file.keys() if k.rsplit(".", 2)[0] in kohya_names
                   or k.rsplit(".", 1)[0] in kohya_names}
    save_file(tensors, str(target))


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------------------

def summary(seconds: list[float]) -> dict[str, Any]:
    return {"best_s": rounded(min(seconds)), "median_s": rounded(statistics.median(seconds)), "runs": len(seconds),
            "all_s": [rounded(s) for s in seconds]}


def timed_s(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class Timers:
    """Accumulating wall-clock timers wrapped around named functions (module, attribute) while the block runs;
    the originals are put back at exit. Nested functions count in both their own and their callers' totals."""

    def __init__(self, targets: dict[str, list[tuple[Any, str]]]) -> None:
        self.targets, self.totals, self.calls = targets, {}, {}
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Timers:
        for label, places in self.targets.items():
            self.totals[label], self.calls[label] = 0.0, 0
            for module, attr in places:
                original = getattr(module, attr)
                self._saved.append((module, attr, original))
                setattr(module, attr, self._wrap(label, original))
        return self

    def _wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[label] += time.perf_counter() - start
                self.calls[label] += 1
        return wrapper

    def __exit__(self, *exc: object) -> None:
        for module, attr, original in reversed(self._saved):
            setattr(module, attr, original)


def convert_timers() -> dict[str, list[tuple[Any, str]]]:
    import lora_fusion.adapter as adapter
    import lora_fusion.api as api
    import lora_fusion.formats.diffusers as fdiff
    import lora_fusion.formats.kohya as fkohya
    import lora_fusion.formats.peft as fpeft
    import lora_fusion.formats.single_file as fsingle
    import lora_fusion.formats.stores as fstores
    import lora_fusion.spec as spec
    import lora_fusion.writer as writer

    return {
        "open_source (sources.load_adapter: headers, alphas, key mapping)": [(api, "load_adapter")],
        "  diffusers key map on the probe (keymaps.kohya_to_canonical)": [(fsingle, "kohya_to_canonical")],
        "  alpha reads and header shapes (single_file._lora_shapes)": [(fsingle, "_lora_shapes")],
        "write_format_files (writer._fill)": [(writer, "_fill")],
        "  factor read (+ scale fold for kohya) + finiteness (peft.output_factors)": [(fpeft, "output_factors"),
                                                                                  (fdiff, "output_factors"),
                                                                                  (fkohya, "output_factors")],
        "    factor read + finiteness (LoraAdapter.factors -> spec.read_factors)": [(adapter, "read_factors")],
        "  kohya names on a probe (keymaps.canonical_to_kohya_sd)": [(fkohya, "canonical_to_kohya_sd")],
        "  safetensors write, pending factors computed (stores.save_safetensors)": [(fpeft, "save_safetensors"),
                                                                       (fdiff, "save_safetensors"),
                                                                       (fkohya, "save_safetensors")],
        "    tensor bytes to the file (stores.write_tensor_bytes)": [(fstores, "write_tensor_bytes")],
        "  model card (writer.model_card)": [(writer, "model_card")],
        "  provenance record (writer._provenance_record; the source's sha256)": [(writer, "_provenance_record")],
        "read_back_check (writer._check_written: headers)": [(writer, "_check_written")],
        "output checks and rename (writer.check_output, swap_into_place)": [(writer, "check_output"),
                                                                            (writer, "swap_into_place")],
        "finiteness checks, all calls (spec.all_finite)": [(spec, "all_finite")],
    }


# ---------------------------------------------------------------------------------------------------------------
# Part 1: convert vs the I/O floor
# ---------------------------------------------------------------------------------------------------------------

COLD_SCRIPT = r"""
import json, sys, time
t = time.perf_counter()
import torch, safetensors
t0 = time.perf_counter()
import lora_fusion
t1 = time.perf_counter()
lora_fusion.convert(sys.argv[1], to=sys.argv[2], out=sys.argv[3])
t2 = time.perf_counter()
lora_fusion.convert(sys.argv[1], to=sys.argv[2], out=sys.argv[4])
t3 = time.perf_counter()
print(json.dumps({"import_torch_safetensors_s": t0 - t, "import_lora_fusion_s": t1 - t0,
                  "first_convert_s": t2 - t1, "second_convert_s": t3 - t2}))
"""

DIFFUSERS_IMPORT_SCRIPT = r"""
import json, time
import torch, safetensors, lora_fusion
from lora_fusion.formats import keymaps
t0 = time.perf_counter()
from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
print(json.dumps({"import_diffusers_keymaps_s": time.perf_counter() - t0}))
"""


def output_path(work: Path, target: str, tag: str) -> Path:
    return work / (f"out-{target}-{tag}.safetensors" if target == "kohya" else f"out-{target}-{tag}")


def output_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def bench_convert(source: Path, work: Path, runs: int, env: dict[str, str]) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    import lora_fusion
    from lora_fusion.formats import keymaps, stores

    targets = ("diffusers", "peft", "kohya")
    floor_out = work / "floor.safetensors"

    def floor() -> tuple[float, float, float]:
        # Python's cyclic collector is paused, as lora-fusion pauses it around a convert: a full collection in
        # this process (diffusers imported) costs about 0.3 s, which is no I/O.
        gc.disable()
        try:
            start = time.perf_counter()
            tensors = load_file(str(source))
            read = time.perf_counter() - start
            save_file(tensors, str(floor_out))
            written = time.perf_counter()
            # What was read is released inside the timed window, as a convert releases its map of the source
            # before it returns (about 0.004 s here, the convert's map about 0.01 s; runs before session 11 left the
            # floor's release out).
            del tensors
            return read, written - start - read, time.perf_counter() - written
        finally:
            gc.enable()

    def convert(target: str, out: Path) -> float:
        # Each timed convert starts from what a fresh `lora-fusion convert` knows: no key map or header kept from
        # the run before (lora-fusion keeps the last few, which the written file's read-back check reuses).
        keymaps._kohya_pieces.cache_clear()
        stores._parsed_header.cache_clear()
        start = time.perf_counter()
        lora_fusion.convert(source, to=target, out=out)
        return time.perf_counter() - start

    # Cold: fresh processes (the page cache is warm: the file was just written and read).
    log("cold first call: fresh subprocesses")
    cold: dict[str, Any] = {}
    for target in targets:
        outs = [output_path(work, target, "cold1"), output_path(work, target, "cold2")]
        run = subprocess.run([sys.executable, "-c", COLD_SCRIPT, str(source), target, *map(str, outs)],
                             capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        cold[target] = {k: rounded(v) for k, v in json.loads(run.stdout).items()}
        for out in outs:
            remove(out)
        log(f"  {target}: {cold[target]}")
    imports = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", DIFFUSERS_IMPORT_SCRIPT], capture_output=True, text=True,
                             env=env, cwd=ROOT, check=True)
        imports.append(json.loads(run.stdout)["import_diffusers_keymaps_s"])
    cold["import_diffusers_keymaps_s"] = summary(imports)

    log("warm-up (in process)")
    for target in targets:
        out = output_path(work, target, "warm")
        lora_fusion.convert(source, to=target, out=out)
        remove(out)
    floor()
    remove(floor_out)

    log(f"interleaved: floor, convert to diffusers, peft, kohya; {runs} runs")
    reads, writes, releases, floors = [], [], [], []
    converts: dict[str, list[float]] = {t: [] for t in targets}
    sizes: dict[str, int] = {}
    with CpuShare() as share:
        for run in range(runs):
            read, write, release = floor()
            reads.append(read), writes.append(write), releases.append(release)
            floors.append(read + write + release)
            sizes["floor"] = floor_out.stat().st_size
            remove(floor_out)
            for target in targets:
                out = output_path(work, target, "timed")
                converts[target].append(convert(target, out))
                sizes[target] = output_bytes(out)
                remove(out)
            log(f"  run {run + 1}: floor {floors[-1]:.3f} s (read {read:.3f}, write {write:.3f}, release "
                f"{release:.3f}); "
                + ", ".join(f"{t} {converts[t][-1]:.3f} s" for t in targets))

    log("breakdown: one more convert per target with timers around the library's functions")
    breakdown: dict[str, Any] = {}
    for target in targets:
        out = output_path(work, target, "profiled")
        with Timers(convert_timers()) as timers:
            total = convert(target, out)
        remove(out)
        breakdown[target] = {"total_s": rounded(total),
                             **{label: {"s": rounded(timers.totals[label]), "calls": timers.calls[label]}
                                for label in timers.totals if timers.calls[label]}}

    def ratios_to(floor_s: list[float]) -> dict[str, dict[str, float]]:
        return {t: {"best": rounded(min(converts[t]) / min(floor_s), 3),
                    "median": rounded(statistics.median(converts[t]) / statistics.median(floor_s), 3)}
                for t in targets}

    ratios = ratios_to(floors)
    return {
        "ratio_convert_over_floor": ratios,
        "target_within_1_2x": {t: ratios[t]["best"] <= 1.2 for t in targets},
        "ratio_convert_over_floor_without_release": ratios_to([r + w for r, w in zip(reads, writes)]),
        "convert_s": {t: summary(converts[t]) for t in targets},
        "floor_s": summary(floors),
        "floor_read_s": summary(reads),
        "floor_write_s": summary(writes),
        "floor_release_s": summary(releases),
        "cold": cold,
        "floor_note": "safetensors' load_file then save_file of the same file, then the tensors read released (as a "
                      "convert releases its map of the source before it returns), Python's cyclic collector paused "
                      "(as lora-fusion pauses it); each timed convert starts with lora-fusion's kept key maps and "
                      "headers cleared; ratio_convert_over_floor_without_release: against read + write only (the "
                      "floor of the runs before session 11)",
        "cold_note": "fresh processes (page cache warm): import torch and safetensors, import lora_fusion, then the "
                     "first convert (diffusers' key maps imported on first use, then the work), then a second "
                     "convert in the same process; import_diffusers_keymaps_s: that import alone, in a fresh process "
                     "that has already imported torch and lora_fusion",
        "bytes": {"input": source.stat().st_size, **{f"output_{k}": v for k, v in sizes.items()}},
        "breakdown_s": breakdown,
        "breakdown_note": "wall time inside each function, summed over its calls, during one extra warm convert per "
                          "target; indented labels are inside the one above (nested times count in both); "
                          "the wrappers add about a microsecond per call",
        "others_cpu_share": share.result(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Part 2: svd merge vs kohya's svd_merge_lora.py algorithm
# ---------------------------------------------------------------------------------------------------------------

def kohya_svd_merge(paths: list[Path], ratios: tuple[float, ...], new_rank: int) -> dict[str, Any]:
    """kohya sd-scripts networks/svd_merge_lora.py (merge_lora_models), linear modules, merge_dtype float32,
    re-written from the published script: returns {module: (up, down)}."""
    import torch
    from safetensors.torch import load_file

    merge_dtype = torch.float
    merged_sd: dict[str, torch.Tensor] = {}
    for model, ratio in zip(paths, ratios):
        lora_sd = {k: v.to(merge_dtype) for k, v in load_file(str(model)).items()}  # load_state_dict(model, dtype)
        for key in list(lora_sd.keys()):
            if "lora_down" not in key:
                continue
            lora_module_name = key[: key.rfind(".lora_down")]
            down_weight = lora_sd[key]
            network_dim = down_weight.size()[0]
            up_weight = lora_sd[lora_module_name + ".lora_up.weight"]
            alpha = lora_sd.get(lora_module_name + ".alpha", network_dim)
            in_dim, out_dim = down_weight.size()[1], up_weight.size()[0]
            if lora_module_name not in merged_sd:
                weight = torch.zeros((out_dim, in_dim), dtype=merge_dtype)
            else:
                weight = merged_sd[lora_module_name]
            scale = alpha / network_dim
            weight = weight + ratio * (up_weight @ down_weight) * scale
            merged_sd[lora_module_name] = weight
    merged: dict[str, Any] = {}
    with torch.no_grad():
        for lora_module_name, mat in list(merged_sd.items()):
            out_dim, in_dim = mat.size()[0:2]
            module_new_rank = min(new_rank, in_dim, out_dim)
            U, S, Vh = torch.linalg.svd(mat)
            U = U[:, :module_new_rank]
            S = S[:module_new_rank]
            U = U @ torch.diag(S)
            Vh = Vh[:module_new_rank, :]
            dist = torch.cat([U.flatten(), Vh.flatten()])
            hi_val = torch.quantile(dist, CLAMP_QUANTILE)
            low_val = -hi_val
            U = U.clamp(low_val, hi_val)
            Vh = Vh.clamp(low_val, hi_val)
            merged[lora_module_name] = (U.contiguous(), Vh.contiguous())
    return merged


def source_factors(paths: list[Path], kohya_names: list[str]) -> dict[str, tuple[Any, Any]]:
    """Per module, the exact merged update in factored form, float64: (Σ wᵢ·sᵢ·upᵢ concatenated, downs stacked)."""
    import torch
    from safetensors import safe_open

    files = [safe_open(str(p), framework="pt") for p in paths]
    out = {}
    for name in kohya_names:
        ups, downs = [], []
        for file, weight in zip(files, MERGE_WEIGHTS):
            down = file.get_tensor(f"{name}.lora_down.weight").double()
            up = file.get_tensor(f"{name}.lora_up.weight").double()
            alpha = float(file.get_tensor(f"{name}.alpha"))
            ups.append(up * (weight * alpha / down.shape[0]))
            downs.append(down)
        out[name] = (torch.cat(ups, dim=1), torch.cat(downs, dim=0))
    return out


def factored_errors(exact: tuple[Any, Any], got: tuple[Any, Any], rank: int) -> dict[str, float]:
    """Squared Frobenius norms, float64, from factors only: ‖ΔW‖², ‖ΔW − ΔŴ‖², the Eckart–Young tail (‖ΔW − ΔW_R‖²),
    ‖ΔŴ − ΔW_R‖² and ‖ΔW_R‖²."""
    import torch

    b, a = exact
    gb, ga = got[0].double(), got[1].double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float((s ** 2).sum())
    tail = float((s[rank:] ** 2).sum())
    # ΔW_R = (qb·u_R·diag(s_R))·(vh_R·qaᵀ)
    tb, ta = qb @ (u[:, :rank] * s[:rank]), vh[:rank] @ qa.T

    def sq_norm_of_difference(b1: Any, a1: Any, b2: Any, a2: Any) -> float:
        left, right = torch.cat([b1, -b2], dim=1), torch.cat([a1, a2], dim=0)
        return float(torch.trace((left.T @ left) @ (right @ right.T)).clamp_min(0))

    return {"total": total, "err": sq_norm_of_difference(b, a, gb, ga), "tail": tail,
            "vs_trunc": sq_norm_of_difference(tb, ta, gb, ga), "trunc": float((s[:rank] ** 2).sum())}


def aggregate(per_module: dict[str, dict[str, float]]) -> dict[str, Any]:
    import math

    total = sum(m["total"] for m in per_module.values())
    trunc = sum(m["trunc"] for m in per_module.values())
    rel = {n: math.sqrt(m["err"] / m["total"]) for n, m in per_module.items()}
    opt = {n: math.sqrt(m["tail"] / m["total"]) for n, m in per_module.items()}
    vs_trunc = {n: math.sqrt(m["vs_trunc"] / m["trunc"]) for n, m in per_module.items()}
    worst = max(rel, key=rel.__getitem__)
    worst_t = max(vs_trunc, key=vs_trunc.__getitem__)
    return {
        "modules": len(per_module),
        "rel_error_vs_exact_sum": rounded(math.sqrt(sum(m["err"] for m in per_module.values()) / total), 6),
        "optimal_rel_error": rounded(math.sqrt(sum(m["tail"] for m in per_module.values()) / total), 6),
        "rel_error_vs_rank32_truncation": rounded(
            math.sqrt(sum(m["vs_trunc"] for m in per_module.values()) / trunc), 6),
        "worst_module_rel_error_vs_exact_sum": {"module": worst, "error": rounded(rel[worst], 6),
                                                "optimal": rounded(opt[worst], 6)},
        "worst_module_rel_error_vs_rank32_truncation": {"module": worst_t, "error": rounded(vs_trunc[worst_t], 6)},
    }


def lora_fusion_factors(merged: Any, canonical_to_kohya: dict[str, str]) -> dict[str, tuple[Any, Any]]:
    out = {}
    for canonical, spec in merged.modules.items():
        factors = merged.factors(canonical)
        out[canonical_to_kohya[canonical]] = (factors.B.double() * factors.scale, factors.A.double())
    return out


def bench_merge(full: list[Path], subset: list[Path], subset_names: list[str], all_names: list[str],
                canonical_to_kohya: dict[str, str], runs: int, kohya_runs: int) -> dict[str, Any]:
    import lora_fusion

    def lf(paths: list[Path]) -> Any:
        return lora_fusion.merge([str(p) for p in paths], method="svd", weights=list(MERGE_WEIGHTS), rank=NEW_RANK,
                                 progress=False)

    log("warm-up: lora-fusion merge (subset and full), kohya reference on the subset")
    lf(subset)
    lf(full)
    start = time.perf_counter()
    kohya_result = kohya_svd_merge(subset, MERGE_WEIGHTS, NEW_RANK)
    kohya_first = time.perf_counter() - start
    log(f"  kohya reference, first (warm-up) run: {kohya_first:.1f} s for {len(subset_names)} modules")

    log(f"interleaved on the subset: kohya x{kohya_runs}, lora-fusion x{runs}; then lora-fusion on all modules")
    kohya_s, lf_s, lf_full_s = [], [], []
    with CpuShare() as share:
        for run in range(max(runs, kohya_runs)):
            if run < kohya_runs:
                start = time.perf_counter()
                kohya_result = kohya_svd_merge(subset, MERGE_WEIGHTS, NEW_RANK)
                kohya_s.append(time.perf_counter() - start)
            if run < runs:
                start = time.perf_counter()
                lf_subset = lf(subset)
                lf_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                lf_full = lf(full)
                lf_full_s.append(time.perf_counter() - start)
            log(f"  run {run + 1}: kohya {kohya_s[-1] if run < kohya_runs else float('nan'):.2f} s, lora-fusion "
                f"{lf_s[-1]:.3f} s (subset), {lf_full_s[-1]:.3f} s (all modules)")

    log(f"diagnostic: lora-fusion on the subset with one engine worker (one core, as the kohya reference), x{runs}")
    import lora_fusion.engine as engine

    workers, engine.CPU_WORKERS = engine.CPU_WORKERS, 1
    try:
        lf_1w = [timed_s(lambda: lf(subset)) for _ in range(runs)]
    finally:
        engine.CPU_WORKERS = workers

    log("errors (float64, factored)")
    exact_subset = source_factors(subset, subset_names)
    kohya_errors = {n: factored_errors(exact_subset[n], kohya_result[n], NEW_RANK) for n in subset_names}
    lf_subset_f = lora_fusion_factors(lf_subset, canonical_to_kohya)
    lf_errors = {n: factored_errors(exact_subset[n], lf_subset_f[n], NEW_RANK) for n in subset_names}
    exact_full = source_factors(full, all_names)
    lf_full_f = lora_fusion_factors(lf_full, canonical_to_kohya)
    lf_full_errors = {n: factored_errors(exact_full[n], lf_full_f[n], NEW_RANK) for n in all_names}
    kohya_agg, lf_agg = aggregate(kohya_errors), aggregate(lf_errors)
    speedup_best = min(kohya_s) / min(lf_s)
    speedup_median = statistics.median(kohya_s) / statistics.median(lf_s)
    at_most_error = lf_agg["rel_error_vs_exact_sum"] <= kohya_agg["rel_error_vs_exact_sum"]
    worst_ok = (lf_agg["worst_module_rel_error_vs_exact_sum"]["error"]
                <= kohya_agg["worst_module_rel_error_vs_exact_sum"]["error"])
    return {
        "speedup_on_subset": {"best": rounded(speedup_best, 4), "median": rounded(speedup_median, 4)},
        "target_50x_at_most_error": speedup_best >= 50 and at_most_error and worst_ok,
        "kohya_reference_subset_s": summary(kohya_s),
        "kohya_reference_first_run_s": rounded(kohya_first),
        "lora_fusion_subset_s": summary(lf_s),
        "lora_fusion_all_modules_s": summary(lf_full_s),
        "lora_fusion_subset_one_worker_s": summary(lf_1w),
        "speedup_on_subset_one_worker": {"best": rounded(min(kohya_s) / min(lf_1w), 4),
                                         "median": rounded(statistics.median(kohya_s) / statistics.median(lf_1w), 4)},
        "kohya_reference_all_modules_extrapolated_s": rounded(statistics.median(kohya_s) * len(all_names)
                                                              / len(subset_names)),
        "extrapolation_note": "kohya on all modules was NOT run: its subset median times modules/subset modules, a "
                              "linear extrapolation (the subset's mix of shapes is in merge_case.subset_kinds)",
        "errors_subset": {"kohya_reference": kohya_agg, "lora_fusion": lf_agg},
        "errors_all_modules": {"lora_fusion": aggregate(lf_full_errors)},
        "lora_fusion_output_dtype": str(next(iter(lf_full.modules.values())).dtype).removeprefix("torch."),
        "others_cpu_share": share.result(),
    }


# ---------------------------------------------------------------------------------------------------------------

def check_names(path: Path, modules: list[tuple[str, str, tuple[int, int]]]) -> dict[str, Any]:
    """The SGM names must load as the expected diffusers modules, with the expected shapes."""
    import lora_fusion

    adapter = lora_fusion.load_adapter(path)
    expected = {canonical: shape for canonical, _, shape in modules}
    got = {name: (spec.out_features, spec.in_features) for name, spec in adapter.modules.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong_shape = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    if missing or extra or wrong_shape:
        raise SystemExit(f"name map mismatch: missing {missing[:5]}, extra {extra[:5]}, shapes {wrong_shape[:5]}")
    return {"modules": len(got), "all_expected_diffusers_names": True, "shapes_match": True,
            "examples": {kohya: canonical for canonical, kohya, _ in modules[:: max(1, len(modules) // 4)]}}


def kind_of(kohya: str) -> str:
    """A module's kind for the subset's summary: unet/te1/te2 and the projection (`attn2_to_k`, `mlp_fc1`, …)."""
    where = kohya.split("_")[1]
    for part in ("attn1_to_out_0", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2", "attn1_to_", "attn2_to_",
                 "self_attn_", "mlp_fc1", "mlp_fc2"):
        if part in kohya:
            tail = kohya[kohya.index(part):]
            return f"{where}:{tail}"
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of the floor, each convert and lora-fusion")
    parser.add_argument("--every", type=int, default=31, help="the svd subset: every k-th module (sorted names)")
    parser.add_argument("--kohya-runs", type=int, default=2, help="timed runs of the kohya reference (after one "
                        "warm-up run)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--wait-load", type=float, default=1.3)
    parser.add_argument("--wait-max", type=float, default=0.0, help="seconds to wait for an idle machine (0: no wait)")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--skip-convert", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    # SIGTERM (a killed run) exits through the `with` blocks, so the temporary folder (~700 MB) is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    figures: dict[str, Any] = {"benchmark": "bench_formats", "machine_at_start": machine()}
    figures["wait"] = wait_for_idle(args.wait_load, args.wait_max)
    modules = sdxl_modules()
    canonical_to_kohya = {c: k for c, k, _ in modules}
    kohya_names = sorted(k for _, k, _ in modules)

    with tempfile.TemporaryDirectory(prefix="lora-fusion-bench-formats-") as tmp:
        work = Path(tmp)
        paths = []
        for index, (rank, alpha) in enumerate(MERGE_RANKS):
            path = work / f"sdxl_r{rank}.safetensors"
            log(f"synthesising {path.name} (rank {rank}, fp16, {len(modules)} modules)")
            synthesise(path, modules, rank, alpha, seed=index)
            paths.append(path)
        figures["case"] = {
            "modules": len(modules),
            "unet_modules": sum(c.startswith("unet.") for c, _, _ in modules),
            "text_encoder_modules": sum(c.startswith("text_encoder.") for c, _, _ in modules),
            "text_encoder_2_modules": sum(c.startswith("text_encoder_2.") for c, _, _ in modules),
            "dtype": "float16",
            "files": {p.name: {"bytes": p.stat().st_size, "mb": rounded(p.stat().st_size / 1e6)} for p in paths},
            "convert_file": paths[0].name,
            "alphas": {f"rank {r}": a for r, a in MERGE_RANKS},
            "init": "down ~ N(0, 1/in), up ~ N(0, 0.01²) times 1/√(j+1) per column j, fp16",
        }
        figures["name_check"] = check_names(paths[0], modules)
        log(f"names check: {figures['name_check']['modules']} modules, all as expected")

        if not args.skip_convert:
            figures["convert"] = bench_convert(paths[0], work, args.runs, env)
        if not args.skip_merge:
            names = kohya_names[:: args.every]
            subset = []
            for path in paths:
                target = work / f"{path.stem}-subset.safetensors"
                subset_file(path, target, set(names))
                subset.append(target)
            figures["merge_case"] = {
                "weights": list(MERGE_WEIGHTS), "new_rank": NEW_RANK,
                "sources": [f"rank {r}, alpha {a}" for r, a in MERGE_RANKS],
                "subset": f"every {args.every}th module of the {len(kohya_names)} sorted kohya names: "
                          f"{len(names)} modules",
                "subset_modules": names,
                "subset_kinds": dict(sorted(Counter(kind_of(n) for n in names).items())),
                "all_kinds": dict(sorted(Counter(kind_of(n) for n in kohya_names).items())),
                "kohya_reference": "sd-scripts networks/svd_merge_lora.py re-written from the published algorithm "
                                   "(not run: not installable from PyPI): float32 dense ΔW, torch.linalg.svd "
                                   "(full_matrices=True, its default), U·diag(S) / Vh at rank 32, both clamped to "
                                   "±torch.quantile(cat(U, Vh), 0.99) (signed values)",
            }
            figures["merge"] = bench_merge(paths, subset, names, kohya_names, canonical_to_kohya, args.runs,
                                           args.kohya_runs)
    figures["torch_threads"] = torch.get_num_threads()
    figures["torch"] = torch.__version__
    import diffusers

    figures["diffusers"] = diffusers.__version__
    figures["machine_at_end"] = machine()
    figures["bench_runtime_s"] = rounded(time.perf_counter() - started, 4)
    emit(figures)


if __name__ == "__main__":
    main()
