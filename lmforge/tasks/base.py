"""What every evaluation task hands the evaluator: items with a prompt and a way to score.

Two kinds of tasks exist. Code tasks (`CodeItem`) are scored by running a program built from
the model's completion and the item's tests in the sandbox: the item passes when that program
runs to its end. Answer tasks (`AnswerItem`) are scored by comparing an extracted answer with
the reference (GSM8K's final number). Both carry a `prompt` in the task's own documented
format; the evaluator sends it as is to a base model, or as the user turn with a chat model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CodeItem:
    """One code-writing problem.

    `program(completion)` is the text the sandbox runs: `head + completion`, then the tests.
    `head` is what the completion continues (HumanEval's signature and docstring; empty for
    MBPP, whose answers are whole programs). `reference` is a known-good completion: the
    validation suite checks `program(reference)` passes.
    """

    task_id: str
    prompt: str
    tests: str
    reference: str
    entry_point: str = ""
    head: str = ""
    stop: tuple[str, ...] = ()
    meta: dict[str, object] = field(default_factory=dict)

    def program(self, completion: str) -> str:
        return f"{self.head}{completion}\n\n{self.tests}\n"


@dataclass(frozen=True)
class AnswerItem:
    """One question with a reference answer, scored by `score(completion) -> bool`."""

    task_id: str
    prompt: str
    answer: str
    reference: str
    score: Callable[[str], bool]
    stop: tuple[str, ...] = ()
    meta: dict[str, object] = field(default_factory=dict)
