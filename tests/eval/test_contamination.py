"""N-gram contamination on hand-built cases: every count and fraction below is worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import UserError
from lmforge.eval.contamination import (
    ContaminationReport,
    SetReport,
    build_index,
    doc_is_contaminated,
    eval_texts_from_file,
    format_report,
    ngrams,
    normalize_words,
    scan,
    window_hashes,
)

ITEM = [f"w{i}" for i in range(20)]  # 20 distinct words: 8 distinct 13-grams (starts 0..7)


def span(lo: int, hi: int, words: list[str] = ITEM) -> str:
    """words[lo:hi] between unrelated filler, so a match cannot lean on the doc's edges."""
    return "filler before " + " ".join(words[lo:hi]) + " filler after"


def only(report: ContaminationReport, name: str = "s") -> SetReport:
    return next(s for s in report.sets if s.name == name)


# --------------------------------------------------------------------------- normalisation


def test_normalisation_is_case_punctuation_and_layout_blind() -> None:
    assert normalize_words("Hello, WORLD!\n\tsnake_case x2 -- don't") == [
        "hello", "world", "snake_case", "x2", "don", "t"]
    assert normalize_words("ＡＢＣ １２") == ["abc", "12"]  # NFKC folds full-width forms
    assert normalize_words("Straße") == normalize_words("STRASSE")  # casefold, not lower
    assert ngrams("A b, C d", 2) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert ngrams("a b", 3) == []


def test_window_hashes_depend_on_content_and_order_only() -> None:
    words = "a b c a b c d".split()
    h = window_hashes(words, 3)
    assert h.dtype == np.uint64 and len(h) == 5
    assert h[0] == h[3] and h[0] != h[1]  # "a b c" twice, "b c a" differs
    assert window_hashes(["x", "y"], 2)[0] != window_hashes(["y", "x"], 2)[0]
    assert len(window_hashes(words, 8)) == 0
    rng = np.random.default_rng(0)
    many = [f"t{i}" for i in rng.integers(0, 50, size=100_000)]  # 50 words: repeats galore
    hashes = window_hashes(many, 13)
    distinct = len({tuple(many[i : i + 13]) for i in range(len(many) - 12)})
    assert len(np.unique(hashes)) == distinct  # no collision among ~10^5 distinct windows


# --------------------------------------------------------------------------- detection


def test_13_words_are_detected_12_are_not() -> None:
    ev = {"s": [("item", " ".join(ITEM))]}
    report = scan([("hit", span(3, 16)), ("miss", span(3, 15))], ev)
    hit = only(report).contaminated
    assert [h.item_id for h in hit] == ["item"]
    assert hit[0].train_docs == ["hit"] and hit[0].n_train_docs == 1
    assert (hit[0].shared_ngrams, hit[0].item_ngrams, hit[0].fraction) == (1, 8, 1 / 8)
    assert hit[0].example == " ".join(ITEM[3:16])
    assert [d.doc_id for d in report.docs] == ["hit"]
    index = build_index(ev)
    assert doc_is_contaminated(span(3, 16), index)
    assert not doc_is_contaminated(span(3, 15), index)
    assert not doc_is_contaminated("", index)
    assert index.matching_items(span(3, 16)).tolist() == [0]
    assert index.keys.dtype == np.uint64 and len(index.keys) == 8


def test_case_and_punctuation_do_not_hide_a_copy() -> None:
    ev = {"s": [("item", " ".join(ITEM))]}
    mangled = "# " + ",\n    ".join(w.upper() for w in ITEM[0:13]) + "!!!"
    assert doc_is_contaminated(mangled, build_index(ev))
    glued = " ".join(ITEM[0:6]) + "-" + " ".join(ITEM[6:13])  # a hyphen splits words too
    assert doc_is_contaminated(glued, build_index(ev))
    # but a word actually changed is a different n-gram
    assert not doc_is_contaminated(" ".join([*ITEM[0:6], "w6x", *ITEM[7:13]]), build_index(ev))


def test_counts_and_fractions_by_hand() -> None:
    # d1: words 0..13 -> 13-grams starting at 0, 1; d2: words 5..19 -> 5, 6, 7;
    # d3: words 0..12 -> 0 again (already found); d4: nothing.
    docs = [("d1", span(0, 14)), ("d2", span(5, 20)), ("d3", span(0, 13)), ("d4", "unrelated")]
    report = scan(docs, {"s": [("item", " ".join(ITEM)), ("clean", " ".join(f"v{i}" for i in range(30)))]},
                  max_doc_ids=2)
    s = only(report)
    (hit,) = s.contaminated
    assert hit.shared_ngrams == 5 and hit.item_ngrams == 8 and hit.fraction == 5 / 8
    assert hit.train_docs == ["d1", "d2"] and hit.n_train_docs == 3  # ids capped, count not
    assert hit.example == " ".join(ITEM[0:13])  # the first shared n-gram in reading order
    assert (s.items, s.checked, s.too_short, len(s.contaminated), s.fraction) == (2, 2, 0, 1, 0.5)
    assert report.train_docs == 4
    assert [d.doc_id for d in report.docs] == ["d1", "d2", "d3"]


def test_repeated_ngrams_count_once() -> None:
    # 14 copies of one word: two 13-word windows, both the same n-gram
    report = scan([("d", "x " * 13)], {"s": [("rep", "x " * 14)]})
    (hit,) = only(report).contaminated
    assert (hit.shared_ngrams, hit.item_ngrams, hit.fraction) == (1, 1, 1.0)


def test_short_items_whole_or_too_short() -> None:
    nine = " ".join(f"s{i}" for i in range(9))  # >= min_words=8: the whole item is one n-gram
    seven = " ".join(f"t{i}" for i in range(7))  # < 8: not checked
    ev = {"s": [("nine", nine), ("seven", seven), ("empty", "  ...  "), ("long", " ".join(ITEM))]}
    docs = [("all9", f"Intro: {nine.upper()}."), ("first8", " ".join(nine.split()[:8])),
            ("has7", f"{seven} and more words here to be long enough for thirteen")]
    s = only(scan(docs, ev))
    assert (s.items, s.too_short, s.checked) == (4, 2, 2)
    (hit,) = s.contaminated
    assert (hit.item_id, hit.train_docs, hit.item_ngrams, hit.fraction) == ("nine", ["all9"], 1, 1.0)
    assert hit.example == nine
    assert s.fraction == 1 / 2  # of the checked items, not of all four
    # min_words is a knob: at 10, the nine-word item is too short as well
    assert only(scan(docs, ev, min_words=10)).too_short == 3


def test_report_names_the_right_docs_across_sets() -> None:
    other = [f"o{i}" for i in range(13)]
    ev = {"a": [("a1", " ".join(ITEM)), ("a2", " ".join(f"q{i}" for i in range(40)))],
          "b": [("b1", " ".join(other)), ("b2", " ".join(ITEM[7:20]))]}
    docs = [("x", span(7, 20)),  # a1's last 13-gram, which is all of b2
            ("y", " ".join(other) + " " + " ".join(ITEM[:13])),  # b1 and a1's first
            ("z", " ".join(f"q{i}" for i in range(12)))]  # 12 words of a2
    report = scan(docs, ev)
    assert {h.item_id: h.train_docs for h in only(report, "a").contaminated} == {"a1": ["x", "y"]}
    assert {h.item_id: h.train_docs for h in only(report, "b").contaminated} == {
        "b1": ["y"], "b2": ["x"]}
    assert {d.doc_id: d.items for d in report.docs} == {
        "x": {"a": ["a1"], "b": ["b2"]}, "y": {"a": ["a1"], "b": ["b1"]}}
    a1 = only(report, "a").contaminated[0]
    assert (a1.shared_ngrams, a1.item_ngrams) == (2, 8)  # starts 7 (from x) and 0 (from y)

    data = json.loads(json.dumps(report.to_json()))
    assert data["sets"]["a"]["contaminated"] == 1 and data["sets"]["a"]["fraction"] == 0.5
    assert data["sets"]["b"]["contaminated_items"][0]["item_id"] == "b1"
    table = format_report(report)
    assert "a1" in table and "b2" in table and "50.0%" in table and "100.0%" in table


def test_nothing_to_check_is_not_an_error() -> None:
    report = scan([("d", "anything at all")], {"s": [("tiny", "two words")], "none": []})
    assert only(report).too_short == 1 and only(report).fraction == 0.0
    assert only(report, "none").items == 0
    assert "none" in format_report(report)
    with pytest.raises(ValueError):
        build_index({}, n=0)


# --------------------------------------------------------------------------- evaluation files


def write(path: Path, rows: list[object], jsonl: bool = True) -> Path:
    body = "\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows)
    path.write_text(body, encoding="utf-8")
    return path


def test_eval_file_default_fields_and_ids(tmp_path: Path) -> None:
    he = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
          "test": "assert f(1) == 1", "entry_point": "f"}
    gsm = {"question": "How many?", "answer": "Two. #### 2"}
    mbpp = {"task_id": 11, "text": "Write f.", "code": "def f(): pass", "test_list": ["assert a", "assert b"],
            "test_setup_code": ""}
    path = write(tmp_path / "mixed.jsonl", [he, gsm, mbpp])
    assert eval_texts_from_file(path) == [
        ("HumanEval/0", "def f(x):\n\n\n    return x\n\n\nassert f(1) == 1"),  # no entry_point
        ("mixed.jsonl:2", "How many?\n\nTwo. #### 2"),
        ("11", "Write f.\n\ndef f(): pass\n\nassert a\nassert b"),
    ]
    only_he = write(tmp_path / "he.jsonl", [he])
    assert eval_texts_from_file(only_he, fields=["test", "prompt"]) == [
        ("HumanEval/0", "assert f(1) == 1\n\ndef f(x):\n")]  # in the order named
    as_json = write(tmp_path / "gsm.json", [gsm, gsm], jsonl=False)
    assert [i for i, _ in eval_texts_from_file(as_json)] == ["gsm.json[0]", "gsm.json[1]"]


@pytest.mark.parametrize(
    ("name", "body", "fields", "message"),
    [
        ("a.jsonl", '{"text": "ok"}\n{"text": oops}\n', None, "a.jsonl:2: invalid JSON"),
        ("a.jsonl", '{"text": "ok"}\n\n["x"]\n', None, "a.jsonl:3: expected a JSON object, got list"),
        ("a.jsonl", '{"text": "ok", "n": 3}\n', ["n"], "a.jsonl:1: field 'n' must be a string"),
        ("a.jsonl", '{"text": "ok"}\n', ["prompt"], "a.jsonl:1: missing field 'prompt' (keys: text)"),
        ("a.jsonl", '{"label": "ok"}\n', None, "a.jsonl:1: no content field"),
        ("a.json", '{"text": "ok"}', None, "a.json: expected a JSON list of objects, got dict"),
        ("a.json", '[\n{"text": "ok"},\n{oops}]', None, "a.json:3: invalid JSON"),
        ("a.csv", "text\nok\n", None, "must be .jsonl or .json"),
    ],
)
def test_eval_file_errors_name_file_and_line(
    tmp_path: Path, name: str, body: str, fields: list[str] | None, message: str
) -> None:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    with pytest.raises(UserError) as err:
        eval_texts_from_file(path, fields)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_missing_eval_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="evaluation file not found: .*nope.jsonl"):
        eval_texts_from_file(tmp_path / "nope.jsonl")
