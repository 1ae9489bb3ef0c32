"""A runs directory with every case the dashboard must show (finished, running, half-written,
a malformed metrics line, an eval with a judge, a report) and an annotation session."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lmforge.annotate import Item, Session, write_session

SFT_LOSS = [(1, 4.0), (2, 3.5), (4, 2.25), (5, 2.0)]  # the rows the sft chart must show


def _stage(d: Path, config: str, rows: list[str], summary: dict | None) -> None:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(config)
    (d / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def make_runs(root: Path) -> Path:
    demo = root / "demo"
    sft_rows = [json.dumps({"step": s, "loss": v}) for s, v in SFT_LOSS[:2]]
    sft_rows += ['{"step": 3, "loss": 3.0, "lr": 0.1', *(json.dumps({"step": s, "loss": v})
                                                       for s, v in SFT_LOSS[2:])]
    sft_rows.append(json.dumps({"step": 5, "val_loss": 2.5}))
    _stage(demo / "sft", "optim:\n  lr: 0.003\ntrain:\n  max_steps: 5\nrun:\n  dir: runs/demo/sft\n",
           sft_rows, {"stage": "sft", "wall_time_s": 12.5, "steps": 5,
                      "before": {"pass_at_1": {"d1": 0.0, "d2": 0.0}},
                      "after": {"pass_at_1": {"d1": 0.91, "d2": 0.72}}})
    (demo / "sft" / "eval_after.jsonl").write_text(
        json.dumps({"task_id": "t1", "status": "passed", "answer": "def f():\n    return 1\n"}) + "\n")
    _stage(demo / "dpo", "optim:\n  lr: 1.0e-05\ntrain:\n  max_steps: 5\nrun:\n  dir: runs/demo/dpo\n",
           [json.dumps({"step": s, "loss": 0.7 - 0.1 * s, "rewards/margin": 0.1 * s})
            for s in (1, 2, 3)], {"stage": "dpo", "wall_time_s": 3.0, "steps": 3})
    _stage(demo / "grpo", "x: 1\n", [json.dumps({"step": 1, "kl": 0.0})], None)
    (demo / "grpo" / "summary.json").write_text('{"stage": "grpo", "wall')  # half-written
    _stage(demo / "eval", "x: 1\n", [], {
        "stage": "eval", "tasks": {"synthetic-code": {"items": 100, "pass@1": 0.476, "pass@5": 0.67,
                                                      "groups": {"d1": {"items": 20, "pass@1": 0.9}}}},
        "judge": {"n": 10, "first_position_rate": 0.65, "position_consistency": 0.7}})
    (demo / "report.md").write_text(
        "# lmforge run: demo\n\n## Stages\n\n| stage | loss |\n|---|---:|\n| sft | **2.0** |\n\n"
        "![loss curves](loss.png)\n![secret](../../../etc/passwd)\n- <script>alert(1)</script>\n")
    (demo / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    old = time.time() - 3600  # all of it an hour old: finished or failed, nothing running
    for p in root.rglob("*"):
        os.utime(p, (old, old))
    return root


# a prompt with three models' answers (three models: the Elo table appears); answers differ
ITEMS = [Item(f"q{i}", f"Question {i}: add {i} and 1.", {
    "base": f"It is {i}.", "sft": f"{i} + 1 = {i + 1}", "dpo": f"The sum is {i + 1}."})
    for i in range(4)]


def make_session(labels: Path, name: str = "s1", mode: str = "pairs") -> Session:
    return write_session(labels / name, ITEMS, mode, seed=0, source="test")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return make_runs(tmp_path / "runs")


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    make_session(tmp_path / "labels")
    return tmp_path / "labels"
