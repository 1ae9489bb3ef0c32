"""lmforge synth constitutional: responses critiqued and revised against written principles,
as supervised and preference data (Bai et al. 2022, "Constitutional AI: Harmlessness from AI
Feedback").

    lmforge synth constitutional configs/constitutional/demo.yaml model.path=runs/demo/sft/final
    lmforge sft CONFIG data.train=runs/constitutional    # (prompt, final revision)
    lmforge dpo CONFIG data.train=runs/constitutional    # its pairs.jsonl; `lmforge rm` too

For each prompt the model writes a response; then, `revisions` times, the critic (the model
itself unless `critic` names another local model or an endpoint) is shown the exchange and a
principle's critique request, sampled per prompt and round, writes a critique, and is asked
the principle's revision request, writing the revision that becomes the response. Each round
starts again from (prompt, current response): the paper chains the whole exchange, but a small
model's context would not hold it, and the revision is what carries forward. A revision that
is empty or cut by the token limit is refused and the response stays as it was.

Preference pairs: `preferences: revision` chooses the final revision over the first response
(the SL-CAI assumption that revising helped); `preferences: judged` asks the critic which of
the two is better under a sampled principle's `choose` question, in both orders (a judge
favours a slot), and keeps a pair only when both orders agree: RLAIF's AI feedback. A judge
may prefer the original: that pair is kept the other way round.

The principles file (YAML): `principles: [{name?, critique, revision, choose?}, ...]`; the
shipped one is lmforge/defaults/constitution.yaml. Prompts: a .jsonl/.json file with a "prompt"
per row, or a .txt file with one per line; the shipped set is
lmforge/defaults/constitution_prompts.jsonl.

Writes into run.dir `sft.jsonl` ({"messages": [user, assistant], "principles"}), `pairs.jsonl`
({"prompt", "chosen", "rejected", "source", "principles"}) and `trace.jsonl` (every prompt's
response, critiques and revisions), and what was dropped, by reason, in summary.json.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import ConstitutionalCfg, GenCfg
from lmforge.data.chat_rows import load_prompts
from lmforge.endpoint import Choice, Message
from lmforge.errors import UserError
from lmforge.stages.pairs import write_jsonl
from lmforge.writer import Prompt, Writer

LABEL = "constitutional"
DEFAULTS = Path(__file__).resolve().parents[1] / "defaults"
KEYS = ("name", "critique", "revision", "choose")

# The paper's multiple-choice form for AI feedback, answered with a slot letter so that
# `parse_verdict` reads it as it reads any pairwise judge. Fields: {question}, {answer_a},
# {answer_b}; {choose} is put in before (see `choose_template`).
CHOOSE_TEMPLATE = (
    "Consider the following conversation between a human and an assistant:\n\n"
    "Human: {question}\n\n{choose}\n\n"
    "Options:\n(A) {answer_a}\n\n(B) {answer_b}\n\n"
    "Reply with exactly one of: A, B, tie."
)


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    choose: str | None = None


@dataclass
class Thread:
    """One prompt's way from its first response to its last revision."""

    prompt: str
    original: str
    current: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def principles(self) -> list[str]:
        return [s["principle"] for s in self.steps if s.get("accepted")]


# --------------------------------------------------------------------------- inputs


def load_constitution(path: Path, need_choose: bool) -> list[Principle]:
    """The principles of a YAML file; anything missing is one line naming the file and the
    principle."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"constitution: {path} not found") from None
    except OSError as e:
        raise UserError(f"constitution: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    items = data.get("principles") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected `principles:`, a non-empty list of "
                        "{name, critique, revision, choose}")
    return [_principle(path, i, p, need_choose) for i, p in enumerate(items)]


def _principle(path: Path, i: int, p: Any, need_choose: bool) -> Principle:
    where = f"{path}: principles[{i}]"
    if not isinstance(p, dict):
        raise UserError(f"{where}: expected a mapping with critique and revision, "
                        f"got {type(p).__name__}")
    name = str(p.get("name") or f"principle-{i}")
    where += f" ({name})" if p.get("name") else ""
    unknown = sorted(set(map(str, p)) - set(KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(KEYS)})")
    for key in ("critique", "revision") + (("choose",) if need_choose else ()):
        value = p.get(key)
        if not isinstance(value, str) or not value.strip():
            what = ("choose question (preferences: judged asks it)" if key == "choose"
                    else f"{key} prompt")
            raise UserError(f"{where} has no {what}")
    choose = p.get("choose")
    return Principle(name, p["critique"].strip(), p["revision"].strip(),
                     choose.strip() if isinstance(choose, str) else None)


# --------------------------------------------------------------------------- the steps (pure)


def critique_turns(t: Thread, p: Principle) -> list[Message]:
    return [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.current},
            {"role": "user", "content": p.critique}]


def revision_turns(t: Thread, p: Principle, critique: str) -> list[Message]:
    return [*critique_turns(t, p), {"role": "assistant", "content": critique},
            {"role": "user", "content": p.revision}]


def apply_revision(t: Thread, p: Principle, critique: Choice, revision: Choice) -> str | None:
    """Record one round; the revision becomes the response unless it is unusable (the reason
    is returned)."""
    why = None
    if not critique.text.strip():
        why = "empty critique"
    elif not revision.text.strip():
        why = "empty revision"
    elif revision.cut:
        why = "revision cut off"
    t.steps.append({"principle": p.name, "critique": critique.text, "revision": revision.text,
                    "accepted": why is None, **({"refused": why} if why else {})})
    if why is None:
        t.current = revision.text.strip()
    return why


def choose_template(p: Principle) -> str:
    """CHOOSE_TEMPLATE with the principle's question in; its braces escaped for str.format."""
    question = str(p.choose).replace("{", "{{").replace("}", "}}")
    return CHOOSE_TEMPLATE.replace("{choose}", question)


def revision_pairs(revised: Sequence[Thread]) -> list[dict[str, Any]]:
    return [{"prompt": [{"role": "user", "content": t.prompt}], "chosen": t.current,
             "rejected": t.original, "source": "revision", "principles": t.principles}
            for t in revised]


# --------------------------------------------------------------------------- with the models


def ask(writer: Writer, prompts: Sequence[Prompt], g: GenCfg, seed: int) -> list[Choice]:
    return [cs[0] for cs in writer(prompts, temperature=g.temperature, top_p=g.top_p,
                                   max_new_tokens=g.max_new_tokens, seed=seed)]


def revise(cfg: ConstitutionalCfg, critic: Writer, threads: Sequence[Thread],
           principles: Sequence[Principle], rng: random.Random, drops: Counter[str]) -> None:
    for r in range(cfg.revisions):
        picks = [rng.choice(principles) for _ in threads]
        critiques = ask(critic, [critique_turns(t, p) for t, p in zip(threads, picks)],
                        cfg.critique, cfg.seed + 1000 * r + 1)
        revisions = ask(critic, [revision_turns(t, p, c.text)
                                 for t, p, c in zip(threads, picks, critiques)],
                        cfg.revision, cfg.seed + 1000 * r + 2)
        for t, p, c, v in zip(threads, picks, critiques, revisions):
            why = apply_revision(t, p, c, v)
            if why is not None:
                drops[why] += 1
        kept = sum(s["accepted"] for t in threads for s in t.steps[-1:])
        print(f"{LABEL}: round {r + 1}/{cfg.revisions}: {kept} of {len(threads)} revisions "
              "accepted")


def judged_pairs(critic: Writer, revised: Sequence[Thread], principles: Sequence[Principle],
                 rng: random.Random, seed: int, drops: Counter[str]
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each revised thread's revision against its original, judged in both orders under a
    sampled principle; a pair only where both orders agree."""
    from lmforge.eval.judge import judge_pairs, summarize

    def judge(prompts: list[str]) -> list[str]:
        return [c.text for c in ask(critic, prompts, GenCfg(temperature=0, max_new_tokens=16),
                                    seed)]

    picks = [rng.choice(principles) for _ in revised]
    pairs: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    for p in dict.fromkeys(picks):  # one judge call per principle, in first-drawn order
        group = [t for t, q in zip(revised, picks) if q is p]
        rows, _ = judge_pairs(judge, [(t.prompt, t.current, t.original) for t in group],
                              choose_template(p))
        verdicts += rows
        for t, row in zip(group, rows):
            if row["outcome"] == "tie":
                drops["judge: tie or orders disagree"] += 1
                continue
            better, worse = ((t.current, t.original) if row["outcome"] == "win"
                             else (t.original, t.current))
            pairs.append({"prompt": [{"role": "user", "content": t.prompt}], "chosen": better,
                          "rejected": worse, "source": "judged", "judged_by": p.name,
                          "revision_won": row["outcome"] == "win", "principles": t.principles})
    return pairs, summarize(verdicts)


# --------------------------------------------------------------------------- main


def main(cfg: ConstitutionalCfg) -> dict[str, Any]:
    model = Writer(cfg.model, "model")
    critic = Writer(cfg.critic, "critic") if cfg.critic is not None else model
    model.check()
    if critic is not model:
        critic.check()
    principles = load_constitution(cfg.constitution or DEFAULTS / "constitution.yaml",
                                   cfg.preferences == "judged")
    prompts = load_prompts(cfg.prompts or DEFAULTS / "constitution_prompts.jsonl", cfg.limit)
    out = cfg.run.dir
    for name in ("sft.jsonl", "pairs.jsonl"):
        (out / name).unlink(missing_ok=True)  # a rerun's rows are never the last run's
    print(f"{LABEL}: {len(prompts)} prompts, {len(principles)} principles, {cfg.revisions} "
          f"revisions each; model {model.label}, critic "
          f"{'the model itself' if critic is model else critic.label}")
    rng, drops = random.Random(cfg.seed), Counter[str]()
    firsts = ask(model, prompts, cfg.response, cfg.seed)
    if critic is not model:
        model.close()  # the critic does the rest: two local models need not share memory
    threads = []
    for prompt, first in zip(prompts, firsts):
        if first.text.strip():
            threads.append(Thread(prompt, first.text.strip(), first.text.strip()))
        else:
            drops["empty first response"] += 1
    if threads:
        revise(cfg, critic, threads, principles, rng, drops)
    write_jsonl(out / "trace.jsonl", [{"prompt": t.prompt, "original": t.original,
                                       "final": t.current, "steps": t.steps} for t in threads])
    revised = [t for t in threads if t.current != t.original]
    drops["never revised (no row)"] += len(threads) - len(revised)
    sft = [{"messages": [{"role": "user", "content": t.prompt},
                         {"role": "assistant", "content": t.current}],
            "principles": t.principles} for t in revised]
    judge_summary = None
    if cfg.preferences == "judged":
        pairs, judge_summary = judged_pairs(critic, revised, principles, rng, cfg.seed + 99, drops)
    else:
        pairs = revision_pairs(revised)
    summary: dict[str, Any] = {
        "prompts": len(prompts), "principles": [p.name for p in principles],
        "revisions": cfg.revisions, "responses": len(threads),
        "revisions_accepted": sum(s["accepted"] for t in threads for s in t.steps),
        "revised_prompts": len(revised), "sft_rows": len(sft), "pairs": len(pairs),
        "preferences": cfg.preferences, "dropped_by_reason": dict(sorted(drops.items())),
        "model": model.describe(), **({"critic": critic.describe()} if critic is not model else {}),
        **({"judge": judge_summary} if judge_summary is not None else {})}
    if not sft:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()) if v)
        raise UserError(f"{LABEL}: no prompt was revised ({shown}); see {out / 'trace.jsonl'}")
    write_jsonl(out / "sft.jsonl", sft)
    if pairs:
        write_jsonl(out / "pairs.jsonl", pairs)
    else:
        why = ("the judge never agreed with itself across the two orders"
               if cfg.preferences == "judged" else "no revision differs from its original")
        print(f"{LABEL}: warning: no preference pairs ({why}); only sft.jsonl was written")
    print(f"{LABEL}: {len(sft)} SFT rows, {len(pairs)} preference pairs ({cfg.preferences}) "
          f"-> {out}")
    return summary
