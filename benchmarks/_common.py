"""Helpers shared by the benchmarks: timing, per-process peak RSS, machine description, JSON output.

Every benchmark prints exactly one JSON object on stdout (`emit`) and everything else on stderr (`log`), so
`python benchmarks/bench_x.py > figures.json` captures the figures alone. This module imports no torch, so that
`bench_help.py` measures the CLI and not the benchmark's own imports.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def log(message: str) -> None:
    """Progress and information, on stderr (stdout is reserved for the JSON figures)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def emit(figures: dict[str, Any]) -> None:
    """Print the benchmark's single JSON object on stdout."""
    print(json.dumps(figures, indent=2, sort_keys=False), flush=True)


def rounded(value: float, digits: int = 4) -> float:
    """A float rounded to `digits` significant digits, for readable JSON."""
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of repeated runs."""

    seconds: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_s": rounded(self.best),
            "median_s": rounded(self.median),
            "runs": len(self.seconds),
            "all_s": [rounded(s) for s in self.seconds],
        }


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Run `fn` once; return (wall seconds, its result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def repeat(fn: Callable[[], T], runs: int) -> tuple[Timings, T]:
    """Run `fn` `runs` times; return the timings and the last result."""
    seconds: list[float] = []
    result: T
    for _ in range(runs):
        elapsed, result = timed(fn)
        seconds.append(elapsed)
    return Timings(tuple(seconds)), result


@dataclass(frozen=True)
class ProcessRun:
    """One subprocess: exit code, wall seconds, peak resident set size (MB = 10⁶ bytes) of that process alone,
    its output, and whether it was killed at its time limit (then `wall_s` is a lower bound)."""

    argv: tuple[str, ...]
    returncode: int
    wall_s: float
    max_rss_mb: float
    stdout: str
    stderr: str
    timed_out: bool = False


# Used when GNU time is missing: a small Python parent whose only child is the command, so RUSAGE_CHILDREN is
# that command's peak RSS (plus at most this wrapper's own ~10 MB, carried into the child by fork, see below).
_RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


@functools.cache
def _gnu_time() -> str | None:
    """`/usr/bin/time` if it is GNU time (understands -f/-o), else None."""
    if not Path("/usr/bin/time").exists():
        return None
    with tempfile.NamedTemporaryFile(mode="r") as report:
        probe = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, "true"], capture_output=True)
        return "/usr/bin/time" if probe.returncode == 0 and report.read().strip().isdigit() else None


def run_process(
    argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None, check: bool = True
) -> ProcessRun:
    """Run `argv` and measure its wall time and peak RSS; kill it after `timeout` seconds if given.

    The peak RSS is read by GNU `/usr/bin/time -f %M` (its "Maximum resident set size"), else by a small Python
    wrapper's RUSAGE_CHILDREN. Not by this process's own `os.wait4`: Linux carries a forked child's RSS high-water
    mark across exec, so a child of a benchmark that holds 500 MB would report at least 500 MB. Wall time is
    measured here around the whole run (time(1) adds about a millisecond). Output goes to temporary files, not pipes,
    so a chatty child cannot block; the child runs in its own session so that a timeout kills it with its wrapper.
    """
    timer = _gnu_time()
    with tempfile.TemporaryDirectory(prefix="lora-fusion-bench-run-") as tmp:
        report = Path(tmp) / "maxrss"
        if timer:
            wrapped = [timer, "-f", "%M", "-o", str(report), *argv]
        else:
            wrapped = [sys.executable, "-c", _RSS_WRAPPER, str(report), *argv]
        with open(Path(tmp) / "stdout", "w+b") as out, open(Path(tmp) / "stderr", "w+b") as err:
            start = time.perf_counter()
            child = subprocess.Popen(wrapped, stdout=out, stderr=err, env=env, start_new_session=True)
            try:
                child.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                timed_out = True
            wall = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        text = report.read_text().strip() if report.exists() else ""
    # GNU time and Linux report KiB; macOS's getrusage reports bytes. A killed run has no report: RSS unknown (nan).
    unit = 1 if (sys.platform == "darwin" and not timer) else 1024
    rss_mb = int(text.split()[-1]) * unit / 1e6 if text and text.split()[-1].isdigit() else float("nan")
    if timer and stderr.startswith("Command exited with non-zero status"):  # GNU time's own line, not the child's
        stderr = stderr.split("\n", 1)[1] if "\n" in stderr else ""
    run = ProcessRun(tuple(argv), child.returncode, wall, rss_mb, stdout, stderr, timed_out)
    if check and run.returncode != 0 and not timed_out:
        raise RuntimeError(f"{' '.join(argv)} exited with {run.returncode}:\n{stderr[-4000:]}")
    return run


def console_script(name: str) -> str:
    """The path of an installed console script next to the running interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    from shutil import which

    found = which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed; run `pip install -e .` in the repository first.")
    return found


def machine() -> dict[str, Any]:
    """What the figures were measured on (CPU only; torch threads are added by the benchmarks that use torch)."""
    return {
        "cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        # Other work on a shared machine skews timings (see README): record how busy it was.
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def wait_for_idle(threshold: float, max_wait_s: float, poll_s: float = 30.0, max_share: float = 0.1) -> dict[str, Any]:
    """Before timing, wait until the machine is idle, so that another job's OpenMP threads do not distort the figures
    (see README, "Timing on a busy machine"): the 1-minute load average below `threshold` *and*, over the last
    `poll_s` seconds, other processes using less than `max_share` of the CPU time (the load average lags by a
    minute, and dips below the threshold while a job that pauses between steps is still running). Polled every
    `poll_s` seconds, at most `max_wait_s`; 0 skips the wait. Returns what happened, for the JSON."""
    if not hasattr(os, "getloadavg"):
        return {"threshold": threshold, "waited_s": 0.0, "reached": None}
    before = [round(x, 2) for x in os.getloadavg()]
    start = time.monotonic()
    share: float | None = None
    while time.monotonic() - start + poll_s <= max_wait_s:
        with CpuShare() as cpu:
            time.sleep(poll_s)
        result = cpu.result()
        share = result["others_cpu_share"] if result else None
        load = os.getloadavg()[0]
        if load < threshold and (share is None or share < max_share):
            break
        log(f"1-minute load average {load:.2f} (< {threshold}?), other processes' CPU share {share} (< {max_share}?): "
            f"waiting {poll_s:.0f} s more")
    after = [round(x, 2) for x in os.getloadavg()]
    return {
        "threshold": threshold,
        "max_share": max_share,
        "max_wait_s": max_wait_s,
        "waited_s": round(time.monotonic() - start, 1),
        "load_before_wait_1_5_15_min": before,
        "load_after_wait_1_5_15_min": after,
        "others_cpu_share_last_poll": share,
        "reached": after[0] < threshold and (share is None or share < max_share),
    }


class CpuShare:
    """CPU time used by *other* processes while a block runs: the whole machine's busy time (/proc/stat) minus this
    process's own (all its threads), as a share of the wall time × the CPU count. 0 means the benchmark had the
    machine to itself; on 2 CPUs, 0.5 means another job kept one core busy throughout. Linux only (None elsewhere).

        with CpuShare() as share:
            ...
        share.result()  # {"others_cpu_share": …, "own_cpu_s": …, "wall_s": …}
    """

    def __enter__(self) -> CpuShare:
        self._start = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = (time.perf_counter(), _machine_busy_s(), _own_cpu_s())

    def result(self) -> dict[str, Any] | None:
        (w0, b0, o0), (w1, b1, o1) = self._start, self._end
        if b0 is None or b1 is None:
            return None
        wall, own = w1 - w0, o1 - o0
        others = max(0.0, (b1 - b0) - own)
        cpus = os.cpu_count() or 1
        return {
            "others_cpu_share": round(others / (wall * cpus), 3) if wall > 0 else None,
            # /proc/stat and os.times() count in clock ticks (10 ms), the machine's total as a sum of per-CPU counts:
            # the share can be off by about cpus + 1 ticks of this block's CPU time
            "resolution": round((cpus + 1) / (os.sysconf("SC_CLK_TCK") * wall * cpus), 3) if wall > 0 else None,
            "own_cpu_s": round(own, 2),
            "wall_s": round(wall, 2),
        }


def _machine_busy_s() -> float | None:
    """Seconds of CPU time the whole machine has spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system
