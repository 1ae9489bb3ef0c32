"""SFT rows -> conversations: exact messages per format, exact locations in every error."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from lmforge.data.chat_rows import (
    REASONS,
    Conversation,
    InvalidRow,
    RowStats,
    load_conversations,
    to_conversation,
)
from lmforge.errors import UserError

SYS = {"role": "system", "content": "Be brief."}
Q = {"role": "user", "content": "2+2?"}
A = {"role": "assistant", "content": "4"}
GOOD_MSG = {"messages": [Q, A]}


def _jsonl(tmp_path: Path, lines: list[Any], name: str = "train.jsonl") -> Path:
    """Write rows (dicts as JSON, strings verbatim) one per line."""
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


# ---- formats -----------------------------------------------------------------------------


def test_messages_format_exact(tmp_path: Path) -> None:
    row = {"messages": [SYS, Q, A, {"role": "user", "content": "and 3+3?", "name": "x"},
                        {"role": "assistant", "content": "6"}], "id": 7}
    convs, stats = load_conversations(_jsonl(tmp_path, [row]))
    assert convs == [Conversation(
        (SYS, Q, A, {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}),
        f"{tmp_path / 'train.jsonl'}:1")]
    assert stats == RowStats(rows=1, kept=1, skipped={}, format="messages")


def test_conversations_key_is_messages(tmp_path: Path) -> None:
    convs, stats = load_conversations(_jsonl(tmp_path, [{"conversations": [Q, A]}]))
    assert convs[0].messages == (Q, A)
    assert stats.format == "messages"


def test_prompt_completion_exact(tmp_path: Path) -> None:
    rows = [{"prompt": "2+2?", "completion": "4"},
            {"prompt": "2+2?", "completion": "4", "system": "Be brief."},
            {"prompt": "2+2?", "completion": "4", "system": ""}]
    convs, stats = load_conversations(_jsonl(tmp_path, rows))
    assert [c.messages for c in convs] == [(Q, A), (SYS, Q, A), (Q, A)]
    assert stats.format == "prompt_completion"


def test_alpaca_exact(tmp_path: Path) -> None:
    rows = [{"instruction": "Add.", "input": "2+2", "output": "4"},
            {"instruction": "Add 2+2.", "input": "", "output": "4"},
            {"instruction": "Add 2+2.", "output": "4", "system": "Be brief."},
            {"instruction": "Add 2+2.", "input": None, "output": "4"}]
    convs, stats = load_conversations(_jsonl(tmp_path, rows))
    assert [c.messages for c in convs] == [
        ({"role": "user", "content": "Add.\n\n2+2"}, A),
        ({"role": "user", "content": "Add 2+2."}, A),
        (SYS, {"role": "user", "content": "Add 2+2."}, A),
        ({"role": "user", "content": "Add 2+2."}, A),
    ]
    assert stats.format == "alpaca"


def test_content_is_kept_verbatim(tmp_path: Path) -> None:
    row = {"prompt": "  hi\n", "completion": " ok \u2028 done\n"}
    convs, _ = load_conversations(_jsonl(tmp_path, [row]))
    assert convs[0].messages[1]["content"] == " ok \u2028 done\n"


def test_to_conversation_direct() -> None:
    conv = to_conversation({"prompt": "2+2?", "completion": "4"}, "prompt_completion", "x:1")
    assert conv == Conversation((Q, A), "x:1")
    with pytest.raises(InvalidRow) as e:
        to_conversation({"prompt": "2+2?", "completion": " "}, "prompt_completion", "x:1")
    assert e.value.reason == "empty assistant message"
    assert str(e.value) == "x:1: completion = ' ': empty assistant message"


# ---- detection ---------------------------------------------------------------------------


def test_auto_detects_from_first_object_row(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, ["{oops", {"instruction": "i", "output": "o"}], "a.jsonl")
    _, stats = load_conversations(path, skip_invalid=True)
    assert stats.format == "alpaca"
    assert stats.skipped == {"invalid json": 1}


def test_unknown_keys_name_line_keys_found_and_expected(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, ["", {"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as e:
        load_conversations(path)
    assert str(e.value) == (
        f"{path}:2: no known chat format: keys found: answer, question; "
        "expected messages (or conversations) | prompt, completion | instruction, output")


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"messages": [Q, A], "prompt": "p", "completion": "c"}])
    convs, stats = load_conversations(path, "prompt_completion")
    assert convs[0].messages == ({"role": "user", "content": "p"}, {"role": "assistant", "content": "c"})
    assert stats.format == "prompt_completion"


def test_unknown_format_name() -> None:
    with pytest.raises(UserError, match="unknown chat row format 'sharegpt'"):
        load_conversations("whatever.jsonl", "sharegpt")  # type: ignore[arg-type]


# ---- every invalid reason, with its exact location and field ------------------------------


@pytest.mark.parametrize(("row", "fmt", "expected"), [
    ("{not json", "auto", ":2: invalid JSON (Expecting property name enclosed in double quotes"),
    ("[1, 2]", "auto", ":2: not an object (expected a JSON object, got list)"),
    ({"messages": [Q, {"role": "bot", "content": "x"}]}, "auto",
     ":2: messages[1].role = 'bot': unknown role (expected system, user, assistant)"),
    ({"messages": [Q, SYS, A]}, "auto",
     ":2: messages[1].role = 'system': misplaced system message (only the first message may be system)"),
    ({"messages": [SYS, Q]}, "auto", ":2: messages: no assistant message (roles: system, user)"),
    ({"messages": []}, "auto", ":2: messages: no assistant message (roles: none)"),
    ({"messages": [Q, {"role": "assistant", "content": " \n"}]}, "auto",
     ":2: messages[1].content = ' \\n': empty assistant message"),
    ({"messages": [Q, {"role": "assistant"}]}, "auto",
     ":2: messages[1].content: missing field (keys found: role)"),
    ({"messages": [Q, {"role": "assistant", "content": None}]}, "auto",
     ":2: messages[1].content: missing field (keys found: content, role)"),
    ({"messages": [Q, {"role": "assistant", "content": [{"type": "text"}]}]}, "auto",
     ":2: messages[1].content: wrong type (expected a string, got list)"),
    ({"messages": [Q, {"role": 3, "content": "x"}]}, "auto",
     ":2: messages[1].role: wrong type (expected a string, got int)"),
    ({"messages": [Q, "hi"]}, "auto", ":2: messages[1]: wrong type (expected an object, got str)"),
    ({"messages": "hi"}, "auto", ":2: messages: wrong type (expected a list of messages, got str)"),
    ({"prompt": "p"}, "auto", ":2: messages: missing field (keys found: prompt)"),
    ({"prompt": "p"}, "prompt_completion", ":2: completion: missing field (keys found: prompt)"),
    ({"prompt": 1, "completion": "c"}, "prompt_completion",
     ":2: prompt: wrong type (expected a string, got int)"),
    ({"prompt": "p", "completion": "c", "system": 0}, "prompt_completion",
     ":2: system: wrong type (expected a string, got int)"),
    ({"instruction": "i", "output": ""}, "alpaca", ":2: output = '': empty assistant message"),
    ({"instruction": "i", "input": ["x"], "output": "o"}, "alpaca",
     ":2: input: wrong type (expected a string, got list)"),
])
def test_invalid_row_message(tmp_path: Path, row: Any, fmt: str, expected: str) -> None:
    if fmt in ("prompt_completion", "alpaca"):
        good = ({"prompt": "p", "completion": "c"} if fmt == "prompt_completion"
                else {"instruction": "i", "output": "o"})
        path = _jsonl(tmp_path, [good, row])
    else:
        path = _jsonl(tmp_path, [GOOD_MSG, row])
    with pytest.raises(UserError) as e:
        load_conversations(path, fmt)  # type: ignore[arg-type]
    message = str(e.value)
    assert message.startswith(f"{path}{expected}")
    assert "\n" not in message
    assert isinstance(e.value, InvalidRow) and e.value.reason in REASONS


def test_every_reason_is_exercised() -> None:
    """The table above covers every documented reason (keeps REASONS and tests in step)."""
    covered = {"invalid json", "not an object", "unknown role", "misplaced system message",
               "no assistant message", "empty assistant message", "missing field", "wrong type"}
    assert covered == set(REASONS)


# ---- skip_invalid, limit -----------------------------------------------------------------


def test_skip_invalid_counts_each_reason(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [
        GOOD_MSG, "{bad", "", {"messages": [{"role": "bot", "content": "x"}, A]},
        {"prompt": "p", "completion": "c"}, {"messages": [Q]}, "7", GOOD_MSG,
    ])
    convs, stats = load_conversations(path, skip_invalid=True)
    assert [c.source for c in convs] == [f"{path}:1", f"{path}:8"]
    assert stats == RowStats(rows=7, kept=2, format="messages", skipped={
        "invalid json": 1, "unknown role": 1, "missing field": 1,
        "no assistant message": 1, "not an object": 1})


def test_skip_invalid_two_good_one_bad_json_one_unknown_role(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [GOOD_MSG, "{", {"messages": [{"role": "bot", "content": "x"}, A]},
                             GOOD_MSG])
    convs, stats = load_conversations(path, skip_invalid=True)
    assert stats.kept == len(convs) == 2
    assert stats.skipped == {"invalid json": 1, "unknown role": 1}


def test_all_invalid_still_raises_naming_first_reason(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, ["{", {"messages": [Q]}])
    with pytest.raises(UserError) as e:
        load_conversations(path, skip_invalid=True)
    assert str(e.value) == (
        f"{path}: no valid rows (invalid json 1, no assistant message 1); "
        f"first: {path}:1: invalid JSON (Expecting property name enclosed in double quotes at column 2)")


def test_all_unknown_keys_with_skip_invalid_names_keys(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"q": 1}, {"q": 2}])
    with pytest.raises(UserError, match=r":1: no known chat format: keys found: q; expected"):
        load_conversations(path, skip_invalid=True)


def test_empty_file_raises(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, ["", "  "])
    with pytest.raises(UserError, match=r"train\.jsonl: no rows$"):
        load_conversations(path)


def test_limit_counts_kept_rows(tmp_path: Path) -> None:
    rows = [{"prompt": str(i), "completion": "c"} for i in range(5)]
    path = _jsonl(tmp_path, [rows[0], "{", *rows[1:]])
    convs, stats = load_conversations(path, skip_invalid=True, limit=3)
    assert [c.messages[0]["content"] for c in convs] == ["0", "1", "2"]
    assert stats == RowStats(rows=4, kept=3, skipped={"invalid json": 1}, format="prompt_completion")
    with pytest.raises(UserError, match="limit must be at least 1"):
        load_conversations(path, limit=0)


# ---- sources -----------------------------------------------------------------------------


def test_json_list_names_items(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD_MSG, {"messages": [Q, {"role": "bot", "content": "x"}]}]))
    with pytest.raises(UserError) as e:
        load_conversations(path)
    assert str(e.value).startswith(f"{path}[item 1]: messages[1].role = 'bot': unknown role")
    convs, stats = load_conversations(path, skip_invalid=True)
    assert [c.source for c in convs] == [f"{path}[item 0]"]
    assert stats.skipped == {"unknown role": 1}


def test_json_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [GOOD_MSG]}))
    with pytest.raises(UserError, match=r"rows\.json: expected a JSON list of rows, got dict with keys data$"):
        load_conversations(path)


def test_jsonl_saved_as_json_gets_a_hint(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [GOOD_MSG, GOOD_MSG], "rows.json")
    with pytest.raises(UserError, match=r"rows\.json:2: invalid JSON \(Extra data .*name it \.jsonl\)"):
        load_conversations(path)


def test_directory_reads_sorted_files(tmp_path: Path) -> None:
    _jsonl(tmp_path, [{"prompt": "b", "completion": "c"}], "b.jsonl")
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "a", "completion": "c"}]))
    (tmp_path / "notes.txt").write_text("ignored")
    convs, stats = load_conversations(tmp_path)
    assert [c.source for c in convs] == [f"{tmp_path / 'a.json'}[item 0]", f"{tmp_path / 'b.jsonl'}:1"]
    assert stats.rows == 2


def test_bom_is_dropped_and_bad_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_MSG).encode() + b"\n")
    convs, _ = load_conversations(path)
    assert convs[0].messages == (Q, A)
    path.write_bytes(b'{"prompt": "\xff", "completion": "c"}\n')
    with pytest.raises(UserError, match=r"bom\.jsonl: not valid UTF-8$"):
        load_conversations(path)


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(UserError, match=r"unsupported file type '\.csv'"):
        load_conversations(path)


@pytest.mark.parametrize("spec", ["data/train.jsonl", "train.json", "./x", "/nope/data"])
def test_missing_local_path_is_not_found(spec: str, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"^dataset path not found: {spec}$"):
        load_conversations(spec)


def test_hub_without_datasets_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError) as e:
        load_conversations("owner/name")
    assert str(e.value) == ("loading hub dataset 'owner/name' needs the datasets package: "
                            "pip install 'lmforge[data]'")


def test_hub_rows_via_load_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> list[dict[str, Any]]:
        calls.append((name, split))
        if split == "nope":
            raise ValueError('Unknown split "nope". Should be one of [\'train\'].\nmore')
        return [{"instruction": "i", "input": None, "output": "o"},
                {"instruction": "i", "input": None, "output": " "}]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match=r"^hub:owner/name\[row 1\]: output = ' ': empty assistant"):
        load_conversations("owner/name", split="test")
    convs, stats = load_conversations("owner/name", split="test", skip_invalid=True)
    assert convs == [Conversation(({"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}),
                                  "hub:owner/name[row 0]")]
    assert stats.skipped == {"empty assistant message": 1}
    assert calls[0] == ("owner/name", "test")
    with pytest.raises(UserError, match=r"^hub dataset 'owner/name' split 'nope': Unknown split \"nope\"\. Should be one of \['train'\]\.$"):
        load_conversations("owner/name", split="nope")
