"""lmforge synth best-of-n: best_of_k against enumerating every k-subset, the stage on canned
answers that really run in the sandbox (the picks, the rows kept, the best-of-k table worked
by hand), the reward-model selector against enumeration, its run dir read by `lmforge sft`,
and bad settings as one line."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from lmforge.config import BestOfNCfg, load_config
from lmforge.data.chat_rows import load_conversations
from lmforge.errors import UserError
from lmforge.eval.passk import best_of_k, pass_at_k
from lmforge.stages import pairs as pairs_stage
from lmforge.stages import run_stage
from tests.conftest import ROOT, run_cli
from tests.stages.test_pairs import _canned, _items, _jsonl, _runs, policy, reward_model  # noqa: F401

TINY = ROOT / "configs/best_of_n/tiny.yaml"


def _enumerated(scores: list[float], passed: list[bool], k: int) -> float:
    """Every k-subset, its top-scoring answer (ties: the earliest) checked."""
    subsets = list(itertools.combinations(range(len(scores)), k))
    return sum(passed[min(sub, key=lambda i: (-scores[i], i))] for sub in subsets) / len(subsets)


def test_best_of_k_closed_form_and_enumeration() -> None:
    s, p = [0.9, 0.5, 0.7, 0.1], [False, True, True, False]
    assert (best_of_k(s, p, 1), best_of_k(s, p, 2), best_of_k(s, p, 4)) == (0.5, 0.5, 0.0)
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 7)
        scores = [float(rng.randint(0, 3)) for _ in range(n)]  # ties on purpose
        passed = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            # exact rationals over C(n, k) <= 35 subsets: doubles agree to a few ulps
            assert best_of_k(scores, passed, k) == pytest.approx(_enumerated(scores, passed, k), abs=1e-12)
            # the tests as the score: the pick passes when any of the k does, pass@k
            tests = [float(x) for x in passed]
            assert best_of_k(tests, passed, k) == pytest.approx(pass_at_k(n, sum(passed), k), abs=1e-12)


def _run(monkeypatch: pytest.MonkeyPatch, policy: Path, out: Path, canned: dict[str, list[str]],  # noqa: F811
         *over: str) -> dict[str, Any]:
    def fake(gen: Any, items: list[Any], *, n: int, **kw: Any) -> list[list[str]]:
        return [list(canned[it.task_id]) for it in items]

    monkeypatch.setattr(pairs_stage, "answer_items", fake)
    cfg = load_config(BestOfNCfg, TINY, [f"model.path={policy}", f"run.dir={out}", "n=6",
                                         "ks=[1,2,4]", *over])
    return run_stage("best_of_n", cfg)


def test_tests_pick_a_passing_answer_and_the_table_is_pass_at_k(
        monkeypatch: pytest.MonkeyPatch, policy: Path, tmp_path: Path) -> None:  # noqa: F811
    """Problems 0 and 1: the reference first, then five failures (two of them exit early to
    fake a pass); problem 2: six references. Every problem keeps its reference; best-of-k
    pass@1 is the mean of pass@k: k=1 (1/6 + 1/6 + 1) / 3, k=2 (1/3 + 1/3 + 1) / 3 with
    pass@2 = 1 - C(5,2)/C(6,2), k=4 (2/3 + 2/3 + 1) / 3."""
    items = _items()
    s = _run(monkeypatch, policy, tmp_path, _canned(items))
    rows = _jsonl(tmp_path / "sft.jsonl")
    assert (s["problems"], s["samples"], s["kept"], s["dropped"]) == (3, 18, 3, 0)
    for it, r in zip(items, rows):
        assert r["task_id"] == it.task_id and r["passed"] and r["pick"] == 0
        assert r["messages"] == [{"role": "user", "content": it.prompt},
                                 {"role": "assistant", "content": it.head + it.reference}]
        assert _runs(it, r["messages"][1]["content"]).passed  # the sandbox agrees
    want = {1: (1 / 6 + 1 / 6 + 1) / 3, 2: (1 / 3 + 1 / 3 + 1) / 3, 4: (2 / 3 + 2 / 3 + 1) / 3}
    for row in s["best_of_k"]:
        assert row["best_of_k_pass@1"] == row["pass@k"] == round(want[row["k"]], 4)
    # `lmforge sft data.train=<this run dir>` reads the kept rows, not the samples
    convs, stats = load_conversations(tmp_path)
    assert stats.kept == 3 and [c.messages[1]["content"] for c in convs] == \
        [r["messages"][1]["content"] for r in rows]


def test_reward_model_pick_is_checked_by_the_tests(
        monkeypatch: pytest.MonkeyPatch, policy: Path, reward_model: Path,  # noqa: F811
        tmp_path: Path) -> None:
    """The reward model picks (its top score per problem, kept verified or not with
    keep=best); each row says whether its pick passed, and best-of-k pass@1 is the
    enumeration over k-subsets of the logged scores and sandbox statuses."""
    items = _items()
    s = _run(monkeypatch, policy, tmp_path, _canned(items), "select=reward_model",
             f"reward_model={reward_model}", "keep=best")
    rows, samples = _jsonl(tmp_path / "sft.jsonl"), _jsonl(tmp_path / "samples.jsonl")
    assert s["kept"] == 3
    for it, r in zip(items, rows):
        mine = [x for x in samples if x["task_id"] == it.task_id]
        scores = [x["score"] for x in mine]
        assert r["pick"] == scores.index(max(scores)) and r["score"] == max(scores)
        assert r["passed"] == (mine[r["pick"]]["status"] == "passed")
    for row in s["best_of_k"]:
        k, per = row["k"], []
        for it in items:
            mine = [x for x in samples if x["task_id"] == it.task_id]
            per.append(_enumerated([x["score"] for x in mine],
                                   [x["status"] == "passed" for x in mine], k))
        assert row["best_of_k_pass@1"] == round(sum(per) / len(per), 4)
        assert row["best_of_k_pass@1"] <= row["pass@k"] + 1e-12  # never above the oracle


def test_nothing_passing_is_an_error_not_an_empty_file(
        monkeypatch: pytest.MonkeyPatch, policy: Path, tmp_path: Path) -> None:  # noqa: F811
    canned = {it.task_id: ["\n    return None"] * 6 for it in _items()}
    with pytest.raises(UserError, match="no problem kept"):
        _run(monkeypatch, policy, tmp_path, canned)
    assert not (tmp_path / "sft.jsonl").exists() and not (tmp_path / "summary.json").exists()
    assert len(_jsonl(tmp_path / "samples.jsonl")) == 18  # kept for a look


@pytest.mark.parametrize("over, needle", [
    (["ks=[1,16]"], "ks"),
    (["keep=best"], "keep=best"),
    (["select=reward_model"], "reward_model"),
])
def test_bad_settings_are_one_line(tmp_path: Path, over: list[str], needle: str) -> None:
    r = run_cli("synth", "best-of-n", str(TINY), "model.path=x", f"run.dir={tmp_path / 'o'}", *over)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_random_policy_end_to_end(policy: Path, tmp_path: Path) -> None:  # noqa: F811
    """The real sampler through the CLI: a random policy passes nothing, so the run stops with
    one line saying so, and every answer is left in samples.jsonl."""
    out = tmp_path / "o"
    r = run_cli("synth", "best-of-n", str(TINY), f"model.path={policy}", f"run.dir={out}")
    assert r.returncode == 2 and "no problem kept" in r.stderr, r.stderr[-2000:]
    assert len(_jsonl(out / "samples.jsonl")) == 3 * 4
    assert "k | best-of-k pass@1" in r.stdout and "1 | 0.0%" in r.stdout  # the table, before
