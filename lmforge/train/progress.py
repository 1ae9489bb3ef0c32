"""Progress: a rich bar on a terminal, plain log lines elsewhere (CI logs, pipes, files)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressLog:
    def __init__(self, mode: str, total: int, start: int, label: str) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total, self.label = mode, total, label
        self._bar: Progress | None = None
        self._t0 = time.perf_counter()
        self._start = start
        if mode == "rich":
            self._bar = Progress(
                TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task(label, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, row: dict[str, Any], log_line: bool) -> None:
        info = _fmt(row)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "plain" and log_line:
            done = step - self._start
            eta = (time.perf_counter() - self._t0) / max(done, 1) * (self.total - step)
            print(f"{self.label} step {step}/{self.total} {info} eta {eta:.0f}s", flush=True)

    def restart(self, total: int, start: int) -> None:
        """After a resume: the bar starts at `start`, and the eta counts from now."""
        self.total, self._start, self._t0 = total, start, time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, total=total, completed=start)

    def set_total(self, total: int) -> None:
        """The time budget fixed the schedule's length."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode != "off":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Ticker:
    """Progress of a phase that can run long (generation, sandboxed checks, evaluations): one
    plain line at most every `every` seconds, so a phase past ~10 s never looks hung and a
    short one prints nothing."""

    def __init__(self, label: str, total: int, every: float = 10.0) -> None:
        self.label, self.total, self.every = label, total, every
        self._t0 = self._last = time.perf_counter()
        self._done = 0
        self._lock = threading.Lock()  # advance() is called from worker threads

    def advance(self, n: int = 1) -> None:
        """Count `n` more done (for callbacks that report increments, e.g. the sandbox pool)."""
        with self._lock:
            self._done += n
            self(self._done)

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self._last < self.every or done >= self.total:
            return
        self._last = now
        eta = (now - self._t0) / max(done, 1) * (self.total - done)
        print(f"{self.label}: {done}/{self.total} ({now - self._t0:.0f}s, eta {eta:.0f}s)",
              flush=True)


def _fmt(row: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
                     ("tokens_per_s", "{:,.0f} tok/s"), ("flops_per_s", "{:.3g} FLOP/s"),
                     ("mfu", "mfu {:.0%}")):
        if row.get(key) is not None:
            parts.append(fmt.format(row[key]))
    return " | ".join(parts)
