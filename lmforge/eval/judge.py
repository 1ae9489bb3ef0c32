"""LLM-as-judge, pairwise (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench").

A judge is any callable `list[str] -> list[str]`: prompts in, raw replies out, one per prompt.
Two come built in: a local Hugging Face model (`hf_judge`, greedy) and an OpenAI-compatible
endpoint (`openai_judge`: vLLM, `lmforge serve`, or a hosted API); `make_judge` picks one from a
string.

`judge_pairs` asks about every (question, answer_1, answer_2) twice, once with answer_1 in slot
A and once in slot B, because judges favour a position (MT-Bench measured it for GPT-4 too).
A pair is a win or a loss only when both orders agree; anything else is a tie (MT-Bench's
conservative rule). The summary reports how often the orders agreed, how often slot A was
picked, and whether wins follow answer length, the two biases that most distort such numbers.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from lmforge.endpoint import Endpoint, in_threads, is_endpoint
from lmforge.errors import UserError

Judge = Callable[[list[str]], list[str]]
Verdict = Literal["A", "B", "tie"]

# MT-Bench's pairwise prompt ("pair-v2"), cut to the verdict alone: a judge given 16 new tokens
# has no room for the explanation MT-Bench asks for first, and a bare letter parses reliably.
# Fields: {question}, {answer_a}, {answer_b} (str.format; braces inside them are left alone).
PAIRWISE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user question displayed below. Choose the assistant that follows the "
    "user's instructions and answers the user's question better, considering helpfulness, "
    "relevance, accuracy, depth and level of detail. Do not let the order in which the responses "
    "are presented, their length, or the assistants' names influence your decision. Be as "
    "objective as possible.\n\n"
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]\n\n"
    "Reply with exactly one of: A, B, tie."
)


def render_pairwise(question: str, answer_a: str, answer_b: str,
                    template: str = PAIRWISE_TEMPLATE) -> str:
    """The judge prompt with `answer_a` in slot A and `answer_b` in slot B."""
    return template.format(question=question, answer_a=answer_a, answer_b=answer_b)


# --------------------------------------------------------------------------- parsing verdicts

_BRACKET_WORD: dict[str, Verdict] = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}
# MT-Bench's own format; [[C]] is its tie. The last one wins: a verdict follows any reasoning.
_BRACKET = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
# A reply that opens with the verdict: "A", "B.", "**A**", "(B) because". Upper case only and
# followed by punctuation or the end, so the article in "A good answer..." is not read as one.
_LEADING = re.compile(r"^[\s*\"'(\[]*(A|B)(?:\s*$|\s*\n|[.:;,!)\]*\"'\-])")
_ALONE = re.compile(r"^[\W_]*([ab])[\W_]*$", re.IGNORECASE)  # "b", "a." : nothing else said
_LEADING_TIE = re.compile(r"^[\s*\"'(\[]*tie\b", re.IGNORECASE)
# "Assistant B is better", "A's answer is clearly superior".
_BETTER = re.compile(
    r"\b(A|B)\b(?:'s)?(?:\s+(?i:answer|response))?\s+(?i:is|was)\s+(?:\w+\s+)?"
    r"(?i:better|superior|preferred|stronger|the\s+winner)")
# "Final verdict: A", "Winner: Assistant B", "I prefer A".
_NAMED = re.compile(
    r"(?i:\b(?:verdict|winner|choice|answer|output)\s*:|\b(?:prefer|choose|pick|select))"
    r"[\s*\"'\[]*(?:(?i:assistant)\s+)?(A|B)\b")
_TIE = re.compile(r"\b(?:tie|tied|draw|neither|equally\s+(?:good|bad|well|helpful))\b",
                  re.IGNORECASE)
_MENTION = re.compile(r"\b(?i:assistant)\s+(A|B)\b")


def parse_verdict(reply: str) -> Verdict | None:
    """'A', 'B' or 'tie' from a judge's reply; None when it cannot be read.

    Tried in order, the first that matches decides: a bracketed verdict (the last of
    "[[A]]"/"[[B]]"/"[[C]]"/"[[tie]]"); a reply opening with the verdict ("A.", "Tie") or
    made of one letter ("b"); a phrase ("Assistant B is better", "verdict: A", "I prefer B";
    the last such phrase); a tie word ("tie", "draw", "neither", "equally good"); a reply
    naming exactly one of "Assistant A"/"Assistant B"."""
    text = reply.strip()
    if brackets := _BRACKET.findall(text):
        return _BRACKET_WORD[brackets[-1].lower()]
    if m := _LEADING.match(text):
        return cast(Verdict, m.group(1))
    if m := _ALONE.match(text):
        return cast(Verdict, m.group(1).upper())
    if _LEADING_TIE.match(text):
        return "tie"
    phrases = [(m.start(), m.group(1)) for p in (_BETTER, _NAMED) for m in p.finditer(text)]
    if phrases:
        return cast(Verdict, max(phrases)[1])
    if _TIE.search(text):
        return "tie"
    mentioned = set(_MENTION.findall(text))
    if len(mentioned) == 1:
        return cast(Verdict, mentioned.pop())
    return None


# --------------------------------------------------------------------------- judging pairs

Outcome = Literal["win", "loss", "tie"]
BUCKETS = ("1 shorter", "about equal", "1 longer")


def _pick(verdict: Verdict | None, first_in_a: bool) -> str | None:
    """The answer a slot verdict points at: '1', '2', 'tie' or None (unreadable)."""
    if verdict is None or verdict == "tie":
        return verdict
    return "1" if (verdict == "A") == first_in_a else "2"


def length_bucket(diff: int, longer: int) -> str:
    """'about equal' when the answers differ by <= 2 words or <= 10% of the longer one."""
    if abs(diff) <= max(2.0, 0.1 * longer):
        return "about equal"
    return "1 longer" if diff > 0 else "1 shorter"


def judge_pairs(judge: Judge, items: Sequence[tuple[str, str, str]],
                template: str = PAIRWISE_TEMPLATE) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge (question, answer_1, answer_2) triples; answer_1 is the system under test,
    answer_2 the baseline. Every pair is asked in both orders (answer_1 in slot A, then
    answer_2 in slot A), all 2n prompts in one call to `judge`. `template` has the fields
    {question}, {answer_a} and {answer_b} (str.format), and asks for A, B or tie.

    Per pair: outcome 'win'/'loss' when both orders pick the same answer, else 'tie' (a
    preference in one order and a tie or an unreadable reply in the other is a tie);
    `consistent` when both orders pick the same answer or both say tie. See `summarize`."""
    prompts = [p for q, a1, a2 in items for p in (render_pairwise(q, a1, a2, template),
                                                  render_pairwise(q, a2, a1, template))]
    replies = judge(prompts) if prompts else []
    if len(replies) != len(prompts):
        raise ValueError(f"judge returned {len(replies)} replies for {len(prompts)} prompts")
    rows: list[dict[str, Any]] = []
    for i, (q, a1, a2) in enumerate(items):
        r1, r2 = replies[2 * i], replies[2 * i + 1]
        v1, v2 = parse_verdict(r1), parse_verdict(r2)
        p1, p2 = _pick(v1, first_in_a=True), _pick(v2, first_in_a=False)
        outcome: Outcome = "tie"
        if p1 == p2 and p1 in ("1", "2"):
            outcome = "win" if p1 == "1" else "loss"
        w1, w2 = len(a1.split()), len(a2.split())
        rows.append({
            "question": q, "answer_1": a1, "answer_2": a2,
            "reply_1_as_A": r1, "reply_2_as_A": r2,
            "verdict_1_as_A": v1, "verdict_2_as_A": v2,  # slot letters, as the judge said
            "pick_1_as_A": p1, "pick_2_as_A": p2,  # the answer it meant: '1', '2', 'tie', None
            "outcome": outcome, "consistent": p1 == p2 and p1 is not None,
            "length_diff": w1 - w2, "length_bucket": length_bucket(w1 - w2, max(w1, w2)),
        })
    return rows, summarize(rows)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rates over pairs, and the judge's biases.

    position_consistency: fraction of pairs whose two orders agreed.
    first_position_rate: of the replies that picked an answer (A or B, ties left out, so an
    unbiased judge scores 0.5 however often it says tie), the fraction that picked slot A.
    unparseable: replies (of 2n) that `parse_verdict` could not read; their pair is a tie.
    length_bias: answer_1's win rate per bucket of word-count difference (answer_1 minus
    answer_2; see `length_bucket`), and the Pearson correlation between that difference and
    the pair's score (win 1, tie 0.5, loss 0); None when either is constant or n < 2."""
    n = len(rows)
    count = {o: sum(r["outcome"] == o for r in rows) for o in ("win", "loss", "tie")}
    verdicts = [r[k] for r in rows for k in ("verdict_1_as_A", "verdict_2_as_A")]
    decisive = [v for v in verdicts if v in ("A", "B")]
    buckets: dict[str, dict[str, Any]] = {}
    for b in BUCKETS:
        part = [r for r in rows if r["length_bucket"] == b]
        wins = sum(r["outcome"] == "win" for r in part)
        buckets[b] = {"n": len(part), "win_rate": wins / len(part) if part else None}
    score = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    return {
        "n": n,
        **{f"{o}_rate": count[o] / n if n else None for o in ("win", "loss", "tie")},
        "position_consistency": sum(r["consistent"] for r in rows) / n if n else None,
        "first_position_rate": decisive.count("A") / len(decisive) if decisive else None,
        "unparseable": sum(v is None for v in verdicts),
        "length_bias": {
            "buckets": buckets,
            "correlation": _pearson([float(r["length_diff"]) for r in rows],
                                    [score[r["outcome"]] for r in rows]),
        },
    }


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None  # undefined: a constant has no variance to correlate
    return statistics.correlation(x, y)


# --------------------------------------------------------------------------- judges


class HFJudge:
    """A local causal LM answering each prompt as a user turn (raw text without a chat
    template), greedily."""

    def __init__(self, path: str, batch_size: int = 8, max_new_tokens: int = 16) -> None:
        import torch

        from lmforge.eval.harness import Generator
        from lmforge.models import load_model, resolve_model_dir
        from lmforge.tokenizer import load_tokenizer

        if not Path(path).is_dir():
            raise UserError(f"judge model directory not found: {path}")
        self.path = resolve_model_dir(path)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_model(self.path).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.generator = Generator(self.model, self.tokenizer)
        self.chat, self.stop_ids = self.generator.chat, self.generator.stop_ids

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.generator.prompt_ids(prompt)

    def __call__(self, prompts: list[str]) -> list[str]:
        outs = self.generator(prompts, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size)
        return [o[0] for o in outs]


def hf_judge(path: str, *, batch_size: int = 8, max_new_tokens: int = 16) -> HFJudge:
    """A judge from a local Hugging Face model dir (or a stage dir holding `final/`)."""
    return HFJudge(path, batch_size, max_new_tokens)


class OpenAIJudge:
    """POSTs each prompt as one user message to an OpenAI-compatible /chat/completions,
    temperature 0, `workers` requests at a time."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60,
                 max_tokens: int = 16, workers: int = 4) -> None:
        self.max_tokens, self.workers = max_tokens, workers
        self.endpoint = Endpoint(url, model, api_key=api_key, timeout=timeout,
                                 what="judge endpoint")

    def __call__(self, prompts: list[str]) -> list[str]:
        return in_threads(self.ask, prompts, self.workers)

    def ask(self, prompt: str) -> str:
        return self.endpoint.chat([{"role": "user", "content": prompt}], temperature=0,
                                  max_tokens=self.max_tokens)[0].text


def openai_judge(url: str, *, model: str, api_key: str | None = None, timeout: float = 60,
                 max_tokens: int = 16, workers: int = 4) -> OpenAIJudge:
    """A judge at an OpenAI-compatible endpoint (see `endpoint.api_base` for the URL
    forms). `api_key` defaults to $OPENAI_API_KEY; no key, no Authorization header (local
    vLLM and `lmforge serve` need none)."""
    return OpenAIJudge(url, model, api_key, timeout, max_tokens, workers)


def make_judge(spec: str, **kw: Any) -> Judge:
    """An http:// or https:// URL is an endpoint (`openai_judge`, needs model=...); anything
    else a local model dir (`hf_judge`). Keyword arguments go to the chosen constructor."""
    if is_endpoint(spec):
        if not kw.get("model"):
            raise UserError(f"judge {spec}: an endpoint judge needs a model name")
        return openai_judge(spec, **kw)
    return hf_judge(spec, **kw)
