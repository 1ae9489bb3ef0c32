"""`lmforge serve` against the official `openai` client: a tiny llama with a chat template,
served on an ephemeral loopback port by uvicorn in a thread, stopped after the module."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from lmforge.chat import install_format, prompt_ids, resolve_format  # noqa: E402
from lmforge.eval.harness import Generator  # noqa: E402
from lmforge.models import load_model, save_hf  # noqa: E402
from lmforge.rl.rollout import HfEngine, Rollouts, SamplingCfg, teacher_forced_logps  # noqa: E402
from lmforge.serve import Server, create_app  # noqa: E402
from lmforge.serve_batch import ApiError, Job, Row, Worker  # noqa: E402
from lmforge.tokenizer import load_tokenizer  # noqa: E402
from tests.conftest import make_chat_tokenizer, micro_llama  # noqa: E402

NAME, KEY = "tiny", "sk-test"
QUESTIONS = ["Add 2 and 3.", "Be brief.", "def add(a, b):", "Now 4?", "keeps the even numbers",
             "Write a Python function", "return a + b", "Add 4 and 2. Be brief."]


def http(url: str, data: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON body) of a raw request: what the client library would refuse to send."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Live:
    def __init__(self, server: Server, base: str, tok, model) -> None:
        self.server, self.base, self.tok, self.model = server, base, tok, model
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
        self.chat_gen = Generator(model, tok, chat=True)
        self.plain_gen = Generator(model, tok, chat=False)

    def reference(self, ids: list[int], chat: bool, max_new: int) -> Rollouts:
        """What the rollout engine itself samples greedily for one prompt, alone."""
        gen = self.chat_gen if chat else self.plain_gen
        eng = HfEngine(self.model, self.tok, gen.stop_ids, gen.pad)
        return eng.generate([ids], SamplingCfg(max_new_tokens=max_new, temperature=0.0),
                            torch.Generator().manual_seed(0))

    def chat_ids(self, q: str) -> list[int]:
        return prompt_ids(self.tok, [{"role": "user", "content": q}])


def peaked_llama(vocab: int) -> torch.nn.Module:
    """micro_llama with weights of std 0.3 instead of 0.02: at 0.02 the logits are nearly flat
    and every prompt's greedy answer is the same run of one token, which would hide a server
    that mixed up its requests' rows."""
    model = micro_llama(vocab=vocab)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    d = tmp_path_factory.mktemp("serve")
    tok = make_chat_tokenizer(d)
    install_format(tok, resolve_format(tok, "lmforge"))  # as `lmforge sft` saves its model
    save_hf(peaked_llama(len(tok)), d, tok)
    model, tok = load_model(d).eval(), load_tokenizer(d)
    server = Server(model, tok, NAME, max_batch=16, max_queue=64)
    with running(server) as base:
        yield Live(server, base, tok, model)


@contextmanager
def running(server: Server) -> Iterator[str]:
    """uvicorn serving `server` in a thread on an ephemeral loopback port; stopped after."""
    config = uvicorn.Config(create_app(server, api_key=KEY), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = http.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive() and not server.worker._thread.is_alive()


def test_models_and_health(live: Live) -> None:
    assert [m.id for m in live.client.models.list()] == [NAME]
    assert http(f"{live.base}/health", key=None) == (200, {"status": "ok", "queued": 0})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.base}/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_is_the_engines_greedy_answer(live: Live) -> None:
    ids = live.chat_ids(QUESTIONS[0])
    ro = live.reference(ids, chat=True, max_new=10)
    r = live.client.chat.completions.create(model=NAME, max_tokens=10, temperature=0,
                                            messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert r.choices[0].message.content == ro.texts[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if ro.finish[0] == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), int(ro.lengths[0]))
    assert r.usage.total_tokens == len(ids) + int(ro.lengths[0])


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_unstreamed(live: Live, kind: str) -> None:
    """Temperature 0: the SSE deltas join to the non-streamed text; usage arrives last."""
    c = live.client
    if kind == "chat":
        args = dict(model=NAME, messages=[{"role": "user", "content": QUESTIONS[1]}],
                    max_tokens=12, temperature=0)
        full = c.chat.completions.create(**args)
        chunks = list(c.chat.completions.create(**args, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        want = full.choices[0].message.content
    else:
        args = dict(model=NAME, prompt=QUESTIONS[2], max_tokens=12, temperature=0)
        full = c.completions.create(**args)
        chunks = list(c.completions.create(**args, stream=True,
                                           stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        want = full.choices[0].text
    assert text == want and len(chunks) > 3  # token by token, not one blob
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_completion_is_the_engines_greedy_answer(live: Live) -> None:
    ids = live.plain_gen.prompt_ids(QUESTIONS[2])
    ro = live.reference(ids, chat=False, max_new=10)
    r = live.client.completions.create(model=NAME, prompt=QUESTIONS[2], max_tokens=10,
                                       temperature=0)
    assert r.choices[0].text == ro.texts[0]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), int(ro.lengths[0]))


def test_n_and_seed(live: Live) -> None:
    """n samples per prompt, indexed 0..n-1; a seed redraws the same ones."""
    args = dict(model=NAME, prompt=QUESTIONS[3], max_tokens=8, temperature=1.0, n=3, seed=7)
    a = live.client.completions.create(**args)
    b = live.client.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # 8 draws from a near-flat 300-way softmax
    r = live.client.completions.create(model=NAME, prompt=[QUESTIONS[0], QUESTIONS[1]], n=2,
                                       max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != "" and r.choices[2].text == r.choices[3].text


def test_stop_string_cuts_the_text(live: Live) -> None:
    args = dict(model=NAME, prompt=QUESTIONS[4], max_tokens=16, temperature=0)
    full = live.client.completions.create(**args).choices[0].text
    # two characters from the middle, none half of a multi-byte character (this random
    # model emits odd bytes), so the cut point is unambiguous
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    r = live.client.completions.create(**args, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in
                       live.client.completions.create(**args, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_logprobs(live: Live) -> None:
    """The reported log-probs are those a plain forward over prompt + answer gives (tolerance:
    see tests/rl/test_rollout.py, the same arithmetic), and the greedy token is the top one."""
    ids = live.chat_ids(QUESTIONS[5])
    ro = live.reference(ids, chat=True, max_new=6)
    ref = teacher_forced_logps(live.model, ro, 1.0, live.chat_gen.pad)[0, : int(ro.lengths[0])]
    r = live.client.chat.completions.create(model=NAME, max_tokens=6, temperature=0, logprobs=True,
                                            top_logprobs=3,
                                            messages=[{"role": "user", "content": QUESTIONS[5]}])
    content = r.choices[0].logprobs.content
    got = torch.tensor([e.logprob for e in content])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    c = live.client.completions.create(model=NAME, prompt=QUESTIONS[2], max_tokens=5,
                                       temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == c.usage.completion_tokens
    assert all(len(t) <= 2 and max(t.values()) <= 0 for t in lp.top_logprobs)


def test_concurrent_clients_are_batched_and_correct(live: Live, monkeypatch) -> None:
    """8 clients at once: each gets its own prompt's answer (as the engine gives it alone),
    and the worker ran them in shared batches. The first batch is slowed so the others queue
    behind it whatever this machine's speed."""
    engine = live.server.worker.engine
    real, calls = engine.generate, []

    def slow_first(*a, **kw):
        if not calls:
            time.sleep(0.5)
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(engine, "generate", slow_first)
    n_before = len(live.server.worker.batches)
    answers: dict[int, str] = {}
    barrier = threading.Barrier(len(QUESTIONS))

    def ask(i: int) -> None:
        barrier.wait()
        r = live.client.chat.completions.create(
            model=NAME, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": QUESTIONS[i]}])
        answers[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    want = {i: live.reference(live.chat_ids(q), chat=True, max_new=8).texts[0]
            for i, q in enumerate(QUESTIONS)}
    assert answers == want
    assert len(set(answers.values())) == len(QUESTIONS)
    assert max(live.server.worker.batches[n_before:]) > 1


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, "model", "nope"),
    ({"model": NAME, "messages": [{"role": "user", "content": "Add 2 and 3. " * 40}]},
     "messages", "context"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "n must"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "frobnicate": 1},
     "frobnicate", "unsupported parameter: frobnicate"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 500},
     "max_tokens", "context"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
     "temperature", "temperature"),
])
def test_bad_requests_are_400_and_the_server_stays_up(live: Live, body, param, words) -> None:
    known = {k: body[k] for k in ("model", "messages")}
    with pytest.raises(openai.BadRequestError) as e:  # the rest as sent, unchecked by the client
        live.client.chat.completions.create(**known, extra_body={k: v for k, v in body.items()
                                                                 if k not in known})
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and words in err["message"]
    assert http(f"{live.base}/health")[0] == 200


def test_malformed_json_is_400(live: Live) -> None:
    for raw in (b"{not json", b"[1, 2]"):
        status, body = http(f"{live.base}/v1/completions", raw)
        assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    r = live.client.completions.create(model=NAME, prompt="x", max_tokens=2)  # still serving
    assert r.usage.completion_tokens >= 1


def test_full_queue_is_429(live: Live) -> None:
    """A bounded queue refuses instead of growing: a worker that is not draining, size 1."""
    w = Worker(live.model, live.tok, 0, max_batch=4, max_queue=1)
    loop = asyncio.new_event_loop()
    try:
        def job() -> Job:
            return Job("completion", [[1, 2]], 1, SamplingCfg(2), None, set(), (), None,
                       [Row(0, 2)], loop, asyncio.Queue())

        w.submit(job())
        with pytest.raises(ApiError) as e:
            w.submit(job())
        assert e.value.status == 429
    finally:
        loop.close()


class Slowed:
    """The live worker made slow enough to disconnect from mid-answer, whatever this machine's
    speed: each decode step waits 50 ms, and the first engine call 0.5 s more (so the requests
    sent meanwhile queue and share the next batch). Records the jobs it is given."""

    def __init__(self, live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
        self.worker, self.jobs = live.server.worker, []
        step, submit, generate = self.worker._step, self.worker.submit, self.worker.engine.generate
        calls: list[int] = []

        def slow_generate(*a, **kw):
            if not calls:
                time.sleep(0.5)
            calls.append(1)
            return generate(*a, **kw)

        monkeypatch.setattr(self.worker, "_step", lambda *a: (time.sleep(0.05), step(*a))[1])
        monkeypatch.setattr(self.worker, "submit", lambda job: (self.jobs.append(job), submit(job))[1])
        monkeypatch.setattr(self.worker.engine, "generate", slow_generate)

    def settled(self, job: Job) -> None:
        deadline = time.monotonic() + 30
        while any(r.finish is None for r in job.rows):
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_disconnected_stream_stops_sampling_and_its_batch_goes_on(live: Live, monkeypatch) -> None:
    """A streaming client that leaves mid-answer: its row leaves the batch at the next decode
    step instead of sampling to max_tokens for no one; the request batched with it still gets
    its whole, correct answer."""
    q, N = QUESTIONS[0], 40
    ref = live.reference(live.chat_ids(q), chat=True, max_new=N)
    assert ref.finish == ["length"]  # left alone, this answer runs all N tokens
    slowed, before = Slowed(live, monkeypatch), live.server.worker.cancelled_rows
    msgs = [{"role": "user", "content": q}]
    first = threading.Thread(target=lambda: live.client.completions.create(
        model=NAME, prompt="x", max_tokens=1))  # occupies the worker while the two queue
    first.start()
    time.sleep(0.2)
    kept: dict[str, str] = {}
    other = threading.Thread(target=lambda: kept.setdefault("text", live.client.chat.completions.create(
        model=NAME, max_tokens=N, temperature=0, messages=msgs).choices[0].message.content))
    other.start()
    deadline = time.monotonic() + 30
    while len(slowed.jobs) < 2:  # `other` queued first: the stream's job is jobs[2]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stream = live.client.chat.completions.create(model=NAME, max_tokens=N, temperature=0,
                                                 stream=True, messages=msgs)
    chunks = iter(stream)
    while not next(chunks).choices[0].delta.content:  # the role chunk, then the first text
        pass
    stream.close()
    first.join(timeout=60)
    other.join(timeout=60)
    gone = slowed.jobs[2]
    slowed.settled(gone)
    assert kept["text"] == ref.texts[0]
    assert gone.rows[0].finish == "cancelled" and len(gone.rows[0].ids) < N
    assert live.server.worker.cancelled_rows == before + 1
    assert len(slowed.jobs[1].rows[0].ids) == N  # its batch-mate ran to the end


def test_a_disconnected_unstreamed_request_is_cancelled(live: Live, monkeypatch) -> None:
    """Without streaming the server is not told of a disconnect: it checks the connection
    while the answer is sampled (twice a second) and cancels the job."""
    import socket
    from urllib.parse import urlparse

    q, N = QUESTIONS[1], 40
    assert live.reference(live.chat_ids(q), chat=True, max_new=N).finish == ["length"]
    slowed = Slowed(live, monkeypatch)
    body = json.dumps({"model": NAME, "max_tokens": N, "temperature": 0,
                       "messages": [{"role": "user", "content": q}]}).encode()
    url = urlparse(live.base)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer " + KEY.encode() +
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while not slowed.jobs or not slowed.jobs[0].rows[0].ids:  # sampling has begun
            assert time.monotonic() < deadline
            time.sleep(0.02)
    job = slowed.jobs[0]
    slowed.settled(job)
    assert job.rows[0].finish == "cancelled" and len(job.rows[0].ids) < N


def test_cli_without_fastapi_says_what_to_install(monkeypatch, tmp_path: Path, capsys) -> None:
    import builtins

    from lmforge.cli import main

    real = builtins.__import__

    def no_fastapi(name, *a, **kw):
        if name in ("fastapi", "uvicorn"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "lmforge[serve]" in err and len(err.splitlines()) == 1


# --- LoRA adapters served by name next to the base ---------------------------------------

ADAPTER = "tuned"


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The base checkpoint plus a LoRA adapter of it (random, large B so its answers differ),
    served as NAME and ADAPTER; also the adapter merged into a copy, for reference."""
    import copy

    from peft import LoraConfig, get_peft_model

    from lmforge.serve import attach_adapters, lora_specs

    d = tmp_path_factory.mktemp("lora")
    tok = make_chat_tokenizer(d / "base")
    install_format(tok, resolve_format(tok, "lmforge"))
    save_hf(peaked_llama(len(tok)), d / "base", tok)
    trained = get_peft_model(load_model(d / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:  # lora_B starts at zero: the adapter would be the identity
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    trained.save_pretrained(d / "adapter")
    merged = copy.deepcopy(trained).merge_and_unload().eval()

    model, tok = load_model(d / "base").eval(), load_tokenizer(d / "base")
    peft, adapters = attach_adapters(model, str(d / "base"), tok,
                                     lora_specs([f"{ADAPTER}={d / 'adapter'}"], NAME))
    server = Server(model, tok, NAME, max_batch=16, max_queue=64, adapters=adapters, peft=peft)
    plain = load_model(d / "base").eval()  # the base, never touched by peft
    with running(server) as base:
        yield {"client": openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0,
                                       timeout=60),
               "server": server, "tok": tok, "dir": d, "models": {NAME: plain, ADAPTER: merged}}


def greedy(lo: dict, name: str, q: str, max_new: int = 8) -> str:
    """A direct greedy answer from one plain model (the base, or the merged adapter)."""
    gen = Generator(lo["models"][name], lo["tok"], chat=True)
    eng = HfEngine(lo["models"][name], lo["tok"], gen.stop_ids, gen.pad)
    ids = prompt_ids(lo["tok"], [{"role": "user", "content": q}])
    return eng.generate([ids], SamplingCfg(max_new_tokens=max_new, temperature=0.0),
                        torch.Generator().manual_seed(0)).texts[0]


def ask(lo: dict, name: str, q: str) -> str:
    r = lo["client"].chat.completions.create(model=name, max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": q}])
    assert r.model == name
    return r.choices[0].message.content


def test_lora_models_lists_base_and_adapter(lora: dict) -> None:
    assert [m.id for m in lora["client"].models.list()] == [NAME, ADAPTER]


def test_lora_answer_is_the_merged_models_and_base_is_unchanged(lora: dict) -> None:
    """Greedy decoding on the unmerged adapter equals the merged model's: the two differ only
    by float32 rounding of W + BA vs W x + B(A x) (~1e-6 relative), far below the gap between
    the top two logits of this peaked model, so the argmax tokens agree."""
    for q in QUESTIONS[:3]:
        want_lora, want_base = greedy(lora, ADAPTER, q), greedy(lora, NAME, q)
        assert want_lora != want_base  # the adapter really changes the answer
        assert ask(lora, ADAPTER, q) == want_lora
        assert ask(lora, NAME, q) == want_base
    # the last batch ran the base: the adapter is switched back on for the next one
    assert ask(lora, ADAPTER, QUESTIONS[0]) == greedy(lora, ADAPTER, QUESTIONS[0])


def test_lora_concurrent_requests_never_mix_adapters(lora: dict, monkeypatch) -> None:
    """8 clients at once, alternating base and adapter: each answer is its own model's, and
    the queued requests ran in batches of one model each (at least one shared)."""
    worker = lora["server"].worker
    engine, real, seen = worker.engine, worker.engine.generate, []

    def record(prompts, *a, **kw):
        if not seen:
            time.sleep(0.5)  # let the others queue behind the first batch
        layer = next(m for m in worker.peft.modules() if hasattr(m, "lora_A"))
        active = None if layer.disable_adapters else layer.active_adapters[0]
        seen.append((active, len(prompts)))
        return real(prompts, *a, **kw)

    monkeypatch.setattr(engine, "generate", record)
    jobs = [(ADAPTER if i % 2 else NAME, q) for i, q in enumerate(QUESTIONS)]
    answers: dict[int, str] = {}
    barrier = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        barrier.wait()
        answers[i] = ask(lora, *jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == {i: greedy(lora, name, q) for i, (name, q) in enumerate(jobs)}
    assert sum(n for _, n in seen) == len(jobs) and max(n for _, n in seen) > 1
    assert {a for a, _ in seen} == {None, ADAPTER}


def test_lora_that_does_not_fit_is_one_line(lora: dict, tmp_path: Path) -> None:
    """An adapter of another base, or one whose tokenizer grew, is refused at startup by name."""
    import shutil

    from lmforge.errors import UserError
    from lmforge.serve import attach_adapters, lora_specs

    model, tok = load_model(lora["dir"] / "base"), lora["tok"]
    other = tmp_path / "other"
    shutil.copytree(lora["dir"] / "adapter", other)
    conf = json.loads((other / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(tmp_path / "elsewhere")
    (other / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match=r"--lora odd: .* was trained on .*elsewhere"):
        attach_adapters(model, str(lora["dir"] / "base"), tok, lora_specs([f"odd={other}"], NAME))
    grown = tmp_path / "grown"
    shutil.copytree(lora["dir"] / "adapter", grown)
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    try:
        tok.save_pretrained(grown)
    finally:
        tok = load_tokenizer(lora["dir"] / "base")
    with pytest.raises(UserError, match=r"--lora big: .* trained new token rows"):
        attach_adapters(model, str(lora["dir"] / "base"), tok, lora_specs([f"big={grown}"], NAME))
    for bad in ("noequals", f"{NAME}={grown}"):
        with pytest.raises(UserError, match="--lora"):
            lora_specs([bad], NAME)
