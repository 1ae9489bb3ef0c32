"""lmforge synth best-of-n: rejection sampling. n answers per training problem from a policy,
one picked per problem, kept as SFT data; and best-of-k pass@1 for each k, the cheap baseline
every RL result has to beat (same policy, same problems, only more samples and a selector).

    lmforge synth best-of-n configs/best_of_n/tiny.yaml model.path=runs/demo/sft/final
    lmforge sft CONFIG data.train=runs/best-of-n          # trains on what was kept

The selector is the tests (`select: tests`: every answer runs with the problem's tests in the
sandbox, a passing one is picked) or a reward model (`select: reward_model`: the highest
score; the sandbox still runs every answer, so the table says how often the reward model's
pick really passes). `keep: passing` writes a problem's pick only when it passed its tests;
`keep: best` writes it whatever (what a reward model alone would keep, verified or not).

Best-of-k pass@1 is computed exactly from the n answers (`eval/passk.py` best_of_k: the
chance the top-scoring of k answers drawn from the n passes), not by drawing subsets; under
the tests it equals pass@k, the oracle verifier's ceiling, which the table prints beside it.

Writes into run.dir `sft.jsonl` (one row per kept problem, the shape `lmforge sft` reads:
{"messages": [user, assistant], "task_id", "passed", "score", "pick"}) and `samples.jsonl`
(every answer, its sandbox status and score). A run dir given as `data.train` is read
through its sft.jsonl.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.config import BestOfNCfg
from lmforge.errors import UserError
from lmforge.eval.passk import best_of_k, pass_at_k
from lmforge.stages.pairs import (
    Sample,
    check,
    load_problems,
    run_tests,
    sample_answers,
    sample_rows,
    score_with_rm,
    write_jsonl,
)
from lmforge.tasks.base import CodeItem

LABEL = "best-of-n"


def scores_of(samples: Sequence[Sample], select: str) -> list[float]:
    """What the selector ranks by: the reward model's score, or the tests (1 pass, 0 not)."""
    if select == "reward_model":
        return [float(s.score) for s in samples]  # type: ignore[arg-type]
    return [float(s.passed) for s in samples]


def pick(scores: Sequence[float]) -> int:
    """The selected answer: the highest score, the earliest among equals (as best_of_k ranks)."""
    return min(range(len(scores)), key=lambda i: (-scores[i], i))


def curve(samples: Sequence[Sequence[Sample]], select: str, ks: Sequence[int]) -> list[dict[str, Any]]:
    """Per k, the mean over problems of best-of-k pass@1 under the selector, and pass@k (any
    of k passes: what a perfect verifier would reach)."""
    rows = []
    for k in ks:
        sel = [best_of_k(scores_of(ss, select), [s.passed for s in ss], k) for ss in samples]
        ora = [pass_at_k(len(ss), sum(s.passed for s in ss), k) for ss in samples]
        rows.append({"k": k, "best_of_k_pass@1": round(float(np.mean(sel)), 4),
                     "pass@k": round(float(np.mean(ora)), 4)})
    return rows


def kept_rows(cfg: BestOfNCfg, items: Sequence[CodeItem],
              samples: Sequence[Sequence[Sample]]) -> list[dict[str, Any]]:
    rows = []
    for it, ss in zip(items, samples):
        i = pick(scores_of(ss, cfg.select))
        s = ss[i]
        if cfg.keep == "passing" and not s.passed:
            continue
        rows.append({"messages": [{"role": "user", "content": it.prompt},
                                  {"role": "assistant", "content": s.text}],
                     "task_id": it.task_id, "passed": s.passed, "pick": i,
                     **({"score": s.score} if s.score is not None else {})})
    return rows


def table(cfg: BestOfNCfg, rows: Sequence[dict[str, Any]]) -> str:
    head = ("best-of-k pass@1 (tests pick = pass@k)" if cfg.select == "tests"
            else "best-of-k pass@1 (reward model's pick) | pass@k (a perfect verifier)")
    lines = [f"k | {head}"]
    for r in rows:
        extra = "" if cfg.select == "tests" else f" | {r['pass@k']:.1%}"
        lines.append(f"{r['k']} | {r['best_of_k_pass@1']:.1%}{extra}")
    return "\n".join(lines)


def main(cfg: BestOfNCfg) -> dict[str, Any]:
    check(cfg, cfg.select == "reward_model")
    out = cfg.run.dir
    (out / "sft.jsonl").unlink(missing_ok=True)  # a rerun's rows are never the last run's
    items = load_problems(cfg, LABEL)
    print(f"{LABEL}: {len(items)} problems, {cfg.n} answers each, picked by {cfg.select}")
    completions, precision, gen_s = sample_answers(cfg, items, LABEL)
    t0 = time.perf_counter()
    samples, isolation = run_tests(cfg, items, completions)
    sandbox_s = time.perf_counter() - t0
    iso = isolation.describe() if isolation is not None else "none"
    if isolation is not None and isolation.level == "weak":
        print(f"warning: sandbox isolation is weak here: {iso}")
    if cfg.select == "reward_model":
        samples = score_with_rm(cfg, items, samples)
    write_jsonl(out / "samples.jsonl", sample_rows(items, samples))
    rows = kept_rows(cfg, items, samples)
    by_k = curve(samples, cfg.select, cfg.ks)
    print(table(cfg, by_k))
    n_samples = sum(len(ss) for ss in samples)
    summary: dict[str, Any] = {
        "task": cfg.task, "select": cfg.select, "keep": cfg.keep, "n": cfg.n,
        "problems": len(items), "samples": n_samples,
        "pass_rate": round(sum(s.passed for ss in samples for s in ss) / max(n_samples, 1), 4),
        "kept": len(rows), "kept_passing": sum(r["passed"] for r in rows),
        "dropped": len(items) - len(rows), "best_of_k": by_k,
        "generation_s": round(gen_s, 2), "sandbox_s": round(sandbox_s, 2),
        "precision": precision, "sandbox": iso}
    if not rows:
        raise UserError(f"{LABEL}: no problem kept: none of {len(items)} problems had a passing "
                        f"pick among {cfg.n} answers; raise n or temperature, or start from a "
                        f"stronger policy (answers: {out / 'samples.jsonl'})")
    write_jsonl(out / "sft.jsonl", rows)
    print(f"{LABEL}: kept {len(rows)} of {len(items)} problems ({summary['kept_passing']} "
          f"passing) -> {out / 'sft.jsonl'}")
    return summary
