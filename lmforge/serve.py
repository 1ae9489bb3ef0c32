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

LoRA adapters (`--lora NAME=DIR`, repeatable) are served by name next to the base: the base is
loaded once and every adapter attached to it with peft; a request's `model` picks one, and the
worker never puts two adapters (or an adapter and the base) in one batch.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.errors import UserError
from lmforge.eval.harness import Generator
from lmforge.generate import check_sampling
from lmforge.models import _recorded_base, read_adapter_config, resolve_model_dir
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
                 model_name: str, max_batch: int = 32, max_queue: int = 256,
                 adapters: dict[str, PreTrainedTokenizerBase] | None = None,
                 peft: Any = None) -> None:
        """`adapters`: name -> the adapter's own tokenizer (its chat template may differ from
        the base's), each already attached to `model` by `peft` (see `attach_adapters`)."""
        self.tokenizer, self.model_name = tokenizer, model_name
        self.created = int(time.time())
        self.gens = {name: self._generators(model, tok)
                     for name, tok in {model_name: tokenizer, **(adapters or {})}.items()}
        self.plain, self.chat = self.gens[model_name]
        self.context = self.plain.context
        self.worker = Worker(model, tokenizer, self.plain.pad, max_batch, max_queue, peft=peft)
        self.max_batch = max_batch

    @staticmethod
    def _generators(model: PreTrainedModel, tok: PreTrainedTokenizerBase
                    ) -> tuple[Generator, Generator | None]:
        return (Generator(model, tok, chat=False),
                Generator(model, tok, chat=True) if getattr(tok, "chat_template", None) else None)

    def job(self, kind: str, body: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Job:
        unknown = sorted(k for k in body if k not in ALLOWED[kind]
                         and not (k in NEUTRAL and body[k] in (NEUTRAL[k], None)))
        if unknown:
            raise ApiError(400, f"unsupported parameter: {unknown[0]}", unknown[0],
                           code="unsupported_parameter")
        name = body.get("model")
        if not isinstance(name, str) or name not in self.gens:
            raise ApiError(400, f"model {name!r} does not exist; this server has "
                           f"{', '.join(map(repr, self.gens))}", "model", code="model_not_found")
        plain, chat = self.gens[name]
        prompts = (self._chat_prompt(body, name, chat) if kind == "chat"
                   else self._prompts(body.get("prompt"), plain))
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
        gen = chat if kind == "chat" and chat is not None else plain
        rows = [Row(i, max_tokens) for i in range(len(prompts) * n)]
        return Job(kind, prompts, n, SamplingCfg(max_tokens, temperature, 0, top_p), seed,
                   set(gen.stop_ids), tuple(s for s in stop if s), self._top_logprobs(kind, body),
                   rows, loop, asyncio.Queue(), name if name != self.model_name else None)

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

    def _chat_prompt(self, body: dict[str, Any], name: str, chat: Generator | None
                     ) -> list[list[int]]:
        from lmforge.chat import prompt_ids

        if chat is None:
            raise ApiError(400, f"{name} has no chat template; use /v1/completions", "messages")
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
        return [prompt_ids(chat.tokenizer, conv)]

    def _prompts(self, prompt: Any, plain: Generator) -> list[list[int]]:
        """A string, a list of strings, a list of token ids, or a list of those: each begins
        after end-of-text, as every pretraining document did."""
        if isinstance(prompt, str):
            return [plain.prompt_ids(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        if isinstance(prompt, list) and prompt:
            return [p for x in prompt for p in self._prompts(x, plain)]
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
    return {"id": rid, "object": obj, "created": created, "model": job.adapter or server.model_name,
            "choices": choices, "usage": _usage(job)}


async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The worker's events for `job` until it is done. Left early (the streaming response is
    cancelled when its client disconnects), the job is cancelled: the worker stops sampling it."""
    done = False
    try:
        while True:
            kind, payload = await job.events.get()
            if kind == "done":
                done = True
                return
            if kind == "error":
                done = True
                raise ApiError(500, payload, None, "server_error")
            yield kind, payload
    finally:
        if not done:
            job.cancelled.set()


async def _watch_disconnect(request: Request, job: Job) -> None:
    """A non-streamed request is not cancelled by the server when its client leaves: look
    twice a second while it is sampled, and cancel the job when the client is gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    job.cancelled.set()


async def _sse(server: Server, job: Job, rid: str, created: int, usage: bool
               ) -> AsyncIterator[str]:
    chat = job.kind == "chat"
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": job.adapter or server.model_name}

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
    from fastapi import Depends, FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            server.worker.close()

    def authorized(request: Request) -> None:
        """The API key, on every /v1 route. A dependency, not an HTTP middleware: Starlette's
        BaseHTTPMiddleware hides a client's disconnect from the route it wraps."""
        if api_key and request.url.path.startswith("/v1") and \
                not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", None,
                           "authentication_error", "invalid_api_key")

    app = FastAPI(title="lmforge", lifespan=lifespan, dependencies=[Depends(authorized)])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": server.worker.jobs.qsize()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": server.created, "owned_by": "lmforge",
             "max_model_len": server.context,
             **({"parent": server.model_name} if name != server.model_name else {})}
            for name in server.gens]}

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
        watch = asyncio.create_task(_watch_disconnect(request, job))
        try:
            async for _ in _events(job):
                pass
        finally:
            watch.cancel()
        if job.cancelled.is_set():
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
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
    if getattr(ns, "backend", "hf") == "vllm" and getattr(ns, "lora", None):
        raise UserError("--lora is served by the hf backend only; with --backend vllm serve the "
                        "adapter run's merged final/ instead")
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

    name = ns.model_name or ns.ckpt
    specs = lora_specs(getattr(ns, "lora", None) or [], name)
    model, tokenizer = load_model(ns.ckpt), load_tokenizer(ns.ckpt)
    peft, adapters = attach_adapters(model, ns.ckpt, tokenizer, specs)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    server = Server(model, tokenizer, name, ns.max_batch, ns.max_queue, adapters, peft)
    if ns.host not in ("127.0.0.1", "localhost", "::1") and not ns.api_key:
        print(f"lmforge serve: warning: listening on {ns.host} without --api-key")
    print(f"lmforge serve: {server.model_name!r} on http://{ns.host}:{ns.port}/v1 "
          f"(chat template: {'yes' if server.chat else 'none'}; context {server.context})"
          + (f"; adapters: {', '.join(adapters)}" if adapters else ""))
    uvicorn.run(create_app(server, ns.api_key), host=ns.host, port=ns.port, log_level="warning")


def lora_specs(flags: list[str], base_name: str) -> dict[str, Path]:
    """`--lora NAME=DIR` flags -> name -> adapter dir (an adapter run's final/ means its
    adapter/)."""
    out: dict[str, Path] = {}
    for flag in flags:
        name, sep, where = flag.partition("=")
        if not sep or not name or not where:
            raise UserError(f"--lora {flag!r}: expected NAME=ADAPTER_DIR")
        if name in out or name == base_name:
            raise UserError(f"--lora {flag!r}: the name {name!r} is already served")
        d = Path(where)
        if not (d / "adapter_config.json").exists() and (d / "adapter" / "adapter_config.json").exists():
            d = d / "adapter"
        out[name] = d
    return out


def check_adapter(name: str, adapter: Path, ckpt: str, n_rows: int,
                  tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """One line naming the adapter when it was not trained on the served checkpoint or needs
    token rows the checkpoint lacks; else the adapter's own tokenizer (or the base's)."""
    from lmforge.tokenizer import load_tokenizer

    base = _recorded_base(adapter, read_adapter_config(adapter))
    served = Path(resolve_model_dir(ckpt))
    same = (Path(base).resolve() == served.resolve() if Path(base).exists() and served.exists()
            else base == ckpt)
    if not same:
        grown = Path(base).name == "base" and (Path(base) / "config.json").exists()
        why = (f"it trained new token rows, so its base is {base}: serve that, or serve the "
               "merged model" if grown else f"it was trained on {base}")
        raise UserError(f"--lora {name}: adapter {adapter} does not fit {ckpt}: {why}")
    tok = load_tokenizer(adapter) if (adapter / "tokenizer_config.json").exists() else tokenizer
    if len(tok) > n_rows:
        raise UserError(f"--lora {name}: adapter {adapter} trained new token rows ({len(tok)} "
                        f"tokens; {ckpt} has {n_rows} embedding rows): serve the run's merged "
                        "model instead")
    if tok.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--lora {name}: adapter {adapter}'s tokenizer differs from {ckpt}'s")
    return tok


def attach_adapters(model: PreTrainedModel, ckpt: str, tokenizer: PreTrainedTokenizerBase,
                    specs: dict[str, Path]) -> tuple[Any, dict[str, PreTrainedTokenizerBase]]:
    """Every adapter checked, then attached to `model` in place (peft injects its layers
    into the base's modules, so the engine keeps calling `model`): (the PeftModel or None,
    name -> tokenizer)."""
    if not specs:
        return None, {}
    from peft import PeftModel

    n_rows = model.get_input_embeddings().num_embeddings
    toks = {name: check_adapter(name, d, ckpt, n_rows, tokenizer) for name, d in specs.items()}
    peft: Any = None
    for name, d in specs.items():
        try:
            if peft is None:
                peft = PeftModel.from_pretrained(model, str(d), adapter_name=name)
            else:
                peft.load_adapter(str(d), adapter_name=name)
        except Exception as e:  # noqa: BLE001 - peft raises many kinds; the user needs one line
            raise UserError(f"--lora {name}: cannot load adapter {d}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return peft, toks
