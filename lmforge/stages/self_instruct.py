"""lmforge synth self-instruct: new tasks and their answers written by a model, grown from a
few seed tasks (Wang et al. 2022, "Self-Instruct"; Stanford Alpaca made 52k this way).

    lmforge synth self-instruct configs/self_instruct/demo.yaml model.path=runs/demo/sft/final
    lmforge synth self-instruct CONFIG model.path=http://localhost:8000 model.name=qwen
    lmforge sft CONFIG data.train=runs/self-instruct        # trains on what was kept

Each round: `requests_per_round` prompts, each listing `shots` tasks as "Task 1: ...", ...,
(seed tasks, and `machine_shots` of them from the generated pool once it has some, as the
paper mixes 6 human and 2 machine tasks) and ending on the next "Task k:"; the model continues
the list. Every new instruction is filtered: length in words, a blocked word (tasks a text
model cannot do, the paper's list), a first character that is punctuation or not ASCII, an
exact or near duplicate of the pool (ROUGE-L F1 >= `rouge_threshold` against every seed and
every instruction that passed before it). Survivors join the pool and the model answers each
(the instruction as a user turn); an answer is dropped when it is empty, cut by the token
limit, has no code under `require_code`, or (with `execute: code`) its code does not run to
its end in the sandbox. Running to the end is all `code` checks: an answer that only defines a
function passes by defining it. `execute: tests` also wants an `assert` in the code, so the
answer's own tests ran (the seed answers show the model how). Model output never runs
in-process: code is parsed, not run, here.
Rounds go on until `target` tasks are kept or `max_requests` were made.

Writes into run.dir `sft.jsonl` (what `lmforge sft data.train=RUN_DIR` reads: {"messages":
[user, assistant], "round", "rouge_l"}), `dropped.jsonl` (every dropped candidate, with its
stage and reason) and the counts of everything dropped, by reason, in summary.json.
"""

from __future__ import annotations

import ast
import random
import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import SelfInstructCfg
from lmforge.data.dedup import RougePool
from lmforge.endpoint import Choice, one_line
from lmforge.errors import UserError
from lmforge.stages.pairs import write_jsonl
from lmforge.writer import Writer

LABEL = "self-instruct"
DEFAULTS = Path(__file__).resolve().parents[1] / "defaults"
HEADER = "Come up with a series of tasks:\n\n"  # the paper's opening line


@dataclass(frozen=True)
class Task:
    instruction: str
    answer: str


# --------------------------------------------------------------------------- prompts and parsing


def instruction_prompt(shots: Sequence[str]) -> str:
    """The numbered list the model continues: 'Task 1: ...' per shot, then 'Task k+1:'."""
    lines = [f"Task {i}: {one_line(s, None)}" for i, s in enumerate(shots, 1)]
    return HEADER + "\n".join(lines) + f"\nTask {len(shots) + 1}:"


# "Task 12:", "**Task 12.**", "12." at a line's start: where a model begins its next task
_MARKER = re.compile(r"^[ \t*#]*(?:Task[ \t]*)?\d+[ \t]*[:.)][ \t*]*", re.IGNORECASE | re.MULTILINE)


def parse_instructions(reply: Choice) -> tuple[list[str], str | None]:
    """(new instructions, the piece dropped as cut off or None). The reply continues 'Task
    k:', so the text before the first marker is task k and each marker starts another. A reply
    that the token limit cut loses its last piece: it is a task stopped mid-sentence."""
    pieces = [one_line(p, None) for p in _MARKER.split(reply.text)]
    pieces = [p for p in pieces if p]
    if reply.cut and pieces:
        return pieces[:-1], pieces[-1]
    return pieces, None


def pick_shots(rng: random.Random, seeds: Sequence[str], generated: Sequence[str], shots: int,
               machine_shots: int) -> list[str]:
    """`shots` distinct tasks: up to `machine_shots` generated ones, the rest seeds, shuffled."""
    machine = rng.sample(list(generated), min(machine_shots, len(generated)))
    human = rng.sample(list(seeds), min(shots - len(machine), len(seeds)))
    out = human + machine
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------- filters (pure)


def instruction_problem(text: str, cfg: SelfInstructCfg) -> str | None:
    """Why an instruction is unusable, or None."""
    words = len(text.split())
    if words < cfg.min_words:
        return "too short"
    if words > cfg.max_words:
        return "too long"
    low = text.lower()
    if any(re.search(rf"\b{re.escape(w.lower())}\b", low) for w in cfg.blocked_words):
        return "blocked word"
    if text[0] in string.punctuation:
        return "starts with punctuation"
    if not text[0].isascii():
        return "starts with a non-ASCII character"
    return None


_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# an answer opening like a Python statement is code even when it does not parse: broken code
# must meet the sandbox (and fail there), not pass as prose
_CODE_START = re.compile(r"\s*(?:async\s+def|def|class|import|from|for|while|with|try|@)\b")


def code_in(answer: str) -> str | None:
    """The code an answer holds: its fenced blocks, joined; else the whole answer when it
    opens like a Python statement, or parses as Python with a statement that does something
    (a bare name such as 'Paris' is valid Python but not code). Parsed, never run, here."""
    blocks = _FENCE.findall(answer)
    if blocks:
        return "\n".join(b.strip("\n") for b in blocks)
    if _CODE_START.match(answer):
        return answer
    try:
        tree = ast.parse(answer)
    except (SyntaxError, ValueError):
        return None
    does = [n for n in tree.body if not isinstance(n, ast.Expr) or isinstance(n.value, ast.Call)]
    return answer if does else None


def answer_problem(reply: Choice, cfg: SelfInstructCfg) -> str | None:
    if not reply.text.strip():
        return "empty answer"
    if reply.cut:
        return "answer cut off"
    code = code_in(reply.text)
    if cfg.require_code and code is None:
        return "no code"
    if cfg.execute == "tests" and code is not None and not has_assert(code):
        return "code without asserts"
    return None


def has_assert(code: str) -> bool:
    """An `assert` statement anywhere in the code (parsed, not run)."""
    try:
        return any(isinstance(n, ast.Assert) for n in ast.walk(ast.parse(code)))
    except (SyntaxError, ValueError):
        return False  # it will fail in the sandbox too, and say how


# --------------------------------------------------------------------------- the steps


def load_seeds(cfg: SelfInstructCfg) -> list[Task]:
    from lmforge.data.chat_rows import load_conversations

    path = cfg.seeds or DEFAULTS / "seed_tasks.jsonl"
    convs, _ = load_conversations(path)
    tasks = []
    for c in convs:
        user = next((m["content"] for m in c.messages if m["role"] == "user"), "")
        answer = next(m["content"] for m in c.messages if m["role"] == "assistant")
        if user.strip():
            tasks.append(Task(user, answer))
    if len(tasks) < cfg.shots - cfg.machine_shots:
        raise UserError(f"seeds: {path} has {len(tasks)} tasks with a user turn; a request "
                        f"shows {cfg.shots - cfg.machine_shots} seeds (shots - machine_shots)")
    return tasks


class Drops:
    """Everything dropped: counts by (stage, reason), and the rows for dropped.jsonl."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.rows: list[dict[str, Any]] = []

    def __call__(self, stage: str, reason: str, text: str, round_: int, **extra: Any) -> None:
        self.counts[f"{stage}: {reason}"] += 1
        self.rows.append({"stage": stage, "reason": reason, "round": round_, "text": text,
                          **extra})


def new_instructions(cfg: SelfInstructCfg, replies: Sequence[Choice], pool: RougePool,
                     drops: Drops, round_: int) -> tuple[list[tuple[str, float]], int]:
    """((instruction, its nearest ROUGE-L in the pool) for each that passes, in order; the
    number of tasks the replies held). Each joins the pool at once, so two copies in one round
    are caught too; a copy (ROUGE-L 1: the same words) is a duplicate, a near copy (at or
    above the threshold) a near-duplicate."""
    out, parsed = [], 0
    for reply in replies:
        if not reply.text.strip():
            drops("instruction", "empty reply", "", round_)
            continue
        found, cut = parse_instructions(reply)
        parsed += len(found) + (cut is not None)
        if cut is not None:
            drops("instruction", "cut off", cut, round_)
        for text in found:
            why = instruction_problem(text, cfg)
            score, near = 0.0, None
            if why is None:
                score, near = pool.nearest(text)
                if score >= cfg.rouge_threshold:
                    why = "duplicate" if score == 1.0 else "near-duplicate"
            if why is not None:
                extra = {"rouge_l": round(score, 4), "nearest": pool.texts[near]} if near is not None else {}
                drops("instruction", why, text, round_, **extra)
                continue
            pool.add(text)
            out.append((text, score))
    return out, parsed


def run_code(cfg: SelfInstructCfg, tasks: Sequence[Task]) -> list[tuple[str, str]]:
    """(status, reason) of each task's answer code in the sandbox; ('no code', '') for an
    answer without any."""
    from lmforge.sandbox import Limits, run_many

    codes = [code_in(t.answer) for t in tasks]
    todo = [c for c in codes if c is not None]
    limits = Limits(timeout_s=cfg.sandbox.timeout_s, memory_mb=cfg.sandbox.memory_mb)
    results = iter(run_many(todo, limits, workers=cfg.sandbox.workers) if todo else [])
    out = []
    for c in codes:
        r = next(results) if c is not None else None
        out.append(("no code", "") if r is None else (r.status, r.reason))
    return out


def answered(cfg: SelfInstructCfg, writer: Writer, found: Sequence[tuple[str, float]],
             drops: Drops, round_: int, seed: int) -> list[dict[str, Any]]:
    """The rows of the tasks whose answers pass, in order."""
    a = cfg.answers
    replies = writer([t for t, _ in found], temperature=a.temperature, top_p=a.top_p,
                     max_new_tokens=a.max_new_tokens, seed=seed)
    good: list[tuple[Task, float]] = []
    for (text, score), (reply,) in zip(found, replies):
        why = answer_problem(reply, cfg)
        if why is not None:
            drops("answer", why, reply.text, round_, instruction=text)
        else:
            good.append((Task(text, reply.text), score))
    statuses = (run_code(cfg, [t for t, _ in good]) if cfg.execute != "off"
                else [("not run", "")] * len(good))
    rows = []
    for (task, score), (status, reason) in zip(good, statuses):
        if status not in ("passed", "no code", "not run"):
            drops("answer", f"code {status}", task.answer, round_, instruction=task.instruction,
                  sandbox=reason)
            continue
        rows.append({"messages": [{"role": "user", "content": task.instruction},
                                  {"role": "assistant", "content": task.answer}],
                     "round": round_, "rouge_l": round(score, 4),
                     **({"code": status} if cfg.execute != "off" else {})})
    return rows


# --------------------------------------------------------------------------- main


def main(cfg: SelfInstructCfg) -> dict[str, Any]:
    writer = Writer(cfg.model, "model")
    writer.check()  # before anything: a dead endpoint is said now, not after the seeds load
    seeds = load_seeds(cfg)
    out = cfg.run.dir
    (out / "sft.jsonl").unlink(missing_ok=True)  # a rerun's rows are never the last run's
    print(f"{LABEL}: {len(seeds)} seed tasks; writer {writer.label}; target {cfg.target} new "
          f"tasks in at most {cfg.max_requests} requests")
    rng = random.Random(cfg.seed)
    pool = RougePool()
    for s in seeds:
        pool.add(s.instruction)
    drops, rows = Drops(), []
    requests, round_, passed, parsed, t0 = 0, 0, 0, 0, time.perf_counter()
    seed_tasks = [s.instruction for s in seeds]
    while len(rows) < cfg.target and requests < cfg.max_requests:
        round_ += 1
        k = min(cfg.requests_per_round, cfg.max_requests - requests)
        generated = [r["messages"][0]["content"] for r in rows]
        prompts = [instruction_prompt(pick_shots(rng, seed_tasks, generated, cfg.shots,
                                                 cfg.machine_shots))
                   for _ in range(k)]
        g = cfg.instructions
        replies = [cs[0] for cs in writer(prompts, temperature=g.temperature, top_p=g.top_p,
                                          max_new_tokens=g.max_new_tokens,
                                          seed=cfg.seed + requests)]
        requests += k
        found, n = new_instructions(cfg, replies, pool, drops, round_)
        passed, parsed = passed + len(found), parsed + n
        new_rows = answered(cfg, writer, found, drops, round_, cfg.seed + 7919 * round_)
        rows.extend(new_rows)
        print(f"{LABEL}: round {round_}: {k} requests -> {len(found)} new instructions, "
              f"{len(new_rows)} answered and kept (kept {len(rows)}/{cfg.target}, "
              f"{time.perf_counter() - t0:.0f}s)")
    over, rows = len(rows) - min(len(rows), cfg.target), rows[:cfg.target]
    write_jsonl(out / "dropped.jsonl", drops.rows)
    dropped = dict(sorted(drops.counts.items()))
    summary: dict[str, Any] = {
        "seeds": len(seeds), "rounds": round_, "requests": requests,
        "instructions_parsed": parsed, "instructions_new": passed, "kept": len(rows),
        "over_target": over, "dropped": sum(dropped.values()),
        "dropped_by_reason": dropped, "writer": writer.describe(),
        "execute": cfg.execute, "rouge_threshold": cfg.rouge_threshold}
    if not rows:
        shown = ", ".join(f"{k} {v}" for k, v in dropped.items()) or "the model wrote nothing"
        raise UserError(f"{LABEL}: no task kept after {requests} requests ({shown}); see "
                        f"{out / 'dropped.jsonl'}")
    write_jsonl(out / "sft.jsonl", rows)
    print(f"{LABEL}: kept {len(rows)} of {parsed} tasks written -> {out / 'sft.jsonl'}")
    for reason, n in dropped.items():
        print(f"  dropped {n:5d}  {reason}")
    return summary
