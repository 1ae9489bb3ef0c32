"""The dashboard's reading of run directories: states, curves with malformed lines, and
paths that must stay inside the runs root."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.ui.runs import curves, inside, stages


def _stage(d: Path, summary: bool, age_s: float, now: float) -> None:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("x: 1\n")
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if summary:
        (d / "summary.json").write_text(json.dumps({"stage": d.name}))
    for f in [d, *d.iterdir()]:
        os.utime(f, (now - age_s, now - age_s))


def test_a_stage_is_finished_running_or_failed(tmp_path: Path) -> None:
    now = 1_000_000.0
    _stage(tmp_path / "demo" / "sft", True, 5000, now)
    _stage(tmp_path / "demo" / "dpo", False, 10, now)  # written 10 s ago: at work
    _stage(tmp_path / "demo" / "grpo", False, 600, now)  # silent for 10 min, no summary
    (tmp_path / "demo" / "sft" / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "demo" / "sft" / "checkpoints" / "step-2" / "config.yaml").write_text("")
    found = {s.name: s.state for s in stages(tmp_path, now=now)}
    assert found == {"demo/dpo": "running", "demo/grpo": "failed", "demo/sft": "finished"}


def test_a_half_written_summary_is_reported_not_raised(tmp_path: Path) -> None:
    d = tmp_path / "r" / "sft"
    d.mkdir(parents=True)
    (d / "summary.json").write_text('{"stage": "sf')
    (s,) = stages(tmp_path)
    assert s.summary is None and s.problems and s.problems[0].startswith("summary.json:")


def test_curves_skip_a_malformed_line_and_a_row_being_written(tmp_path: Path) -> None:
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 2.5, "lr": 0.1}\nnot json\n{"step": 2, "loss": NaN}\n'
                 '{"step": 3, "loss": 1.5, "ok": true}\n{"step": 4, "lo')
    series, problems = curves(f)
    assert series == {"loss": [(1, 2.5), (3, 1.5)], "lr": [(1, 0.1)]}
    assert problems == ["metrics.jsonl:2: not a JSON line, skipped"]


def test_paths_stay_inside_the_runs_root(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    (root / "demo").mkdir(parents=True)
    (root / "demo" / "report.md").write_text("# r\n")
    (tmp_path / "secret.txt").write_text("not the dashboard's\n")
    (root / "out").symlink_to(tmp_path)  # a link out of the root
    assert inside(root, "demo/report.md") == (root / "demo" / "report.md").resolve()
    for bad in ("../../etc/passwd", "/etc/passwd", "demo/../../x", "out/secret.txt"):
        assert inside(root, bad) is None, bad
