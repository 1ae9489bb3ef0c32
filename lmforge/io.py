"""Small file helpers: atomic writes, so nothing half-written ever looks finished."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp sibling of `path`; only a block that finishes renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: Path, tmp: Path | None = None) -> Iterator[Path]:
    """A fresh temp directory to fill; only a block that finishes publishes it as `final`.
    A failed block leaves the temp dir behind (never `final`), to be cleared on the next try."""
    tmp = tmp or final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    replace_dir(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` directory to `final`, replacing what was there."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_local_or_hub(spec: str | Path, what: str) -> None:
    """A hub id is `name` or `owner/name`; anything else that does not exist is a missing
    local path, said at once (instead of hub retries and a message about repo ids)."""
    from lmforge.errors import UserError

    s = str(spec)
    if Path(s).exists():
        return
    if Path(s).is_absolute() or s.startswith(".") or s.count("/") > 1 or "\\" in s:
        raise UserError(f"{what} path not found: {s}")
