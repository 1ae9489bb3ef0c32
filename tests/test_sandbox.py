"""The sandbox contains hostile programs: the parent stays alive, nothing is left on disk and
no process outlives the run. Every case runs with the namespaces (`strong` where the kernel
permits) and without them (the `weak` fallback), which must still contain what it claims to."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lmforge import sandbox as S
from lmforge.errors import UserError
from tests.conftest import spawn

STRONG = S.probe().level == "strong"
MODES = [pytest.param(True, id="namespaces"), pytest.param(False, id="fallback")]


def _leftovers() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and b"sandbox_boot.py" in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def _workdirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "lmforge-sandbox-*")))


@pytest.fixture
def contained():
    """Checks after the test: no sandbox process left (the kernel may take a moment to
    finish killing a namespace), no work directory left."""
    before = _workdirs()
    yield
    deadline = time.monotonic() + 3.0
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers() == []
    assert _workdirs() - before == set()


def _run(code: str, ns: bool, **kw: object) -> S.Result:
    limits = S.Limits(**{"timeout_s": 2.0, "namespaces": ns, **kw})  # type: ignore[arg-type]
    return S.run(code, limits)


@pytest.mark.parametrize("ns", MODES)
def test_pass_fail_error_and_early_exit(ns: bool, contained: None) -> None:
    assert _run("x = 2\nassert x * 3 == 6\nprint('hi')", ns).status == "passed"
    r = _run("assert 1 == 2, 'nope'", ns)
    assert (r.status, r.reason) == ("failed", "assertion failed")
    assert "AssertionError: nope" in r.stderr and "sandbox_boot" not in r.stderr
    r = _run("def f(:\n  pass", ns)
    assert (r.status, r.reason) == ("error", "exception") and "SyntaxError" in r.stderr
    for early in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False",
                  "raise SystemExit\nassert False"):
        assert _run(early, ns).status == "failed", early
    # printing something nonce-like is not a pass either: the nonce is per run and unseen
    assert _run("import os\nprint('0' * 32)\nos._exit(0)", ns).status == "failed"


@pytest.mark.parametrize("ns", MODES)
def test_infinite_loop_times_out(ns: bool, contained: None) -> None:
    r = _run("while True:\n    pass", ns, timeout_s=1.0)
    assert r.status == "timeout" and 1.0 <= r.duration_s < 3.0


@pytest.mark.parametrize("ns", MODES)
def test_fork_bomb(ns: bool, contained: None) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = _run(code, ns, timeout_s=1.5, nproc=32)
    assert r.status in ("timeout", "error")


@pytest.mark.parametrize("ns", MODES)
def test_huge_allocation(ns: bool, contained: None) -> None:
    r = _run("x = bytearray(10 * 2**30)", ns, memory_mb=512)
    assert r.status == "error" and "MemoryError" in r.stderr


@pytest.mark.parametrize("ns", MODES)
def test_deep_recursion(ns: bool, contained: None) -> None:
    code = "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)"
    assert _run(code, ns, timeout_s=4.0).status in ("error", "timeout")


@pytest.mark.parametrize("ns", MODES)
def test_output_is_capped(ns: bool, contained: None) -> None:
    r = _run("import sys\nsys.stdout.write('x' * 100_000_000)", ns, fsize_mb=8,
             output_bytes=1000)
    assert r.status == "error"
    assert len(r.stdout) <= 1010 and len(r.stderr) <= 1010


@pytest.mark.parametrize("ns", MODES)
def test_parent_environment_is_not_inherited(ns: bool, contained: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_SECRET", "s3cret")
    code = ("import os\nassert 'LMFORGE_SECRET' not in os.environ, os.environ\n"
            "assert os.environ['HOME'] == os.getcwd()\nassert os.environ['TMPDIR'] == os.getcwd()")
    assert _run(code, ns).status == "passed"


@pytest.mark.parametrize("ns", MODES)
def test_killing_the_parent(ns: bool, contained: None) -> None:
    me = os.getpid()
    r = _run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
             "os.kill(0, signal.SIGKILL)", ns)
    assert os.getpid() == me and r.status != "passed"
    assert _run("assert True", ns).status == "passed"  # and the sandbox still works


@pytest.mark.parametrize("ns", MODES)
def test_no_network(ns: bool, contained: None) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.3)
        port = server.getsockname()[1]
        r = _run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 1)\n"
                 "s.sendall(b'leak')", ns)
        with pytest.raises(TimeoutError):
            server.accept()
    assert r.status == "error"


@pytest.mark.parametrize("ns", MODES)
def test_writes_stay_in_the_work_directory(ns: bool, contained: None) -> None:
    with tempfile.TemporaryDirectory(prefix="lmforge-test-") as d:
        target = Path(d)
        target.chmod(0o777)  # writable by anyone: only the read-only view can stop this write
        r = _run(f"open({str(target / 'pwned')!r}, 'w').write('x')\n"
                 "open('inside.txt', 'w').write('ok')\nassert open('inside.txt').read() == 'ok'", ns)
        if r.isolation.layers["readonly_fs"]:
            assert r.status == "error" and "Read-only file system" in r.stderr
            assert not (target / "pwned").exists()
        else:  # the fallback says so rather than pretending
            assert r.isolation.level == "weak"


@pytest.mark.parametrize("ns", MODES)
def test_daemonized_grandchild_is_killed(ns: bool, contained: None, tmp_path: Path) -> None:
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(30)\n"
            "    os._exit(0)\n"
            "time.sleep(0.2)\n"
            "print('parent done')")
    r = _run(code, ns)
    assert r.status == "passed" and r.stdout == "parent done"


def test_isolation_is_recorded() -> None:
    weak = _run("pass", False).isolation
    assert weak.level == "weak" and not weak.layers["net_ns"] and not weak.layers["pid_ns"]
    assert "missing: " in weak.describe()
    strong = _run("pass", True).isolation
    assert strong.level == ("strong" if STRONG else "weak")
    if STRONG:
        assert all(strong.layers.values())
    if os.geteuid() == 0:  # root drops to a uid of its own before the program runs
        assert strong.layers["unprivileged"] and weak.layers["unprivileged"]
        assert _run("import os\nassert os.getuid() != 0 and os.geteuid() != 0", True).passed


def test_run_many_keeps_order_and_runs_in_parallel(contained: None) -> None:
    progs = [f"import time\ntime.sleep(0.3)\nassert {i} % 3 != 0" for i in range(6)]
    t0 = time.perf_counter()
    rs = S.run_many(progs, S.Limits(timeout_s=5), workers=3)
    took = time.perf_counter() - t0
    assert [r.status for r in rs] == ["failed", "passed", "passed"] * 2
    assert took < 6 * 0.3  # not one after another


def test_bad_limits_are_user_errors() -> None:
    with pytest.raises(UserError, match="timeout_s must be > 0"):
        S.run("pass", S.Limits(timeout_s=0))
    with pytest.raises(UserError, match="workers must be >= 1"):
        S.run_many(["pass"], workers=0)


INTERRUPT_SCRIPT = """
import sys
from lmforge import sandbox
from lmforge.cli import _sigterm_raises
from lmforge.errors import Terminated

sleeper = "import time\\ntime.sleep(60)"
limits = sandbox.Limits(timeout_s=60)
print("ready", flush=True)
try:
    with _sigterm_raises():
        if sys.argv[1] == "run_many":
            sandbox.run_many([sleeper] * 6, limits, workers=2)
        else:
            sandbox.run(sleeper, limits)
except KeyboardInterrupt:
    sys.exit(130)
except Terminated:
    sys.exit(143)
"""


def _children(ppids: set[int]) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1]
                                       .split()[1]) in ppids:
                found.add(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


@pytest.mark.parametrize("mode,sig,code", [("run_many", signal.SIGTERM, 143),
                                           ("run", signal.SIGINT, 130)])
def test_an_interrupt_ends_the_programs_and_removes_their_work_dirs(
        mode: str, sig: int, code: int) -> None:
    before = _workdirs()
    proc = spawn([sys.executable, "-c", INTERRUPT_SCRIPT, mode])
    try:
        _interrupt_and_check(proc, before, mode, sig, code)
    finally:
        if proc.poll() is None:
            proc.kill()


def _interrupt_and_check(proc: subprocess.Popen[str], before: set[str], mode: str, sig: int,
                         code: int) -> None:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    want = 2 if mode == "run_many" else 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the programs are running: their dirs and processes
        mine = _workdirs() - before
        boots = _children({proc.pid})
        programs = _children(boots)
        if len(mine) >= want and len(programs) >= want:
            break
        time.sleep(0.1)
    assert len(mine) >= want and len(programs) >= want
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - sent < 5  # not after the programs' 60 s
    assert not (mine & _workdirs())  # no work dir left, empty or not
    deadline = time.monotonic() + 3
    while (boots | programs) & _alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (boots | programs) & _alive()


def _alive() -> set[int]:
    return {int(e) for e in os.listdir("/proc") if e.isdigit()}
