"""lmforge synth pairs: preference pairs from a policy's own answers, judged by execution.

    lmforge synth pairs configs/pairs/tiny.yaml model.path=runs/demo/sft/final

The policy answers each training problem n times; every answer runs with the problem's tests
in the sandbox (never in-process: it is model output). A passing answer is chosen over a
failing one to the same problem; a problem that no answer solves pairs its reference solution
against the failures (the policy learns from what it got wrong); a problem every answer solves
teaches nothing by comparison and makes no pair. With `judge: reward_model` a reward model
picks its best answer over its worst instead, and the sandbox still runs, so the summary can
say how often the reward model agrees with the tests.

Writes into run.dir `pairs.jsonl`, one row per pair, in the shape the preference data loader
reads from a pairs stage dir:

    {"prompt": [{"role": "user", "content": ...}], "chosen": str, "rejected": str,
     "task_id": str, "chosen_from": "sample" | "reference", "pass_rate": float}

and `samples.jsonl`, every answer with its sandbox status, for inspection. An answer is the
whole assistant message: the signature prefill (when there is one) and what the model wrote.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import AnswerSamplingCfg, PairsCfg
from lmforge.errors import UserError
from lmforge.eval.harness import Generator, answer_items, score_code
from lmforge.io import atomic_file
from lmforge.sandbox import Isolation, Limits
from lmforge.tasks.base import CodeItem


@dataclass(frozen=True)
class Sample:
    """One answer: the whole assistant message and how its program ended in the sandbox."""

    text: str
    status: str  # passed | failed | timeout | error
    reason: str = ""
    score: float | None = None  # the reward model's, when it judges

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Pair:
    item: CodeItem
    chosen: str
    rejected: str
    chosen_from: str  # sample | reference
    pass_rate: float
    chosen_passed: bool
    rejected_passed: bool

    def row(self) -> dict[str, Any]:
        return {"prompt": [{"role": "user", "content": self.item.prompt}],
                "chosen": self.chosen, "rejected": self.rejected, "task_id": self.item.task_id,
                "chosen_from": self.chosen_from, "pass_rate": self.pass_rate}


# --------------------------------------------------------------------------- pairing (pure)


def outcomes(samples: Sequence[Sample]) -> tuple[list[str], list[str]]:
    """(passing texts, failing texts), distinct, in first-seen order. A text whose copies
    ended differently (a timeout under load) is neither: it is not trusted either way. A blank
    answer (the model ended its turn at once) is neither too: it fails, but as a completion it
    is only the end-of-turn token, and preference data refuses empty answers."""
    seen: dict[str, set[bool]] = {}
    for s in samples:
        if s.text.strip():
            seen.setdefault(s.text, set()).add(s.passed)
    return ([t for t, v in seen.items() if v == {True}],
            [t for t, v in seen.items() if v == {False}])


def _rng(seed: int, item: CodeItem) -> random.Random:
    # one stream per problem (str seeds hash with sha512, not the salted hash()): a problem's
    # pairs do not change when `limit` or the problems before it do
    return random.Random(f"{seed}/{item.task_id}")


def execution_pairs(item: CodeItem, samples: Sequence[Sample], per_problem: int,
                    reference_when_none_pass: bool, seed: int) -> list[Pair]:
    """Up to `per_problem` (passing, failing) pairs drawn without repeats; when no answer
    passed, (reference, failing) pairs; when none failed, none."""
    passing, failing = outcomes(samples)
    rate = sum(s.passed for s in samples) / max(len(samples), 1)
    if passing and failing:
        candidates = list(itertools.product(passing, failing))
        source = "sample"
    elif reference_when_none_pass and not any(s.passed for s in samples):
        whole = item.head + item.reference  # the reference as a whole assistant message
        candidates = [(whole, f) for f in failing if f != whole]
        source = "reference"
    else:
        return []
    picked = _rng(seed, item).sample(candidates, min(per_problem, len(candidates)))
    return [Pair(item, c, r, source, rate, True, False) for c, r in picked]


def reward_model_pair(item: CodeItem, samples: Sequence[Sample]) -> list[Pair]:
    """The reward model's best answer over its worst; none when their scores tie (nothing
    to learn from it) or only one distinct answer was written."""
    scores: dict[str, float] = {}
    for s in samples:
        if s.score is None:
            raise ValueError(f"{item.task_id}: an answer without a reward model score")
        scores.setdefault(s.text, s.score)
    best = max(scores, key=scores.__getitem__)  # the first of equals: deterministic
    worst = min(scores, key=scores.__getitem__)
    if best == worst or scores[best] == scores[worst]:
        return []
    passing, _ = outcomes(samples)
    rate = sum(s.passed for s in samples) / max(len(samples), 1)
    return [Pair(item, best, worst, "sample", rate, best in passing, worst in passing)]


def make_pairs(cfg: PairsCfg, items: Sequence[CodeItem],
               samples: Sequence[Sequence[Sample]]) -> list[Pair]:
    if cfg.judge == "reward_model":
        return [p for it, ss in zip(items, samples) for p in reward_model_pair(it, ss)]
    return [p for it, ss in zip(items, samples)
            for p in execution_pairs(it, ss, cfg.pairs_per_problem,
                                     cfg.reference_when_none_pass, cfg.seed)]


# --------------------------------------------------------------------------- the phases


def check(cfg: AnswerSamplingCfg, judged_by_rm: bool) -> None:
    """What can be wrong with the settings, said before problems or a model are loaded."""
    from lmforge.io import check_local_or_hub

    if not cfg.model.path:
        raise UserError("model.path: give the policy that answers (an SFT model's final/, "
                        "e.g. runs/demo/sft/final)")
    if judged_by_rm:
        rm = getattr(cfg, "reward_model", None)
        if not rm:
            raise UserError("reward_model: judging by a reward model needs one "
                            "(an `lmforge rm` run's final/ dir)")
        check_local_or_hub(rm, "reward_model")
    if cfg.task == "synthetic_code" and cfg.source is not None:
        raise UserError("source: only task=mbpp reads a source; synthetic_code problems are "
                        "generated (see `synthetic`)")


def load_problems(cfg: AnswerSamplingCfg, label: str = "pairs") -> list[CodeItem]:
    """Training problems only: pairs are training data, and a held-out problem in them
    would inflate every later evaluation."""
    if cfg.task == "synthetic_code":
        from lmforge.tasks.synthetic_code import make_splits, to_code_items

        t = cfg.synthetic
        train = make_splits(t.seed, t.n_train, t.n_eval).train[:cfg.limit]
        items = to_code_items(train, signature_prefill=cfg.signature_prefill)
    else:
        from lmforge.tasks.mbpp import load_mbpp

        if cfg.split in ("test", "validation"):
            print(f"{label}: warning: split={cfg.split} is what evaluations measure; training "
                  "data made from it contaminates them (train is MBPP's training split)")
        items = load_mbpp(cfg.source, split=cfg.split, n_shot=0, limit=cfg.limit)
    if not items:
        raise UserError(f"task {cfg.task}: no problems (split {cfg.split!r}, limit {cfg.limit})")
    return items


def sample_answers(cfg: AnswerSamplingCfg, items: Sequence[CodeItem], label: str = "pairs"
                   ) -> tuple[list[list[str]], dict[str, str], float]:
    """(completions per item, the precision choice, seconds). The policy is loaded here and
    let go on return, so a reward model loaded next does not share memory with it."""
    import torch

    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.precision import make_precision

    path = str(cfg.model.path)
    model = load_model(path, cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"model.path: {path} has no chat template in its tokenizer files; "
                        f"{label} makes chat data: give a model `lmforge sft` trained")
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    precision = make_precision(cfg.precision, next(model.parameters()).device.type)
    print(f"{label}: {precision.choice.line()}")
    gen = Generator(model, tokenizer, chat=True)
    t0 = time.perf_counter()
    completions = answer_items(gen, items, n=cfg.n, temperature=cfg.temperature,
                               top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size, seed=cfg.seed,
                               autocast=precision.autocast())
    seconds = time.perf_counter() - t0
    if gen.truncated:
        print(f"{label}: {gen.truncated} prompts longer than the context lost their start")
    return completions, precision.choice.as_dict(), seconds


def run_tests(cfg: AnswerSamplingCfg, items: Sequence[CodeItem], completions: list[list[str]]
              ) -> tuple[list[list[Sample]], Isolation | None]:
    """Every answer's program in the sandbox; a pass is the sandbox's word that the program
    ran to its end, tests included (an early exit 0 is not one, see sandbox.py)."""
    limits = Limits(timeout_s=cfg.sandbox.timeout_s, memory_mb=cfg.sandbox.memory_mb)
    rows, isolation = score_code(items, completions, limits, cfg.sandbox.workers)
    samples = [[Sample(it.head + c, st, why)
                for c, st, why in zip(cs, row["statuses"], row["reasons"])]
               for it, cs, row in zip(items, completions, rows)]
    return samples, isolation


def score_with_rm(cfg: PairsCfg | Any, items: Sequence[CodeItem],
                  samples: list[list[Sample]]) -> list[list[Sample]]:
    """The reward model's score (`cfg.reward_model`) on each distinct (problem, answer):
    copies score alike."""
    from lmforge.rl.rewards import reward_model_scores

    keys = list(dict.fromkeys((i, s.text) for i, ss in enumerate(samples) for s in ss))
    scores = reward_model_scores(str(cfg.reward_model), None,
                                 [[{"role": "user", "content": items[i].prompt}] for i, _ in keys],
                                 [text for _, text in keys], cfg.batch_size)
    by_key = dict(zip(keys, scores))
    return [[Sample(s.text, s.status, s.reason, by_key[(i, s.text)]) for s in ss]
            for i, ss in enumerate(samples)]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with atomic_file(path) as f:  # nothing half-written looks finished
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def sample_rows(items: Sequence[CodeItem], samples: Sequence[Sequence[Sample]]
                ) -> list[dict[str, Any]]:
    return [{"task_id": it.task_id, "sample": k, "status": s.status, "reason": s.reason,
             **({"score": s.score} if s.score is not None else {}), "answer": s.text}
            for it, ss in zip(items, samples) for k, s in enumerate(ss)]


# --------------------------------------------------------------------------- the summary


def count(samples: Sequence[Sequence[Sample]], pairs: Sequence[Pair]) -> dict[str, Any]:
    passes = [sum(s.passed for s in ss) for ss in samples]
    total = sum(len(ss) for ss in samples)
    return {
        "problems": len(samples), "samples": total,
        "pass_rate": round(sum(passes) / max(total, 1), 4),
        "problems_with_pass": sum(p > 0 for p in passes),
        "problems_all_pass": sum(p == len(ss) for p, ss in zip(passes, samples)),
        "problems_none_pass": sum(p == 0 for p in passes),
        "pairs": len(pairs),
        "pairs_from_reference": sum(p.chosen_from == "reference" for p in pairs),
        "distinct_answers": sum(len({s.text for s in ss}) for ss in samples),
        "blank_answers": sum(not s.text.strip() for ss in samples for s in ss),
    }


def rm_agreement(pairs: Sequence[Pair]) -> float | None:
    """Of the pairs whose two answers fared differently in the sandbox, the fraction where
    the reward model chose the one that passed (None when no pair was mixed)."""
    mixed = [p for p in pairs if p.chosen_passed != p.rejected_passed]
    return round(sum(p.chosen_passed for p in mixed) / len(mixed), 4) if mixed else None


def no_pairs_reason(cfg: PairsCfg, c: dict[str, Any]) -> str:
    """Why nothing was paired, and what to change."""
    head = f"no pairs from {c['problems']} problems x {cfg.n} answers"
    if cfg.judge == "reward_model":
        return (f"{head}: the reward model scored each problem's best and worst answer alike "
                "(or all answers were the same); raise temperature or n")
    if c["problems_all_pass"] == c["problems"]:
        return (f"{head}: every answer passed its tests, so none can be rejected; raise "
                "temperature or n, or give harder problems")
    if c["problems_none_pass"] and not cfg.reference_when_none_pass:
        return (f"{head}: {c['problems_none_pass']} problems had no passing answer and "
                f"{c['problems_all_pass']} had no failing one (reference_when_none_pass is "
                "off); turn it on, lower temperature, or raise n")
    return (f"{head}: no problem had both a passing and a failing answer that ran the same "
            "way every time; raise n or the sandbox timeout")


def final_line(cfg: PairsCfg, s: dict[str, Any]) -> str:
    head = (f"pairs: {s['pairs']} pairs from {s['problems']} problems "
            f"(pass rate {s['pass_rate']:.0%}; ")
    if cfg.judge == "reward_model":
        agree = s["rm_agrees_with_execution"]
        shown = "no pair with one pass and one fail" if agree is None else (
            f"the reward model agrees with the tests on {agree:.0%} of mixed pairs")
        return head + shown + ")"
    none = f"{s['problems_none_pass']} none pass"
    if cfg.reference_when_none_pass:
        none += " -> reference chosen"
    return head + f"{s['problems_all_pass']} all pass, {none})"


# --------------------------------------------------------------------------- main


def main(cfg: PairsCfg) -> dict[str, Any]:
    check(cfg, cfg.judge == "reward_model")
    out = cfg.run.dir
    (out / "pairs.jsonl").unlink(missing_ok=True)  # a rerun's pairs are never the last run's
    items = load_problems(cfg)
    where = f"{cfg.task} {cfg.split if cfg.task == 'mbpp' else 'train'}"
    print(f"pairs: {len(items)} problems ({where}), {cfg.n} answers each")
    completions, precision, gen_s = sample_answers(cfg, items)
    n_samples = sum(len(cs) for cs in completions)
    print(f"pairs: sampled {n_samples} answers in {gen_s:.1f}s "
          f"({n_samples / max(gen_s, 1e-9):.1f}/s)")
    t0 = time.perf_counter()
    samples, isolation = run_tests(cfg, items, completions)
    sandbox_s = time.perf_counter() - t0
    passed = sum(s.passed for ss in samples for s in ss)
    iso = isolation.describe() if isolation is not None else "none"
    print(f"pairs: ran {n_samples} programs in {sandbox_s:.1f}s: {passed} passed "
          f"(sandbox isolation {iso})")
    if isolation is not None and isolation.level == "weak":
        print(f"warning: sandbox isolation is weak here: {iso}")
    extra: dict[str, Any] = {}
    if cfg.judge == "reward_model":
        t0 = time.perf_counter()
        samples = score_with_rm(cfg, items, samples)
        extra["rm_s"] = round(time.perf_counter() - t0, 2)
        print(f"pairs: the reward model scored the answers in {extra['rm_s']:.1f}s")
    pairs = make_pairs(cfg, items, samples)
    write_jsonl(out / "samples.jsonl", sample_rows(items, samples))
    summary: dict[str, Any] = {"task": cfg.task, "judge": cfg.judge, "n": cfg.n,
                               **count(samples, pairs)}
    if cfg.judge == "reward_model":
        summary["rm_agrees_with_execution"] = rm_agreement(pairs)
    if not pairs:
        raise UserError(no_pairs_reason(cfg, summary) + f" (answers: {out / 'samples.jsonl'})")
    write_jsonl(out / "pairs.jsonl", [p.row() for p in pairs])
    summary.update(generation_s=round(gen_s, 2), sandbox_s=round(sandbox_s, 2), **extra,
                   samples_per_s=round(n_samples / max(gen_s, 1e-9), 2), precision=precision,
                   sandbox=iso)
    print(final_line(cfg, summary))
    return summary
