"""Pairwise LLM judge: verdict parsing, both-order aggregation and its bias measures (fake
judges with known behaviour), the OpenAI-compatible client against a local stdlib server, and
the local-model judge against a hand-rolled greedy loop."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.endpoint import chat_completions_url
from lmforge.errors import UserError
from lmforge.eval.judge import (
    HFJudge,
    OpenAIJudge,
    hf_judge,
    judge_pairs,
    make_judge,
    openai_judge,
    parse_verdict,
    render_pairwise,
)
from tests.conftest import make_chat_tokenizer, micro_llama
from tests.fake_openai import JsonHandler, serving

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("reply, verdict", [
    ("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"), ("[[tie]]", "tie"),
    ("A.", "A"), ("B", "B"), ("  b \n", "B"), ("**A**", "A"), ("(B) is more complete", "B"),
    ("A\nBecause it is complete.", "A"),
    ("Tie", "tie"), ("tie.", "tie"), ("TIE - both fine", "tie"), ("It's a tie.", "tie"),
    ("Both are equally good.", "tie"), ("Neither answer is correct.", "tie"),
    ("Assistant B is better", "B"), ("Assistant A's answer is clearly better.", "A"),
    ("B's response is superior", "B"), ("Final verdict: A", "A"), ("I prefer Assistant B.", "B"),
    ("Assistant A.", "A"),
    ("Reasoning... [[A]] on reflection [[B]]", "B"),  # the last bracketed verdict
    ("Assistant A is better. No wait, Assistant B is better.", "B"),  # the last phrase
    ("", None), ("hmm", None), ("A good answer needs more detail", None),  # an article, no verdict
    ("Assistant A is worse than Assistant B", None),  # names both, prefers neither in words
])
def test_parse_verdict(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


def test_chat_completions_url_forms() -> None:
    want = "http://h:8/v1/chat/completions"
    for url in ("http://h:8", "http://h:8/", "http://h:8/v1", "http://h:8/v1/",
                "http://h:8/v1/chat/completions"):
        assert chat_completions_url(url) == want


# --------------------------------------------------------------------------- aggregation

_A_OPEN, _A_CLOSE = "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]"
_B_OPEN, _B_CLOSE = "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's Answer]"


def slots(prompt: str) -> tuple[str, str]:
    """The answers in slot A and slot B of a rendered judge prompt."""
    a = prompt.split(_A_OPEN, 1)[1].split(_A_CLOSE, 1)[0]
    b = prompt.split(_B_OPEN, 1)[1].split(_B_CLOSE, 1)[0]
    return a, b


def words(n: int) -> str:
    return " ".join(["w"] * n)


def test_always_a_judge_is_all_position_bias() -> None:
    items = [("q1", "x", "y"), ("q2", words(9), "z"), ("q3", "a b", "c d e f g h i")]
    rows, s = judge_pairs(lambda ps: ["A"] * len(ps), items)
    # order 1 puts answer_1 in A, order 2 answer_2: "A" twice names a different answer each time
    assert [(r["pick_1_as_A"], r["pick_2_as_A"]) for r in rows] == [("1", "2")] * 3
    assert [r["outcome"] for r in rows] == ["tie"] * 3
    assert not any(r["consistent"] for r in rows)
    assert (s["n"], s["win_rate"], s["loss_rate"], s["tie_rate"]) == (3, 0.0, 0.0, 1.0)
    assert s["position_consistency"] == 0.0
    assert s["first_position_rate"] == 1.0
    assert s["unparseable"] == 0
    assert s["length_bias"]["correlation"] is None  # every score is 0.5: no variance


def prefer_longer(prompts: list[str]) -> list[str]:
    out = []
    for p in prompts:
        a, b = (len(x.split()) for x in slots(p))
        out.append("A" if a > b else "B" if b > a else "tie")
    return out


def test_length_loving_judge_wins_exactly_where_answer_1_is_longer() -> None:
    # (words in answer_1, words in answer_2) -> diff, bucket, outcome, score
    sizes = [(12, 2),   # +10, 1 longer (10 > max(2, 1.2)), win, 1
             (3, 9),    # -6,  1 shorter,                   loss, 0
             (5, 5),    # 0,   about equal,                 tie, 0.5
             (40, 36),  # +4,  about equal (4 <= 10% of 40), win, 1
             (4, 1),    # +3,  1 longer (3 > max(2, 0.4)),  win, 1
             (20, 24)]  # -4,  1 shorter (4 > 10% of 24),   loss, 0
    items = [(f"q{i}", words(a), words(b)) for i, (a, b) in enumerate(sizes)]
    rows, s = judge_pairs(prefer_longer, items)
    assert [r["outcome"] for r in rows] == ["win", "loss", "tie", "win", "win", "loss"]
    assert [r["length_diff"] for r in rows] == [10, -6, 0, 4, 3, -4]
    assert [r["length_bucket"] for r in rows] == ["1 longer", "1 shorter", "about equal",
                                                  "about equal", "1 longer", "1 shorter"]
    assert all(r["consistent"] for r in rows)  # length does not depend on the slot
    assert (s["win_rate"], s["loss_rate"], s["tie_rate"]) == (3 / 6, 2 / 6, 1 / 6)
    assert s["position_consistency"] == 1.0
    assert s["first_position_rate"] == 5 / 10  # 10 decisive verdicts, 5 of them slot A
    assert s["length_bias"]["buckets"] == {"1 shorter": {"n": 2, "win_rate": 0.0},
                                           "about equal": {"n": 2, "win_rate": 0.5},
                                           "1 longer": {"n": 2, "win_rate": 1.0}}
    # Pearson r of x = [10, -6, 0, 4, 3, -4] and y = [1, 0, .5, 1, 1, 0], centred and scaled
    # to integers: 6x - 7 = [53, -43, -7, 17, 11, -31], 12y - 7 = [5, -7, -1, 5, 5, -7];
    # sum of products 930, sums of squares 6078 and 174.
    assert s["length_bias"]["correlation"] == pytest.approx(930 / math.sqrt(6078 * 174))


def test_each_pair_is_asked_twice_with_swapped_slots_in_one_call() -> None:
    calls: list[list[str]] = []

    def recorder(prompts: list[str]) -> list[str]:
        calls.append(prompts)
        return ["[[B]]", "nonsense"] * (len(prompts) // 2)

    items = [("What is 2+2?", "4", "5"), ("Name a {color}", "red", "blue")]
    rows, s = judge_pairs(recorder, items)
    assert len(calls) == 1 and len(calls[0]) == 4
    for i, (q, a1, a2) in enumerate(items):
        first, second = calls[0][2 * i], calls[0][2 * i + 1]
        assert slots(first) == (a1, a2) and slots(second) == (a2, a1)
        assert first == render_pairwise(q, a1, a2) and q in first and q in second
    assert "Name a {color}" in calls[0][2]  # braces in the data are not format fields
    # "[[B]]" with answer_1 in A picks answer_2; the second order is unreadable -> tie
    assert [(r["pick_1_as_A"], r["pick_2_as_A"], r["outcome"]) for r in rows] == \
        [("2", None, "tie")] * 2
    assert s["unparseable"] == 2 and s["position_consistency"] == 0.0
    assert s["first_position_rate"] == 0.0


def test_no_pairs_never_calls_the_judge() -> None:
    def boom(prompts: list[str]) -> list[str]:
        raise AssertionError("called")

    rows, s = judge_pairs(boom, [])
    assert rows == [] and s["n"] == 0 and s["win_rate"] is None


# --------------------------------------------------------------------------- openai_judge


class _Handler(JsonHandler):
    """/ok/...: a chat completion echoing the prompt; /bad/...: not JSON; /err/...: HTTP 500
    with an OpenAI-style error body spread over lines."""

    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "body": body,
                          "auth": self.headers.get("Authorization")})
        if self.path.startswith("/bad/"):
            self.send_json(200, b"<html>\nnot json\n</html>")
        elif self.path.startswith("/err/"):
            self.send_json(500, {"error": {"message": "model\nexploded"}})
        else:
            prompt = body["messages"][0]["content"]
            self.send_json(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant",
                                                          "content": f"[[A]] {prompt}"}}]})


@pytest.fixture
def server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    _Handler.seen = []
    with serving(_Handler) as url:
        yield url, _Handler.seen


def test_openai_judge_request_and_reply(server, monkeypatch) -> None:
    base, seen = server
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    prompts = [f"prompt {i}" for i in range(6)]
    judge = openai_judge(f"{base}/ok/v1", model="judge-7b", max_tokens=5, workers=3)
    assert judge(prompts) == [f"[[A]] {p}" for p in prompts]  # in order despite threads
    assert len(seen) == 6
    for req in seen:
        assert req["path"] == "/ok/v1/chat/completions"
        assert req["body"]["model"] == "judge-7b"
        assert req["body"]["temperature"] == 0 and req["body"]["max_tokens"] == 5
        assert req["auth"] == "Bearer from-env"
    assert sorted(r["body"]["messages"][0]["content"] for r in seen) == prompts
    assert all(r["body"]["messages"][0]["role"] == "user" and len(r["body"]["messages"]) == 1
               for r in seen)
    seen.clear()  # without /v1, an explicit key over the env's
    assert openai_judge(f"{base}/ok/", model="m", api_key="k")(["hi"]) == ["[[A]] hi"]
    assert seen[0]["path"] == "/ok/v1/chat/completions" and seen[0]["auth"] == "Bearer k"


def test_openai_judge_through_judge_pairs(server) -> None:
    base, _ = server
    rows, s = judge_pairs(make_judge(f"{base}/ok", model="m"), [("q", "x", "y")])
    assert rows[0]["verdict_1_as_A"] == rows[0]["verdict_2_as_A"] == "A"
    assert s["first_position_rate"] == 1.0 and s["tie_rate"] == 1.0


def test_openai_judge_bad_replies_are_one_line_user_errors(server) -> None:
    base, _ = server
    with pytest.raises(UserError, match="malformed") as bad:
        openai_judge(f"{base}/bad/v1", model="m")(["x"])
    with pytest.raises(UserError, match="HTTP 500") as err:
        openai_judge(f"{base}/err/v1", model="m")(["x"])
    for e in (bad, err):
        assert "\n" not in str(e.value)
    assert f"{base}/bad/v1" in str(bad.value)
    assert f"{base}/err/v1" in str(err.value) and "model exploded" in str(err.value)


def test_openai_judge_refused_connection() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(UserError) as e:
        openai_judge(url, model="m", timeout=5)(["x", "y", "z"])
    assert str(e.value) == f"judge endpoint {url} refused the connection"


def test_make_judge_dispatch(tmp_path: Path) -> None:
    assert isinstance(make_judge("https://api.example.com/v1", model="m"), OpenAIJudge)
    with pytest.raises(UserError, match="model name"):
        make_judge("http://127.0.0.1:1")
    missing = str(tmp_path / "no-such-judge")
    with pytest.raises(UserError, match="no-such-judge") as e:
        make_judge(missing)
    assert missing in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- hf_judge


def _save_tiny(d: Path, template: bool) -> None:
    from lmforge.chat import install_format, resolve_format
    from lmforge.models import save_hf

    tok = make_chat_tokenizer(d / "tok")
    if template:
        install_format(tok, resolve_format(tok, "lmforge"))
    model = micro_llama(seed=1, vocab=len(tok)).eval()
    # at the default init (std 0.02, tied embeddings) every prompt's greedy reply just repeats
    # its last token, which would let a padding or ordering bug pass; larger weights do not
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    # LlamaConfig's default eos id (2) is not this tokenizer's; real checkpoints agree
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    save_hf(model, d / "model", tok)


@torch.no_grad()
def _argmax_loop(model: torch.nn.Module, ids: list[int], stop: list[int], n: int) -> list[int]:
    new: list[int] = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt in stop:
            break
        new.append(nxt)
    return new


@pytest.mark.parametrize("template", [True, False])
def test_hf_judge_equals_plain_greedy(tmp_path: Path, template: bool) -> None:
    from lmforge.chat import prompt_ids

    _save_tiny(tmp_path, template)
    judge = make_judge(str(tmp_path / "model"), batch_size=2, max_new_tokens=6)
    assert isinstance(judge, HFJudge) and judge.chat is template
    tok, model = judge.tokenizer, judge.model
    prompts = ["Add 2 and 3.", "Write a Python function that keeps the even numbers.", "def"]
    replies = judge(prompts)  # lengths differ, so batches of 2 are left-padded
    assert len(replies) == len(prompts) and all(isinstance(r, str) for r in replies)
    assert len(set(replies)) > 1  # the replies depend on the prompt
    end = tok.convert_tokens_to_ids("<|end|>")
    stop = [end, tok.eos_token_id] if template else [tok.eos_token_id]
    assert judge.stop_ids == stop
    for p, r in zip(prompts, replies):
        ids = (prompt_ids(tok, [{"role": "user", "content": p}]) if template
               else [tok.eos_token_id, *tok(p, add_special_tokens=False)["input_ids"]])
        assert r == tok.decode(_argmax_loop(model, ids, stop, 6), skip_special_tokens=True)
    assert hf_judge(str(tmp_path / "model"), max_new_tokens=6)(prompts[:1]) == replies[:1]
