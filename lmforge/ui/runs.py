"""What the runs dashboard reads, and only reads: the runs under a root, their stages and each
stage's state, metric curves, and files resolved safely inside the root.

A stage directory is one holding `config.yaml` (written first by every stage) or
`summary.json` (written last, the mark of done). Its state:
- finished: summary.json is there;
- running: no summary yet, and something in it was written within `stale_s` seconds;
- failed: no summary and nothing written for longer (an error, a kill, a machine gone).

Nothing here writes: a half-written run and a malformed metrics line are reported as such.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STALE_S = 120.0  # a training stage writes a metrics row far more often than this


@dataclass
class Stage:
    name: str  # its path under the root, e.g. "demo/sft"
    path: Path
    state: str  # finished | running | failed
    summary: dict[str, Any] | None
    updated: float  # newest write, seconds since the epoch
    problems: list[str] = field(default_factory=list)  # what could not be read, and where


def _newest_write(d: Path) -> float:
    """The newest mtime among a stage's own files (not its checkpoints' insides)."""
    times = [d.stat().st_mtime]
    for f in d.iterdir():
        try:
            times.append(f.stat().st_mtime)
        except OSError:  # removed between the listing and the stat: a run at work
            continue
    return max(times)


def read_stage(root: Path, d: Path, now: float | None = None, stale_s: float = STALE_S) -> Stage:
    now = time.time() if now is None else now
    problems: list[str] = []
    summary = None
    if (d / "summary.json").exists():
        try:
            summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            problems.append(f"summary.json: {str(e).splitlines()[0][:120]}")
    updated = _newest_write(d)
    state = ("finished" if summary is not None
             else "running" if now - updated <= stale_s else "failed")
    return Stage(d.relative_to(root).as_posix(), d, state, summary, updated, problems)


def stages(root: Path, now: float | None = None, stale_s: float = STALE_S) -> list[Stage]:
    """Every stage directory under `root` (at any depth, checkpoints and exports not
    searched), in path order."""
    found: list[Stage] = []
    skip = {"checkpoints", "final", "best", "critic", ".git"}

    def walk(d: Path) -> None:
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return
        if d != root and ((d / "config.yaml").exists() or (d / "summary.json").exists()):
            found.append(read_stage(root, d, now, stale_s))
        for c in children:
            if c.name not in skip and not c.name.startswith("."):
                walk(c)

    walk(root)
    return found


def curves(path: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """metrics.jsonl as {metric: [(step, value), ...]} (finite numbers only) and the problems
    met: a line that is not JSON is named by its number and skipped; a last line without its
    newline is a row being written, left for the next read."""
    series: dict[str, list[tuple[int, float]]] = {}
    problems: list[str] = []
    if not path.exists():
        return series, problems
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == len(lines) and not text.endswith("\n")):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            problems.append(f"{path.name}:{n}: not a JSON line, skipped")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            problems.append(f"{path.name}:{n}: no integer step, skipped")
            continue
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and math.isfinite(v):
                series.setdefault(k, []).append((row["step"], float(v)))
    return series, problems


def inside(root: Path, rel: str) -> Path | None:
    """`root / rel` when it stays inside `root` once resolved (links followed), else None:
    `../../etc/passwd`, an absolute path or a link out of the root is refused."""
    base = root.resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return target if target == base or base in target.parents else None
