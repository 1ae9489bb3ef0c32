"""The sandbox contains hostile programs: the parent stays alive, nothing is left on disk and
no process outlives the run. Every case runs on a pre-forked worker, one shot with the
namespaces, and without them (the `weak` fallback); with the namespaces (`strong` where the kernel
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
# a pre-forked worker, the same isolation started for one run, and the weak fallback
MODES = ["workers", "one-shot", "fallback"]


def _sandbox_processes() -> tuple[set[int], set[int]]:
    """Every process the sandbox runs (boot and runner interpreters, whatever they forked), and
    of those the workers' own: a worker's boot (`--pool`) and its zygote, which live between
    runs. Machine-wide: another user's workers count as workers too."""
    found, workers, parents = set(), set(), {}
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text()
                                      .rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if b"sandbox_boot.py" in cmd or b"sandbox_runner.py" in cmd:
            found.add(int(entry))
        if b"sandbox_boot.py\0--pool" in cmd:
            workers.add(int(entry))
    workers |= {p for p, pp in parents.items() if pp in workers}  # their zygotes
    while grown := {p for p, pp in parents.items() if pp in found} - found:
        found |= grown
    return found, workers


def _leftovers() -> set[int]:
    found, workers = _sandbox_processes()
    return found - workers


def _workdirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "lmforge-sandbox-*")))


def _pool_roots() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "lmforge-pool-*")))


@pytest.fixture
def contained():
    """Checks after the test: no sandbox process left but the idle workers, no work directory
    left, and the workers' roots empty on the host (the runs' files live in each worker's own
    tmpfs). The kernel may take a moment to finish killing a namespace, and other users' runs
    come and go meanwhile: what is left must be gone within 3 s, and ours would not be."""
    before = _workdirs()
    yield
    procs, dirs = _leftovers(), _workdirs() - before
    deadline = time.monotonic() + 3.0
    while (procs or dirs) and time.monotonic() < deadline:
        time.sleep(0.05)
        procs, dirs = procs & _leftovers(), dirs & _workdirs()
    assert procs == set()
    assert dirs == set()
    assert all(os.listdir(d) == [] for d in _pool_roots())
    assert S.pool_pids() <= _sandbox_processes()[1]


def _run(code: str, ns: str, **kw: object) -> S.Result:
    limits = S.Limits(**{"timeout_s": 2.0, "namespaces": ns != "fallback",  # type: ignore[arg-type]
                         "prefork": ns == "workers", **kw})
    return S.run(code, limits)


@pytest.mark.parametrize("ns", MODES)
def test_pass_fail_error_and_early_exit(ns: str, contained: None) -> None:
    assert _run("x = 2\nassert x * 3 == 6\nprint('hi')", ns).status == "passed"
    r = _run("assert 1 == 2, 'nope'", ns)
    assert (r.status, r.reason) == ("failed", "assertion failed")
    assert "AssertionError: nope" in r.stderr and "sandbox_boot" not in r.stderr
    r = _run("def f(:\n  pass", ns)
    assert (r.status, r.reason) == ("error", "exception") and "SyntaxError" in r.stderr
    for early in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False",
                  "raise SystemExit\nassert False"):
        assert _run(early, ns).status == "failed", early
    # printing is never a pass: only the boot process reports one, on a pipe of its own
    assert _run("import os\nprint('passed', '0' * 32)\nos._exit(0)", ns).status == "failed"


# A program that tries every way to a pass without running to its end: it collects whatever
# it can reach (the run's token, the function that reveals it) and writes all of it, and
# garbage, to every descriptor before `os._exit(0)`. One output line per route.
FORGER = r"""
import gc, os, sys

found = []

def walk(frame):
    while frame is not None:
        found.extend(frame.f_locals.values())
        found.extend(c.cell_contents for v in frame.f_locals.values()
                     for c in getattr(v, "__closure__", None) or ())
        frame = frame.f_back

def tb_frame():
    try:
        1 / 0
    except ZeroDivisionError as e:
        walk(e.__traceback__.tb_frame)

def handler_frame():
    import _signal
    _signal.signal(_signal.SIGALRM, lambda sig, frame: walk(frame))
    _signal.setitimer(_signal.ITIMER_REAL, 0.01)
    sum(range(10**7))

def native_code():  # an extension module the program wrote (not a valid one: never loaded)
    import _imp
    open("ext.so", "wb").write(b"not an ELF file")
    class Spec:
        name, origin = "ext", os.path.abspath("ext.so")
    _imp.create_dynamic(Spec())

def ctypes_from_its_file():
    import glob, importlib.util
    path = glob.glob(sys.base_prefix + "/lib/python3*/lib-dynload/_ctypes.*")[0]
    spec = importlib.util.spec_from_file_location("x._ctypes", path)
    found.append(importlib.util.module_from_spec(spec))

routes = {
    "the frame that runs it": lambda: walk(sys._getframe(1)),
    "a traceback's frame": tb_frame,
    "a generator's frame": lambda: walk((x for x in [0]).gi_frame),
    "a signal handler's frame": handler_frame,
    "a tracer (it could jump over the asserts)": lambda: sys.settrace(lambda *a: None),
    "a profiler": lambda: sys.setprofile(lambda *a: None),
    "gc.get_objects": lambda: found.extend(gc.get_objects()),
    "gc.get_referrers": lambda: found.extend(gc.get_referrers(os.write)),
    "ctypes": lambda: found.append(__import__("ctypes").c_char_p(id(found)).value),
    "ctypes from its file": ctypes_from_its_file,
    "native code from the work dir": native_code,
    "/proc/self/mem": lambda: found.append(open("/proc/self/mem", "rb").read(1)),
    "/dev/fd/../mem": lambda: found.append(open("/dev/fd/../mem", "rb").read(1)),
    "the parent's memory": lambda: os.open(f"/proc/{os.getppid()}/mem", os.O_RDONLY),
    "the parent's descriptors": lambda: os.listdir(f"/proc/{os.getppid()}/fd"),
}
for name, route in routes.items():
    try:
        route()
        print(f"{name}: allowed")
    except BaseException as e:
        print(f"{name}: {type(e).__name__}")
for v in found:
    if callable(v) and getattr(v, "__name__", "") == "prove":
        v()
tokens = [b"\0" * 16] + [v for v in found if isinstance(v, bytes) and len(v) == 16]
for fd in range(3, 64):
    try:
        os.set_blocking(fd, False)  # a full pipe must not hang this
        for token in tokens:
            os.write(fd, token)
    except OSError:
        pass
sys.stdout.flush()
os._exit(0)
assert False, "the tests"
"""


@pytest.mark.parametrize("ns", MODES)
def test_no_route_to_a_pass_but_the_end(ns: str, contained: None) -> None:
    r = _run(FORGER, ns)
    assert (r.status, r.reason) == ("failed", "exited before its end"), r.stderr
    routes = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert len(routes) == 15 and "allowed" not in routes.values(), routes
    # the hook refuses what it sees; seccomp refuses signal handlers; the kernel the parent
    assert routes["the frame that runs it"] == routes["/dev/fd/../mem"] == "Refused"
    assert routes["native code from the work dir"] == "Refused"
    assert routes["a signal handler's frame"] == "PermissionError"
    assert routes["the parent's descriptors"] in ("PermissionError", "FileNotFoundError")
    # the runner's own code reveals a token of its own, not the one committed for the program
    again = ("import os, sys\nfor fd in range(3, 64):\n    try:\n"
             "        sys.modules['__main__']._run_program('pass', fd)\n"
             "    except BaseException:\n        pass\nos._exit(0)")
    assert _run(again, ns).reason == "exited before its end"


@pytest.mark.parametrize("ns", MODES)
def test_no_program_without_the_hook_can_read_the_token_holders(ns: str,
                                                                contained: None) -> None:
    # a program the program starts has no audit hook: where /proc is hidden (a PID namespace)
    # it may start, and finds neither the runner's memory nor the boot process's; elsewhere
    # no program may start at all (and neither process is readable by the kernel's rules)
    code = ("import os\nme, parent = os.getpid(), os.getppid()\npid = os.fork()\nif pid == 0:\n"
            "    try:\n"
            "        os.execv('/bin/sh', ['sh', '-c', f'for p in {me} {parent}; do if (exec 3< "
            "/proc/$p/mem) 2>/dev/null; then echo opened; else echo denied; fi; done'])\n"
            "    except PermissionError:\n        print('no exec', flush=True)\n"
            "        os._exit(0)\n"
            "os.waitpid(pid, 0)")
    r = _run(code, ns)
    assert r.status == "passed", r.stderr
    proc_hidden = r.isolation.layers["pid_ns"]
    assert r.stdout.split() == (["denied", "denied"] if proc_hidden else ["no", "exec"])


COMMON = """
import collections, enum, functools, typing
P = collections.namedtuple("P", "a b")
assert P(1, 2).b == 2
T = typing.TypeVar("T")
class Q(typing.NamedTuple):
    x: int
assert Q(3).x == 3 and enum.Enum("E", "a b").b.value == 2
@functools.lru_cache(None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
assert fib(30) == 832040
try:
    raise ValueError("x")
except ValueError as e:
    assert str(e) == "x" and e.__traceback__ is not None
"""
MORE = """
import asyncio, dataclasses, logging, subprocess, sys, threading
@dataclasses.dataclass
class D:
    x: int
logging.getLogger().warning("from the program")
async def main():
    return D(4).x
assert asyncio.run(main()) == 4
out = []
t = threading.Thread(target=lambda: out.append(1))
t.start()
t.join()
assert out == [1]
assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True,
                      text=True).stdout == "42\\n"
"""


@pytest.mark.parametrize("ns", MODES)
def test_ordinary_programs_are_not_refused(ns: str, contained: None) -> None:
    # the fallback run as root imports only the modules preloaded for it (see sandbox_boot)
    code = COMMON + (MORE if ns != "fallback" and STRONG else "")
    r = _run(code, ns, timeout_s=10.0)
    assert r.status == "passed", r.stderr


@pytest.mark.parametrize("ns", MODES)
def test_infinite_loop_times_out(ns: str, contained: None) -> None:
    r = _run("while True:\n    pass", ns, timeout_s=1.0)
    assert r.status == "timeout" and 1.0 <= r.duration_s < 3.0


@pytest.mark.parametrize("ns", MODES)
def test_fork_bomb(ns: str, contained: None) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = _run(code, ns, timeout_s=1.5, nproc=32)
    assert r.status in ("timeout", "error")


@pytest.mark.parametrize("ns", MODES)
def test_huge_allocation(ns: str, contained: None) -> None:
    r = _run("x = bytearray(10 * 2**30)", ns, memory_mb=512)
    assert r.status == "error" and "MemoryError" in r.stderr


@pytest.mark.parametrize("ns", MODES)
def test_deep_recursion(ns: str, contained: None) -> None:
    code = "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)"
    assert _run(code, ns, timeout_s=4.0).status in ("error", "timeout")


@pytest.mark.parametrize("ns", MODES)
def test_output_is_capped(ns: str, contained: None) -> None:
    r = _run("import sys\nsys.stdout.write('x' * 100_000_000)", ns, fsize_mb=8,
             output_bytes=1000)
    assert r.status == "error"
    assert len(r.stdout) <= 1010 and len(r.stderr) <= 1010


@pytest.mark.parametrize("ns", MODES)
def test_parent_environment_is_not_inherited(ns: str, contained: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_SECRET", "s3cret")
    code = ("import os\nassert 'LMFORGE_SECRET' not in os.environ, os.environ\n"
            "assert os.environ['HOME'] == os.getcwd()\nassert os.environ['TMPDIR'] == os.getcwd()")
    assert _run(code, ns).status == "passed"


@pytest.mark.parametrize("ns", MODES)
def test_killing_the_parent(ns: str, contained: None) -> None:
    me = os.getpid()
    r = _run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
             "os.kill(0, signal.SIGKILL)", ns)
    assert os.getpid() == me and r.status != "passed"
    assert _run("assert True", ns).status == "passed"  # and the sandbox still works


@pytest.mark.parametrize("ns", MODES)
def test_no_network(ns: str, contained: None) -> None:
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
def test_writes_stay_in_the_work_directory(ns: str, contained: None) -> None:
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
def test_daemonized_grandchild_is_killed(ns: str, contained: None, tmp_path: Path) -> None:
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
    weak = _run("pass", "fallback").isolation
    assert weak.level == "weak" and not weak.layers["net_ns"] and not weak.layers["pid_ns"]
    assert "missing: " in weak.describe()
    for mode in ("workers", "one-shot"):
        strong = _run("pass", mode).isolation
        assert strong.level == ("strong" if STRONG else "weak")
        if STRONG:
            assert all(strong.layers.values())
        if os.geteuid() == 0:  # root drops to a uid of its own before the program runs
            assert strong.layers["unprivileged"] and weak.layers["unprivileged"]
            assert _run("import os\nassert os.getuid() != 0 and os.geteuid() != 0", mode).passed


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
limits = sandbox.Limits(timeout_s=60, namespaces=sys.argv[2] == "ns")
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


@pytest.mark.parametrize("mode,sig,code,ns", [
    ("run_many", signal.SIGTERM, 143, "ns"), ("run", signal.SIGINT, 130, "ns"),
    ("run_many", signal.SIGTERM, 143, "fallback")])
def test_an_interrupt_ends_the_programs_and_removes_their_work_dirs(
        mode: str, sig: int, code: int, ns: str) -> None:
    before = _workdirs() | _pool_roots()
    proc = spawn([sys.executable, "-c", INTERRUPT_SCRIPT, mode, ns])
    try:
        _interrupt_and_check(proc, before, mode, sig, code, ns == "ns")
    finally:
        if proc.poll() is None:
            proc.kill()


def _interrupt_and_check(proc: subprocess.Popen[str], before: set[str], mode: str, sig: int,
                         code: int, pooled: bool) -> None:
    """Pooled, the programs are the zygotes' children (boot -> zygote -> program), and their
    dirs the workers' roots; one shot, the boots' children, in dirs of their own."""
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    want = 2 if mode == "run_many" else 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the programs are running: their dirs and processes
        mine = (_pool_roots() if pooled else _workdirs()) - before
        boots = _children({proc.pid})
        zygotes = _children(boots) if pooled else set()
        programs = _children(zygotes if pooled else boots)
        if len(mine) >= want and len(programs) >= want:
            break
        time.sleep(0.1)
    assert len(mine) >= want and len(programs) >= want
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - sent < 5  # not after the programs' 60 s
    assert not (mine & (_workdirs() | _pool_roots()))  # no work dir left, empty or not
    deadline = time.monotonic() + 3
    while (boots | zygotes | programs) & _alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (boots | zygotes | programs) & _alive()


def _alive() -> set[int]:
    """Processes that still run: a zombie has ended, it only waits for its parent to read its
    status."""
    alive = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(int(entry))
        except (OSError, IndexError):
            pass
    return alive
