"""Run untrusted programs (anything a model wrote) out of process, contained.

`run(code)` runs a program in its own session with a wall-clock timeout, rlimits (CPU,
address space, processes, file size, open files), a fresh working directory that is removed
afterwards, a minimal environment, stdin closed and output capped. Where the kernel permits
(unprivileged user namespaces), it adds a network namespace (no network at all), a read-only
view of the whole filesystem but the work directory, and a PID namespace whose end kills
every process the program left behind. Run as root, the program runs as an unprivileged uid
of its own (one per concurrent slot, so RLIMIT_NPROC binds and one run's fork bomb cannot
starve another).

With namespaces (`Limits.namespaces`, the default), runs go to pre-forked workers
(`sandbox_pool`): each run is a fork of an interpreter that was started once, isolated once,
and never runs program code itself; after each run every process of the worker's PID
namespace is killed and its files (a tmpfs of the worker's own) removed before the next. A
worker holds its uid, namespaces, read-only view, capabilities and seccomp filter for its
life; the run gets its rlimits, work dir, output files and pass token. Workers start lazily,
are reused across calls and end at exit. Where the workers' isolation cannot be had (no
namespaces, no hidden /proc), and with `namespaces=False`, each run starts from scratch
through `sandbox_boot.py` (the one-shot path), as weak as the kernel leaves it.

Each `Result` records the isolation reached: `strong` when the network, filesystem and PID
layers all held, else `weak` with the layers that did. A pass means the program ran to its
end: the boot process says so on its report pipe, which the program's processes cannot write
or read, and only once the program's process has revealed a token it drew before the program
started and that no program code can reach (sandbox_runner's docstring has the argument and
the gap that remains). So `sys.exit(0)` or `os._exit(0)` before the asserts is not a pass, and
nothing the program prints is one. Without namespaces and without root (a weak level), the
program runs as the caller's user with the caller's files writable: there a pass is only as
trustworthy as the program's restraint.
"""

from __future__ import annotations

import atexit
import marshal
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from lmforge import sandbox_pool
from lmforge.errors import UserError

# the boot reads uids the same way; it imports nothing of lmforge, so the parent takes its copy
from lmforge.sandbox_boot import real_uid
from lmforge.sandbox_pool import Outcome, Pool, Unavailable, WorkerGone, _records

Status = Literal["passed", "failed", "timeout", "error"]
_BOOT = str(Path(__file__).with_name("sandbox_boot.py"))
_UID_BASE = 61000  # run uids: _UID_BASE + slot; no passwd entry needed
_STRONG = ("net_ns", "readonly_fs", "pid_ns")


@dataclass(frozen=True)
class Limits:
    """Per-run limits. `cpu_s` defaults to the timeout rounded up plus one second."""

    timeout_s: float = 10.0
    memory_mb: int = 2048
    nproc: int = 64
    fsize_mb: int = 16
    nofile: int = 64
    output_bytes: int = 4096
    cpu_s: int | None = None
    namespaces: bool = True  # False: rlimits, uid and process group only (the weak fallback)
    prefork: bool = True  # False: every run starts from scratch, even where workers could serve

    def check(self) -> None:
        for name in ("timeout_s", "memory_mb", "nproc", "fsize_mb", "nofile", "output_bytes"):
            if getattr(self, name) <= 0:
                raise UserError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")

    def rlimits(self) -> dict[str, int]:
        cpu = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 1
        return {"RLIMIT_CPU": cpu, "RLIMIT_AS": self.memory_mb << 20,
                "RLIMIT_NPROC": self.nproc, "RLIMIT_FSIZE": self.fsize_mb << 20,
                "RLIMIT_NOFILE": self.nofile, "RLIMIT_CORE": 0}


@dataclass(frozen=True)
class Isolation:
    level: Literal["strong", "weak"]
    layers: dict[str, bool]
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        held = [k for k, v in self.layers.items() if v]
        missing = [k for k, v in self.layers.items() if not v]
        text = f"{self.level} (held: {', '.join(held) or 'none'}"
        return text + (f"; missing: {', '.join(missing)})" if missing else ")")


@dataclass(frozen=True)
class Result:
    status: Status
    stderr: str
    duration_s: float
    isolation: Isolation
    stdout: str = ""
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@cache
def _interpreter_dirs() -> list[str]:
    """Directories the program's interpreter reads from: its binary, its shared library (the
    program runs in a freshly started interpreter), the standard library and its extensions."""
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    dirs.add(os.path.dirname(os.path.realpath(sys.executable)))
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        dirs.add(str(sysconfig.get_config_var("LIBDIR")))
    return sorted(d for d in dirs if os.path.isdir(d))


_SLOTS: queue.Queue[int] = queue.Queue()
for _i in range(64):
    _SLOTS.put(_i)
_POOL_LOCK = threading.Lock()
_POOL: Pool | None = None


def _uid_of(slot: int) -> int | None:
    return _UID_BASE + slot if os.geteuid() == 0 else None


def _pool() -> Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = Pool(_SLOTS, _uid_of, _interpreter_dirs)
        return _POOL


def close_pool() -> None:
    """End every pre-forked worker now (this happens at exit by itself); the next run that
    needs one starts it."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown()


def pool_pids() -> set[int]:
    """The pre-forked workers' own processes (boot and zygote): nothing else of the sandbox
    lives between runs."""
    pool = _POOL
    return pool.pids() if pool is not None else set()


def _forget_pool() -> None:
    """In a forked child: the workers are the parent's, and a lock another thread held at the
    fork stays held here forever, so start over (keeping the slots the parent had taken)."""
    global _POOL, _POOL_LOCK, _SLOTS
    if _POOL is not None:
        _POOL.forget()
    _POOL, _POOL_LOCK = None, threading.Lock()
    free: queue.Queue[int] = queue.Queue()
    for slot in list(_SLOTS.queue):
        free.put(slot)
    _SLOTS = free


atexit.register(close_pool)
os.register_at_fork(after_in_child=_forget_pool)


def _tail(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def _read_capped(f: Any, limit: int) -> bytes:
    """The last `limit` bytes of an output file (tracebacks are at the end)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read()  # type: ignore[no-any-return]


def _kill(pgid: int, child: int | None) -> None:
    for target, fn in ((pgid, os.killpg), (child, os.kill)):
        if target:
            try:
                fn(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _reap_uid(uid: int) -> None:
    """Weak mode's stand-in for a PID namespace: kill whatever still runs as the run's uid
    (again while a pass finds some: one may have forked during the last)."""
    for _ in range(3):
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and real_uid(e) == uid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not pids:
            return


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _classify(rc: int | None, done: dict[str, Any]) -> tuple[Status, str]:
    """Map how the run ended to a status and a reason (exit codes: see sandbox_runner)."""
    wait_status = done.get("wait_status")
    if rc is None:
        return "timeout", "wall-clock timeout"
    if wait_status is None:
        return "error", f"the sandbox's boot process ended ({rc}) before the program did"
    if os.WIFSIGNALED(wait_status):  # no PID namespace: the program's status comes directly
        code = 128 + os.WTERMSIG(wait_status)
    else:
        code = os.WEXITSTATUS(wait_status)
    if code == 0:
        ran = done.get("ran_to_end") is True
        return ("passed", "") if ran else ("failed", "exited before its end")
    if code > 128:
        name = _signal_name(code - 128)
        if name == "SIGXCPU":
            return "timeout", "CPU time limit"
        return "error", {"SIGXFSZ": "file size limit", "SIGSEGV": "crashed (SIGSEGV)"}.get(
            name, f"killed by {name}")
    return {1: ("failed", "assertion failed"), 2: ("error", "exception"),
            3: ("failed", "exited before its end"),
            4: ("error", "sandbox setup failed")}.get(code, ("error", f"exit code {code}"))


class _Batch:
    """What one `run_many` call has running, each with a way to stop it, so that an interrupt
    ends them all at once (their work dirs then go at once too, not after their timeouts)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, Callable[[], None]] = {}
        self.stopped = False

    def add(self, key: int, stop: Callable[[], None]) -> bool:
        """Register a started run; False once stopped (the caller stops it itself: no program
        started during a stop can slip past it)."""
        with self.lock:
            if not self.stopped:
                self.live[key] = stop
            return not self.stopped

    def discard(self, key: int) -> None:
        with self.lock:
            self.live.pop(key, None)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            stops = list(self.live.values())
        for stop in stops:
            stop()


def run(code: str, limits: Limits | None = None) -> Result:
    """Run one program; a pass means it ran to its end (see the module docstring)."""
    limits = limits or Limits()
    limits.check()
    return _run_any(code, limits, None)


def _run_any(code: str, limits: Limits, batch: _Batch | None) -> Result:
    """On a pre-forked worker where workers can be had, else one shot."""
    if limits.namespaces and limits.prefork:
        for _ in range(2):  # a worker that died while idle is replaced, once
            try:
                return _run_pooled(code, limits, batch)
            except (Unavailable, sandbox_pool.StartFailed):
                break
            except WorkerGone:
                continue
    slot = _SLOTS.get()  # a uid of its own for as long as it runs
    try:
        return _run(code, limits, slot, batch)
    finally:
        _SLOTS.put(slot)


def _run_pooled(code: str, limits: Limits, batch: _Batch | None) -> Result:
    pool = _pool()
    worker = pool.acquire()
    t0 = time.perf_counter()
    try:
        if batch is not None and not batch.add(id(worker), worker.kill):
            out = Outcome(None, {}, b"", b"", "interrupted before it started")
        else:
            try:
                out = worker.run(code, limits.rlimits(), limits.timeout_s, limits.output_bytes)
            except BaseException:
                worker.kill()  # interrupted while it runs: the program must not outlive the call
                raise
            finally:
                if batch is not None:
                    batch.discard(id(worker))
    finally:
        pool.release(worker)
    return _result(out.rc, out.done, time.perf_counter() - t0, worker.layers, worker.notes,
                   out.stdout, out.stderr, limits, out.error)


def _run(code: str, limits: Limits, slot: int, batch: _Batch | None = None) -> Result:
    """The one-shot path: a boot process (and a fresh interpreter) for this run alone."""
    uid = _UID_BASE + slot if os.geteuid() == 0 else None
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    # everything from here on is inside try/finally: an interrupt (Ctrl-C, SIGTERM raised as
    # an exception by the CLI) anywhere still kills the program and removes the work dir
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            report_r, report_w = os.pipe()
            cfg = {"uid": uid, "workdir": workdir, "limits": limits.rlimits(),
                   "report_fd": report_w, "namespaces": limits.namespaces,
                   "interpreter_dirs": _interpreter_dirs()}
            try:
                proc = subprocess.Popen([sys.executable, "-I", "-S", _BOOT],
                                        stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir,
                                        env=env, start_new_session=True, pass_fds=(report_w,))
            except BaseException:
                os.close(report_r)
                raise
            finally:
                os.close(report_w)
            with proc:
                if batch is not None and not batch.add(proc.pid, lambda: _kill(proc.pid, None)):
                    _kill(proc.pid, None)  # the batch is stopping: this one must not run
                try:
                    rc, info, done = _supervise(proc, report_r, marshal.dumps(
                        {"cfg": cfg, "code": code}), limits.timeout_s)
                finally:
                    if batch is not None:
                        batch.discard(proc.pid)
            duration = time.perf_counter() - t0
            stdout = _read_capped(out, limits.output_bytes)
            stderr = _read_capped(err, limits.output_bytes)
    finally:
        if uid is not None and not info.get("layers", {}).get("pid_ns"):
            _reap_uid(uid)
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(rc, done, duration, info.get("layers", {"unprivileged": False}),
                   info.get("notes", ()), stdout, stderr, limits)


def _result(rc: int | None, done: dict[str, Any], duration: float, layers: dict[str, bool],
            notes: Sequence[str], stdout: bytes, stderr: bytes, limits: Limits,
            error: str = "") -> Result:
    status, reason = ("error", error) if error else _classify(rc, done)
    strong = all(layers.get(k) for k in _STRONG) and layers.get("unprivileged")
    return Result(status=status, stderr=_tail(stderr, limits.output_bytes),
                  duration_s=round(duration, 4),
                  isolation=Isolation("strong" if strong else "weak", layers, tuple(notes)),
                  stdout=_tail(stdout, limits.output_bytes).rstrip("\n"), reason=reason)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The boot's exit code, None after `timeout`: woken by the exit itself (a pidfd), not by
    Popen.wait's polling, whose growing sleeps cost a short run up to 50 ms."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return proc.wait() if ready else None


def _supervise(proc: subprocess.Popen[bytes], report_r: int, payload: bytes,
               timeout: float) -> tuple[int | None, dict[str, Any], dict[str, Any]]:
    """Feed the boot process its configuration and the program, wait up to `timeout`, kill
    everything, read the boot report.

    The boot process's group is killed in every case (a finished program may have left
    children), an interrupted wait included; the program's own process, which may have left
    that group with setsid, is killed by pid from the report, and with it its PID namespace."""
    rc: int | None = None
    lines: list[dict[str, Any]] = []
    try:
        try:
            proc.stdin.write(payload)  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        rc = _wait(proc, timeout)
    finally:
        _kill(proc.pid, None)
        proc.wait()
        with os.fdopen(report_r, "rb") as rep:  # EOF: the boot process is gone, the child closed it
            lines = _records(rep.read())
        _kill(0, (lines[0] if lines else {}).get("pid"))
    return rc, (lines[0] if lines else {}), (lines[1] if len(lines) > 1 else {})


def run_many(programs: Sequence[str], limits: Limits | None = None, *, workers: int = 2,
             progress: Callable[[int], None] | None = None) -> list[Result]:
    """Run programs `workers` at a time; results in input order. Interrupted (Ctrl-C,
    SIGTERM), it cancels what has not started and kills what runs before re-raising, so no
    program and no work dir outlives the call."""
    if workers < 1:
        raise UserError(f"sandbox workers must be >= 1, got {workers}")
    limits = limits or Limits()
    limits.check()
    batch = _Batch()

    def one(code: str) -> Result:
        r = _run_any(code, limits, batch)
        if progress is not None:
            progress(1)
        return r

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(one, programs))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        batch.stop()
        raise
    finally:
        pool.shutdown(wait=True)


def probe(limits: Limits | None = None) -> Isolation:
    """The isolation this machine gives: run a trivial program once."""
    return run("pass", limits or Limits(timeout_s=10.0)).isolation
