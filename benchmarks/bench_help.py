"""Startup time of the CLI: `lora-fusion --help` and `lora-fusion --version`, each as a fresh process.

Both should stay free of torch (the CLI imports it only inside command bodies), so they are bounded by the
interpreter's startup plus Typer. A bare `python -c pass` is measured alongside as the floor, and one extra run
checks whether torch gets imported at all. Target: < 0.5 s.

Usage: python benchmarks/bench_help.py [--runs 10]
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import Timings, console_script, emit, log, machine, rounded, run_process

TORCH_PROBE = (
    "import sys; from lora_fusion_cli.main import main; main(['--help']); "
    "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED', file=sys.stderr)"
)


def measure(argv: list[str], runs: int) -> tuple[Timings, float, str]:
    """Wall times of `runs` fresh processes, their largest peak RSS (MB), and the last run's stdout."""
    results = [run_process(argv) for _ in range(runs)]
    return Timings(tuple(r.wall_s for r in results)), max(r.max_rss_mb for r in results), results[-1].stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    started = time.perf_counter()
    cli = console_script("lora-fusion")

    log(f"{args.runs} runs each of `python -c pass`, `lora-fusion --help`, `lora-fusion --version`")
    python_t, python_rss, _ = measure([sys.executable, "-c", "pass"], args.runs)
    help_t, help_rss, help_text = measure([cli, "--help"], args.runs)
    version_t, version_rss, version_text = measure([cli, "--version"], args.runs)
    probe = run_process([sys.executable, "-c", TORCH_PROBE])

    emit(
        {
            "benchmark": "bench_help",
            "help_best_s": rounded(help_t.best),
            "help_median_s": rounded(help_t.median),
            "version_best_s": rounded(version_t.best),
            "version_median_s": rounded(version_t.median),
            "python_startup_best_s": rounded(python_t.best),
            "python_startup_median_s": rounded(python_t.median),
            "help_peak_rss_mb": rounded(help_rss),
            "version_peak_rss_mb": rounded(version_rss),
            "python_startup_peak_rss_mb": rounded(python_rss),
            "help_imports_torch": "TORCH_IMPORTED" in probe.stderr,
            "target_under_0_5_s": help_t.median < 0.5 and version_t.median < 0.5,
            "version_output": version_text.strip(),
            "help_output_lines": len(help_text.splitlines()),
            "all_runs_s": {
                "help": [rounded(s) for s in help_t.seconds],
                "version": [rounded(s) for s in version_t.seconds],
                "python_startup": [rounded(s) for s in python_t.seconds],
            },
            "machine": machine(),
            "bench_runtime_s": rounded(time.perf_counter() - started, 3),
        }
    )


if __name__ == "__main__":
    main()
