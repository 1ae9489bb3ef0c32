"""lmforge synth self-instruct: the parsing and filters worked by hand; one scripted round
through an OpenAI-compatible endpoint and through a local model's generation path, every
count worked out below and equal between the two; the shipped seeds' code really passes in
the sandbox; the run dir read by `lmforge sft`; a wrong model name, bad settings and a bad
seed file said in one line (a refused endpoint: tests/test_writer.py)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmforge import sandbox
from lmforge.chat import BUILTINS
from lmforge.config import SelfInstructCfg, load_config
from lmforge.data.chat_rows import load_conversations
from lmforge.endpoint import Choice
from lmforge.errors import UserError
from lmforge.io import read_jsonl
from lmforge.models import save_hf
from lmforge.stages import run_stage
from lmforge.stages import self_instruct as si
from tests.conftest import ROOT, make_chat_tokenizer
from tests.fake_openai import MODEL, script_local_model, scripted_server

TINY = ROOT / "configs/self_instruct/tiny.yaml"
CFG = load_config(SelfInstructCfg, TINY, [])


# --------------------------------------------------------------------------- pure parts


def test_prompt_and_parsing_worked_by_hand() -> None:
    assert si.instruction_prompt(["Add  two\nnumbers.", "Sort a list."]) == (
        "Come up with a series of tasks:\n\nTask 1: Add two numbers.\nTask 2: Sort a list.\nTask 3:")
    # a base model continues after "Task 3:"; a chat model often repeats the marker first
    reply = " Reverse a string.\nTask 4: Count vowels.\n**Task 5.** Merge two lists\n6) Hi there"
    assert si.parse_instructions(Choice(reply, cut=False)) == (
        ["Reverse a string.", "Count vowels.", "Merge two lists", "Hi there"], None)
    assert si.parse_instructions(Choice("Task 3: Reverse a string.\nTask 4: Count", cut=True)) == (
        ["Reverse a string."], "Count")  # the cut reply's last task is half a sentence
    assert si.parse_instructions(Choice("  \n", cut=False)) == ([], None)


@pytest.mark.parametrize("text, why", [
    ("Sort it.", "too short"),  # 2 words < min_words 3
    (" ".join(["word"] * 151), "too long"),
    ("Draw a map of the town.", "blocked word"),
    ("Describe this video in detail.", "blocked word"),
    ("Explain the mapping of keys.", None),  # "map" only as a whole word
    ("?Why is the sky blue", "starts with punctuation"),
    ("Écris une fonction Python.", "starts with a non-ASCII character"),
    ("Write a function that sorts a list.", None),
])
def test_instruction_filters(text: str, why: str | None) -> None:
    cfg = load_config(SelfInstructCfg, None, ["min_words=3"])
    assert si.instruction_problem(text, cfg) == why


def test_code_in_answers_parses_never_runs() -> None:
    fenced = "Here:\n```python\nx = 1\n```\nand\n```\nassert x == 1\n```"
    assert si.code_in(fenced) == "x = 1\nassert x == 1"
    assert si.code_in("def f():\n    return 1") == "def f():\n    return 1"
    assert si.code_in("print('hi')") == "print('hi')"  # a call does something
    assert si.code_in("Paris") is None  # valid Python, but a bare name is prose
    assert si.code_in("The answer is 4.") is None
    broken = "def tally(xs):\n    xs = min(xs(xs)\n    return xs"  # opens like code: it is code
    assert si.code_in(broken) == broken and not si.has_assert(broken)
    assert si.code_in("Define a word.") is None  # "Define" is not "def"
    assert si.has_assert("assert f(1) == 2") and not si.has_assert("def f(): pass")
    assert not si.has_assert("def (:")


def test_pick_shots_mixes_seeds_and_machine_tasks() -> None:
    seeds, gen = [f"s{i}" for i in range(10)], ["g0", "g1", "g2"]
    for seed in range(20):
        shots = si.pick_shots(random.Random(seed), seeds, gen, 8, 2)
        assert len(shots) == len(set(shots)) == 8
        assert sum(s.startswith("g") for s in shots) == 2
    assert sorted(si.pick_shots(random.Random(0), seeds[:6], [], 8, 2)) == seeds[:6]


def test_new_instructions_join_the_pool_at_once() -> None:
    """Two copies in one reply: the second is a duplicate; an empty reply counted as such."""
    from lmforge.data.dedup import RougePool

    pool, drops = RougePool(), si.Drops()
    pool.add("Write a function that sorts a list.")
    replies = [Choice("Count the vowels in a word.\nTask 2: count the vowels in a word.", False),
               Choice("", False)]
    found, parsed = si.new_instructions(CFG, replies, pool, drops, 1)
    assert [t for t, _ in found] == ["Count the vowels in a word."] and parsed == 2
    assert drops.counts == {"instruction: duplicate": 1, "instruction: empty reply": 1}
    assert pool.texts[-1] == "Count the vowels in a word."


def test_shipped_seed_answers_pass_in_the_sandbox() -> None:
    """Every shipped seed answer with code runs to its end with its asserts: the examples the
    model copies from are right."""
    tasks = si.load_seeds(CFG)
    codes = [c for c in (si.code_in(t.answer) for t in tasks) if c is not None]
    assert len(tasks) == 20 and len(codes) >= 15 and all(si.has_assert(c) for c in codes)
    results = sandbox.run_many(codes, sandbox.Limits(timeout_s=10), workers=2)
    assert [r.status for r in results] == ["passed"] * len(codes)


# --------------------------------------------------------------------------- one scripted round

CUT = " ".join(["on"] * 2000)  # a task too long for any limit: always cut, in words or tokens
TASKS = (" Write a function that doubles every number in a list.\n"
         "Task 6: Write a Python function that doubles each number in a list.\n"
         "Task 7: Draw a picture of a cat.\n"
         "Task 8: Hi.\n"
         "Task 9: ?What is this\n"
         "Task 10: Write a Python function add_one(xs) that adds one to each item.\n"
         "Task 11: Reverse the order of characters in text with Python code.\n"
         "Task 12: Explain why the sky is blue to a child.\n"
         f"Task 13: Write {CUT}")
ANSWERS = {
    "doubles every": "```python\ndef double(xs):\n    return [2 * x for x in xs]\n```",
    "add_one": "```python\ndef add_one(xs):\n    return [x + 1 for x in xs]\n\nassert add_one([1]) == [3]\n```",
    "order of characters": "```python\ndef rev(s):\n    return s[::-1]\n\nassert rev('ab') == 'ba'\n```",
    "sky is blue": "Sunlight scatters off the air, and blue light scatters the most.",
}


def brain(shown: str) -> str:
    if "Come up with a series of tasks" in shown:
        return TASKS
    return next(a for k, a in ANSWERS.items() if k in shown)


# Per reply, in order: new; near-duplicate of the first (ROUGE-L 2*9/(11+10) = 0.857: LCS
# "write a function that doubles number in a list"); blocked word (picture); too short;
# starts with punctuation; new; new (ROUGE-L to the nearest seed 0.25); new; cut off. The
# first three new tasks stay below 0.7 against every seed (0.57, 0.48, 0.25). The second reply is the same text: the four
# new ones are now exact duplicates, the rest drop again for the same reasons. Of the four new
# tasks, the doubling answer has code without an assert, add_one's assert fails in the
# sandbox; the reversal (its assert passes) and the prose answer (no code) are kept.
DROPPED = {"instruction: blocked word": 2, "instruction: cut off": 2,
           "instruction: duplicate": 4, "instruction: near-duplicate": 2,
           "instruction: starts with punctuation": 2, "instruction: too short": 2,
           "answer: code without asserts": 1, "answer: code failed": 1}
OVER = ["requests_per_round=2", "max_requests=2", "target=10", "execute=tests",
        "instructions.max_new_tokens=1000", "answers.max_new_tokens=1000", "min_words=3"]


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat model with room for the whole scripted round (its weights never run here)."""
    d = tmp_path_factory.mktemp("writer")
    tok = make_chat_tokenizer(d / "tok")
    tok.chat_template = BUILTINS["lmforge"].template
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    save_hf(AutoModelForCausalLM.from_config(cfg), d / "final", tok)
    return d / "final"


def _check_round(out: Path, s: dict[str, Any]) -> None:
    assert (s["rounds"], s["requests"], s["kept"], s["over_target"]) == (1, 2, 2, 0)
    assert s["dropped_by_reason"] == DROPPED and s["dropped"] == sum(DROPPED.values())
    # every task written is accounted for: 9 pieces per reply = 4 new + 14 dropped before
    assert (s["instructions_parsed"], s["instructions_new"]) == (18, 4)
    rows = read_jsonl(out / "sft.jsonl")
    assert [r["messages"][0]["content"] for r in rows] == [
        "Reverse the order of characters in text with Python code.",
        "Explain why the sky is blue to a child."]
    assert [r["messages"][1]["content"] for r in rows] == [ANSWERS["order of characters"],
                                                           ANSWERS["sky is blue"]]
    assert [r["code"] for r in rows] == ["passed", "no code"]
    failed = next(r for r in read_jsonl(out / "dropped.jsonl") if r["reason"] == "code failed")
    assert failed["sandbox"] == "assertion failed"  # the sandbox says why
    near = next(r for r in read_jsonl(out / "dropped.jsonl") if r["reason"] == "near-duplicate")
    assert near["rouge_l"] == round(18 / 21, 4)
    assert near["nearest"] == "Write a function that doubles every number in a list."
    convs, stats = load_conversations(out)  # what `lmforge sft data.train=<run dir>` reads
    assert stats.kept == 2 and list(convs[0].messages) == rows[0]["messages"]


def test_scripted_round_through_an_endpoint(tmp_path: Path) -> None:
    with scripted_server(brain) as (url, seen):
        cfg = load_config(SelfInstructCfg, TINY, [f"model.path={url}", f"model.name={MODEL}",
                                                   f"run.dir={tmp_path}", *OVER])
        s = run_stage("self_instruct", cfg)
    _check_round(tmp_path, s)
    assert seen[0] == {"method": "GET", "path": "/v1/models"}  # checked before any work
    asks = [r["body"] for r in seen if r["method"] == "POST"]
    assert len(asks) == 2 + 4  # two lists, four answers
    lists = [b for b in asks if "Come up with" in b["messages"][0]["content"]]
    assert sorted(b["seed"] for b in lists) == [0, 1]  # one seed per request, repeatable
    assert all(b["temperature"] == 1.0 and b["max_tokens"] == 1000 and "top_p" not in b
               for b in lists)
    assert all(b["messages"][0]["content"].endswith("\nTask 5:") for b in lists)  # 4 shots
    assert s["writer"]["requests"] == 6 and s["writer"]["name"] == MODEL


def test_scripted_round_through_a_local_model_equals_the_endpoints(
        monkeypatch: pytest.MonkeyPatch, long_context_model: Path, tmp_path: Path) -> None:
    script_local_model(monkeypatch, brain)
    cfg = load_config(SelfInstructCfg, TINY, [f"model.path={long_context_model}",
                                               f"run.dir={tmp_path}", *OVER])
    s = run_stage("self_instruct", cfg)
    _check_round(tmp_path, s)
    assert s["writer"]["precision"]["name"] == "fp32"


def test_target_stops_generation_and_counts_the_rest(tmp_path: Path) -> None:
    with scripted_server(brain) as (url, _):
        cfg = load_config(SelfInstructCfg, TINY, [f"model.path={url}", f"model.name={MODEL}",
                                                   f"run.dir={tmp_path}", *OVER[:2], "target=1",
                                                   *OVER[3:]])
        s = run_stage("self_instruct", cfg)
    assert (s["kept"], s["over_target"]) == (1, 1) and len(read_jsonl(tmp_path / "sft.jsonl")) == 1


# --------------------------------------------------------------------------- bad input


def test_wrong_model_name_and_missing_name_are_one_line(tmp_path: Path) -> None:
    with scripted_server(brain) as (url, _):
        cfg = load_config(SelfInstructCfg, TINY, [f"model.path={url}", "model.name=other",
                                                   f"run.dir={tmp_path}"])
        with pytest.raises(UserError, match=f"does not serve model 'other'; it serves: {MODEL}"):
            run_stage("self_instruct", cfg)
    with pytest.raises(UserError, match="needs name"):
        load_config(SelfInstructCfg, TINY, ["model.path=http://127.0.0.1:1"])
    with pytest.raises(UserError, match="model.path: give the model"):
        run_stage("self_instruct", load_config(SelfInstructCfg, TINY, [f"run.dir={tmp_path}"]))
    with pytest.raises(UserError, match="machine_shots"):
        load_config(SelfInstructCfg, TINY, ["shots=2", "machine_shots=2"])


def test_bad_seed_file_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    cfg = load_config(SelfInstructCfg, TINY, [f"seeds={bad}", "model.path=x"])
    with pytest.raises(UserError, match=f"{bad}:2"):
        si.load_seeds(cfg)
    few = tmp_path / "few.jsonl"
    few.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(UserError, match="has 1 tasks"):
        si.load_seeds(load_config(SelfInstructCfg, TINY, [f"seeds={few}"]))
