"""Small file helpers: atomic writes, so nothing half-written ever looks finished."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lmforge.errors import TrainingError, UserError


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp sibling of `path`; only a block that finishes renames it into place. A block
    that fails or is interrupted (Ctrl-C, SIGTERM, a full disk) takes its temp file with it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


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
    s = str(spec)
    if Path(s).exists():
        return
    if Path(s).is_absolute() or s.startswith(".") or s.count("/") > 1 or "\\" in s:
        raise UserError(f"{what} path not found: {s}")


# ------------------------------------------------------------------ storage the user must fix

# errnos that mean "this place cannot take the write", not a bug: said in one line, exit 2
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOTDIR,
                   errno.EEXIST}
# writers that hide the errno: torch's zip writer (`unexpected pos N vs M`, `file write
# failed`, `PytorchStreamWriter failed writing file`) and safetensors' Rust I/O (`StorageFull`)
_DISK_FULL_TEXT = re.compile(r"unexpected pos \d+ vs \d+|file write failed|"
                             r"PytorchStreamWriter failed writing|No space left on device|"
                             r"StorageFull|os error 28\b")
_QUOTA_TEXT = re.compile(r"Disk quota exceeded|QuotaExceeded|FilesystemQuotaExceeded|os error 122\b")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space(path: Path) -> str:
    """Free bytes on the filesystem holding `path` (its nearest existing ancestor)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{human_bytes(shutil.disk_usage(p).free)} free on {p}"
    except OSError:
        return "free space unknown"


def storage_error(exc: BaseException, where: Path | None = None) -> str | None:
    """One line for an error that says the disk, not the code, is at fault; None otherwise.
    `where` names the directory being written when the error itself does not."""
    if isinstance(exc, (UserError, TrainingError)):
        return None
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        code = exc.errno
        path = Path(os.fsdecode(exc.filename)) if exc.filename else where
    elif isinstance(exc, Exception) and _DISK_FULL_TEXT.search(str(exc)):
        code, path = errno.ENOSPC, where
    elif isinstance(exc, Exception) and _QUOTA_TEXT.search(str(exc)):
        code, path = errno.EDQUOT, where
    else:
        return None
    shown = str(path) if path is not None else "the output"
    if code == errno.ENOSPC:
        here = free_space(path or Path.cwd())
        return f"disk full: no space left writing {shown} ({here}); free space or set run.dir elsewhere"
    if code == errno.EDQUOT:
        return f"disk quota exceeded writing {shown} ({free_space(path or Path.cwd())})"
    if code == errno.EROFS:
        return f"cannot write {shown}: read-only file system"
    if code == errno.EACCES:
        return f"permission denied: {shown}"
    if code == errno.ENOTDIR:
        return f"{shown}: a file is in the way where a directory is expected"
    if path is not None and path.exists() and not path.is_dir():
        return f"{shown}: a file is in the way where a directory is expected"
    return f"{shown}: already exists"


@contextlib.contextmanager
def storage_errors(where: Path | None) -> Iterator[None]:
    """Turn a full disk, a read-only filesystem or a blocked path inside the block into a
    UserError naming `where` (the directory being written) when the error does not say."""
    try:
        yield
    except Exception as e:
        msg = storage_error(e, where)
        if msg is None:
            raise
        raise UserError(msg) from None


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create `path` and prove a file can be made in it, before any work: a read-only
    filesystem, /proc, or a file in the way must cost a second, not a stage's run."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".lmforge-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTDIR):
            reason = "a file is in the way where a directory is expected"
        else:
            reason = e.strerror or str(e)
        raise UserError(f"{what} {path}: cannot write there ({reason})") from None
