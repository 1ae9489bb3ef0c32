"""GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): grade-school
word problems whose worked answers end in a `#### <number>` line.

Prompt, for a base model, the common n-shot chain-of-thought layout:

    Question: {question}\\nAnswer: {full worked answer, #### line included}\\n\\n   (n_shot times)
    Question: {question}\\nAnswer:

The examples are the first `n_shot` rows of the train split, in file order, so a prompt is the
same on every run; a train item never sees itself as an example. Generation stops where the
model starts a next "Question:".

Scoring: `extract_answer` takes the number after the first "####" (the format the examples
teach), else the last number in the text (a model that reasons but forgets the marker), and
`answers_match` compares numbers, not strings ("3.50" is "3.5", "1,000" is "1000").

Sources: a directory with train.jsonl and test.jsonl, one .jsonl file (its rows are the items;
`split` is not consulted, and n_shot > 0 reads the train.jsonl beside it), or a hub id (default
openai/gsm8k, config "main", read through the optional `datasets`).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from functools import partial
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.tasks.base import AnswerItem
from lmforge.tasks.mbpp import check_limit, field, file_rows, hub_rows, is_hub_id

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
SPLITS = ("train", "test")
STOP = ("\n\nQuestion:", "\nQuestion:")
# A number: optional sign (not the minus of "16-3"), optional "$", digits with optional
# thousands commas, optional decimals. "5." leaves the period out: it ends the sentence.
_NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """A number's canonical text ("1,000.00" -> "1000", "$5.00." -> "5", "3.50" -> "3.5"),
    or None when `text` is not one number."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution or a completion, normalised; None if no number."""
    _, marker, after = text.partition("####")
    found = _NUMBER.search(after) if marker else None
    if found is None:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        return normalize_number(numbers[-1])
    return normalize_number(found.group())


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Numeric equality (to 1e-6) when both are numbers, else equality of the stripped text."""
    if pred is None or ref is None:
        return False
    a, b = normalize_number(pred), normalize_number(ref)
    if a is not None and b is not None:
        return abs(Decimal(a) - Decimal(b)) < Decimal("1e-6")
    return pred.strip() == ref.strip()


def score_completion(completion: str, reference: str) -> bool:
    """AnswerItem.score, a module function (not a lambda) so items can be pickled."""
    return answers_match(extract_answer(completion), reference)


def _problem(row: dict[str, Any], where: str) -> dict[str, str]:
    question = field(row, "question", str, where)
    answer = field(row, "answer", str, where)
    final = extract_answer(answer)
    if final is None:
        raise UserError(f"{where}: field 'answer' has no final number (expected '#### <number>')")
    return {"question": question, "answer": answer, "final": final, "where": where}


def _read_file(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"GSM8K file not found: {path}")
    problems = [_problem(row, where) for where, row in file_rows(path)]
    if not problems:
        raise UserError(f"{path}: no rows")
    return problems


def _hub(name: str, split: str) -> list[dict[str, str]]:
    return [_problem(row, where) for where, row in hub_rows(name, HUB_CONFIG, split)]


def _read(source: str | Path, split: str, n_shot: int) -> tuple[list[dict[str, str]],
                                                                  list[dict[str, str]], str]:
    """(items, the train rows examples come from (empty when n_shot is 0), the items' label:
    the split, or a lone file's stem)."""
    if is_hub_id(source):
        items = _hub(str(source), split)
        train = (items if split == "train" else _hub(str(source), "train")) if n_shot else []
        return items, train, split
    path = Path(source)
    label = split if path.is_dir() else path.stem
    if path.is_dir():
        path = path / f"{split}.jsonl"
    items = _read_file(path)
    if not n_shot:
        return items, [], label
    train = path.with_name("train.jsonl")
    if not train.is_file():
        raise UserError(f"n_shot={n_shot} needs GSM8K's train.jsonl next to {path} "
                        f"(the examples come from it); or use n_shot=0")
    return items, (items if train == path else _read_file(train)), label


def _shots(train: list[dict[str, str]], n_shot: int, question: str) -> str:
    chosen = [p for p in train[: n_shot + 1] if p["question"] != question][:n_shot]
    if len(chosen) < n_shot:
        raise UserError(f"n_shot={n_shot} but the GSM8K train split has only {len(chosen)} "
                        "examples to offer")
    return "".join(f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in chosen)


def load_gsm8k(
    source: str | Path | None = None,
    *,
    split: str = "test",
    n_shot: int = 8,
    limit: int | None = None,
) -> list[AnswerItem]:
    """GSM8K items of one split from a directory, a .jsonl file or a hub id."""
    if split not in SPLITS:
        raise UserError(f"unknown GSM8K split {split!r} (expected {', '.join(SPLITS)})")
    if n_shot < 0:
        raise UserError(f"n_shot must be at least 0, got {n_shot}")
    check_limit(limit)
    items, train, label = _read(HUB_ID if source is None else source, split, n_shot)
    return [
        AnswerItem(
            task_id=f"gsm8k/{label}/{i}",
            prompt=(_shots(train, n_shot, p["question"]) if n_shot else "")
            + f"Question: {p['question']}\nAnswer:",
            answer=p["answer"],
            reference=p["final"],
            score=partial(score_completion, reference=p["final"]),
            stop=STOP,
            meta={"question": p["question"], "where": p["where"]},
        )
        for i, p in enumerate(items[:limit])
    ]
