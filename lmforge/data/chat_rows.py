"""Supervised fine-tuning rows -> conversations (lists of {"role", "content"} messages, ready for
`tokenizer.apply_chat_template`).

Formats (`fmt="auto"` picks one per call from the first JSON object's keys, in this order):

- `messages`: `{"messages": [{"role": ..., "content": ...}, ...]}`; the key `conversations` with
  the same shape is accepted too (the field paths in errors then say `conversations[i]`).
  Roles are system/user/assistant; a system message only first; at least one assistant message;
  content a string; keys other than role/content are dropped (a template could act on them).
- `prompt_completion`: `{"prompt": str, "completion": str, "system"?: str}`
  -> [system?, user(prompt), assistant(completion)].
- `alpaca`: `{"instruction": str, "input"?: str, "output": str, "system"?: str}`
  -> [system?, user(instruction, or instruction + "\\n\\n" + input), assistant(output)].

In the flat formats a null or empty `system`/`input` counts as absent (hub datasets fill a
column missing from some rows with null, exports fill it with ""). A required field that is
null is a missing field. Content is never stripped or otherwise rewritten.

Invalid rows have one of the stable reasons in `REASONS` (the keys of `RowStats.skipped`).
An empty user message is allowed (some data trains unconditional completions); an empty or
whitespace assistant message is not: it would train on nothing but the end-of-turn token.
Role alternation is not checked: what a template accepts varies, and it says so itself.

Sources: a `.jsonl` file (`path:line`, 1-based, blank lines skipped), a `.json` file holding a
list of objects (`path[item i]`, 0-based), a directory (its .jsonl/.json files, sorted, as
`sources.list_files` walks them), or a hub dataset id read with `datasets.load_dataset(id,
split=split)` (`hub:id[row i]`, 0-based; `split` applies only to hub ids). Without
`skip_invalid` the first invalid row raises; with it invalid rows (bad JSON too) are counted and
skipped, but a source with no valid row still raises, naming the first reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.config import SourceCfg
from lmforge.data.sources import invalid_json, jsonl_lines, list_files
from lmforge.errors import UserError
from lmforge.io import check_local_or_hub

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Format = Literal["auto", "messages", "prompt_completion", "alpaca"]

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "prompt_completion", "alpaca")
REASONS = (
    "invalid json", "not an object", "missing field", "wrong type", "unknown role",
    "misplaced system message", "no assistant message", "empty assistant message",
)
# Suffixes that make a missing path a missing local file rather than a hub id.
_FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz"}
_EXPECTED_KEYS = "messages (or conversations) | prompt, completion | instruction, output"
_MISSING = object()


@dataclass(frozen=True)
class Conversation:
    # Plain dicts, not a Message class: they go straight to apply_chat_template.
    # (So a Conversation compares by value but cannot be hashed.)
    messages: tuple[Message, ...]
    source: str  # "path:line" / "path[item 3]" / "hub:owner/name[row 17]"


@dataclass
class RowStats:
    rows: int = 0  # rows read, valid or not (up to where `limit` stopped the read)
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    format: str = ""  # the format used, detected or given


class InvalidRow(UserError):
    """One row that cannot be a conversation; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _bad(where: str, path: str, reason: str, detail: str = "", value: Any = _MISSING) -> InvalidRow:
    shown = "" if value is _MISSING else f" = {_short(value)}"
    tail = f" ({detail})" if detail else ""
    return InvalidRow(reason, f"{where}: {path}{shown}: {reason}{tail}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _required(row: dict[str, Any], key: str, where: str, kind: type, label: str,
              path: str = "") -> Any:
    """A required field of type `kind`; null counts as missing (see the module docstring)."""
    path = path or key
    value = row.get(key)
    if value is None:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise _bad(where, path, "missing field", f"keys found: {keys}")
    if not isinstance(value, kind):
        raise _bad(where, path, "wrong type", f"expected {label}, got {_type_name(value)}")
    return value


def _string(row: dict[str, Any], key: str, where: str, path: str = "") -> str:
    return _required(row, key, where, str, "a string", path)  # type: ignore[no-any-return]


def _optional_string(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(where, key, "wrong type", f"expected a string, got {_type_name(value)}")
    return value


def _check_assistant(content: str, where: str, path: str) -> None:
    if not content.strip():
        raise _bad(where, path, "empty assistant message", value=content)


def message_list(items: list[Any], where: str, key: str) -> list[Message]:
    """Chat messages from a JSON list, each checked (role, content, a system message only
    first, a non-empty assistant answer); errors name `key[i].field`."""
    out: list[Message] = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, at, "wrong type", f"expected an object, got {_type_name(item)}")
        role = _string(item, "role", where, f"{at}.role")
        if role not in ROLES:
            raise _bad(where, f"{at}.role", "unknown role", f"expected {', '.join(ROLES)}", role)
        if role == "system" and i > 0:
            raise _bad(where, f"{at}.role", "misplaced system message",
                       "only the first message may be system", role)
        content = _string(item, "content", where, f"{at}.content")
        if role == "assistant":
            _check_assistant(content, where, f"{at}.content")
        out.append({"role": role, "content": content})
    return out


def _messages(row: dict[str, Any], where: str) -> list[Message]:
    key = "messages" if "messages" in row or "conversations" not in row else "conversations"
    out = message_list(_required(row, key, where, list, "a list of messages"), where, key)
    if not any(m["role"] == "assistant" for m in out):
        roles = ", ".join(m["role"] for m in out) or "none"
        raise _bad(where, key, "no assistant message", f"roles: {roles}")
    return out


def _flat(row: dict[str, Any], fmt: str, where: str) -> list[Message]:
    if fmt == "prompt_completion":
        user = _string(row, "prompt", where)
        answer, answer_key = _string(row, "completion", where), "completion"
    else:
        instruction = _string(row, "instruction", where)
        extra = _optional_string(row, "input", where)
        answer, answer_key = _string(row, "output", where), "output"
        user = f"{instruction}\n\n{extra}" if extra else instruction
    system = _optional_string(row, "system", where)
    _check_assistant(answer, where, answer_key)
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def to_conversation(row: dict[str, Any], fmt: str, where: str) -> Conversation:
    """One row in format `fmt` (not "auto") as a Conversation; raises InvalidRow."""
    if not isinstance(row, dict):
        raise InvalidRow("not an object", f"{where}: not an object (expected a JSON object, "
                                          f"got {_type_name(row)})")
    if fmt == "messages":
        messages = _messages(row, where)
    elif fmt in ("prompt_completion", "alpaca"):
        messages = _flat(row, fmt, where)
    else:
        raise UserError(f"unknown chat row format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    return Conversation(tuple(messages), where)


def detect_format(row: dict[str, Any]) -> str | None:
    """The format a row's keys say, or None; `messages` wins when a row has several."""
    if "messages" in row or "conversations" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; a line that is not JSON yields an InvalidRow in place of a row,
    so the caller can count it or raise it like any other invalid row."""
    for lineno, row in jsonl_lines(_read_text(path)):
        where = f"{path}:{lineno}"
        yield where, (InvalidRow("invalid json", invalid_json(where, row))
                      if isinstance(row, json.JSONDecodeError) else row)


def _read_text(path: Path) -> str:
    """The file as text; utf-8-sig: a BOM is an encoding mark, not content."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # The usual cause of "Extra data" at line 2 is JSON Lines saved as .json.
        hint = "; is it JSON Lines? name it .jsonl" if e.msg == "Extra data" else ""
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}{hint})") from None
    if not isinstance(data, list):
        keys = f" with keys {', '.join(map(str, data))}" if isinstance(data, dict) else ""
        raise UserError(f"{path}: expected a JSON list of rows, got {_type_name(data)}{keys}")
    for i, row in enumerate(data):
        yield f"{path}[item {i}]", row


def _iter_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading hub dataset {name!r} needs the datasets package: "
                        "pip install 'lmforge[data]'") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError) as e:
        # Unknown repo (DatasetNotFoundError is a FileNotFoundError) or unknown split.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"hub dataset {name!r} split {split!r}: {first}") from None
    for i, row in enumerate(rows):
        yield f"hub:{name}[row {i}]", row


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(path)
    if suffix == ".json":
        return _iter_json(path)
    raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'!r} "
                    "(expected .jsonl or .json)")


# what `lmforge synth best-of-n` writes into its run dir (next to samples and a summary)
SYNTH_ROWS = "sft.jsonl"

def iter_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Every (location, row) of a file, a directory or a hub dataset, in a fixed order."""
    path = Path(source)
    if path.is_file():
        yield from _iter_file(path)
    elif (path / SYNTH_ROWS).is_file():  # an `lmforge synth` run dir: only its SFT rows
        yield from _iter_file(path / SYNTH_ROWS)
    elif path.is_dir():
        for file in list_files(SourceCfg(path=path), [".jsonl", ".json"]):
            yield from _iter_file(file)
    else:
        spec = str(source)
        check_local_or_hub(spec, "dataset")
        # check_local_or_hub takes `data/train.jsonl` for an `owner/name` id; a file suffix
        # says it is a local file the user mistyped.
        if path.suffix.lower() in _FILE_SUFFIXES:
            raise UserError(f"dataset path not found: {spec}")
        yield from _iter_hub(spec, split)


def load_prompts(path: Path, limit: int | None = None) -> list[str]:
    """Prompts from a .txt file (one a line) or .jsonl/.json rows with a "prompt" string."""
    if not path.is_file():
        raise UserError(f"prompts: {path} not found")
    if path.suffix.lower() == ".txt":
        prompts = [x.strip() for x in path.read_text(encoding="utf-8-sig").splitlines()]
        prompts = [x for x in prompts if x]
    else:
        prompts = []
        for where, row in iter_rows(path):
            if isinstance(row, InvalidRow):
                raise row
            value = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: expected an object with a non-empty \"prompt\" string")
            prompts.append(value)
    if not prompts:
        raise UserError(f"prompts: {path} holds no prompt")
    return prompts[:limit]


def require_rows(kept: list[Any], source: str | Path, skipped: dict[str, int],
                 first_error: Exception | None) -> None:
    """One line when nothing usable was read: no rows at all, or why every row was skipped."""
    if kept:
        return
    if first_error is None:
        raise UserError(f"{source}: no rows")
    counts = ", ".join(f"{k} {n}" for k, n in skipped.items())
    raise UserError(f"{source}: no valid rows ({counts}); first: {first_error}")


def load_conversations(
    source: str | Path,
    fmt: Format = "auto",
    *,
    split: str = "train",
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[Conversation], RowStats]:
    """The conversations of a source, and what was read, kept and skipped (and why)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown chat row format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    stats = RowStats(format="" if fmt == "auto" else fmt)
    out: list[Conversation] = []
    first_error: InvalidRow | None = None
    for where, row in iter_rows(source, split):
        stats.rows += 1
        try:
            out.append(_convert(row, stats, where))
        except InvalidRow as e:
            if not skip_invalid:
                raise
            first_error = first_error or e
            stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
            continue
        stats.kept += 1
        if limit is not None and stats.kept >= limit:
            break
    require_rows(out, source, stats.skipped, first_error)
    return out, stats


def _convert(row: Any, stats: RowStats, where: str) -> Conversation:
    """One row; the first object row whose keys say a format fixes `stats.format`."""
    if isinstance(row, InvalidRow):
        raise row
    if not stats.format and isinstance(row, dict):
        detected = detect_format(row)
        if detected is None:
            # Counted as a missing field under skip_invalid: it lacks every format's fields.
            keys = ", ".join(sorted(map(str, row))) or "none"
            raise InvalidRow("missing field", f"{where}: no known chat format: keys found: {keys}; "
                                              f"expected {_EXPECTED_KEYS}")
        stats.format = detected
    return to_conversation(row, stats.format or "messages", where)
