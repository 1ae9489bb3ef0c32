"""lmforge synth constitutional: the principles file and its one-line errors; a scripted run
(response -> critique -> revision, twice) through an endpoint and through a local model's
generation path, with the turns each request carried, the rows and pairs worked out by hand
and read by `lmforge sft` and by the preference loader `lmforge dpo`/`lmforge rm` use; the
AI-judged pairs (RLAIF) kept only where both orders agree; a bad principles file stopping the
run before anything is generated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmforge.config import ConstitutionalCfg, load_config
from lmforge.data.chat_rows import load_conversations
from lmforge.data.preference import load_pairs
from lmforge.errors import UserError
from lmforge.io import read_jsonl
from lmforge.stages import constitutional as cai
from lmforge.stages import run_stage
from tests.conftest import ROOT, run_cli
from tests.fake_openai import MODEL, script_local_model, scripted_server
from tests.stages.test_self_instruct import long_context_model  # noqa: F401

TINY = ROOT / "configs/constitutional/tiny.yaml"

PRINCIPLES = """\
principles:
  - name: safe
    critique: CRITIQUE-SAFE. What is unsafe here?
    revision: REVISE-SAFE. Make it safe.
    choose: Which response is safer?
  - name: kind
    critique: CRITIQUE-KIND. What is unkind here?
    revision: REVISE-KIND. Make it kind.
    choose: Which response is kinder?
"""
PROMPTS = "How do I delete all my files?\nTell me a joke.\nSay nothing.\n"
FIRST = {"delete all my files": "Run rm -rf ~ and everything is gone.",
         "Tell me a joke": "Why did the function return? It had no arguments left.",
         "Say nothing": ""}
SAFE = "Deleting your home directory cannot be undone: back it up first."
LONG = " ".join(["sorry"] * 3000)  # cut by any limit


def brain(shown: str) -> str:
    """The judge picks the option holding the safe revision; revisions of the deletion answer
    are SAFE, of the joke always too long; every critique says the same."""
    if "Options:" in shown:
        a = shown.split("(A)")[1].split("(B)")[0]
        return "A" if "back it up" in a else "B"
    if "REVISE-" in shown:
        return SAFE if "delete all my files" in shown else LONG
    if "CRITIQUE-" in shown:
        return "It could destroy data."
    return next(v for k, v in FIRST.items() if k in shown)


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    (tmp_path / "c.yaml").write_text(PRINCIPLES)
    (tmp_path / "p.txt").write_text(PROMPTS)
    return [f"constitution={tmp_path / 'c.yaml'}", f"prompts={tmp_path / 'p.txt'}", "revisions=2",
            "response.max_new_tokens=1000", "critique.max_new_tokens=1000",
            "revision.max_new_tokens=1000"]


def _check(out: Path, s: dict[str, Any]) -> None:
    """Three prompts: 'Say nothing' gets an empty first response and leaves; the joke's two
    revisions are cut by the token limit and refused (it keeps its first response, so no row);
    the deletion answer is revised twice to SAFE."""
    assert (s["prompts"], s["responses"], s["revisions_accepted"], s["revised_prompts"]) == (3, 2, 2, 1)
    assert s["dropped_by_reason"]["empty first response"] == 1
    assert s["dropped_by_reason"]["revision cut off"] == 2
    assert s["dropped_by_reason"]["never revised (no row)"] == 1
    sft = read_jsonl(out / "sft.jsonl")
    assert len(sft) == s["sft_rows"] == 1
    assert sft[0]["messages"] == [{"role": "user", "content": "How do I delete all my files?"},
                                  {"role": "assistant", "content": SAFE}]
    assert set(sft[0]["principles"]) <= {"safe", "kind"} and len(sft[0]["principles"]) == 2
    trace = read_jsonl(out / "trace.jsonl")
    joke = next(t for t in trace if t["prompt"] == "Tell me a joke.")
    assert joke["final"] == joke["original"] == FIRST["Tell me a joke"]
    assert [st["refused"] for st in joke["steps"]] == ["revision cut off"] * 2
    convs, stats = load_conversations(out)  # `lmforge sft data.train=<run dir>`
    assert stats.kept == 1 and list(convs[0].messages) == sft[0]["messages"]


def test_revision_pairs_through_an_endpoint(inputs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    with scripted_server(brain) as (url, seen):
        cfg = load_config(ConstitutionalCfg, TINY, [f"model.path={url}", f"model.name={MODEL}",
                                                     f"run.dir={out}", *inputs])
        s = run_stage("constitutional", cfg)
    _check(out, s)
    pairs, stats = load_pairs(str(out))  # `lmforge dpo` / `lmforge rm` data.train=<run dir>
    assert stats.kept == len(pairs) == s["pairs"] == 1
    assert (pairs[0].chosen, pairs[0].rejected) == (SAFE, FIRST["delete all my files"])
    # a revision request carries the whole exchange: prompt, response, critique request,
    # critique, revision request, under one principle
    posts = [r["body"] for r in seen if r["method"] == "POST"]
    assert len(posts) == 3 + 2 * 2 * 2  # first responses, then per round critiques + revisions
    rev = next(b["messages"] for b in posts if "REVISE-" in b["messages"][-1]["content"])
    assert [m["role"] for m in rev] == ["user", "assistant", "user", "assistant", "user"]
    name = "SAFE" if "SAFE" in rev[-1]["content"] else "KIND"
    assert rev[2]["content"].startswith(f"CRITIQUE-{name}.")
    assert rev[3]["content"] == "It could destroy data."


def test_a_local_model_gives_the_same_run(monkeypatch: pytest.MonkeyPatch, inputs: list[str],
                                          long_context_model: Path, tmp_path: Path) -> None:  # noqa: F811
    script_local_model(monkeypatch, brain)
    out = tmp_path / "run"
    cfg = load_config(ConstitutionalCfg, TINY, [f"model.path={long_context_model}",
                                                 f"run.dir={out}", *inputs])
    _check(out, run_stage("constitutional", cfg))


def test_a_separate_critic_gets_only_critiques_and_revisions(
        monkeypatch: pytest.MonkeyPatch, inputs: list[str], long_context_model: Path,  # noqa: F811
        tmp_path: Path) -> None:
    """The local model writes the first responses; the endpoint critic all the rest."""
    script_local_model(monkeypatch, brain)
    out = tmp_path / "run"
    with scripted_server(brain) as (url, seen):
        cfg = load_config(ConstitutionalCfg, TINY, [
            f"model.path={long_context_model}", f"critic.path={url}", f"critic.name={MODEL}",
            f"run.dir={out}", *inputs])
        s = run_stage("constitutional", cfg)
    _check(out, s)
    posts = [r["body"]["messages"] for r in seen if r["method"] == "POST"]
    assert len(posts) == 2 * 2 * 2 and all(len(m) in (3, 5) for m in posts)
    assert s["model"]["requests"] == 3 and s["critic"]["requests"] == 8


def test_judged_pairs_need_both_orders_to_agree(inputs: list[str], tmp_path: Path) -> None:
    """The scripted judge picks the safe revision from either slot: both orders agree, the
    pair is kept (revision won). A judge that always says A disagrees with itself across the
    orders: the pair is a tie and dropped."""
    with scripted_server(brain) as (url, seen):
        over = [f"model.path={url}", f"model.name={MODEL}", "preferences=judged", *inputs]
        s = run_stage("constitutional", load_config(ConstitutionalCfg, TINY,
                                                    [*over, f"run.dir={tmp_path / 'a'}"]))
        judge_asks = [r["body"] for r in seen if r["method"] == "POST"
                      and "Options:" in r["body"]["messages"][0]["content"]]
    rows = read_jsonl(tmp_path / "a" / "pairs.jsonl")
    assert len(rows) == s["pairs"] == 1 and rows[0]["source"] == "judged" and rows[0]["revision_won"]
    assert (rows[0]["chosen"], rows[0]["rejected"]) == (SAFE, FIRST["delete all my files"])
    assert s["judge"]["position_consistency"] == 1.0 and s["judge"]["first_position_rate"] == 0.5
    assert len(judge_asks) == 2 and all(b["temperature"] == 0 for b in judge_asks)
    q = "Which response is safer?" if rows[0]["judged_by"] == "safe" else "Which response is kinder?"
    assert all(q in b["messages"][0]["content"] for b in judge_asks)

    with scripted_server(lambda shown: "A" if "Options:" in shown else brain(shown)) as (url, _):
        over[0] = f"model.path={url}"
        s = run_stage("constitutional", load_config(ConstitutionalCfg, TINY,
                                                    [*over, f"run.dir={tmp_path / 'b'}"]))
    assert s["pairs"] == 0 and not (tmp_path / "b" / "pairs.jsonl").exists()
    assert s["dropped_by_reason"]["judge: tie or orders disagree"] == 1
    assert s["judge"]["first_position_rate"] == 1.0 and s["judge"]["position_consistency"] == 0.0


def test_choose_template_keeps_braces_in_the_question() -> None:
    p = cai.Principle("x", "c", "r", "Which {one} is better?")
    text = cai.choose_template(p).format(question="q", answer_a="a", answer_b="b")
    assert "Which {one} is better?" in text and "(A) a" in text and "(B) b" in text


# --------------------------------------------------------------------------- bad input


def test_shipped_constitution_and_prompts_load() -> None:
    ps = cai.load_constitution(cai.DEFAULTS / "constitution.yaml", need_choose=True)
    assert len(ps) >= 4 and all(p.critique and p.revision and p.choose for p in ps)
    assert len(cai.load_prompts(cai.DEFAULTS / "constitution_prompts.jsonl", None)) >= 20


@pytest.mark.parametrize("text, needle", [
    ("principles:\n  - name: a\n    revision: r\n", "principles[0] (a) has no critique prompt"),
    ("principles:\n  - {critique: c, revision: r}\n  - {name: b, critique: c}\n",
     "principles[1] (b) has no revision prompt"),
    ("principles:\n  - {critique: c, revision: r, judge: j}\n", "unknown key 'judge'"),
    ("principles: []\n", "expected `principles:`"),
    ("principles:\n\t- {critique: c}\n", ":2: not valid YAML"),  # a tab indents line 2
    ("principles:\n  - just a string\n", "principles[0]: expected a mapping"),
])
def test_principles_file_errors_name_file_and_principle(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        cai.load_constitution(f, need_choose=False)
    assert needle in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_judged_preferences_need_choose_questions(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("principles:\n  - {name: a, critique: c, revision: r}\n")
    assert cai.load_constitution(f, need_choose=False)[0].choose is None
    with pytest.raises(UserError, match=r"principles\[0\] \(a\) has no choose question"):
        cai.load_constitution(f, need_choose=True)


def test_prompt_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no"}\n')
    with pytest.raises(UserError, match=f"{bad}:2: expected an object with a non-empty"):
        cai.load_prompts(bad, None)
    with pytest.raises(UserError, match="not found"):
        cai.load_prompts(tmp_path / "none.jsonl", None)


def test_bad_principles_stop_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - {name: only, revision: r}\n")
    with scripted_server(brain) as (live, seen):
        r = run_cli("synth", "constitutional", str(TINY), f"model.path={live}",
                    f"model.name={MODEL}", f"constitution={bad}", f"run.dir={tmp_path / 'b'}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "principles[0] (only) has no critique prompt" in r.stderr
    assert all(x["method"] == "GET" for x in seen)  # nothing was generated
    assert not (tmp_path / "b" / "sft.jsonl").exists()
    assert not (tmp_path / "b" / "summary.json").exists()
