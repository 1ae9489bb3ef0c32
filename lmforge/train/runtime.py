"""The process around the training loop: signals turned into a flag it checks between steps,
and how the C allocator keeps the memory a step frees."""

from __future__ import annotations

import ctypes
import resource
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Signals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (a second SIGINT aborts)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the OS between steps: otherwise every
    step re-faults its activations (~100k page faults, 5-10% of a CPU step on `small`), for
    50-100 MB more resident memory. A no-op where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: serve big blocks from the heap, not fresh mmaps
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep the freed heap
