"""Pre-forked sandbox workers: each run is a fork of an interpreter already started, isolated.

A worker is a `sandbox_boot.py --pool` process (trusted, outside the namespaces) and its
zygote (`sandbox_runner.py --zygote`, PID 1 of the worker's namespaces): the boot's and the
runner's docstrings say what each holds. What a fresh one-shot run pays every time (two
interpreter starts, the imports, the namespaces and mounts) a worker pays once.

One run, from here: the program in a memfd, fresh memfds for its stdout and stderr and the
write end of a fresh done pipe go to the zygote in one message (SCM_RIGHTS); the zygote forks
the program's process, waits up to the run's timeout, kills every other process of the
namespace and wipes the work root, then replies with the program's wait status. The parent
reads the done pipe itself (the token's commit and reveal), so a pass needs both the status
and the reveal. If no reply comes within the timeout plus a grace, the worker is killed (its
namespaces, and everything in them, go with its PID 1) and replaced; so is a worker that
dies, or that reports a run it could not clean.

The pool starts workers lazily (at most one per concurrent run) and keeps up to `MAX_IDLE`
idle ones for the next call. An interrupt kills the workers whose runs it cuts short (their
programs must not outlive the call); exit kills them all, and so does the parent's death (the
boot process watches its stdin). A forked child of the parent forgets its parent's pool and
starts its own.
"""

from __future__ import annotations

import io
import marshal
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.sandbox_boot import POOL_NPROC, _revealed

_BOOT = str(Path(__file__).with_name("sandbox_boot.py"))
GRACE_S = 5.0  # past a run's timeout: the zygote's own kill, reap and wipe
START_S = 30.0  # a worker that is not ready by then is a failed start
MAX_IDLE = 8
# the work root of a worker: every file of every run lives in this tmpfs, never on disk
TMPFS = "size=256m,nr_inodes=16384,mode=0700"


class Unavailable(Exception):
    """This machine gives workers less than the full isolation: run one shot at a time."""

    def __init__(self, layers: dict[str, bool], notes: list[str]) -> None:
        super().__init__("; ".join(notes) or "the pool's isolation did not hold")
        self.layers, self.notes = layers, notes


class StartFailed(RuntimeError):
    """A worker did not come up (its log says why): run one shot instead."""


class WorkerGone(Exception):
    """The worker died before it took the run (the run did not start: retry elsewhere)."""


@dataclass
class Outcome:
    """How one run ended, as the boot's one-shot report says it (see sandbox._classify)."""

    rc: int | None  # None: the wall-clock timeout
    done: dict[str, Any]
    stdout: bytes
    stderr: bytes
    error: str = ""


def _records(data: bytes) -> list[dict[str, Any]]:
    """The boot process's report: marshalled dicts, one after another."""
    out, f = [], io.BytesIO(data)
    while f.tell() < len(data):
        try:
            out.append(marshal.load(f))
        except (EOFError, ValueError, TypeError):
            break
    return out


def _read_capped(fd: int, limit: int) -> bytes:
    """The last `limit` bytes of an output memfd (tracebacks are at the end); closes it."""
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read()


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass(eq=False)
class Worker:
    """One pre-forked worker: its boot process, control socket and work root."""

    proc: subprocess.Popen[bytes]
    ctl: socket.socket
    root: str
    slot: int
    report: int
    log: BinaryIO
    layers: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    zygote: int = 0
    alive: bool = True
    closed: bool = False

    def run(self, code: str, rlimits: dict[str, int], timeout: float,
            output_bytes: int) -> Outcome:
        """Run one program; raises WorkerGone if the worker could not take it."""
        out, err = _memfd("stdout"), _memfd("stderr")
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        try:
            code_fd = _memfd("program", code.encode("utf-8", "surrogatepass"))
            try:
                socket.send_fds(self.ctl, [marshal.dumps({"limits": rlimits, "timeout": timeout})],
                                [code_fd, done_w, out, err])
            except OSError as e:
                self.kill()
                raise WorkerGone(str(e)) from None
            finally:
                os.close(code_fd)
                os.close(done_w)
            outcome = self._outcome(*self._reply(timeout + GRACE_S), done_r)
        except BaseException:
            os.close(out)
            os.close(err)
            raise
        finally:
            os.close(done_r)
        outcome.stdout = _read_capped(out, output_bytes)
        outcome.stderr = _read_capped(err, output_bytes)
        return outcome

    def _reply(self, wait_s: float) -> tuple[dict[str, Any] | None, bool]:
        """The zygote's reply, and whether waiting for it ran out of time. Without a reply,
        or with one that says the run could not be cleaned, the worker is killed."""
        ready, _, _ = select.select([self.ctl], [], [], wait_s)
        if not ready:
            self.kill()
            return None, True
        try:
            msg = self.ctl.recv(1 << 16)
        except OSError:
            msg = b""
        reply = marshal.loads(msg) if msg else None
        if reply is None or reply.get("recycle"):
            self.kill()
        return reply, False

    @staticmethod
    def _outcome(reply: dict[str, Any] | None, late: bool, done_r: int) -> Outcome:
        if reply is None:
            return Outcome(None, {}, b"", b"", "" if late else "the sandbox worker died")
        if reply.get("error"):
            return Outcome(0, {}, b"", b"", f"sandbox setup failed: {reply['error']}")
        if reply["timed_out"]:
            return Outcome(None, {}, b"", b"")
        return Outcome(0, {"wait_status": reply["wait_status"],
                           "ran_to_end": _revealed(done_r)}, b"", b"")

    def kill(self) -> None:
        """End the worker: its boot process and zygote (the whole group; the namespaces and
        every process in them go with their PID 1)."""
        self.alive = False
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Kill, reap and forget the worker; remove its work root (empty on the host: the
        runs' files were in the worker's tmpfs)."""
        if self.closed:
            return
        self.closed = True
        self.kill()
        self.proc.wait()
        for f in (self.ctl, self.log, self.proc.stdin):
            if f is not None:
                f.close()
        os.close(self.report)
        shutil.rmtree(self.root, ignore_errors=True)

    def forget(self) -> None:
        """In a forked child: drop this process's copies of the worker's descriptors (the
        parent's worker must still see its parent go), without touching the worker."""
        self.closed = True
        for f in (self.ctl, self.log, self.proc.stdin):
            if f is not None:
                f.close()
        os.close(self.report)

    def pids(self) -> set[int]:
        """Its boot and zygote while they run (a worker that died idle is retired later)."""
        return set() if self.closed or self.proc.poll() is not None else {self.proc.pid,
                                                                           self.zygote}

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:].decode("utf-8", "replace").strip()


def start_worker(slot: int, uid: int | None, dirs: list[str]) -> Worker:
    """Start a worker as `uid` (None: this process's): it is ready when the zygote says so."""
    root = tempfile.mkdtemp(prefix="lmforge-pool-")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    owner, group = (uid, uid) if uid is not None else (os.geteuid(), os.getegid())
    cfg = {"uid": uid, "workdir": root, "limits": {"RLIMIT_NPROC": POOL_NPROC},
           "report_fd": report_w, "ctl_fd": theirs.fileno(), "namespaces": True,
           "interpreter_dirs": dirs, "tmpfs": f"{TMPFS},uid={owner},gid={group}"}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": root, "TMPDIR": root,
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    log = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", _BOOT, "--pool"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                                cwd=root, env=env, start_new_session=True,
                                pass_fds=(report_w, theirs.fileno()))
    except BaseException:
        for f in (ours, log):
            f.close()
        os.close(report_r)
        os.rmdir(root)
        raise
    finally:
        os.close(report_w)
        theirs.close()
    worker = Worker(proc, ours, root, slot, report_r, log)
    try:
        proc.stdin.write(marshal.dumps(cfg))  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]  # kept open: its end is ours
        _handshake(worker)
    except BaseException:
        worker.close()
        raise
    return worker


def _handshake(worker: Worker) -> None:
    """The boot's first report (layers, the zygote's pid), then the zygote's hello."""
    first = _first_record(worker.report, START_S)
    if first is None:
        raise StartFailed(f"the sandbox worker did not start: {worker.tail()}")
    worker.layers, worker.notes = first["layers"], list(first["notes"])
    if first["pid"] is None:
        raise Unavailable(worker.layers, worker.notes)
    worker.zygote = first["pid"]
    ready, _, _ = select.select([worker.ctl], [], [], START_S)
    msg = worker.ctl.recv(1 << 16) if ready else b""
    if not msg:
        raise StartFailed(f"the sandbox worker's interpreter did not start: {worker.tail()}")
    hello = marshal.loads(msg)
    if not hello["proc_hidden"] or hello["ctypes"]:
        raise Unavailable(worker.layers, worker.notes + [
            "no worker: /proc could not be hidden" if not hello["proc_hidden"]
            else f"no worker: its interpreter loaded {hello['ctypes']}"])


def _first_record(fd: int, timeout: float) -> dict[str, Any] | None:
    data, deadline = b"", time.monotonic() + timeout
    while not (records := _records(data)):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 1 << 16) if ready else b""
        if not chunk:
            return None
        data += chunk
    return records[0]


class Pool:
    """Workers started on demand and kept for the next run (module docstring)."""

    def __init__(self, slots: queue.Queue[int], uid_of: Callable[[int], int | None],
                 dirs: Callable[[], list[str]]) -> None:
        self.slots, self.uid_of, self.dirs = slots, uid_of, dirs
        self.lock = threading.Lock()
        self.idle: list[Worker] = []
        self.busy: set[Worker] = set()
        self.unavailable: Unavailable | None = None

    def acquire(self) -> Worker:
        """An idle worker, else a new one; raises Unavailable where workers cannot be isolated."""
        with self.lock:
            if self.unavailable is not None:
                raise self.unavailable
            while self.idle:
                worker = self.idle.pop()
                if worker.alive and worker.proc.poll() is None:
                    self.busy.add(worker)
                    return worker
                self._retire(worker)
        slot = self.slots.get()
        try:
            worker = start_worker(slot, self.uid_of(slot), self.dirs())
        except BaseException as e:
            self.slots.put(slot)
            if isinstance(e, Unavailable):
                self.unavailable = e
            raise
        with self.lock:
            self.busy.add(worker)
        return worker

    def release(self, worker: Worker) -> None:
        with self.lock:
            self.busy.discard(worker)
            if worker.alive and len(self.idle) < MAX_IDLE:
                self.idle.append(worker)
                return
        self._retire(worker)

    def _retire(self, worker: Worker) -> None:
        if not worker.closed:
            worker.close()
            self.slots.put(worker.slot)

    def shutdown(self) -> None:
        """Kill every worker, busy or idle (their threads see their runs end)."""
        with self.lock:
            workers, self.idle = [*self.idle, *self.busy], []
        for worker in workers:
            worker.kill()
        for worker in workers:
            if worker not in self.busy:  # a busy one is retired by its own thread
                self._retire(worker)

    def pids(self) -> set[int]:
        """The workers' own processes (boot and zygote), which live between runs."""
        with self.lock:
            return {p for w in (*self.idle, *self.busy) for p in w.pids()}

    def forget(self) -> None:
        for worker in (*self.idle, *self.busy):
            worker.forget()
        self.idle, self.busy = [], set()
