"""Process-level settings lora-fusion applies around its own work."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

_collector = {"pauses": 0, "was_enabled": False}
_collector_lock = threading.Lock()


@contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """Run torch on at most `threads` threads inside the block (None: leave torch's setting), then restore it.

    Factored merges and file checks are made of many small operations (a 4096×64 QR, a k×k SVD, a finiteness check)
    that gain nothing from more threads, while MKL/OpenMP threads spin badly when the cores are shared: a 4096×64
    QR measured 6 ms on one thread and 420 ms on two with a busy neighbour, on the 2-core machine.

    It sets the calling thread's count only: OpenMP and MKL keep one per thread, so threads that do the work need
    their own ([`torch_thread_pool`]).
    """
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_thread_pool(workers: int, threads: int | None = 1) -> ThreadPoolExecutor:
    """A pool of `workers` threads, each running torch on `threads` threads (None: OpenMP's default, every core).

    `torch.set_num_threads` in one thread does not reach threads started later: OpenMP and MKL keep their thread
    count per thread, and a new one starts at the default. Before this pool, a CPU merge's two workers each ran MKL
    on every core, under a `thread_limit(1)` that only the main thread obeyed: the workers' threads spun against
    each other, and since MKL's multi-threaded reductions round differently from run to run, one svd merge gave 3
    different outputs in 6 runs here (max difference 6e-7; with each worker on one thread, the same bytes every run;
    a one-off shell loop, not kept: `tests/test_distributed.py` checks the workers' thread count instead).
    """
    if threads is None:
        return ThreadPoolExecutor(workers)
    return ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads,))


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block, then restore it (reference counting still frees
    every tensor and object as usual; only cycles wait for the end of the block).

    Reading and writing a diffusion LoRA makes tens of thousands of small objects (header entries, key-map probes),
    which set off full collections, and with torch and diffusers imported a full collection walks some 440,000
    objects: 0.28 s each on the 2-core machine, 1.06 s (seven of them) in a first kohya convert of a 225 MB file,
    whose own work takes about 0.4 s (measured once with `gc.callbacks` timers; benchmarks/README.md). Blocks may
    nest or run in several threads: the collector is restored when the last one ends.
    """
    with _collector_lock:
        if _collector["pauses"] == 0:
            _collector["was_enabled"] = gc.isenabled()
            gc.disable()
        _collector["pauses"] += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector["pauses"] -= 1
            if _collector["pauses"] == 0 and _collector["was_enabled"]:
                gc.enable()
