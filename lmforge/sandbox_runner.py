"""The sandbox's program side: the interpreter a program runs in. It never loads ctypes.

Started by the boot (`sandbox_boot.py`), already isolated, as `python -I -S sandbox_runner.py`:

- `--run CODE_FD DONE_FD UID`: the one-shot path. A fresh interpreter for one program, which
  it reads from CODE_FD and runs; then it exits.
- `--zygote CTL_FD ROOT NPROC_BASE`: a pre-forked worker. This interpreter is PID 1 of the
  worker's namespaces; it imports what programs commonly import, then serves the runs the
  parent sends on CTL_FD. Each run is a fork of this process (the program's process), which
  applies the run's rlimits and runs the program exactly as `--run` does. When that process
  ends (or the run's wall-clock timeout passes) this process kills every other process of the
  namespace (kill(-1) spares only PID 1) and waits until none is left, then removes every file
  the run wrote under ROOT (a tmpfs of the worker's own), so nothing of one run reaches the
  next: the next run is a fresh fork of a process that never ran program code. Whatever it
  cannot clean, it reports, and the worker is replaced.

The pass signal, and who knows what:
- The parent knows no secret and takes a pass only from pipes no process that runs program
  code can write: the one-shot boot's report pipe, or the worker's control socket, which the
  program's process closes before the program starts. Printing anything proves nothing.
- The program's process draws a 16-byte token right before the program starts and writes it
  to the done pipe (the commit: nothing else has written to that pipe, so these are its first
  bytes). From then on the token exists only in the closure of `prove`, which `_run_program`
  calls once `exec` has returned normally, i.e. after the program's last statement (a module
  has no early return; tracers, which could jump over lines, are refused). `prove` writes the
  token again (the reveal). Whoever reads the done pipe (the one-shot boot, or the parent for
  a worker) counts the run as having reached its end when the program's process exited 0 and
  the reveal directly follows the commit (one guess, not one per written byte).
- Why that is not the whole story: the final statement runs in the program's own process, with
  no capability the program lacks, so anything it does the program could do first, if it had
  the token. The token is therefore put out of the program's reach. Within the process: the
  interpreter has never loaded ctypes (whose pointer types read any address without an audit
  event; a zygote is checked for that before it serves), and an audit hook, which cannot be
  removed, refuses every other route CPython offers from Python code to the token: frames,
  tracers, the object graph, ctypes and the test-only C modules, new interpreters, paths
  through /proc (see `_seal`); seccomp refuses installing signal handlers, which CPython hands
  the interrupted frame without an audit event. From other processes: seccomp refuses ptrace
  and process_vm_readv; in a PID namespace /proc is an empty tmpfs, elsewhere seccomp refuses
  starting any other program, so every process of the run is this interpreter or a fork of it,
  under the hook. A zygote holds no token: each run draws its own, after the fork. What
  remains: code that corrupts the interpreter's memory (crafted bytecode, a CPython bug) gets
  past any in-process guard; only tests that run in a process the answer never touches would
  not. And without namespaces and without root the program runs as the caller, who is then not
  protected.
"""

from __future__ import annotations

import os
import sys
from _collections_abc import Callable

TOKEN_BYTES = 16
SETUP_FAILED = 4  # exit codes 0-3 are the program's (see _run_program), 128+N a signal
# what solutions to MBPP/HumanEval-style problems import: the one-shot runner imports them
# before a uid drop that would hide them; a zygote imports them so that no run pays for them
COMMON = ("array bisect cmath collections copy datetime decimal fractions functools hashlib "
          "heapq itertools json math operator random re socket statistics string sys typing "
          "unicodedata").split()


class Refused(ValueError):
    """What the seal's audit hook raises. A ValueError, as `sys._getframe` raises one when there
    is no frame: the stdlib's fallbacks for that (namedtuple, typing, enum, logging) still work."""


def _seal(done: int) -> Callable[[], None]:
    """Commit a fresh token to the done pipe and return `prove`, its only holder, which reveals
    it; then put the token out of the program's reach with an audit hook (module docstring).

    The hook refuses frames (sys._getframe & co, the frames of tracebacks and generators,
    tracers), the object graph (gc), ctypes and the test-only C modules, native code from
    anywhere but the interpreter's own directories (an extension module the program wrote;
    sqlite extensions), new interpreters and namespaces (they would not have the hook or would
    have a /proc of their own), and any path through "proc" or ".." (/proc/self/mem, also
    reached as /dev/fd/../mem). Everything it uses is bound in this call: the program can
    rebind globals and builtins and call this module's functions, but no name refers to the
    hook or to `prove`."""
    token = os.urandom(TOKEN_BYTES)
    write = os.write
    write(done, token)

    def prove() -> None:
        write(done, token)

    refused = frozenset(("sys._getframe", "sys._current_frames", "sys._current_exceptions",
                         "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
                         "gc.get_referents", "cpython.PyInterpreterState_New", "os.unshare",
                         "os.setns", "sqlite3.enable_load_extension", "sqlite3.load_extension"))
    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    path_args = {"open": 1, "os.chdir": 1, "os.symlink": 2, "sqlite3.connect": 1}.get
    modules, home = ("ctypes", "_ctypes", "_test", "_xx", "_interp"), sys.base_prefix + "/"
    kind, text, raw, number = type, str, bytes, int
    split, split_raw, starts, refuse = str.split, bytes.split, str.startswith, Refused

    def bad_path(p: object) -> bool:  # a path-like object could show one path here, another later
        if kind(p) is text:
            parts = split(p, "/")  # type: ignore[arg-type]
            return ".." in parts or "proc" in parts
        if kind(p) is raw:
            parts_raw = split_raw(p, b"/")  # type: ignore[arg-type]
            return b".." in parts_raw or b"proc" in parts_raw
        return kind(p) is not number

    def bad_module(name: str, file: object) -> bool:  # any part: "x._ctypes" loads _ctypes
        for part in split(name, "."):
            if starts(part, modules):
                return True
        return file is not None and (kind(file) is not text or not starts(file, home)  # type: ignore[arg-type]
                                     or ".." in split(file, "/"))  # type: ignore[arg-type]

    def hook(event: str, args: tuple) -> None:
        n = path_args(event, 0)
        if (event in refused or event[:7] == "ctypes."
                or (event == "object.__getattr__" and args[1] in frame_attrs)
                or (event == "import" and bad_module(args[0], args[1]))
                or (n > 0 and bad_path(args[0])) or (n > 1 and bad_path(args[1]))):
            raise refuse(f"{event} is refused in the sandbox (it could reach the pass token)")

    sys.addaudithook(hook)
    return prove


def _failure(e: BaseException, display: Callable[..., object]) -> int:
    """Print why the program failed; its exit code (see `_run_program`)."""
    if isinstance(e, SystemExit):
        sys.stderr.write(f"SandboxEarlyExit: the program exited ({e.code!r}) before its end\n")
        return 3
    # the interpreter's own printer reads frames in C, past the hook; this file's frame says
    # nothing, so the traceback starts at the program's
    tb = e.__traceback__
    display(type(e), e, None if tb is None else e.with_traceback(tb.tb_next).__traceback__)
    return 1 if isinstance(e, AssertionError) else 2


def _run_program(code: str, done: int) -> int:
    """Run to the end -> reveal the token, exit 0. Exit 1: an assert failed; 3: the program
    exited (sys.exit) before its end; 2: any other exception."""
    display = sys.__excepthook__
    prove: Callable[[], None] | None = _seal(done)
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "program.py", "exec"), ns)
        status = 0
    except BaseException as e:  # noqa: BLE001 - every failure of untrusted code is a result
        prove = None  # the token goes before any of the program's code can run again
        status = _failure(e, display)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - a closed or over-limit stream
        status = status or 2
    if status == 0 and prove is not None:
        try:
            prove()
        except OSError as e:  # the program closed the done pipe's descriptor
            sys.stderr.write(f"SandboxError: could not report the end of the program: {e}\n")
            status = 2
    return status


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogatepass")


def _runner(code_fd: int, done: int, uid: int) -> None:
    """The one-shot program process: read the program, become the run's uid if the boot
    process could not (`uid` >= 0: then the interpreter is unreadable by that uid, so the usual
    modules are imported first, and the drop also makes this process not dumpable), run it."""
    try:
        code = _read_all(code_fd)
        os.set_inheritable(done, False)  # a program the program execs does not get it
        if uid >= 0:
            import importlib

            for name in COMMON:
                importlib.import_module(name)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        import types  # noqa: F401 - before the seal: it reads a traceback's frame on import
    except BaseException:  # noqa: BLE001 - a setup failure must not look like a result
        import traceback

        traceback.print_exc()
        os._exit(SETUP_FAILED)
    os._exit(_run_program(code, done))


# -- the zygote: a pre-forked worker's PID 1, which never runs program code itself --------------

# Trusted code that exercises what programs do first (parse, compile, define, loop, raise,
# format, match), so that the zygote, not each run, pays for the first use.
_WARM_UP = '''
import re
class Point:
    def __init__(self, x: int) -> None:
        self.x = x
def f(xs, k=2):
    return sorted({x % k: [y for y in range(x)] for x in xs}.items())
try:
    assert f([3, 4, 5]) == [(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3, 4])], "warm"
    raise ValueError(f"{Point(1).x:>3}")
except ValueError as e:
    assert re.match(r"\\s+1", str(e)) is not None
'''


def serve(ctl_fd: int, root: str, nproc_base: int) -> None:
    """Serve runs until the parent closes the control socket or a run leaves what this process
    cannot clean (then the worker ends with its namespaces and the parent starts another)."""
    import importlib
    import marshal
    import resource  # noqa: F401 - each run's rlimits
    import socket

    for name in COMMON:
        importlib.import_module(name)
    import gc
    import types  # noqa: F401 - see _runner

    # the compiler's and the interpreter's first use costs ~1.5 ms in every fork (lazy state,
    # copy-on-write faults); had here once, it is shared. Frozen objects are never scanned by
    # a run's garbage collector, so a collection does not copy the zygote's pages either.
    exec(compile(_WARM_UP, "warm-up", "exec"), {"__name__": "warm-up"})
    gc.collect()
    gc.freeze()
    ctl = socket.socket(fileno=ctl_fd)
    ctl.send(marshal.dumps({"proc_hidden": not os.path.exists("/proc/self"),
                            "ctypes": [m for m in sys.modules if "ctypes" in m]}))
    n = 0
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 1 << 16, 4)
        except OSError:
            break
        if not msg or len(fds) != 4:
            break  # the parent is gone (or speaks another protocol)
        try:
            reply = _serve_one(marshal.loads(msg), fds, ctl_fd, f"{root}/{n}", nproc_base)
            reply["recycle"] = not _wipe(root)
        except Exception as e:  # noqa: BLE001 - reported; the worker is then replaced
            reply = {"wait_status": None, "timed_out": False, "error": repr(e), "recycle": True}
        ctl.send(marshal.dumps(reply))
        if reply["recycle"]:
            break
        n += 1
    os._exit(0)  # PID 1: the kernel ends the namespaces with it


def _serve_one(req: dict, fds: list[int], ctl_fd: int, workdir: str,
               nproc_base: int) -> dict:
    """Fork the program's process, wait for it up to the run's timeout, then end every process
    of the namespace but this one."""
    code_fd, done, out, err = fds
    os.mkdir(workdir, 0o700)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _program_process(req["limits"], nproc_base, ctl_fd, fds, workdir)
    for fd in fds:
        os.close(fd)
    status = _wait(pid, req["timeout"])  # None: still running, killed by _reap_all
    _reap_all()
    return {"wait_status": status, "timed_out": status is None}


def _program_process(limits: dict[str, int], nproc_base: int, ctl_fd: int, fds: list[int],
                     workdir: str) -> None:
    """The program's process, forked from the zygote: it drops the zygote's control socket,
    takes the run's output files, work dir and rlimits, then runs the program as `--run`."""
    code_fd, done, out, err = fds
    status = SETUP_FAILED
    try:
        import resource

        os.close(ctl_fd)
        os.setsid()  # a group of its own: kill(0) from the program does not reach PID 1's
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        code = _read_all(code_fd)
        os.set_inheritable(done, False)  # a program the program execs does not get it
        os.closerange(3, done)
        os.closerange(done + 1, 4096)
        os.chdir(workdir)
        os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        for name, value in limits.items():
            rlimit = getattr(resource, name)
            if rlimit == resource.RLIMIT_NPROC:  # the uid's other processes: this zygote (+ base)
                value += nproc_base + 1
            hard = resource.getrlimit(rlimit)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(rlimit, (value, value))
    except BaseException:  # noqa: BLE001 - a setup failure must not look like a result
        import traceback

        traceback.print_exc()
        os._exit(SETUP_FAILED)
    try:
        status = _run_program(code, done)
    finally:
        os._exit(status)


def _wait(pid: int, timeout: float) -> int | None:
    """The program's wait status, or None once it has run `timeout` seconds."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll the status instead
        return _wait_polling(pid, timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(1, int(timeout * 1000))):
            return None
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]


def _wait_polling(pid: int, timeout: float) -> int | None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    return None


def _reap_all() -> None:
    """Kill every process of the namespace but this one (PID 1, which kill(-1) spares) and
    wait until none is left: a process whose parent dies is reparented to PID 1, so once this
    process has no child, the namespace holds no other process."""
    try:
        os.kill(-1, 9)  # SIGKILL
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _wipe(root: str) -> bool:
    """Remove everything a run left under `root`; False if anything stays. The files are this
    uid's whatever modes the program gave them, and no process of the run is left to race."""
    try:
        os.chmod(root, 0o700)
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False):
                _remove_tree(entry.path)
            else:
                os.unlink(entry.path)
        return not os.listdir(root)
    except (OSError, RecursionError):
        return False


def _remove_tree(path: str) -> None:
    os.chmod(path, 0o700)  # a directory the program made unreadable or read-only
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
        else:
            os.unlink(entry.path)
    os.rmdir(path)


if __name__ == "__main__" and sys.argv[1:2] == ["--run"]:
    _runner(*(int(a) for a in sys.argv[2:5]))  # never returns
if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    serve(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
