"""`lmforge serve CKPT`: an OpenAI-compatible HTTP server over the rollout engine's sampler.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, with
`stream: true` as server-sent events ending in `data: [DONE]`. Chat prompts are rendered with
the checkpoint's own chat template (the one training saved in its tokenizer files).

One worker thread owns the model. It drains a bounded queue: whatever is waiting (up to
`max_batch` rows) runs together through `HfEngine` (one KV cache per group of requests that
share their sampling settings), so concurrent requests are batched, not serialized; a full
queue answers 429 instead of growing without bound. The engine calls back once per decode
step; that hook applies each request's own stop ids, stop strings and max_tokens, collects
log-probs, and streams every token to its HTTP response as it is drawn.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.errors import UserError
from lmforge.eval.harness import Generator
from lmforge.generate import check_sampling
from lmforge.rl.rollout import SamplingCfg
from lmforge.serve_batch import ApiError, Job, Row, Worker

try:  # an extra; FastAPI reads the route signatures' (string) annotations from these globals
    from fastapi import Request
    from fastapi.responses import Response
except ImportError:  # `serve_cli` says what to install
    Request = Response = Any  # type: ignore[misc,assignment]

if TYPE_CHECKING:
    from fastapi import FastAPI

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit
# accepted, and honoured only at their neutral value (a client library may send them)
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "echo": False,
           "logit_bias": {}, "parallel_tool_calls": None}
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
          "seed", "logprobs", "user"}
ALLOWED = {"chat": COMMON | {"messages", "top_logprobs", "max_completion_tokens"},
           "completion": COMMON | {"prompt"}}


class Server:
    """The model, its tokenizer and the request -> Job translation, independent of HTTP."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 model_name: str, max_batch: int = 32, max_queue: int = 256) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name
        self.created = int(time.time())
        self.plain = Generator(model, tokenizer, chat=False)
        self.chat = (Generator(model, tokenizer, chat=True)
                     if getattr(tokenizer, "chat_template", None) else None)
        self.context = self.plain.context
        self.worker = Worker(model, tokenizer, self.plain.pad, max_batch, max_queue)
        self.max_batch = max_batch

    def job(self, kind: str, body: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Job:
        unknown = sorted(k for k in body if k not in ALLOWED[kind]
                         and not (k in NEUTRAL and body[k] in (NEUTRAL[k], None)))
        if unknown:
            raise ApiError(400, f"unsupported parameter: {unknown[0]}", unknown[0],
                           code="unsupported_parameter")
        if body.get("model") != self.model_name:
            raise ApiError(400, f"model {body.get('model')!r} does not exist; this server has "
                           f"{self.model_name!r}", "model", code="model_not_found")
        prompts = self._chat_prompt(body) if kind == "chat" else self._prompts(body.get("prompt"))
        n = _int(body, "n", 1, 1, self.max_batch)
        temperature = _num(body, "temperature", 1.0)
        top_p = _num(body, "top_p", 1.0)
        try:
            check_sampling(1, temperature, top_p, None)
        except UserError as e:
            raise ApiError(400, str(e), "temperature" if "temperature" in str(e) else "top_p") from None
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise ApiError(400, f"the prompt is {longest} tokens; this model's context is "
                           f"{self.context}", "messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        room = self.context - longest
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        # OpenAI's defaults: a chat answer may fill the context, a completion gets 16 tokens
        max_tokens = _int(body, key, room if kind == "chat" else min(16, room), 1, 1 << 30)
        if max_tokens > room:
            raise ApiError(400, f"{key}={max_tokens} plus the {longest}-token prompt exceeds "
                           f"this model's {self.context}-token context", key,
                           code="context_length_exceeded")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", "stop")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ApiError(400, "seed must be an integer", "seed")
        gen = self.chat if kind == "chat" and self.chat is not None else self.plain
        rows = [Row(i, max_tokens) for i in range(len(prompts) * n)]
        return Job(kind, prompts, n, SamplingCfg(max_tokens, temperature, 0, top_p), seed,
                   set(gen.stop_ids), tuple(s for s in stop if s), self._top_logprobs(kind, body),
                   rows, loop, asyncio.Queue())

    def _top_logprobs(self, kind: str, body: dict[str, Any]) -> int | None:
        lp = body.get("logprobs")
        if kind == "completion":
            return None if lp is None else _int(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if lp not in (None, True, False):
            raise ApiError(400, "logprobs must be a boolean", "logprobs")
        top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not lp:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        return top if lp else None

    def _chat_prompt(self, body: dict[str, Any]) -> list[list[int]]:
        from lmforge.chat import prompt_ids

        if self.chat is None:
            raise ApiError(400, f"{self.model_name} has no chat template; use /v1/completions",
                           "messages")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        conv = []
        for i, m in enumerate(msgs):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   f"messages[{i}].content")
                content = "".join(str(p.get("text", "")) for p in content)
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] needs a role (system, user, assistant) and "
                               "string content", f"messages[{i}]")
            conv.append({"role": role, "content": content})
        return [prompt_ids(self.tokenizer, conv)]

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """A string, a list of strings, a list of token ids, or a list of those: each begins
        after end-of-text, as every pretraining document did."""
        if isinstance(prompt, str):
            return [self.plain.prompt_ids(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        if isinstance(prompt, list) and prompt:
            return [p for x in prompt for p in self._prompts(x)]
        raise ApiError(400, "prompt must be a string, a list of strings or token ids", "prompt")


def _num(body: dict[str, Any], key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{key} must be a number, got {v!r}", key)
    return float(v)


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{key} must be an integer in [{lo}, {hi}], got {v!r}", key)
    return v


def _lp_token(tokenizer: PreTrainedTokenizerBase, tok: int) -> str:
    return str(tokenizer.decode([tok], skip_special_tokens=False))


def _logprobs(server: Server, job: Job, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Log-prob entries in the shape of the job's endpoint (chat: `content`; completions:
    parallel lists)."""
    if job.top_logprobs is None:
        return None
    tk = server.tokenizer
    if job.kind == "chat":
        def one(t: int, lp: float) -> dict[str, Any]:
            s = _lp_token(tk, t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**one(e["id"], e["logprob"]),
                             "top_logprobs": [one(t, lp) for t, lp in e["top"]]} for e in entries]}
    toks = [_lp_token(tk, e["id"]) for e in entries]
    offsets = [sum(len(t) for t in toks[:i]) for i in range(len(toks))]
    return {"tokens": toks, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{_lp_token(tk, t): lp for t, lp in e["top"]} for e in entries],
            "text_offset": offsets}


def _usage(job: Job) -> dict[str, int]:
    prompt = sum(len(p) for p in job.prompts)  # each prompt counted once, whatever n
    done = sum(len(r.ids) for r in job.rows)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _response(server: Server, job: Job, rid: str, created: int) -> dict[str, Any]:
    if job.kind == "chat":
        choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                    "logprobs": _logprobs(server, job, r.logprobs), "finish_reason": r.finish}
                   for r in job.rows]
        obj = "chat.completion"
    else:
        choices = [{"index": r.index, "text": r.text, "logprobs": _logprobs(server, job, r.logprobs),
                    "finish_reason": r.finish} for r in job.rows]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": server.model_name,
            "choices": choices, "usage": _usage(job)}


async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
    while True:
        kind, payload = await job.events.get()
        if kind == "done":
            return
        if kind == "error":
            raise ApiError(500, payload, None, "server_error")
        yield kind, payload


async def _sse(server: Server, job: Job, rid: str, created: int, usage: bool
               ) -> AsyncIterator[str]:
    chat = job.kind == "chat"
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": server.model_name}

    def chunk(r: Row, text: str | None, finish: str | None, lp: Any = None,
              role: bool = False) -> str:
        if chat:
            delta: dict[str, str] = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": r.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": r.index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        extra = {"usage": None} if usage else {}
        return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

    if chat:
        for r in job.rows:
            yield chunk(r, "", None, role=True)
    try:
        async for kind, payload in _events(job):
            if kind == "delta":
                idx, text, count = payload
                r = job.rows[idx]
                entries, r.lp_sent = r.logprobs[r.lp_sent:count], max(r.lp_sent, count)
                if text or entries:
                    yield chunk(r, text, None, _logprobs(server, job, entries))
            else:
                r = job.rows[payload]
                yield chunk(r, None, r.finish)
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    if usage:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(job)})}\n\n"
    yield "data: [DONE]\n\n"


def create_app(server: Server, api_key: str | None = None) -> FastAPI:
    """The ASGI app; the worker thread runs for the app's lifespan."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            server.worker.close()

    app = FastAPI(title="lmforge", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path.startswith("/v1") and \
                not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
            e = ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                         "authentication_error", "invalid_api_key")
            return JSONResponse(e.body(), status_code=401)
        return await call_next(request)  # type: ignore[no-any-return]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": server.worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                            "created": server.created, "owned_by": "lmforge",
                                            "max_model_len": server.context}]}

    async def complete(request: Request, kind: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        job = server.job(kind, body, asyncio.get_running_loop())
        server.worker.submit(job)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
            return StreamingResponse(_sse(server, job, rid, created, usage),
                                     media_type="text/event-stream")
        async for _ in _events(job):
            pass
        return JSONResponse(_response(server, job, rid, created))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    return app


def serve_cli(ns: argparse.Namespace) -> None:
    """`lmforge serve CKPT [--host H] [--port P] [--api-key K] [--max-batch N] [--model-name M]
    [--backend hf|vllm]`."""
    if ns.max_batch < 1 or ns.max_queue < 1:
        raise UserError("--max-batch and --max-queue must be >= 1")
    if getattr(ns, "backend", "hf") == "vllm":
        from lmforge.serve_vllm import serve_vllm

        serve_vllm(ns)  # replaces this process with vLLM's server
        return
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("lmforge serve needs fastapi and uvicorn: pip install 'lmforge[serve]'") from None
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer

    model = load_model(ns.ckpt)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    server = Server(model, load_tokenizer(ns.ckpt), ns.model_name or ns.ckpt, ns.max_batch,
                    ns.max_queue)
    if ns.host not in ("127.0.0.1", "localhost", "::1") and not ns.api_key:
        print(f"lmforge serve: warning: listening on {ns.host} without --api-key")
    print(f"lmforge serve: {server.model_name!r} on http://{ns.host}:{ns.port}/v1 "
          f"(chat template: {'yes' if server.chat else 'none'}; context {server.context})")
    uvicorn.run(create_app(server, ns.api_key), host=ns.host, port=ns.port, log_level="warning")
