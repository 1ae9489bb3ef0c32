"""File helpers: an interrupted write leaves nothing behind; storage failures are one line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lmforge.errors import Terminated, TrainingError, UserError
from lmforge.io import atomic_file, ensure_writable_dir, storage_error, storage_errors


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), Terminated(15),
                                 OSError(errno.ENOSPC, "No space left on device")],
                         ids=["sigint", "sigterm", "enospc"])
def test_an_interrupted_atomic_file_leaves_no_temp_and_no_target(tmp_path: Path,
                                                                  exc: BaseException) -> None:
    target = tmp_path / "train.jsonl"
    with pytest.raises(type(exc)):
        with atomic_file(target) as f:
            f.write("half a line")
            assert (tmp_path / f".train.jsonl.tmp-{os.getpid()}").exists()
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_rewrite_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "val.jsonl"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as f:
            f.write("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["val.jsonl"] and target.read_text() == "old\n"


def test_disk_full_is_one_line_with_the_place_and_the_free_space(tmp_path: Path) -> None:
    torch_writer = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                                "2898112 vs 2898000")
    cases = [OSError(errno.ENOSPC, "No space left on device"), torch_writer,
             RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                          "failed writing file data/3: file write failed"),
             Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                       'message: "No space left on device" })')]
    for exc in cases:
        msg = storage_error(exc, tmp_path)
        assert msg is not None and "\n" not in msg, exc
        assert msg.startswith("disk full") and str(tmp_path) in msg and " free on " in msg
    named = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))
    assert str(tmp_path / "x.bin") in storage_error(named, None)  # type: ignore[operator]
    assert "quota" in storage_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)  # type: ignore[operator]
    assert "read-only" in storage_error(OSError(errno.EROFS, "Read-only", "/x"), None)  # type: ignore[operator]


def test_other_errors_are_not_storage_errors(tmp_path: Path) -> None:
    for exc in (OSError(errno.ENOENT, "No such file"), RuntimeError("shape mismatch"),
                ValueError("x"), UserError("No space left on device"), TrainingError("nan")):
        assert storage_error(exc, tmp_path) is None
    with pytest.raises(RuntimeError, match="shape"):
        with storage_errors(tmp_path):
            raise RuntimeError("shape mismatch")
    with pytest.raises(UserError, match="disk full"):
        with storage_errors(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_unusable_directories_are_found_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for bad in (blocker, blocker / "sub", Path("/proc/lmforge-test/run")):
        with pytest.raises(UserError, match=rf"^run.dir {bad}: cannot write there \("):
            ensure_writable_dir(bad, "run.dir")
    assert blocker.read_text() == "mine"  # nothing the user wrote is touched
    ok = tmp_path / "a" / "b"
    ensure_writable_dir(ok, "run.dir")
    assert ok.is_dir() and list(ok.iterdir()) == []  # the probe file is gone
