"""MBPP (Austin et al. 2021, "Program Synthesis with Large Language Models"): 974 short Python
problems, each a sentence, a reference program and three asserts; and the hand-verified
"sanitized" subset (427 problems) whose rows say `prompt` for `text` and add `test_imports`.

Splits are the upstream task_id ranges (google-research `mbpp/README.md`): prompt 1-10, test
11-510, validation 511-600, train 601-974. They are applied to local files; a hub dataset
already comes split, under the same names. A local row whose task_id is outside 1-974 belongs to
no split.

The prompt is the paper's, as EleutherAI's lm-evaluation-harness `mbpp` task renders it:

    You are an expert Python programmer, and here is your task: {text} Your code should pass
    these tests:\\n\\n{test_list joined by \\n}\\n[BEGIN]\\n

(one line up to "tests:"), preceded by `n_shot` solved examples from the prompt split, each that
same text followed by `{code}\\n[DONE]\\n\\n`. The examples are tasks 2, 3, 4 (then 5..10, then
1), the ones the paper and the harnesses show; an item of the prompt split never sees itself as
an example. Generation stops at "[DONE]".

One deliberate difference from lm-evaluation-harness: the full set's code uses CRLF line endings
(972 of 974 rows; tasks 104, 255, 593 and 732 also hold a bare CR) and is turned into LF here,
in the examples, the setup code and the references alike. A tokenizer trained on LF code (ours
are) sees "\\r" as a rare byte, and a few-shot prompt full of them teaches the model to emit
them. The sanitized file is LF already. Asserts lose trailing newlines (task 847 has one, which
would put a blank line in its prompt) but keep trailing spaces (task 4's, as the harness shows).

`tests` is the sanitized `test_imports`, then `test_setup_code` (two full-set rows, 367 and 927,
build trees from a `Node` class that the solution itself defines, which is why tests run after
the completion), then the asserts. `challenge_test_list` (11 rows) is left out, as everywhere.
The program runs them rewritten (tasks/checks.py): each `==` through a comparator that wants
builtin values, every name they use bound before the answer runs, each assert a test of its
own (`CodeItem.program(completion, only=i)`).

`sft_conversations` turns a split into supervised fine-tuning data (`data.train: mbpp` in an SFT
config): the user turn is the zero-shot prompt, built by `load_mbpp` itself so it cannot drift
from what the eval sends, and the assistant turn is the LF reference. "[DONE]" is not trained:
a chat model ends its answer with its template's end-of-turn token, where chat-mode eval stops.

This module also holds the row-reading helpers the other hub-backed tasks share: `hub_rows`,
`file_rows`, `field`.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data.chat_rows import Conversation, iter_rows
from lmforge.errors import UserError
from lmforge.io import check_local_or_hub
from lmforge.tasks import checks
from lmforge.tasks.base import CodeItem

HUB_ID = "google-research-datasets/mbpp"
SPLITS: dict[str, tuple[int, int]] = {
    "prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974),
}
# Austin et al. prompt with tasks 2, 3 and 4; lm-evaluation-harness uses the same three.
SHOT_ORDER = (2, 3, 4, 5, 6, 7, 8, 9, 10, 1)
STOP = ("[DONE]",)
FULL_FILE = "mbpp.jsonl"
SANITIZED_FILES = ("sanitized-mbpp.json", "sanitized-mbpp.jsonl")
# A missing path with one of these suffixes is a mistyped local file, not a hub id.
_FILE_SUFFIXES = {".json", ".jsonl", ".gz"}
_TYPE_LABELS = {str: "a string", int: "an integer", list: "a list of strings"}


def field(row: dict[str, Any], key: str, kind: type, where: str, *, required: bool = True) -> Any:
    """`row[key]` checked to be `kind` (lists: of strings); null counts as absent, and an absent
    optional field is the empty value of its kind (hub exports fill gaps with null)."""
    value = row.get(key)
    if value is None:
        if required:
            raise UserError(f"{where}: missing field {key!r}")
        return kind()
    # bool is an int subclass, but `"task_id": true` is a broken row, not task 1.
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and kind is list:
        ok = all(isinstance(v, str) for v in value)
    if not ok:
        mixed = kind is list and isinstance(value, list)
        shown = "a list with a non-string" if mixed else type(value).__name__
        raise UserError(f"{where}: field {key!r} must be {_TYPE_LABELS[kind]}, got {shown}")
    return value


def check_object(row: Any, where: str) -> dict[str, Any]:
    """The row itself when it is a JSON object; a bad JSON line (yielded as an error) raises."""
    if isinstance(row, UserError):
        raise row
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def file_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, object) per row of a .jsonl (`path:line`) or .json list (`path[item i]`)."""
    return [(where, check_object(row, where)) for where, row in iter_rows(path)]


def hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) per row of a hub dataset split, read through the optional `datasets`."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading hub dataset {name!r} needs the datasets package: "
                        "pip install 'lmforge[data]'") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, ValueError) as e:
        # Unknown repo (DatasetNotFoundError is a FileNotFoundError), config or split.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"hub dataset {name!r} ({config or 'default'}) split {split!r}: "
                        f"{first}") from None
    for i, row in enumerate(rows):
        yield f"hub:{name}[row {i}]", dict(row)


def is_hub_id(source: str | Path) -> bool:
    """True for a hub id; a path that exists is local, and a missing one that cannot be an id
    (or ends like a data file) is a UserError, said before any network wait."""
    if Path(source).exists():
        return False
    check_local_or_hub(source, "dataset")
    if Path(source).suffix.lower() in _FILE_SUFFIXES:
        raise UserError(f"dataset path not found: {source}")
    return True


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """One problem as the paper states it; a solved example appends `{code}\\n[DONE]\\n\\n`."""
    return (f"You are an expert Python programmer, and here is your task: {text} "
            f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def entry_point(code: str, tests: list[str]) -> str:
    """The function the asserts call: the first called name the reference defines, else the
    first called name that is not a builtin (`set(f(x)) == ...` calls `f`, not `set`).
    Parsing is not running: the dataset's code is never executed here."""
    called: list[str] = []
    for test in tests:
        try:
            tree = ast.parse(test)
        except SyntaxError:
            continue
        called += [n.func.id for n in ast.walk(tree)
                   if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    try:
        body = ast.parse(code).body
    except SyntaxError:
        body = []
    defined = {n.name for n in body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    for name in called:
        if name in defined:
            return name
    return next((n for n in called if not hasattr(builtins, n)), "")


def _lf(text: str) -> str:
    """Universal newlines: CRLF, and the bare CR that ends four full-set solutions, become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _problem(row: dict[str, Any], where: str, sanitized: bool) -> dict[str, Any]:
    """A row checked and normalised: text, code, task_id, tests (asserts), setup (lines)."""
    task_id = field(row, "task_id", int, where)
    text = field(row, "prompt" if sanitized else "text", str, where)
    code = field(row, "code", str, where)
    asserts = field(row, "test_list", list, where)
    if not asserts:
        raise UserError(f"{where}: field 'test_list' is empty")
    if sanitized:
        setup = list(field(row, "test_imports", list, where, required=False))
    else:
        setup = [field(row, "test_setup_code", str, where, required=False)]
    setup = [_lf(s).rstrip() for s in setup if s.strip()]
    # Task 847's last assert ends in "\n" (a blank line in the prompt otherwise); a trailing
    # space (task 4) is kept, as lm-evaluation-harness shows it.
    asserts = [a.rstrip("\r\n") for a in asserts]
    return {"task_id": task_id, "text": text, "code": _lf(code),
            "asserts": asserts, "setup": setup, "where": where}


def _split_of(task_id: int) -> str | None:
    return next((name for name, (lo, hi) in SPLITS.items() if lo <= task_id <= hi), None)


def _local_file(path: Path, sanitized: bool) -> Path:
    if path.is_file():
        return path
    names = SANITIZED_FILES if sanitized else (FULL_FILE,)
    for name in names:
        if (path / name).is_file():
            return path / name
    raise UserError(f"MBPP directory {path} has no {' or '.join(names)}")


def _read_local(path: Path, sanitized: bool) -> dict[str, list[dict[str, Any]]]:
    """Problems of a local file grouped by split, each split in task_id order."""
    rows = file_rows(_local_file(path, sanitized))
    if not rows:
        raise UserError(f"{path}: no rows")
    # A sanitized file read without `sanitized=True` is still recognised by its fields.
    first = rows[0][1]
    sanitized = sanitized or ("prompt" in first and "text" not in first)
    seen: dict[int, str] = {}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for where, row in rows:
        p = _problem(row, where, sanitized)
        if p["task_id"] in seen:
            raise UserError(f"{where}: duplicate task_id {p['task_id']} "
                            f"(first at {seen[p['task_id']]})")
        seen[p["task_id"]] = where
        split = _split_of(p["task_id"])
        if split is not None:
            out[split].append(p)
    for problems in out.values():
        problems.sort(key=lambda p: p["task_id"])
    return out


def _read_hub(name: str, sanitized: bool, splits: list[str]) -> dict[str, list[dict[str, Any]]]:
    config = "sanitized" if sanitized else "full"
    return {s: [_problem(row, where, sanitized) for where, row in hub_rows(name, config, s)]
            for s in dict.fromkeys(splits)}


def _shots(pool: list[dict[str, Any]], n_shot: int, task_id: int) -> str:
    order = {tid: i for i, tid in enumerate(SHOT_ORDER)}
    ranked = sorted(pool, key=lambda p: (order.get(p["task_id"], len(order)), p["task_id"]))
    chosen = [p for p in ranked if p["task_id"] != task_id][:n_shot]
    if len(chosen) < n_shot:
        raise UserError(f"n_shot={n_shot} but the MBPP prompt split has only {len(chosen)} "
                        f"examples to offer (tasks 1-10); use a smaller n_shot")
    return "".join(mbpp_prompt(p["text"], p["asserts"]) + p["code"] + "\n[DONE]\n\n"
                   for p in chosen)


def _item(p: dict[str, Any], shots: str, split: str) -> CodeItem:
    try:  # the asserts rewritten to compare real values (tasks/checks.py), each its own test
        harness = checks.for_asserts(p["asserts"], setup="\n".join(p["setup"]),
                                     reference=p["code"])
    except ValueError as e:
        raise UserError(f"{p['where']}: {e}") from None
    return CodeItem(
        task_id=f"mbpp/{p['task_id']}",
        prompt=shots + mbpp_prompt(p["text"], p["asserts"]),
        tests="\n".join([*p["setup"], *p["asserts"]]),
        reference=p["code"],
        entry_point=entry_point(p["code"], p["asserts"]),
        stop=STOP,
        meta={"text": p["text"], "task_id": p["task_id"], "split": split, "where": p["where"]},
        harness=harness,
    )


def load_mbpp(
    source: str | Path | None = None,
    *,
    split: str = "test",
    sanitized: bool = False,
    n_shot: int = 3,
    limit: int | None = None,
) -> list[CodeItem]:
    """MBPP items of one split from a local file or directory, or a hub id (default
    google-research-datasets/mbpp, config "full" or "sanitized")."""
    if split not in SPLITS:
        raise UserError(f"unknown MBPP split {split!r} (expected {', '.join(SPLITS)})")
    if n_shot < 0:
        raise UserError(f"n_shot must be at least 0, got {n_shot}")
    check_limit(limit)
    source = HUB_ID if source is None else source
    if is_hub_id(source):
        by_split = _read_hub(str(source), sanitized, [split] + (["prompt"] if n_shot else []))
    else:
        by_split = _read_local(Path(source), sanitized)
    problems = by_split[split][:limit]
    if not problems:
        raise UserError(f"{source}: no MBPP rows in split {split!r} "
                        f"(task_id {SPLITS[split][0]}-{SPLITS[split][1]})")
    pool = by_split.get("prompt", [])
    return [_item(p, _shots(pool, n_shot, p["task_id"]) if n_shot else "", split)
            for p in problems]


def sft_conversations(
    source: str | Path | None = None, *, split: str = "train", limit: int | None = None
) -> list[Conversation]:
    """One (user, assistant) conversation per item of `split`: the prompt `lmforge eval --task
    mbpp` sends with `n_shot: 0`, then the reference program."""
    items = load_mbpp(source, split=split, n_shot=0, limit=limit)
    out = []
    for it in items:
        where = str(it.meta["where"])
        # An empty answer would train on nothing but the end-of-turn token.
        if not it.reference.strip():
            raise UserError(f"{where}: field 'code' is empty")
        out.append(Conversation(({"role": "user", "content": it.prompt},
                                 {"role": "assistant", "content": it.reference}), where))
    return out
