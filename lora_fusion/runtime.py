"""Process-level settings lora-fusion applies around its own work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """Run torch on at most `threads` threads inside the block (None: leave torch's setting), then restore it.

    Factored merges and file checks are made of many small operations (a 4096×64 QR, a k×k SVD, a finiteness check)
    that gain nothing from more threads, while MKL/OpenMP threads spin badly when the cores are shared: a 4096×64
    QR measured 6 ms on one thread and 420 ms on two with a busy neighbour, on the 2-core machine.
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
