"""MBPP loader: upstream split ranges, the paper's prompt byte for byte, few-shot examples from
the prompt split, the sanitized variant, and row errors that name file:line and the field.
Dataset code is only ever read here, never run (the sandbox's suite validates references)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmforge.errors import UserError
from lmforge.tasks.mbpp import entry_point, load_mbpp, sft_conversations

HUB = "google-research-datasets/mbpp"
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mbpp"


def _row(task_id: int, name: str | None = None, **extra: Any) -> dict[str, Any]:
    name = name or f"f{task_id}"
    return {"text": f"Write {name}.", "code": f"def {name}(x):\r\n  return x + {task_id}",
            "task_id": task_id, "test_setup_code": "",
            "test_list": [f"assert {name}(0) == {task_id}", f"assert {name}(1) == {task_id + 1}"],
            "challenge_test_list": [], **extra}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# Prompt split 1-5, test 11-12, validation 511, train 601, and 975 (in no split); shuffled,
# since splits must come out in task_id order whatever the file order.
IDS = [12, 3, 1, 5, 2, 4, 11, 511, 601, 975]


@pytest.fixture
def mbpp_file(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "mbpp.jsonl", [_row(i) for i in IDS])


def _ids(items: list[Any]) -> list[int]:
    return [it.meta["task_id"] for it in items]


def test_splits_are_upstream_task_id_ranges(mbpp_file: Path) -> None:
    got = {s: _ids(load_mbpp(mbpp_file, split=s, n_shot=0))
           for s in ("prompt", "test", "validation", "train")}
    assert got == {"prompt": [1, 2, 3, 4, 5], "test": [11, 12], "validation": [511], "train": [601]}
    item = load_mbpp(mbpp_file, n_shot=0)[0]
    assert item.task_id == "mbpp/11" and item.meta["split"] == "test"
    assert item.meta["text"] == "Write f11." and item.stop == ("[DONE]",)
    assert item.meta["where"] == f"{mbpp_file}:7" and item.head == ""


def test_one_shot_prompt_is_the_papers_format(mbpp_file: Path) -> None:
    item = load_mbpp(mbpp_file, n_shot=1)[0]
    assert item.prompt == (
        "You are an expert Python programmer, and here is your task: Write f2. "
        "Your code should pass these tests:\n\n"
        "assert f2(0) == 2\nassert f2(1) == 3\n[BEGIN]\n"
        "def f2(x):\n  return x + 2\n[DONE]\n\n"
        "You are an expert Python programmer, and here is your task: Write f11. "
        "Your code should pass these tests:\n\n"
        "assert f11(0) == 11\nassert f11(1) == 12\n[BEGIN]\n")


def _shot_ids(prompt: str) -> list[int]:
    return [int(n) for n in re.findall(r"task: Write f(\d+)\.", prompt)[:-1]]


def test_few_shot_examples_come_from_the_prompt_split_in_harness_order(mbpp_file: Path) -> None:
    # Tasks 2, 3, 4 first (the paper's and the harnesses' three), task 1 last.
    assert _shot_ids(load_mbpp(mbpp_file, n_shot=3)[0].prompt) == [2, 3, 4]
    assert _shot_ids(load_mbpp(mbpp_file, split="train", n_shot=5)[0].prompt) == [2, 3, 4, 5, 1]
    # A prompt-split item is never its own example.
    own = load_mbpp(mbpp_file, split="prompt", n_shot=3)
    assert [_shot_ids(it.prompt) for it in own[:3]] == [[2, 3, 4], [3, 4, 5], [2, 4, 5]]
    assert load_mbpp(mbpp_file, n_shot=0)[0].prompt.startswith("You are an expert")


def test_more_shots_than_the_prompt_split_holds(mbpp_file: Path) -> None:
    with pytest.raises(UserError, match=r"n_shot=6 but the MBPP prompt split has only 5"):
        load_mbpp(mbpp_file, n_shot=6)
    with pytest.raises(UserError, match=r"n_shot=5 .* only 4"):
        load_mbpp(mbpp_file, split="prompt", n_shot=5)


def test_program_of_reference_layout(tmp_path: Path) -> None:
    row = _row(11, "area", test_setup_code="side = 2\r\n")
    row["test_list"][1] += "\n"  # as upstream task 847: a stray newline after an assert
    item = load_mbpp(_write_jsonl(tmp_path / "m.jsonl", [row]), n_shot=0)[0]
    assert item.reference == "def area(x):\n  return x + 11"  # CRLF -> LF
    assert item.entry_point == "area"
    assert item.tests == "side = 2\nassert area(0) == 11\nassert area(1) == 12"
    assert item.test_list == ("assert area(0) == 11", "assert area(1) == 12")
    program = item.program(item.reference)
    # the answer runs as module code inside the tests' function, then the setup, then the
    # asserts through the comparator, each with its own text as its message
    answer = repr("def area(x):\n  return x + 11")
    assert program.index("same, exact = ") < program.index(f'({answer}, "answer.py", "exec")')
    assert program.endswith("    side = 2\n"
                            "    assert same(area(0), 11), 'area(0) == 11'\n"
                            "    assert same(area(1), 12), 'area(1) == 12'\n")
    only = item.program(item.reference, only=1)
    assert "area(0)" not in only and only.endswith("    assert same(area(1), 12), 'area(1) == 12'\n")
    assert item.prompt.endswith("assert area(0) == 11\nassert area(1) == 12\n[BEGIN]\n")


def _sanitized(task_id: int) -> dict[str, Any]:
    return {"source_file": "nb.ipynb", "task_id": task_id, "prompt": f"Compute g{task_id}.",
            "code": f"import math\ndef g{task_id}(x):\n    return math.floor(x)",
            "test_imports": ["import math"],
            "test_list": [f"assert set([g{task_id}(1.5)]) == set([1])"]}


def test_sanitized_json_fields(tmp_path: Path) -> None:
    path = tmp_path / "sanitized-mbpp.json"
    path.write_text(json.dumps([_sanitized(i) for i in (2, 3, 11)]), encoding="utf-8")
    item = load_mbpp(tmp_path, sanitized=True, n_shot=2)[0]  # a directory: picks the file
    assert item.task_id == "mbpp/11" and item.meta["text"] == "Compute g11."
    assert item.tests == "import math\nassert set([g11(1.5)]) == set([1])"
    assert item.entry_point == "g11"  # not `set`, the first call in the assert
    assert _shot_ids(item.prompt.replace("Compute g", "Write f")) == [2, 3]
    assert item.meta["where"] == f"{path}[item 2]"
    # The file named directly is recognised by its fields, without sanitized=True.
    assert load_mbpp(path, n_shot=0)[0].tests == item.tests


def test_directory_without_the_expected_file(tmp_path: Path, mbpp_file: Path) -> None:
    with pytest.raises(UserError, match=r"has no sanitized-mbpp.json or sanitized-mbpp.jsonl"):
        load_mbpp(tmp_path, sanitized=True)
    assert len(load_mbpp(tmp_path, n_shot=0)) == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"test_list": None}, "missing field 'test_list'"),
    ({"test_list": "assert f(1)"}, "field 'test_list' must be a list of strings, got str"),
    ({"test_list": [1]}, "field 'test_list' must be a list of strings, got a list with a non-string"),
    ({"task_id": "12"}, "field 'task_id' must be an integer, got str"),
    ({"task_id": True}, "field 'task_id' must be an integer, got bool"),
    ({"code": 3}, "field 'code' must be a string, got int"),
    ({"test_setup_code": ["x"]}, "field 'test_setup_code' must be a string, got list"),
    ({"test_list": []}, "field 'test_list' is empty"),
])
def test_bad_row_names_file_line_and_field(tmp_path: Path, change: dict[str, Any],
                                           message: str) -> None:
    bad = {k: v for k, v in {**_row(12), **change}.items() if v is not None}
    path = tmp_path / "mbpp.jsonl"
    # Line 12: blank lines count, as an editor numbers them.
    path.write_text(json.dumps(_row(11)) + "\n" * 11 + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_mbpp(path, n_shot=0)
    assert str(e.value) == f"{path}:12: {message}"


def test_other_source_errors(tmp_path: Path, mbpp_file: Path) -> None:
    with pytest.raises(UserError, match=r"unknown MBPP split 'dev' \(expected prompt, test, "
                                        r"validation, train\)"):
        load_mbpp(mbpp_file, split="dev")
    dup = _write_jsonl(tmp_path / "dup.jsonl", [_row(11), _row(11)])
    with pytest.raises(UserError, match=re.escape(f"{dup}:2: duplicate task_id 11 (first at {dup}:1)")):
        load_mbpp(dup)
    with pytest.raises(UserError, match=r"dataset path not found: missing/mbpp.jsonl"):
        load_mbpp("missing/mbpp.jsonl")
    with pytest.raises(UserError, match=r"no MBPP rows in split 'validation'"):
        load_mbpp(_write_jsonl(tmp_path / "t.jsonl", [_row(11)]), split="validation")
    with pytest.raises(UserError, match=r"limit must be at least 1"):
        load_mbpp(mbpp_file, limit=0)
    assert _ids(load_mbpp(mbpp_file, n_shot=0, limit=1)) == [11]


def test_hub_id_without_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails, hermetically
    with pytest.raises(UserError, match=r"'google-research-datasets/mbpp' needs the datasets "
                                        r"package: pip install 'lmforge\[data\]'"):
        load_mbpp()


def test_hub_reads_the_split_and_the_prompt_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str]] = []

    def load_dataset(name: str, config: str, *, split: str) -> list[dict[str, Any]]:
        calls.append((name, config, split))
        make = _sanitized if config == "sanitized" else _row
        return [make(2), make(3)] if split == "prompt" else [make(700)]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    item = load_mbpp(sanitized=True, n_shot=2)[0]
    assert calls == [(HUB, "sanitized", "test"), (HUB, "sanitized", "prompt")]
    # The hub's own split names decide membership: task 700 is in "test" because the hub says so.
    assert item.task_id == "mbpp/700" and item.meta["where"] == f"hub:{HUB}[row 0]"
    assert item.prompt.count("[DONE]") == 2
    calls.clear()
    load_mbpp(split="train", n_shot=0)
    assert calls == [(HUB, "full", "train")]


def test_entry_point_prefers_a_defined_function() -> None:
    assert entry_point("def helper(): pass\ndef main_fn(x): pass",
                       ["assert sorted(main_fn(3)) == [1]"]) == "main_fn"
    assert entry_point("class Pair: pass\ndef max_chain(p, n): pass",
                       ["assert max_chain([Pair(5, 24)], 1) == 1"]) == "max_chain"
    assert entry_point("not python (", ["assert set(fn(1)) == {1}"]) == "fn"


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data/mbpp is absent")
def test_real_mbpp_split_sizes_and_items() -> None:
    sizes = {s: len(load_mbpp(DATA, split=s, n_shot=0))
             for s in ("prompt", "test", "validation", "train")}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    items = load_mbpp(DATA)
    assert items[0].prompt.count("[DONE]") == 3 and items[0].task_id == "mbpp/11"
    assert "def similar_elements" in items[0].prompt and "\r" not in items[0].prompt
    for it in items:
        assert it.entry_point and f"{it.entry_point}(" in it.tests
        assert "\r" not in it.reference


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data/mbpp is absent")
def test_real_sanitized_split_sizes() -> None:
    sizes = {s: len(load_mbpp(DATA, split=s, sanitized=True, n_shot=0))
             for s in ("prompt", "test", "validation", "train")}
    # The sizes of the hub's "sanitized" config, which splits by the same ranges.
    assert sizes == {"prompt": 7, "test": 257, "validation": 43, "train": 120}
    item = next(it for it in load_mbpp(DATA, sanitized=True) if it.task_id == "mbpp/82")
    assert item.tests.startswith("import math\nassert ")


def test_sft_conversation_is_what_the_chat_eval_sends_then_the_reference(
        mbpp_file: Path, chat_tok: Any) -> None:
    """Trained on these tokens, a model sees exactly the eval's zero-shot chat prompt as its
    context and learns to end the reference with the end-of-turn token the eval stops at."""
    from lmforge.chat import install_format, render, resolve_format
    from lmforge.config import EvalCfg
    from lmforge.data.chat_rows import Conversation
    from lmforge.eval.harness import Generator
    from lmforge.stages.eval import load_items
    from tests.conftest import micro_llama

    item = load_items("mbpp", EvalCfg(sources={"mbpp": str(mbpp_file)}, split="train", n_shot=0))[0]
    convs = sft_conversations(mbpp_file)
    assert convs == [Conversation(({"role": "user", "content": item.prompt},
                                   {"role": "assistant", "content": "def f601(x):\n  return x + 601"}),
                                  f"{mbpp_file}:9")]
    assert [c.source for c in sft_conversations(mbpp_file, split="validation")] == [f"{mbpp_file}:8"]
    install_format(chat_tok, resolve_format(chat_tok, "lmforge"))
    gen = Generator(micro_llama(vocab=len(chat_tok)), chat_tok)
    sent = gen.prompt_ids(item.prompt, item.head)
    r = render(chat_tok, [list(convs[0].messages)])[0]
    assert gen.chat and r.ids[:len(sent)] == sent and not any(r.loss_mask[:len(sent)])
    n = sum(r.loss_mask)
    assert r.loss_mask[len(sent):len(sent) + n] == [1] * n  # the answer follows the prompt
    answer = r.ids[len(sent):len(sent) + n]
    assert chat_tok.decode(answer[:-1]) == item.reference
    assert chat_tok.convert_ids_to_tokens(answer[-1]) == "<|end|>" and answer[-1] in gen.stop_ids


def test_sft_conversations_refuse_what_cannot_be_trained(tmp_path: Path) -> None:
    empty = _write_jsonl(tmp_path / "mbpp.jsonl", [_row(601), _row(602, code=" \r\n")])
    with pytest.raises(UserError) as e:
        sft_conversations(empty)
    assert str(e.value) == f"{empty}:2: field 'code' is empty"
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "hi", "completion": "there"}])
    with pytest.raises(UserError, match=re.escape(f"{chat}:1: missing field 'task_id'")):
        sft_conversations(chat)
    assert len(sft_conversations(_write_jsonl(tmp_path / "t.jsonl", [_row(601), _row(602)]),
                                 limit=1)) == 1
