"""Rewards for sampled answers, each a function with typed arguments (lmforge/rl/config.py):

- code: the answer's program runs with the problem's tests in the sandbox (never in-process);
  all_pass gives 1 when the program ran to its end, fraction the share of tests that pass,
  each test in a program of its own, so each verdict is the sandbox's sealed one;
- format: the answer has the shape the task reads (code that parses and defines the entry
  point, or a GSM8K answer with a number); parsing only, nothing of it runs;
- answer: GSM8K's final number matches the reference;
- reward_model: the scalar an `lmforge rm` model gives (prompt, answer);
- length: DAPO's soft overlong penalty.

`score_rollouts` runs the configured ones and returns their weighted sum per answer with each
function's own values (for the per-function metrics).

A reward model is what `lmforge rm` saves: a causal LM with a one-output `score` head, loaded
with `AutoModelForSequenceClassification`, whose config names its pad token (the head reads the
last token that is not padding, so batches must be told where that is).
"""

from __future__ import annotations

import ast
import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from lmforge.chat import Message
from lmforge.errors import UserError
from lmforge.io import check_local_or_hub

LENGTH_FILE = "reward_length.json"  # written by the rm stage when trained with length_normalize
STATS_FILE = "reward_stats.json"  # the rm stage's mean and std of its training completions' scores


def reward_model_scores(model_dir: str | Path, tokenizer_dir: str | Path | None,
                        prompts: list[list[Message]], answers: list[str],
                        batch_size: int) -> list[float]:
    """The reward model's scalar for each (prompt, answer): prompt + [assistant: answer]
    rendered with the chat template of the RM's tokenizer (`tokenizer_dir`, default
    `model_dir`), right-padded, scored in fp32 by the model's own forward, so the score is
    read where training read it (the last non-pad token).

    Length correction: when `<model_dir>/reward_length.json` exists ({"slope": b,
    "intercept": a}, the rm stage's fit of reward ~ a + b * completion_tokens on its training
    pairs), b * (the answer's tokens, the RM tokenizer's count without special tokens) is
    subtracted from each score: a longer answer then earns nothing for its length alone. The
    intercept is the same for every answer and is left in.

    A conversation longer than the model's context loses its oldest tokens (the answer's end,
    where the score is read, is kept)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    from lmforge.models import resolve_model_dir

    model_dir = resolve_model_dir(model_dir)
    tok = _rm_tokenizer(str(tokenizer_dir if tokenizer_dir is not None else model_dir))
    model = _load_rm(model_dir)
    pad = int(model.config.pad_token_id)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    rows = []
    for conv, answer in zip(prompts, answers):
        out: Any = tok.apply_chat_template([*conv, {"role": "assistant", "content": answer}],
                                           tokenize=True, return_dict=True,
                                           add_generation_prompt=False)
        rows.append(list(out["input_ids"])[-context:])
    scores = _forward(model, rows, pad, batch_size)
    slope = _length_slope(Path(model_dir))
    if slope:
        lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
        scores = [s - slope * n for s, n in zip(scores, lengths)]
    return scores


@functools.lru_cache(maxsize=8)  # RL scores every step: load once (an ensemble: each member)
def _rm_tokenizer(path: str) -> Any:
    """A reward model's tokenizer, which must carry the chat template (prompt, answer) are
    rendered with."""
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if not getattr(tok, "chat_template", None):
        raise UserError(f"reward model {path}: its tokenizer has no chat template to "
                        "render (prompt, answer) with")
    return tok


@functools.lru_cache(maxsize=8)
def _load_rm(model_dir: str) -> PreTrainedModel:
    check_local_or_hub(model_dir, "reward model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load reward model {model_dir!r}: {first}") from None
    if model.config.num_labels != 1:
        raise UserError(f"reward model {model_dir}: its head has {model.config.num_labels} "
                        "outputs; a reward model has one (an `lmforge rm` final/ dir)")
    if model.config.pad_token_id is None:
        raise UserError(f"reward model {model_dir}: config.json has no pad_token_id, so a "
                        "batch cannot say where each answer ends")
    if torch.cuda.is_available():
        model.to("cuda")
    return model.eval()  # type: ignore[no-any-return]


@torch.inference_mode()
def _forward(model: PreTrainedModel, rows: list[list[int]], pad: int,
             batch_size: int) -> list[float]:
    """One scalar per row; rows batched by length (little compute spent on padding)."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [0.0] * len(rows)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(rows[i]) for i in idx)
        x = torch.full((len(idx), T), pad, dtype=torch.long)  # (B, T)
        att = torch.zeros((len(idx), T), dtype=torch.long)  # (B, T)
        for r, i in enumerate(idx):
            x[r, :len(rows[i])] = torch.tensor(rows[i])
            att[r, :len(rows[i])] = 1
        logits = model(input_ids=x.to(device), attention_mask=att.to(device)).logits  # (B, 1)
        for r, v in zip(idx, logits[:, 0].float().tolist()):
            out[r] = v
    return out


def _length_slope(model_dir: Path) -> float:
    """b of the rm stage's length fit, or 0.0 when it made none."""
    path = model_dir / LENGTH_FILE
    if not path.exists():
        return 0.0
    try:
        slope = json.loads(path.read_text(encoding="utf-8"))["slope"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: expected {{\"slope\": b, \"intercept\": a}} ({e})") from None
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise UserError(f"{path}: slope must be a finite number, got {slope!r}")
    return float(slope)


# --------------------------------------------------------------------------- RL rewards


@dataclass(frozen=True)
class Answer:
    """What a reward function sees of one rollout: its problem, its text (cut before a stop
    string; a code answer continues the item's head), and its length in tokens."""

    item: Any  # CodeItem | AnswerItem
    text: str
    tokens: int


@dataclass(frozen=True)
class Env:
    """What rewards share: the sandbox's limits and workers."""

    limits: Any  # sandbox.Limits
    workers: int


def code_reward(cfg: Any, answers: Sequence[Answer], env: Env) -> list[float]:
    """1.0 / 0.0 per answer (all_pass), or the fraction of its tests that pass (fraction)."""
    from lmforge import sandbox
    from lmforge.eval.harness import code_of

    if cfg.mode == "all_pass":
        programs = [a.item.program(code_of(a.item, a.text)) for a in answers]
        return [float(r.passed) for r in sandbox.run_many(programs, env.limits, workers=env.workers)]
    per = [a.item.test_programs(code_of(a.item, a.text)) for a in answers]
    flat = sandbox.run_many([p for ps in per for p in ps], env.limits, workers=env.workers)
    out, k = [], 0
    for ps in per:
        out.append(sum(r.passed for r in flat[k:k + len(ps)]) / max(len(ps), 1))
        k += len(ps)
    return out


_MAX_PARSE_CHARS = 20_000  # the parser's time and memory grow with the text: bound both


def format_reward(cfg: Any, answers: Sequence[Answer], env: Env) -> list[float]:
    from lmforge.eval.harness import code_of
    from lmforge.tasks.base import CodeItem
    from lmforge.tasks.gsm8k import extract_answer

    def ok(a: Answer) -> bool:
        if not isinstance(a.item, CodeItem):
            return extract_answer(a.text) is not None
        code = a.item.head + code_of(a.item, a.text)
        if len(code) > _MAX_PARSE_CHARS:
            return False
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return False
        return any(isinstance(n, ast.FunctionDef) and n.name == a.item.entry_point
                   for n in tree.body)

    return [float(ok(a)) for a in answers]


def answer_reward(cfg: Any, answers: Sequence[Answer], env: Env) -> list[float]:
    return [float(bool(a.item.score(a.text))) for a in answers]


def reward_model_reward(cfg: Any, answers: Sequence[Answer], env: Env) -> list[float]:
    prompts: list[list[Message]] = [[{"role": "user", "content": a.item.prompt}] for a in answers]
    texts = [getattr(a.item, "head", "") + a.text for a in answers]
    paths = cfg.paths
    members = [reward_model_scores(p, None, prompts, texts, cfg.batch_size) for p in paths]
    if len(paths) > 1:  # members on one scale: each standardized by its own training scores
        members = [[(x - m) / sd for x in scores]
                   for scores, (m, sd) in zip(members, map(member_scale, paths))]
    return combine_scores(members, cfg.combine)


def check_reward_models(cfgs: Sequence[Any], tokenizer: Any) -> None:
    """Before the first rollout: every reward model loads (a head of one output, a pad id),
    its tokenizer has a chat template, and is the policy's, unless the reward allows another
    (`other_tokenizer`). A model of another family scores re-rendered text, which works, but
    silently: a reward model trained with lmforge rm from the policy is what RLHF assumes."""
    from lmforge.models import resolve_model_dir

    for c in cfgs:
        if c.kind != "reward_model":
            continue
        for p in c.paths:
            check_local_or_hub(p, "reward model")
            model_dir = resolve_model_dir(p)
            tok = _rm_tokenizer(model_dir)
            if not c.other_tokenizer and tok.get_vocab() != tokenizer.get_vocab():
                raise UserError(
                    f"reward model {p}: its tokenizer differs from the policy's ({len(tok)} vs "
                    f"{len(tokenizer)} tokens); train it from the policy (lmforge rm "
                    "model.path=<the policy>), or set other_tokenizer: true on this reward to "
                    "score answers as text in the reward model's own template")
            _load_rm(str(model_dir))  # its head and pad id, said now (cached for the rounds)


@functools.lru_cache(maxsize=8)
def member_scale(model_dir: str) -> tuple[float, float]:
    """(mean, std) of an ensemble member's scores on its training completions, written by
    the rm stage (reward_stats.json); a member without it cannot share a scale: one line."""
    from lmforge.models import resolve_model_dir

    path = Path(resolve_model_dir(model_dir)) / STATS_FILE
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
        mean, std = float(st["mean"]), float(st["std"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"reward model {model_dir}: no usable {STATS_FILE}, so it cannot join an "
                        "ensemble (members are standardized by it); retrain it with lmforge rm") from None
    if not std > 0:
        raise UserError(f"{path}: std {std} is not > 0; the model scores every completion alike")
    return mean, std


def combine_scores(members: Sequence[Sequence[float]], how: str) -> list[float]:
    """Per answer, the ensemble's mean or min over its members' scores (one member: its own).
    Worked example: members [1, 4] and [3, 0]: mean [2, 2], min [1, 0]."""
    if how not in ("mean", "min"):
        raise ValueError(f"combine must be mean or min, got {how!r}")
    cols = list(zip(*members))
    return [min(c) if how == "min" else sum(c) / len(c) for c in cols]


def length_reward(cfg: Any, answers: Sequence[Answer], env: Env) -> list[float]:
    """0 up to max_tokens - buffer, then linearly down to -1 at max_tokens (DAPO eq. 13)."""
    free = cfg.max_tokens - cfg.buffer
    return [-min(1.0, max(0, a.tokens - free) / cfg.buffer) for a in answers]


REWARDS: dict[str, Callable[[Any, Sequence[Answer], Env], list[float]]] = {
    "code": code_reward, "format": format_reward, "answer": answer_reward,
    "reward_model": reward_model_reward, "length": length_reward,
}


def score_rollouts(cfgs: Sequence[Any], answers: Sequence[Answer], env: Env
                   ) -> tuple[list[float], dict[str, list[float]]]:
    """(the weighted sum per answer, each function's unweighted values by its kind)."""
    parts = {c.kind: REWARDS[c.kind](c, answers, env) for c in cfgs}
    total = [sum(c.weight * parts[c.kind][i] for c in cfgs) for i in range(len(answers))]
    return total, parts
