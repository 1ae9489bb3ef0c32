"""lmforge eval end to end on the tiny pipeline's fine-tuned model, and every bad input as one
line with exit 2."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from lmforge import sandbox
from lmforge.errors import UserError
from lmforge.eval.harness import score_code, summarize
from lmforge.eval.passk import pass_at_k
from lmforge.stages.eval import parse_task
from lmforge.tasks.mbpp import load_mbpp
from tests.conftest import run_cli


def test_pipeline_eval_stage_and_report(tiny_run: Path) -> None:
    s = json.loads((tiny_run / "eval" / "eval.json").read_text())
    r = s["tasks"]["synthetic-code"]
    assert r["items"] == 20 and r["samples"] == 40  # 4 per group x 5 groups, n = 2
    rows = [json.loads(x) for x in (tiny_run / "eval" / "eval_synthetic-code.jsonl").open()]
    assert len(rows) == 20
    for row in rows:  # per-item counts are the statuses; pass@k is the estimator on them
        assert row["c"] == row["statuses"].count("passed") and row["n"] == 2
        assert row["pass@2"] == pytest.approx(pass_at_k(2, row["c"], 2), abs=1e-4)
    for k in (1, 2):
        assert r[f"pass@{k}"] == pytest.approx(sum(pass_at_k(2, x["c"], k) for x in rows) / 20)
    assert set(r["groups"]) == {"d1", "d2", "d3", "d4", "unseen"}
    assert s["sandbox"]["level"] in ("strong", "weak")
    report = (tiny_run / "report.md").read_text()
    assert "## Evaluation" in report and "| synthetic-code | 20 | pass@2 |" in report
    assert "sandbox isolation" in report


def test_eval_cli_on_a_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    text = tmp_path / "val.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    r = run_cli("eval", str(tiny_run / "sft" / "final"), "--task", "synthetic-code",
                "--task", f"perplexity:{text}", "--limit", "1", "--out", str(tmp_path / "ev"),
                "max_new_tokens=16", "synthetic.n_eval=1", "--contamination", str(text))
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert s["tasks"]["synthetic-code"]["items"] == 5 and s["settings"]["n"] == 1
    ppl = s["tasks"][f"perplexity:{text}"]
    assert ppl["documents"] == 1 and ppl["perplexity"] > 1
    assert s["contamination"]["sets"]["synthetic-code"]["items"] == 5
    assert (tmp_path / "ev" / "contamination.txt").exists()


def test_mbpp_references_pass_and_broken_fail_through_the_harness(tmp_path: Path) -> None:
    rows = [{"task_id": i, "text": f"Return {i} plus x.", "code": f"def f{i}(x):\r\n    return x + {i}",
             "test_list": [f"assert f{i}(1) == {i + 1}", f"assert f{i}(0) == {i}"],
             "test_setup_code": "", "challenge_test_list": []} for i in range(11, 15)]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_mbpp(path, split="test", n_shot=0)
    good = [[it.reference, f"```python\n{it.reference}\n```"] for it in items]
    bad = [[f"def {it.entry_point}(x):\n    return x"] * 2 for it in items]
    got, iso = score_code(items, good, sandbox.Limits(timeout_s=5))
    assert [r["c"] for r in got] == [2] * 4 and iso is not None  # fenced answers are unwrapped
    assert summarize(got, [1, 2])["pass@2"] == 1.0
    got, _ = score_code(items, bad, sandbox.Limits(timeout_s=5))
    assert [r["statuses"] for r in got] == [["failed", "failed"]] * 4


def _one_line_exit_2(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_bad_inputs_are_one_line_exit_2(tiny_run: Path, tmp_path: Path) -> None:
    final = str(tiny_run / "sft" / "final")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": 11, "text": "t", "code": "def f(): pass",
                               "test_setup_code": ""}) + "\n")
    line = _one_line_exit_2(run_cli("eval", final, "--task", "mbpp", f"sources.mbpp={bad}",
                                    "--out", str(tmp_path / "a"), "n_shot=0"))
    assert "bad.jsonl:1" in line and "test_list" in line
    line = _one_line_exit_2(run_cli("eval", str(tmp_path / "nope"), "--out", str(tmp_path / "b")))
    assert "nope" in line
    line = _one_line_exit_2(run_cli("eval", final, "--k", "1,5", "--n", "2",
                                    "--temperature", "0.8", "--out", str(tmp_path / "c")))
    assert "k=5 is larger than n=2" in line
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the judge endpoint is asked before anything loads: the checkpoint need not exist
    line = _one_line_exit_2(run_cli("eval", str(tmp_path / "none"), "--limit", "1",
                                    "synthetic.n_eval=1", "max_new_tokens=8", "--judge",
                                    f"http://127.0.0.1:{port}/v1", "--judge-model", "m",
                                    "--baseline", final, "--out", str(tmp_path / "d")))
    assert f"judge endpoint http://127.0.0.1:{port}/v1 refused the connection" in line
    line = _one_line_exit_2(run_cli("eval", final, "--task", "nosuch", "--out", str(tmp_path / "e")))
    assert "unknown task 'nosuch'" in line
    assert not (tmp_path / "c" / "eval.json").exists()


def test_an_empty_or_missing_text_set_path_is_an_error(tmp_path: Path) -> None:
    # refused before a model is loaded: the checkpoint need not exist
    line = _one_line_exit_2(run_cli("eval", str(tmp_path / "ckpt"), "--task", "perplexity:",
                                    "--out", str(tmp_path / "a")))
    assert "tasks: 'perplexity:' needs a path: perplexity:PATH" in line
    assert not (tmp_path / "a" / "eval.json").exists()
    with pytest.raises(UserError, match="needs a path"):
        parse_task("text: ")
    with pytest.raises(UserError, match=r"no such file or directory: .*nope\.txt"):
        parse_task(f"perplexity:{tmp_path / 'nope.txt'}")
    (tmp_path / "set.txt").write_text("x")
    assert parse_task(f"perplexity:{tmp_path / 'set.txt'}") == ("perplexity", str(tmp_path / "set.txt"))
    assert parse_task("mbpp") == ("mbpp", None)
