"""The pre-forked workers keep every layer of a one-shot run, and one run leaves nothing to the
next in the same worker: no process, no file, no module or builtin it changed. A worker that
dies, or that cannot clean up after a run, is replaced; so is one whose parent dies."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time

import pytest

from lmforge import sandbox as S
from tests.conftest import spawn
from tests.test_sandbox import _alive, _sandbox_processes, contained  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(S.probe().level != "strong",
                                reason="pre-forked workers need the strong isolation")
LIMITS = S.Limits(timeout_s=3.0)


@pytest.fixture
def one_worker(contained: None):  # noqa: F811 - the fixture imported above
    """A fresh pool: sequential runs then all go to the same single worker."""
    S.close_pool()
    yield
    assert len(S.pool_pids()) <= 2  # one boot + one zygote


def _run(code: str, **kw: object) -> S.Result:
    return S.run(textwrap.dedent(code), S.Limits(**{"timeout_s": 3.0, **kw}))  # type: ignore[arg-type]


def _same_worker(before: set[int]) -> None:
    assert S.pool_pids() == before and len(before) == 2


def _worker() -> tuple[int, int]:
    """The one worker's boot and zygote (the boot's child)."""
    pids = S.pool_pids()
    (zygote,) = [p for p in pids if _parent(p) in pids]
    (boot,) = pids - {zygote}
    return boot, zygote


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# no process in the worker's PID namespace but PID 1 (the zygote) and this one
ALONE = """
import os
for pid in range(2, os.getpid()):
    try:
        os.kill(pid, 0)
        raise SystemExit(f"process {pid} is alive")
    except ProcessLookupError:
        pass
"""


def test_runs_in_a_worker_hold_every_layer(one_worker: None) -> None:
    r = _run("""
        import os, socket, sys
        assert not any("ctypes" in m for m in sys.modules)  # the zygote never loaded it
        assert os.listdir("/proc") == []  # hidden: no process, no memory of any
        assert os.getpid() > 1 and os.getppid() == 1  # the zygote is PID 1, not the program
        try:
            socket.create_connection(("1.1.1.1", 53), 1)
            raise SystemExit("network reachable")
        except OSError:
            pass
        for path in (f"/tmp/lmforge-pwned-{os.getpid()}", "/dev/shm/lmforge-pwned"):
            try:
                open(path, "w")
                raise SystemExit(f"wrote {path}")
            except OSError as e:
                assert e.errno == 30, e  # EROFS: the read-only view
        open("mine.txt", "w").write("the work dir is writable")
        """)
    assert r.status == "passed", r.stderr
    assert r.isolation.level == "strong" and all(r.isolation.layers.values())
    if os.geteuid() == 0:
        assert _run("import os\nassert os.getuid() >= 61000 and os.geteuid() >= 61000").passed


def test_ipc_objects_and_keys_cannot_be_made(one_worker: None) -> None:
    # the worker's namespaces outlive a run: what could outlive a process there is refused, even
    # to an interpreter the program starts (which has ctypes, but not the seal's hook)
    code = """
        import os, subprocess, sys
        add_key = {"x86_64": 248, "aarch64": 217}[os.uname().machine]
        probe = ("import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
                 "print(libc.shmget(0, 4096, 0o1600), libc.semget(0, 1, 0o1600), "
                 f"libc.msgget(0, 0o1600), libc.syscall({add_key}, b'user', b'k', b'v', 1, -2), "
                 "ctypes.get_errno())")
        out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True)
        assert out.stdout.split() == ["-1", "-1", "-1", "-1", "1"], (out.stdout, out.stderr)
        """
    r = _run(code)
    assert r.status == "passed", r.stderr


def test_nothing_of_a_run_reaches_the_next_in_the_same_worker(one_worker: None) -> None:
    first = _run("""
        import builtins, math, os, random, sys, time
        print(random.random())
        open("left.txt", "w").write("x")
        open(os.path.dirname(os.getcwd()) + "/next-door.txt", "w").write("x")
        os.mkdir("locked")
        os.chmod("locked", 0)  # the zygote still removes it
        math.pi = 3
        builtins.len = lambda x: 0
        sys.modules["re"] = None
        sys.setrecursionlimit(50)
        random.seed(0)
        if os.fork() == 0:  # a daemon
            os.setsid()
            time.sleep(60)
        """)
    assert first.status == "passed", first.stderr
    before = S.pool_pids()
    second = _run(ALONE + f"""
import math, os, random, re, sys
assert os.listdir(".") == [], os.listdir(".")
root = os.path.dirname(os.getcwd())
assert os.listdir(root) == [os.path.basename(os.getcwd())], os.listdir(root)
assert math.pi > 3.14 and len([1, 2]) == 2 and re.match("a", "a")
assert sys.getrecursionlimit() == 1000
assert random.random() != {first.stdout}  # each fork reseeds: not the zygote's sequence
""")
    assert second.status == "passed", second.stderr
    _same_worker(before)


def test_a_run_after_a_timeout_is_clean(one_worker: None) -> None:
    _run("pass")
    before = S.pool_pids()
    code = "import os\nopen('busy', 'w')\nif os.fork() == 0:\n    os.fork()\nwhile True:\n    pass"
    r = _run(code, timeout_s=1.0)
    assert r.status == "timeout" and 1.0 <= r.duration_s < 3.0
    r = _run(ALONE + "assert os.listdir('.') == []")  # its processes were killed and reaped
    assert r.status == "passed", r.stderr
    _same_worker(before)


@pytest.mark.parametrize("victim", ["zygote", "boot"])
def test_a_worker_that_dies_is_replaced(one_worker: None, victim: str) -> None:
    _run("pass")
    boot, zygote = _worker()
    os.kill(zygote if victim == "zygote" else boot, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while {boot, zygote} & _alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not {boot, zygote} & _alive()  # either end takes the other with it
    r = _run("assert 1 + 1 == 2")
    assert r.status == "passed", r.stderr
    assert S.pool_pids().isdisjoint({boot, zygote}) and len(S.pool_pids()) == 2


def test_a_worker_killed_mid_run_fails_that_run_only(one_worker: None) -> None:
    _run("pass")
    boot, zygote = _worker()
    rs: list[S.Result] = []
    t = threading.Thread(target=lambda: rs.append(_run("import time\ntime.sleep(10)")))
    t.start()
    time.sleep(0.5)
    os.kill(zygote, signal.SIGKILL)
    t.join(10)
    assert rs and rs[0].status == "error" and rs[0].reason == "the sandbox worker died"
    assert _run("pass").passed


def test_a_run_that_cannot_be_cleaned_retires_its_worker(one_worker: None) -> None:
    # deeper than a path can name: the zygote cannot remove it, says so, and the worker goes
    code = "import os\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')"
    r = _run(code)
    assert r.status == "passed", r.stderr
    assert S.pool_pids() == set()  # retired, not kept idle
    assert _run("import os\nassert os.listdir('..') == [os.path.basename(os.getcwd())]").passed


def test_run_many_reuses_workers_across_calls(contained: None) -> None:  # noqa: F811
    S.close_pool()
    progs = [f"assert {i} % 5 != 0" for i in range(40)]
    first = S.run_many(progs, LIMITS, workers=2)
    workers = S.pool_pids()
    second = S.run_many(progs, LIMITS, workers=2)
    assert [r.status for r in first] == [r.status for r in second] == [
        "failed" if i % 5 == 0 else "passed" for i in range(40)]
    assert workers <= S.pool_pids()  # the same workers served the second call


def test_a_forked_child_gets_a_pool_of_its_own(contained: None) -> None:  # noqa: F811
    S.run("pass")
    workers = S.pool_pids()
    pid = os.fork()
    if pid == 0:  # the child: its parent's workers are not its to use
        code = 1
        try:
            code = 0 if S.run("pass").passed and S.pool_pids().isdisjoint(workers) else 1
            S.close_pool()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert S.pool_pids() == workers and S.run("pass").passed


PARENT = """
import time
from lmforge import sandbox
sandbox.run("pass")
print(*sorted(sandbox.pool_pids()), flush=True)
time.sleep(60)
"""


def test_workers_end_with_their_parent() -> None:
    proc = spawn([sys.executable, "-c", PARENT])
    try:
        assert proc.stdout is not None
        workers = {int(p) for p in proc.stdout.readline().split()}
        assert len(workers) == 2 and workers <= _sandbox_processes()[1]
        proc.kill()  # no atexit: the boot sees its stdin close
        proc.wait()
        deadline = time.monotonic() + 5
        while workers & _alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not workers & _alive()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_worker_that_stops_answering_is_killed_after_the_grace(
        one_worker: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _run("pass")
    boot, zygote = _worker()
    monkeypatch.setattr(S.sandbox_pool, "GRACE_S", 0.5)
    os.kill(zygote, signal.SIGSTOP)  # it will not reap nor reply: the parent's clock decides
    t0 = time.monotonic()
    r = _run("pass", timeout_s=0.5)
    assert r.status == "timeout" and time.monotonic() - t0 < 3
    # the boot is reaped by the pool; the zygote, orphaned when its boot dies, by whoever
    # adopts it, in the kernel's time: wait for that, as for the parent-death test above
    deadline = time.monotonic() + 5
    while {boot, zygote} & _alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {boot, zygote} & _alive() and _run("pass").passed


def test_without_workers_runs_start_from_scratch(contained: None,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    S.close_pool()
    tried = []

    def refuse(*args: object) -> None:
        tried.append(args)
        raise S.sandbox_pool.Unavailable({"pid_ns": False}, ["no worker here"])

    monkeypatch.setattr(S.sandbox_pool, "start_worker", refuse)
    assert S.run("pass").isolation.level == "strong"  # the one-shot path, as strong here
    assert [r.status for r in S.run_many(["pass", "assert False"], LIMITS)] == ["passed", "failed"]
    assert len(tried) == 1 and S.pool_pids() == set()  # asked once, then not again
    S.close_pool()


def test_the_boot_and_the_runner_agree_on_their_constants() -> None:
    # the boot cannot import the runner (isolated interpreter, -I): it keeps copies
    from lmforge import sandbox_boot, sandbox_runner

    assert (sandbox_boot.TOKEN_BYTES, sandbox_boot.SETUP_FAILED) == (
        sandbox_runner.TOKEN_BYTES, sandbox_runner.SETUP_FAILED)
