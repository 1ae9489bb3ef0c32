"""Read documents from files and directories: .txt/.md/.py (one file, one document) and .jsonl
(one line, one document, from a text field).

Directory sources are walked with pruning rather than `Path.glob`, because the embedded default
(the standard library) sits next to a site-packages that can be 100x larger, and because hidden
directories (`.git`, `.venv`) inside a user's tree would otherwise be read as corpus. Rules:

- `glob` matches a file's path relative to the source directory: `*` and `?` stay inside one
  path component, `**` spans any number of them (`**/*.py` also matches `top.py`).
  Symlinked directories are not followed, so a link cycle cannot hang the walk.
- `exclude_dirs` entries are matched (fnmatch) against every directory *name* below the source
  path, so `tests` and `*_test` both work; directories starting with "." are always skipped.
- `extensions` filter files found in directories (case-insensitive, the dot optional). A file
  named directly as a source is read whatever its extension: the user asked for it.
- A file that is not valid UTF-8 is skipped and counted, not fatal: one stray Latin-1 file must
  not sink a run over thousands. Invalid JSON or a bad text field in a .jsonl is fatal, naming
  `file:line`, because it means the user pointed at the wrong field or a broken export.

Output order is deterministic: sources in the order given, files sorted by relative path.
`iter_corpus` reads back what the corpus stage wrote (its train/val splits).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import SourceCfg
from lmforge.errors import UserError

# Test suites are code, but mostly fixtures and asserts; a toy model learns better without them.
STDLIB_EXCLUDES = [
    "site-packages", "dist-packages", "__pycache__",
    "test", "tests", "idle_test", "*_test", "test_*",
]


@dataclass(frozen=True, slots=True)
class Document:
    text: str
    source: str  # a file path, or `path:line` for a .jsonl line


@dataclass
class SourceRead:
    documents: list[Document] = field(default_factory=list)
    files_seen: int = 0
    undecodable: list[str] = field(default_factory=list)  # paths skipped as not UTF-8


def default_sources() -> list[SourceCfg]:
    """The embedded default: the running interpreter's standard library, .py files, no tests."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [SourceCfg(path=stdlib, glob="**/*.py", exclude_dirs=STDLIB_EXCLUDES)]


def describe_sources(sources: list[SourceCfg]) -> list[str]:
    out = []
    for s in sources:
        excl = f" excluding {','.join(s.exclude_dirs)}" if s.exclude_dirs else ""
        out.append(f"{s.path} [{s.glob}]{excl}" if s.path.is_dir() else str(s.path))
    return out


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A `/`-aware glob over relative POSIX paths (fnmatch's `*` would cross directories)."""
    parts = pattern.strip("/").split("/")
    rx = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            rx += ".*" if last else "(?:[^/]+/)*"
        else:
            rx += _component_regex(part) + ("" if last else "/")
    return re.compile(rx + r"\Z", re.DOTALL)


def _component_regex(part: str) -> str:
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := part.find("]", i + 2)) != -1:
            body = part[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _norm_ext(ext: str) -> str:
    return "." + ext.lower().lstrip(".")


def list_files(source: SourceCfg, extensions: list[str]) -> list[Path]:
    """The files one source names, sorted; a missing path or no match at all is a UserError."""
    root = source.path
    if root.is_file():
        return [root]
    if not root.exists():
        raise UserError(f"source path does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"source path is neither a file nor a directory: {root}")
    matcher = glob_regex(source.glob)
    exts = {_norm_ext(e) for e in extensions}
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of excluded trees entirely (site-packages is huge).
        dirnames[:] = [
            d for d in dirnames
            if not d.startswith(".") and not any(fnmatch.fnmatchcase(d, p) for p in source.exclude_dirs)
        ]
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() in exts and matcher.match(rel):
                found.append((rel, path))
    if not found:
        shown = " ".join(dict.fromkeys(_norm_ext(e) for e in extensions))
        raise UserError(f"source {root}: no files match glob {source.glob!r} with extensions {shown}")
    return [p for _, p in sorted(found)]


def _decode(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff")  # a BOM is an encoding mark, not content


def jsonl_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, the parsed value or its JSONDecodeError) per non-blank line.
    Splits on "\n" only: str.splitlines also breaks on U+2028 and its kin, which a JSON
    string may hold unescaped, and would cut such a line in two."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, e


def invalid_json(where: str, e: json.JSONDecodeError) -> str:
    return f"{where}: invalid JSON ({e.msg} at column {e.colno})"


def parse_jsonl(text: str, path: Path, text_field: str) -> list[Document]:
    docs = []
    for lineno, row in jsonl_lines(text):
        where = f"{path}:{lineno}"
        if isinstance(row, json.JSONDecodeError):
            raise UserError(invalid_json(where, row))
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(row).__name__}")
        if text_field not in row:
            raise UserError(f"{where}: missing text field {text_field!r} (keys: {', '.join(sorted(row)) or 'none'})")
        value = row[text_field]
        if not isinstance(value, str):
            raise UserError(f"{where}: text field {text_field!r} must be a string, got {type(value).__name__}")
        docs.append(Document(value, where))
    return docs


def read_sources(sources: list[SourceCfg], extensions: list[str]) -> SourceRead:
    """Every document of every source, in a deterministic order."""
    out = SourceRead()
    for source in sources:
        for path in list_files(source, extensions):
            out.files_seen += 1
            try:
                data = path.read_bytes()
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror}") from None
            text = _decode(data)
            if text is None:
                out.undecodable.append(str(path))
            elif path.suffix.lower() == ".jsonl":
                out.documents.extend(parse_jsonl(text, path, source.text_field))
            else:
                out.documents.append(Document(text, str(path)))
    return out


def iter_corpus(corpus_dir: Path, split: str, max_bytes: int | None = None) -> Iterator[str]:
    """Texts of a corpus stage's split (`train.jsonl` / `val.jsonl`), up to `max_bytes`."""
    path = corpus_dir / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"corpus split not found: {path} (run the corpus stage first)")
    seen = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            yield text
            seen += len(text.encode("utf-8"))
            if max_bytes is not None and seen >= max_bytes:
                return
