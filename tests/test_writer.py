"""The model that writes synth data: an endpoint's requests and replies (n, seeds, the cut
flag, the model check), a local chat model's replies against a plain greedy loop on the
conversation's template ids, a base model's transcript worked by hand, and a refused endpoint
stopping either synth command in one line before any work."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lmforge.config import WriterCfg
from lmforge.endpoint import Endpoint
from lmforge.errors import UserError
from lmforge.writer import TRANSCRIPT_STOP, Writer, transcript
from tests.conftest import ROOT, run_cli
from tests.eval.test_judge import _argmax_loop, _save_tiny
from tests.fake_openai import MODEL, scripted_server


def test_endpoint_requests_and_cut_flags() -> None:
    with scripted_server(lambda shown: shown.upper()) as (url, seen):
        w = Writer(WriterCfg(path=f"{url}/v1/", name=MODEL, workers=3), "model")
        w.check()
        conv = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"}]
        out = w(["one two three", conv, "x"], n=2, temperature=0.5, top_p=0.9, max_new_tokens=2,
                seed=10)
    assert [[(c.text, c.cut) for c in cs] for cs in out] == [
        [("ONE TWO", True)] * 2,  # three words, two allowed: finish_reason "length"
        [("A B\n\nC\n\nD", False)] * 2,  # the whole conversation went as turns
        [("X", False)] * 2]
    posts = sorted((r["body"] for r in seen if r["method"] == "POST"), key=lambda b: b["seed"])
    assert [b["seed"] for b in posts] == [10, 11, 12]  # one per prompt, in prompt order
    assert all(b["n"] == 2 and b["top_p"] == 0.9 and b["temperature"] == 0.5 for b in posts)
    assert posts[1]["messages"] == conv and seen[0]["path"] == "/v1/models"
    assert w.describe()["requests"] == 3


@pytest.mark.parametrize("kind", ["self-instruct", "constitutional"])
def test_a_refused_endpoint_is_one_line_before_any_work(tmp_path: Path, kind: str) -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    tiny = ROOT / f"configs/{kind.replace('-', '_')}/tiny.yaml"
    r = run_cli("synth", kind, str(tiny), f"model.path={url}", "model.name=m",
                f"run.dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert f"model endpoint {url} refused the connection" in r.stderr
    assert not (tmp_path / "sft.jsonl").exists() and not (tmp_path / "summary.json").exists()
    assert r.stdout == ""  # nothing began


def test_endpoint_check_without_a_model_listing(tmp_path: Path) -> None:
    """A gateway answering 404 to /v1/models is reachable, which is all the check needs."""
    with scripted_server(lambda shown: "ok") as (url, seen):
        Endpoint(f"{url}/nolist", "m").check()  # the fake lists models only under /v1/models
        assert seen[-1]["path"] == "/nolist/v1/models"
        with pytest.raises(UserError, match="does not serve model 'm'"):
            Endpoint(url, "m", what="critic endpoint").check()


def test_local_path_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.path path not found"):
        Writer(WriterCfg(path=str(tmp_path / "none")), "model").check()


def test_local_chat_model_answers_the_conversation_greedily(tmp_path: Path) -> None:
    from lmforge.chat import prompt_ids

    _save_tiny(tmp_path, template=True)
    w = Writer(WriterCfg(path=str(tmp_path / "model"), precision="fp32", batch_size=2), "model")
    w.check()
    convs = [[{"role": "user", "content": "Add 2 and 3."},
              {"role": "assistant", "content": "5"},
              {"role": "user", "content": "Now 4?"}],
             "Write a Python function that keeps the even numbers."]
    out = w(convs, temperature=0, top_p=1, max_new_tokens=6, seed=0)
    gen = w._gen
    tok, model = gen.tokenizer, gen.model
    for conv, (reply,) in zip(convs, out):
        turns = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        want = _argmax_loop(model, prompt_ids(tok, turns), gen.stop_ids, 6)
        assert reply.text == tok.decode(want, skip_special_tokens=True)
        assert reply.cut == (len(want) == 6)


def test_base_model_transcript_worked_by_hand() -> None:
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert transcript(conv) == ("Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye"
                                "\n\nAssistant:")


def test_local_base_model_gets_the_transcript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What reaches the sampler: end-of-text, then the transcript's tokens, stopped at the next
    'Human:'; a plain string stays raw text with no stop."""
    import lmforge.eval.harness as harness

    _save_tiny(tmp_path, template=False)
    w = Writer(WriterCfg(path=str(tmp_path / "model"), precision="fp32"), "model")
    conv = [{"role": "user", "content": "Add 2 and 3."}]
    seen: list[tuple[list[list[int]], tuple[str, ...]]] = []

    def fake(model, prompts, stop_ids, pad, max_new_tokens, batch_size=64, *, stop=(), **kw):
        seen.append((prompts, tuple(stop)))
        return [[] for _ in prompts]

    monkeypatch.setattr(harness, "generate_batch", fake)
    w([conv], temperature=0, top_p=1, max_new_tokens=5, seed=0)
    w(["Task 1: add"], temperature=0, top_p=1, max_new_tokens=5, seed=0)
    tok = w._gen.tokenizer
    raw = lambda text: [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]  # noqa: E731
    assert not w._gen.chat
    assert seen == [([raw(transcript(conv))], TRANSCRIPT_STOP), ([raw("Task 1: add")], ())]
