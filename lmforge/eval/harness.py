"""Answer evaluation items with a model and score the answers: the pieces `lmforge eval`,
the SFT stage's pass@1 and the judge share.

A `Generator` wraps a model and its tokenizer: chat models get each prompt as a user turn in
their own template, base models get the raw prompt after end-of-text (as every pretraining
document began). Code answers run only in the sandbox, never in-process. With an `engine`
(the vLLM rollout engine), the same prompt ids, stops and settings are sampled there instead.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge import sandbox
from lmforge.endpoint import Choice, Message
from lmforge.errors import UserError
from lmforge.eval.passk import mean_pass_at_k, pass_at_k
from lmforge.generate import cut_at_stop, generate_batch
from lmforge.tasks.base import AnswerItem, CodeItem
from lmforge.tasks.synthetic_code import extract_code
from lmforge.train.progress import Ticker

if TYPE_CHECKING:
    from lmforge.rl.rollout import Engine

Item = CodeItem | AnswerItem


class Generator:
    """Greedy or sampled answers from one model; `chat=None` picks chat mode when the
    tokenizer carries a template."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 chat: bool | None = None, stop_ids: list[int] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.stop_ids = stop_ids or self._stop_ids()
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else 0)
        cfg = model.config
        self.context = int(getattr(cfg, "max_position_embeddings", None)
                           or getattr(cfg, "n_positions", None) or 1 << 30)
        self.truncated = 0  # prompts cut from the left to fit the context
        self.engine: Engine | None = None  # set: sample there instead of with `model`

    def _stop_ids(self) -> list[int]:
        """End-of-turn and eos, plus whatever the model's generation config stops at
        (`lmforge sft` writes its template's stop ids there)."""
        from lmforge.chat import resolve_format, stop_token_ids

        ids = (stop_token_ids(self.tokenizer, resolve_format(self.tokenizer, "tokenizer"))
               if self.chat else [self.tokenizer.eos_token_id])
        extra = getattr(self.model.generation_config, "eos_token_id", None)
        extra = extra if isinstance(extra, list) else [extra]
        return list(dict.fromkeys(i for i in [*ids, *extra] if i is not None))

    def prompt_ids(self, prompt: str | list[Message], prefill: str = "") -> list[int]:
        """The tokens the model continues. A prompt is one user turn, or (chat models) a whole
        conversation ending on a user turn. A prefill is put in the assistant's mouth (chat)
        or appended to the prompt unless the prompt already ends with it (HumanEval's)."""
        from lmforge.chat import prompt_ids

        tok = self.tokenizer
        if self.chat:
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = prompt_ids(tok, turns)
            return ids + (tok(prefill, add_special_tokens=False)["input_ids"] if prefill else [])
        if not isinstance(prompt, str):
            raise ValueError("a conversation needs a chat model; render it as text first")
        text = prompt if prompt.endswith(prefill) else prompt + prefill
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return [tok.eos_token_id, *ids] if tok.eos_token_id is not None else list(ids)

    def __call__(self, prompts: Sequence[str | list[Message]], *,
                 prefills: Sequence[str] | None = None, n: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 16,
                 stop: Sequence[str] = (), seed: int = 0) -> list[list[str]]:
        """n answers per prompt (the new text only, cut at the first stop string)."""
        outs = self.replies(prompts, prefills=prefills, n=n, temperature=temperature,
                            top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            stop=stop, seed=seed)
        return [[c.text for c in cs] for cs in outs]

    def replies(self, prompts: Sequence[str | list[Message]], *,
                prefills: Sequence[str] | None = None, n: int = 1, temperature: float = 0.0,
                top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 16,
                stop: Sequence[str] = (), seed: int = 0) -> list[list[Choice]]:
        """As `__call__`, each answer with whether the token limit cut it: it ran the whole
        `max_new_tokens` without a stop token (one that stopped on its very last token by a
        stop string counts as cut too; the ids cannot tell them apart)."""
        prefills = prefills or [""] * len(prompts)
        ids = [self.prompt_ids(p, f) for p, f in zip(prompts, prefills) for _ in range(n)]
        room = self.context - max_new_tokens
        if room < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                            f"the model's {self.context}-token context")
        self.truncated += sum(len(x) > room for x in ids) // n
        ids = [x[-room:] for x in ids]  # keep the end: the question, not the oldest shots
        if self.engine is not None:
            outs = self._engine_sample(ids, temperature, top_p, max_new_tokens, batch_size,
                                       stop, seed)
        else:
            was_training = self.model.training
            self.model.eval()
            outs = generate_batch(self.model, ids, self.stop_ids, self.pad, max_new_tokens,
                                  batch_size, temperature=temperature, top_p=top_p, stop=stop,
                                  tokenizer=self.tokenizer, seed=seed)
            self.model.train(was_training)
        texts = [Choice(cut_at_stop(self.tokenizer.decode(o, skip_special_tokens=True),
                                    tuple(stop)), len(o) >= max_new_tokens) for o in outs]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _engine_sample(self, ids: list[list[int]], temperature: float, top_p: float,
                       max_new_tokens: int, batch_size: int, stop: Sequence[str], seed: int
                       ) -> list[list[int]]:
        """`generate_batch`'s output from the engine: each row's new ids before its first stop
        id (the engine keeps the stop id it ended on). Seeds come from one generator seeded
        with `seed`, so a run repeats; they are not `generate_batch`'s per-batch seeds, so
        sampled (not greedy) answers differ between the backends."""
        from lmforge.rl.rollout import SamplingCfg

        assert self.engine is not None
        cfg = SamplingCfg(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          stop=tuple(stop), batch_size=batch_size)
        ro = self.engine.generate(ids, cfg, torch.Generator().manual_seed(seed))
        outs = []
        for i in range(len(ids)):
            new = ro.completion(i)
            outs.append(new[:next((k for k, t in enumerate(new) if t in self.stop_ids), len(new))])
        return outs


def answer_items(gen: Generator, items: Sequence[Item], *, n: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 16,
                 seed: int = 0, autocast: Any = None) -> list[list[str]]:
    """n completions per item. Items of one task share their stop strings."""
    heads = [it.head if isinstance(it, CodeItem) else "" for it in items]
    stop = items[0].stop if items else ()
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
        return gen([it.prompt for it in items], prefills=heads, n=n, temperature=temperature,
                   top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   stop=stop, seed=seed)


def code_of(item: CodeItem, completion: str) -> str:
    """The code to run: a completion that continues a head is code as is; a whole answer may
    wrap its code in a ``` fence."""
    return completion if item.head else extract_code(completion)


def score_code(items: Sequence[CodeItem], completions: Sequence[Sequence[str]],
               limits: sandbox.Limits, workers: int = 2
               ) -> tuple[list[dict[str, Any]], sandbox.Isolation | None]:
    """Run every completion's program in the sandbox: one row per item with its statuses."""
    programs = [it.program(code_of(it, c)) for it, cs in zip(items, completions) for c in cs]
    results = sandbox.run_many(programs, limits, workers=workers,
                               progress=Ticker("sandbox", len(programs)).advance)
    rows, k = [], 0
    for it, cs in zip(items, completions):
        rs = results[k:k + len(cs)]
        k += len(cs)
        rows.append({"task_id": it.task_id, **_group(it), "n": len(cs),
                     "c": sum(r.passed for r in rs), "statuses": [r.status for r in rs],
                     "reasons": [r.reason for r in rs], "completions": list(cs),
                     "stderr": next((r.stderr[-500:] for r in rs if not r.passed), "")})
    return rows, (results[0].isolation if results else None)


def score_answers(items: Sequence[AnswerItem], completions: Sequence[Sequence[str]]
                  ) -> list[dict[str, Any]]:
    rows = []
    for it, cs in zip(items, completions):
        ok = [bool(it.score(c)) for c in cs]
        rows.append({"task_id": it.task_id, **_group(it), "n": len(cs), "c": sum(ok),
                     "correct": ok, "reference": it.reference, "completions": list(cs)})
    return rows


def _group(item: Item) -> dict[str, Any]:
    return {"group": item.meta["group"]} if "group" in item.meta else {}


def summarize(rows: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """pass@k over items (and per group where items have one), status counts."""
    out: dict[str, Any] = {"items": len(rows), "samples": sum(r["n"] for r in rows),
                           **mean_pass_at_k([(r["n"], r["c"]) for r in rows], ks)}
    for r in rows:
        r.update({f"pass@{k}": round(pass_at_k(r["n"], r["c"], k), 4) for k in ks})
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "group" in r:
            groups[r["group"]].append(r)
    if groups:
        out["groups"] = {g: {"items": len(rs), **mean_pass_at_k([(r["n"], r["c"]) for r in rs], ks)}
                         for g, rs in groups.items()}
    statuses = Counter(s for r in rows for s in r.get("statuses", ()))
    if statuses:
        out["statuses"] = dict(statuses)
    return out


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t, self.t0 = self.t0, time.perf_counter()
        return round(self.t0 - t, 2)
