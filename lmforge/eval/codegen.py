"""Greedy pass@1 on code-writing problems: generate with the chat template, run each answer
against its tests in a subprocess (never in-process: it is model output), count passes."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.config import TaskEvalCfg
from lmforge.eval.harness import Generator
from lmforge.tasks.synthetic_code import Problem, Splits, extract_code, run_checks


def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
           stop_ids: list[int], cfg: TaskEvalCfg, max_new_tokens: int,
           prefills: Sequence[str] | None = None) -> list[str]:
    """Greedy answers to single-turn user prompts, rendered with the tokenizer's template.
    A prefill is put in the assistant's mouth first and is part of the returned answer."""
    prefills = prefills or [""] * len(prompts)
    gen = Generator(model, tokenizer, chat=True, stop_ids=stop_ids)
    outs = gen(prompts, prefills=prefills, max_new_tokens=max_new_tokens,
               batch_size=cfg.batch_size)
    return [f + o[0] for f, o in zip(prefills, outs)]


def signature(p: Problem) -> str:
    """`def name(arg):` without its newline: the newline merges with the next line's indent
    into one token in training, so a prefill ending in a bare newline would be off-grid."""
    return p.solution.splitlines()[0]


def pass_at_1(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              problems: Sequence[Problem], stop_ids: list[int], cfg: TaskEvalCfg,
              autocast: Any = None) -> list[dict[str, Any]]:
    """One row per problem: task_id, difficulty, status (passed|failed|timeout|error), answer.

    With `cfg.signature_prefill` the answer starts from the function's signature, as
    HumanEval's prompts do: the model writes the body, not the name (copying a random
    name out of a sentence is a skill of its own that a few-million-parameter model lacks).

    Answers are cut at the longest reference solution plus 8 tokens (or `max_new_tokens`):
    the base model never emits the end-of-turn token, and generating its full budget would
    cost minutes for answers that are equally wrong when cut."""
    longest = max(len(tokenizer(p.solution, add_special_tokens=False)["input_ids"]) for p in problems)
    limit = min(cfg.max_new_tokens, longest + 8)
    prefills = [signature(p) for p in problems] if cfg.signature_prefill else None
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
        texts = answer(model, tokenizer, [p.prompt for p in problems], stop_ids, cfg, limit, prefills)
    statuses = run_checks([(extract_code(t), p.tests) for t, p in zip(texts, problems)],
                          timeout=cfg.timeout_s, workers=cfg.workers)
    return [{"task_id": p.task_id, "difficulty": p.difficulty, "composition": list(p.composition),
             "status": s, "answer": t} for p, s, t in zip(problems, statuses, texts)]


def eval_splits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, splits: Splits,
                stop_ids: list[int], cfg: TaskEvalCfg, autocast: Any = None,
                limit: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """pass@1 per held-out difficulty and on the unseen compositions (the first `limit`
    problems of each group when given)."""
    t0 = time.perf_counter()
    groups = {f"d{d}": list(ps)[:limit] for d, ps in sorted(splits.heldout.items())}
    groups["unseen"] = list(splits.unseen)[:limit]
    everything = [p for ps in groups.values() for p in ps]
    rows = pass_at_1(model, tokenizer, everything, stop_ids, cfg, autocast)
    out: dict[str, Any] = {}
    counts: dict[str, int] = defaultdict(int)
    k = 0
    for name, ps in groups.items():
        part = rows[k:k + len(ps)]
        k += len(ps)
        for r in part:
            r["group"] = name
            counts[r["status"]] += 1
        out[name] = sum(r["status"] == "passed" for r in part) / max(len(part), 1)
    out["n_per_group"] = {name: len(ps) for name, ps in groups.items()}
    out["statuses"] = dict(counts)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out, rows
