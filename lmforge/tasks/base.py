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

from lmforge.tasks.checks import Harness


@dataclass(frozen=True)
class CodeItem:
    """One code-writing problem.

    `program(completion)` is the text the sandbox runs: the answer (`head + completion`), then
    the tests. `head` is what the completion continues (HumanEval's signature and docstring;
    empty for MBPP, whose answers are whole programs). `reference` is a known-good completion:
    the validation suite checks `program(reference)` passes. `tests` is the tests' source as
    the dataset wrote it; `harness` (tasks/checks.py) is how they run: rewritten so that a
    pass means they compared real values, with everything they use bound before the answer
    runs, and split into tests that each run alone (`program(completion, only=i)`,
    `test_programs`). Without a harness the program is `head + completion` then `tests` as
    written, one test.
    """

    task_id: str
    prompt: str
    tests: str
    reference: str
    entry_point: str = ""
    head: str = ""
    stop: tuple[str, ...] = ()
    meta: dict[str, object] = field(default_factory=dict)
    harness: Harness | None = None

    @property
    def test_list(self) -> tuple[str, ...]:
        """Each test's source, in the order `only` numbers them."""
        return self.harness.units if self.harness is not None else (self.tests,)

    def program(self, completion: str, only: int | None = None) -> str:
        """The answer, then every test, or only test `only` (0-based; see `test_list`)."""
        if only is not None and not 0 <= only < len(self.test_list):
            raise IndexError(f"{self.task_id} has {len(self.test_list)} tests, not test {only}")
        if self.harness is None:
            return f"{self.head}{completion}\n\n{self.tests}\n"
        return self.harness.program(self.head + completion, only)

    def test_programs(self, completion: str) -> list[str]:
        """One program per test: each test's verdict is the sandbox's own, so a reward can count
        the tests an answer passes without trusting anything the answer prints or returns."""
        return [self.program(completion, i) for i in range(len(self.test_list))]


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
