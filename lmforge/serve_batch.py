"""The batcher behind `lmforge serve`: one thread owns the model and samples queued requests
together through the rollout engine's KV-cached sampler (`HfEngine`).

Dynamic batching: the worker takes whatever requests wait (up to `max_batch` rows) and runs
them as one engine call per group that shares sampling settings; requests that arrive while a
batch decodes wait for the next one. A request whose client disconnects is cancelled: its
rows leave the batch at the next decode step (the engine drops ended rows from its cache). The engine calls back once per decode step; the hook
applies each request's own stop ids, stop strings and max_tokens, collects log-probs, and hands
every token to the request's event loop as it is drawn (true per-token streaming).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.rl.rollout import HfEngine, SamplingCfg


class ApiError(Exception):
    """An OpenAI-style error: HTTP status and the body's message/type/param/code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type_, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Row:
    """One sampled choice: its tokens as drawn, the text so far, and the streaming cursor."""

    index: int
    max_tokens: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    lp_sent: int = 0  # entries of `logprobs` already streamed
    finish: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Job:
    """One HTTP request's work: n rows per prompt, its sampling settings, and how the worker
    reaches the request's event loop."""

    kind: str  # "chat" | "completion"
    prompts: list[list[int]]
    n: int
    cfg: SamplingCfg
    seed: int | None
    stop_ids: set[int]
    stop: tuple[str, ...]
    top_logprobs: int | None  # None: no log-probs
    rows: list[Row]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]]
    adapter: str | None = None  # the LoRA adapter by name; None: the base
    # set by the request's side when its client has gone: the worker drops the job's rows
    # (at the next decode step, or before its batch starts) rather than sample for no one
    cancelled: threading.Event = field(default_factory=threading.Event)

    def key(self) -> tuple[Any, ...]:
        """Jobs with one key share a KV cache and a generator, so one adapter. A seeded
        sampled request runs alone, so its draws do not depend on what else was queued."""
        if self.cfg.temperature == 0:
            return (self.adapter, 0.0)
        if self.seed is not None:
            return (self.adapter, self.cfg.temperature, self.cfg.top_p, id(self))
        return (self.adapter, self.cfg.temperature, self.cfg.top_p)

    def emit(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters might begin a stop string, so must not be streamed yet."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-k:])), default=0)


class Worker:
    """The thread that owns the model: it takes whatever jobs wait and samples them together."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pad_id: int,
                 max_batch: int, max_queue: int, seed: int = 0, peft: Any = None) -> None:
        self.peft = peft  # the PeftModel whose adapters are injected into `model`, or None
        self.engine = HfEngine(model, tokenizer, [], pad_id)  # stops are per request: the hook
        self.tokenizer, self.max_batch = tokenizer, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches: list[int] = []  # rows per engine call (tests and load benchmarks read it)
        self.cancelled_rows = 0  # rows dropped mid-decode because their client went away
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-serve", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, "the server is at capacity; retry later", None,
                           "rate_limit_error", "queue_full") from None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            taken, rows = [first], len(first.rows)
            while rows < self.max_batch:  # dynamic batching: everything already waiting
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                taken.append(job)
                rows += len(job.rows)
            groups: dict[tuple[Any, ...], list[Job]] = {}
            for job in (j for j in taken if not j.cancelled.is_set()):
                groups.setdefault(job.key(), []).append(job)
            for group in groups.values():
                self._sample(group)

    def _sample(self, group: list[Job]) -> None:
        rows = [(job, r) for job in group for r in job.rows]
        prompts = [job.prompts[r.index // job.n] for job, r in rows]
        head = group[0]
        cfg = SamplingCfg(max_new_tokens=max(r.max_tokens for _, r in rows),
                          temperature=head.cfg.temperature, top_p=head.cfg.top_p,
                          batch_size=min(len(rows), self.max_batch))
        gen = (torch.Generator().manual_seed(head.seed)
               if head.seed is not None and cfg.temperature > 0 else self.generator)
        self.batches.append(len(rows))
        try:
            with self._adapter(head.adapter):
                self.engine.generate(prompts, cfg, gen,
                                     on_step=lambda b, t, lg: self._step(rows, b, t, lg))
        except Exception as e:  # the server stays up; the requests in this batch learn why
            for job in group:
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            return
        for job, r in rows:
            if r.finish is None:
                r.finish = "length"
                self._flush(job, r)
        for job in group:
            job.emit("done", None)

    def _adapter(self, name: str | None) -> AbstractContextManager[Any]:
        """The group's adapter switched on; the base: every adapter switched off."""
        if self.peft is None:
            return nullcontext()
        if name is None:
            return self.peft.disable_adapter()  # type: ignore[no-any-return]
        self.peft.set_adapter(name)
        return nullcontext()

    def _step(self, rows: list[tuple[Job, Row]], batch: list[int], toks: list[int],
              logits: torch.Tensor) -> set[int]:
        ended: set[int] = set()
        for k, (b, tok) in enumerate(zip(batch, toks)):
            job, r = rows[b]
            if job.cancelled.is_set() and r.finish is None:
                r.finish = "cancelled"  # its client is gone: the row leaves the batch now
                self.cancelled_rows += 1
            if r.finish is not None:
                ended.add(b)
                continue
            r.ids.append(tok)
            if job.top_logprobs is not None:
                r.logprobs.append(self._logprobs(F.log_softmax(logits[k], -1), tok, job.top_logprobs))
            if tok in job.stop_ids:
                r.finish = "stop"
            else:
                text = self.tokenizer.decode([i for i in r.ids if i not in job.stop_ids],
                                             skip_special_tokens=True)
                cut = min((i for s in job.stop if (i := text.find(s)) >= 0), default=-1)
                r.text = text if cut < 0 else text[:cut]
                if cut >= 0:
                    r.finish = "stop"
                elif len(r.ids) >= r.max_tokens:
                    r.finish = "length"
            if r.finish is not None:
                ended.add(b)
                self._flush(job, r)
            else:
                self._stream(job, r)
        return ended

    def _logprobs(self, logp: torch.Tensor, tok: int, k: int) -> dict[str, Any]:
        """The drawn token's log-prob and the k likeliest, under the model's own (T=1)
        distribution, as OpenAI reports them."""
        top = logp.topk(k) if k else None
        return {"id": tok, "logprob": float(logp[tok]),
                "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))}

    def _stream(self, job: Job, r: Row) -> None:
        """Send what is safe: not a half-decoded character, not a possible stop-string start."""
        text = r.text
        if text.endswith("\ufffd"):
            return
        safe = len(text) - _held_back(text, job.stop)
        if safe > r.sent:
            job.emit("delta", (r.index, text[r.sent:safe], len(r.ids)))
            r.sent = safe

    def _flush(self, job: Job, r: Row) -> None:
        job.emit("delta", (r.index, r.text[r.sent:], len(r.ids)))
        r.sent = len(r.text)
        job.emit("finish", r.index)
