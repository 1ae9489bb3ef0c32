"""GSM8K: final-answer extraction and numeric matching, the n-shot prompt byte for byte, where
the examples come from, and row errors naming file:line."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.errors import UserError
from lmforge.tasks.gsm8k import answers_match, extract_answer, load_gsm8k

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize(("text", "expected"), [
    ("so 3 + 4 = 7\n#### 1,234", "1234"),
    ("She pays $5.00.", "5"),
    ("#### -3", "-3"),
    ("no number", None),
    ("", None),
    ("1,000.00", "1000"),
    ("3.50", "3.5"),
    ("#### 0.25", "0.25"),
    ("costs $.5", "0.5"),
    ("16-3-4=9 eggs, so 18 dollars.", "18"),  # last number; "-3" in "16-3" is not negative
    ("#### 42 (after 7 days)", "42"),  # the number after ####, not the last one
    ("#### 5\n#### 6", "5"),  # the first ####
    ("#### none\nbut 12 apples", "12"),  # nothing after #### -> the last number anywhere
    ("items 1,2,3", "3"),  # not thousands grouping
    ("-7 degrees", "-7"),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("pred", "ref", "expected"), [
    ("3.50", "3.5", True),
    ("1,000", "1000", True),
    ("$18", "18", True),
    ("18.0000001", "18", True),  # within 1e-6
    ("18.00001", "18", False),
    ("-3", "3", False),
    (None, "3", False),
    ("seven", "seven", True),  # not numbers: compared as text
    ("seven", "7", False),
])
def test_answers_match(pred: str | None, ref: str, expected: bool) -> None:
    assert answers_match(pred, ref) is expected


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows),
                    encoding="utf-8")
    return path


TRAIN = [("Ann has 2 cats and gets 3 more. How many?", "2 + 3 = <<2+3=5>>5\n#### 5"),
         ("Bob had 10 pens and lost 4. How many left?", "10 - 4 = <<10-4=6>>6\n#### 6"),
         ("Cy buys 2 books at $1,500 each. Total?", "2 * 1500 = <<2*1500=3000>>3000\n#### 3,000")]
TEST = [("Dee has 7 eggs and eats 2. How many left?", "7 - 2 = 5\n#### 5"),
        ("Eve runs 3 km a day for 4 days. How far?", "3 * 4 = 12\n#### 12")]


@pytest.fixture
def gsm_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "train.jsonl", TRAIN)
    _write(tmp_path / "test.jsonl", TEST)
    return tmp_path


def test_one_shot_prompt_and_scoring(gsm_dir: Path) -> None:
    items = load_gsm8k(gsm_dir, n_shot=1)
    assert len(items) == 2
    item = items[1]
    assert item.prompt == ("Question: Ann has 2 cats and gets 3 more. How many?\n"
                           "Answer: 2 + 3 = <<2+3=5>>5\n#### 5\n\n"
                           "Question: Eve runs 3 km a day for 4 days. How far?\nAnswer:")
    assert item.task_id == "gsm8k/test/1" and item.reference == "12"
    assert item.answer == "3 * 4 = 12\n#### 12" and item.stop == ("\n\nQuestion:", "\nQuestion:")
    assert item.meta == {"question": TEST[1][0], "where": f"{gsm_dir / 'test.jsonl'}:2"}
    assert item.score(" 3 * 4 = 12 km.\n#### 12.0") and item.score(" He runs 12 km.")
    assert not item.score(" #### 13") and not item.score(" I do not know.")
    assert pickle.loads(pickle.dumps(item)).score("#### 12")  # items cross process pools


def test_examples_are_the_first_train_rows_never_the_item_itself(gsm_dir: Path) -> None:
    item = load_gsm8k(gsm_dir, n_shot=3)[0]
    assert item.prompt.count("Question:") == 4 and item.prompt.index("Ann") < item.prompt.index("Bob")
    assert "#### 3,000\n\nQuestion: Dee" in item.prompt
    train = load_gsm8k(gsm_dir, split="train", n_shot=2)
    assert train[0].prompt.startswith("Question: Bob") and "Question: Cy" in train[0].prompt
    assert train[2].prompt.startswith("Question: Ann") and train[2].reference == "3000"
    assert load_gsm8k(gsm_dir, n_shot=0)[0].prompt == f"Question: {TEST[0][0]}\nAnswer:"
    with pytest.raises(UserError, match=r"n_shot=4 but the GSM8K train split has only 3"):
        load_gsm8k(gsm_dir, n_shot=4)


def test_single_file_source(gsm_dir: Path, tmp_path: Path) -> None:
    items = load_gsm8k(gsm_dir / "test.jsonl", n_shot=2, limit=1)
    assert len(items) == 1 and items[0].prompt.count("Question:") == 3
    alone = tmp_path / "alone"
    alone.mkdir()
    path = _write(alone / "mine.jsonl", TEST)
    assert load_gsm8k(path, n_shot=0)[1].task_id == "gsm8k/mine/1"
    with pytest.raises(UserError, match=r"n_shot=8 needs GSM8K's train.jsonl next to .*mine.jsonl"):
        load_gsm8k(path)


def test_row_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n\n"
                    + json.dumps({"question": "q2"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_gsm8k(path, n_shot=0)
    assert str(e.value) == f"{path}:3: missing field 'answer'"
    path.write_text(json.dumps({"question": 3, "answer": "#### 1"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"test.jsonl:1: field 'question' must be a string, got int"):
        load_gsm8k(path, n_shot=0)
    path.write_text(json.dumps({"question": "q", "answer": "none"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"test.jsonl:1: field 'answer' has no final number"):
        load_gsm8k(path, n_shot=0)


def test_source_errors(gsm_dir: Path) -> None:
    with pytest.raises(UserError, match=r"unknown GSM8K split 'dev' \(expected train, test\)"):
        load_gsm8k(gsm_dir, split="dev")
    (gsm_dir / "empty").mkdir()
    with pytest.raises(UserError, match=r"GSM8K file not found: .*empty/test.jsonl"):
        load_gsm8k(gsm_dir / "empty", n_shot=0)
    with pytest.raises(UserError, match=r"dataset path not found: .*nope.jsonl"):
        load_gsm8k(gsm_dir / "nope.jsonl")
    with pytest.raises(UserError, match=r"limit must be at least 1"):
        load_gsm8k(gsm_dir, limit=0)


def test_hub_id_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"'openai/gsm8k' needs the datasets package"):
        load_gsm8k()


def test_hub_reads_test_and_train(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str]] = []

    def load_dataset(name: str, config: str, *, split: str) -> list[dict[str, str]]:
        calls.append((name, config, split))
        rows = TRAIN if split == "train" else TEST
        return [{"question": q, "answer": a} for q, a in rows]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    items = load_gsm8k(n_shot=1)
    assert calls == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]
    assert items[0].prompt.startswith("Question: Ann") and items[0].task_id == "gsm8k/test/0"
    assert items[0].meta["where"] == "hub:openai/gsm8k[row 0]"


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data/gsm8k is absent")
def test_real_gsm8k() -> None:
    items = load_gsm8k(DATA)
    assert len(items) == 1319
    first_train = json.loads((DATA / "train.jsonl").open(encoding="utf-8").readline())
    assert items[0].prompt.startswith(f"Question: {first_train['question']}\nAnswer: ")
    assert items[0].prompt.count("\nAnswer:") == 9 and items[0].reference == "18"
    for it in items:
        assert answers_match(extract_answer(it.answer), it.reference)
        assert it.reference.lstrip("-").isdigit()  # every GSM8K final answer is an integer
        assert it.score(f"... so the answer is {it.reference}.")
