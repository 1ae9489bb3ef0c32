"""The sandbox's trusted first process: isolate, fork the program's process, report.

Run by `lmforge.sandbox` as `python -I -S sandbox_boot.py` with its configuration and the
program (marshal) on stdin and the write end of a report pipe (its number in the configuration).
Standard library only and no lmforge imports: `-S` keeps site-packages off the path, and
everything is imported before privileges are dropped (the interpreter may live where the
unprivileged user cannot read).

Order matters:
1. as root, open handles to the interpreter's directories, then drop to the run's own uid
   (if that uid could not start the interpreter and no mount namespace re-exposes it, the
   runner drops instead, after importing the usual modules);
2. unshare user + mount + net + pid + ipc + uts namespaces (each layer recorded if it held);
3. make the whole filesystem read-only except the work directory, re-exposing the
   interpreter's directories if a parent directory (e.g. /root) hid them from that uid;
4. stop being dumpable, then fork: the child is PID 1 of the new PID namespace, so when it
   exits the kernel kills every process it left behind (daemons included); it sets rlimits,
   drops capabilities, hides /proc and installs the seccomp filter; then the program's process
   (its child, or itself without a PID namespace) execs this file again as the runner
   (`--run`), a fresh interpreter that runs the program;
5. wait for it and report its wait status, and whether it ran to its end.

The pass signal, and who knows what:
- The supervisor knows no secret. It takes a pass only from this process's report pipe, which
  no process that runs program code holds a write end of (the child closes it first). This
  process is not dumpable from before the fork and the program's processes hold no
  capabilities, so the kernel refuses them ptrace, /proc/<pid>/mem and /proc/<pid>/fd on it
  (in a PID namespace it is not even visible). Printing anything proves nothing.
- The runner draws a 16-byte token right before the program starts and writes it to the done
  pipe (the commit: nothing else has run in that process, so these are the pipe's first
  bytes). From then on the token exists only in the closure of `prove`, which `_run_program`
  calls once `exec` has returned normally, i.e. after the program's last statement (a module
  has no early return; tracers, which could jump over lines, are refused). `prove` writes the
  token again (the reveal). This process reports `ran_to_end` when the program's process
  exited 0 and the reveal directly follows the commit (one guess, not one per written byte).
- Why that is not the whole story: the final statement runs in the program's own process, with
  no capability the program lacks (a process's capabilities only ever shrink), so anything it
  does the program could do first, if it had the token. The token is therefore put out of the
  program's reach. Within the process: the runner is a fresh interpreter that has never
  loaded ctypes (whose pointer types read any address without an audit event, which is why
  the program does not run in this process's interpreter), and an audit hook, which cannot be
  removed, refuses every other route CPython offers from Python code to the token: frames,
  tracers, the object graph, ctypes and the test-only C modules, new interpreters, paths through
  /proc (see `_seal`); seccomp refuses installing signal handlers, which CPython hands the
  interrupted frame without an audit event. From other processes: seccomp refuses ptrace and
  process_vm_readv; in a PID namespace /proc is an empty tmpfs, elsewhere seccomp refuses
  starting any other program, so every process of the run is the runner or a fork of it,
  under the hook. What remains: code that
  corrupts the interpreter's memory (crafted bytecode, a CPython bug) gets past any in-process
  guard; only tests that run in a process the answer never touches would not. And without
  namespaces and without root the program runs as the caller, who is then not protected.
"""

from __future__ import annotations

import os
import sys
from _collections_abc import Callable

TOKEN_BYTES = 16
SETUP_FAILED = 4  # exit codes 0-3 are the program's (see _run_program), 128+N a signal
# what solutions to MBPP/HumanEval-style problems import; see _runner
_COMMON = ("array bisect collections copy datetime decimal fractions functools hashlib heapq "
           "itertools math operator random re socket statistics string sys typing "
           "unicodedata").split()


# -- the runner: the program's process, a fresh interpreter that never loads ctypes ----------


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


def _runner(code_fd: int, done: int, uid: int) -> None:
    """The program's process: read the program, become the run's uid if the boot process
    could not (`uid` >= 0: then the interpreter is unreadable by that uid, so the usual
    modules are imported first, and the drop also makes this process not dumpable), run it."""
    try:
        chunks = []
        while chunk := os.read(code_fd, 1 << 16):
            chunks.append(chunk)
        os.close(code_fd)
        os.set_inheritable(done, False)  # a program the program execs does not get it
        if uid >= 0:
            import importlib

            for name in _COMMON:
                importlib.import_module(name)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        code = b"".join(chunks).decode("utf-8", "surrogatepass")
        import types  # noqa: F401 - before the seal: it reads a traceback's frame on import
    except BaseException:  # noqa: BLE001 - a setup failure must not look like a result
        import traceback

        traceback.print_exc()
        os._exit(SETUP_FAILED)
    os._exit(_run_program(code, done))


if __name__ == "__main__" and sys.argv[1:2] == ["--run"]:
    _runner(*(int(a) for a in sys.argv[2:5]))  # never returns


# -- the boot process (and PID 1 of the namespace): trusted, isolates, may use ctypes --------

import _signal  # noqa: E402
import ctypes  # noqa: E402
import marshal  # noqa: E402
import resource  # noqa: E402

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
SECCOMP_MODE_FILTER, SECCOMP_RET_ALLOW, SECCOMP_RET_EPERM = 2, 0x7FFF0000, 0x00050001
# always: rt_sigaction, ptrace, process_vm_readv, process_vm_writev
SECCOMP_ARCH = {
    "x86_64": {"arch": 0xC000003E, "always": (13, 101, 310, 311), "socket": 41, "execve": 59,
               "execveat": 322},
    "aarch64": {"arch": 0xC00000B7, "always": (134, 117, 270, 271), "socket": 198,
                "execve": 221, "execveat": 281}}

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enc(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(libc.mount(_enc(src), _enc(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data)),
           f"mount {target}")


def _setattr(path: str, set_: int, clr: int) -> None:
    attr = MountAttr(set_, clr, 0, 0)
    _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE,
                        ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {path}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _hidden_roots(dirs: list[str], uid: int) -> list[str]:
    """The outermost ancestors of `dirs` that `uid` cannot traverse (e.g. a 0700 /root)."""
    roots: set[str] = set()
    for d in dirs:
        parts = d.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/" + "/".join(parts[:i])
            st = os.stat(p)
            if uid != 0 and not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
                roots.add(p)
                break
    return sorted(roots)


def real_uid(pid: str) -> int | None:
    """A process's real uid, from its status: not the owner of /proc/<pid>, which is root for a
    process that is not dumpable (every sandbox process)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _processes_of(uid: int) -> int:
    return sum(e.isdigit() and real_uid(e) == uid for e in os.listdir("/proc"))


def _drop_user(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    # setuid clears "dumpable", which makes /proc/self/{uid,gid}_map root-owned and unwritable
    _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl dumpable")


def _enter_namespaces(uid: int, gid: int) -> bool:
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if libc.unshare(flags) != 0:
        return False
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    return True


def _read_only_view(workdir: str, keep: list[str], hidden: list[str]) -> None:
    """Everything read-only but `workdir`. `hidden` directories (ones the run's uid cannot
    enter, e.g. a 0700 /root) are covered with an empty tmpfs and only `keep` under them is
    bound back, so the interpreter stays importable while the rest stays out of sight."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates outside
    handles = [(p, os.open(p, os.O_PATH)) for p in keep
               if any(p == r or p.startswith(r + "/") for r in hidden)]
    for root in hidden:
        _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for path, fd in handles:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    _setattr("/", MOUNT_ATTR_RDONLY, 0)
    _setattr("/proc", 0, MOUNT_ATTR_RDONLY)  # proc's own permissions govern it (uid maps)
    _mount(workdir, workdir, None, MS_BIND | MS_REC)
    _setattr(workdir, 0, MOUNT_ATTR_RDONLY)


def _drop_capabilities() -> None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    data = (ctypes.c_uint32 * 6)()  # two zeroed {effective, permitted, inheritable} sets
    _check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")


def _set_limits(lim: dict[str, int]) -> None:
    for name, value in lim.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _seccomp(machine: str, sockets: bool, exec_fd: int | None) -> bool:
    """Refuse (EPERM) signal handlers, ptrace, process_vm_readv/writev, sockets unless
    `sockets` (the weak stand-in for a network namespace), and every syscall of another ABI
    (i386, x32); inherited by every process the program starts. With `exec_fd`, also refuse
    starting programs: execve, and execveat but on `exec_fd`, a descriptor numbered past
    RLIMIT_NOFILE that only the runner's own start uses. False on an unknown architecture."""
    if machine not in SECCOMP_ARCH:
        return False
    nr = SECCOMP_ARCH[machine]
    denied = nr["always"] + (() if sockets else (nr["socket"],))
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE|K, BPF_RET|K
    # (code, where to go if true, if false, k); None is the next instruction
    prog: list[tuple[int, str | None, str | None, int]] = [
        (ld, None, None, 4), (jeq, None, "deny", nr["arch"]),  # seccomp_data.arch
        (ld, None, None, 0), (jge, "deny", None, 0x40000000),  # .nr; x32 ones have bit 30
        *((jeq, "deny", None, n) for n in denied)]
    if exec_fd is not None:
        prog += [(jeq, "deny", None, nr["execve"]), (jeq, None, "allow", nr["execveat"]),
                 (ld, None, None, 16), (jeq, "allow", "deny", exec_fd)]  # .args[0], low half
    prog += [(ret, None, None, SECCOMP_RET_ALLOW), (ret, None, None, SECCOMP_RET_EPERM)]
    at = {"allow": len(prog) - 2, "deny": len(prog) - 1}
    code = (SockFilter * len(prog))(*(
        SockFilter(op, 0 if yes is None else at[yes] - i - 1, 0 if no is None else at[no] - i - 1,
                   k) for i, (op, yes, no, k) in enumerate(prog)))
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                      ctypes.byref(SockFprog(len(prog), code)), 0, 0), "seccomp")
    return True


def _init(program: int) -> int:
    """PID 1's job: reap everything until the program itself ends; its status is ours.
    (The program does not run as PID 1, whose default signal dispositions the kernel
    ignores: a stack overflow there would hang instead of ending the run.)"""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _child(cfg: dict, layers: dict[str, bool], code_fd: int, done: int, drop: int) -> None:
    os.close(cfg["report_fd"])  # the report pipe is the boot process's, not the program's
    proc_hidden = False
    if layers["pid_ns"]:
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
        try:  # no /proc at all: no other process, and not the runner's memory either
            _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "size=4k,mode=0555")
            proc_hidden = True
        except OSError:
            pass  # the outer /proc stays visible (read-only): then no program may start
    # the runner's interpreter, at a number no descriptor can have once RLIMIT_NOFILE is set
    python, exe = os.path.realpath(sys.executable), cfg["limits"]["RLIMIT_NOFILE"]
    fd = os.open(python, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(fd, exe, inheritable=False)
    os.close(fd)
    _set_limits(cfg["limits"])
    if layers["user_ns"]:
        _drop_capabilities()
    os.chdir(cfg["workdir"])
    # ignored, so the runner's interpreter installs no handler for it (nor does asyncio then):
    # the seccomp filter refuses setting one
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    # where /proc shows the runner, a program started without the audit hook could read it
    _seccomp(os.uname().machine, sockets=layers["net_ns"], exec_fd=None if proc_hidden else exe)
    if layers["pid_ns"]:
        program = os.fork()
        if program != 0:
            for fd in (code_fd, done, exe):
                os.close(fd)
            os._exit(_init(program))
    for fd in (code_fd, done):
        os.set_inheritable(fd, True)
    os.execve(exe, [python, "-I", "-S", os.path.abspath(__file__), "--run", str(code_fd),
                    str(done), str(drop)], os.environ)


def _isolate(cfg: dict, layers: dict[str, bool], notes: list[str]) -> int:
    """Steps 1-3 of the module docstring. As root the read-only view is built first, in a
    mount namespace the program's user namespace does not own: the kernel then locks it, so
    not even the program's namespace-local capabilities could undo it. Returns the uid the
    runner must drop to itself (-1: none), when the run's uid could not start the interpreter."""
    uid, workdir, dirs = cfg["uid"], cfg["workdir"], cfg["interpreter_dirs"]
    if os.geteuid() == 0 and uid is not None:
        hidden = _hidden_roots(dirs, uid)
        try:
            if not cfg["namespaces"]:
                raise OSError("namespaces turned off")
            _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
            _read_only_view(workdir, dirs, hidden)
            layers["readonly_fs"] = True
        except OSError as e:
            notes.append(str(e))
        layers["unprivileged"] = True
        if hidden and not layers["readonly_fs"]:  # no namespaces then: they need the drop first
            notes.append("interpreter unreadable by the run's uid: common modules preloaded, "
                         "others will fail to import")
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["limits"]["RLIMIT_NPROC"],) * 2)
            return uid  # type: ignore[no-any-return]
        _drop_user(uid)
    else:
        # a shared uid's other processes count too: give the program its budget on top
        cfg["limits"]["RLIMIT_NPROC"] += _processes_of(os.geteuid())
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["limits"]["RLIMIT_NPROC"],) * 2)
    if not cfg["namespaces"]:
        notes.append("namespaces turned off")
        return -1
    if not _enter_namespaces(os.geteuid(), os.getegid()):
        notes.append(f"unshare: {os.strerror(ctypes.get_errno())}")
        return -1
    layers.update(user_ns=True, net_ns=True, pid_ns=True)
    if not layers["readonly_fs"]:
        try:
            _read_only_view(workdir, dirs, [])
            layers["readonly_fs"] = True
        except OSError as e:
            notes.append(str(e))
    return -1


def _revealed(fd: int) -> bool:
    """Whether the done pipe holds the commit and, right after it, the same token again (the
    reveal). Read without waiting: a daemon the program left may still hold the pipe open."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 2 * TOKEN_BYTES)
    except BlockingIOError:
        data = b""
    os.close(fd)
    return len(data) == 2 * TOKEN_BYTES and data[:TOKEN_BYTES] == data[TOKEN_BYTES:]


def main() -> None:
    payload = marshal.loads(sys.stdin.buffer.read())
    cfg = payload["cfg"]
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    report = os.fdopen(cfg["report_fd"], "wb")
    layers = {"unprivileged": os.geteuid() != 0, "user_ns": False, "net_ns": False,
              "pid_ns": False, "readonly_fs": False}
    notes: list[str] = []
    drop = _isolate(cfg, layers, notes)
    if os.uname().machine not in SECCOMP_ARCH:
        notes.append(f"no seccomp filter for {os.uname().machine}: signal handlers, ptrace and "
                     "process_vm_readv are not refused")
    # the program, for the runner to read once; in no file the program could open
    code_fd = os.memfd_create("program", os.MFD_CLOEXEC)
    os.write(code_fd, payload["code"].encode("utf-8", "surrogatepass"))
    os.lseek(code_fd, 0, os.SEEK_SET)
    done_r, done_w = os.pipe()
    _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")  # before the fork
    pid = os.fork()
    if pid == 0:
        try:
            os.close(done_r)
            _child(cfg, layers, code_fd, done_w, drop)
        except BaseException:  # noqa: BLE001 - a setup failure must not look like a result
            import traceback

            traceback.print_exc()
        finally:
            os._exit(SETUP_FAILED)
    os.close(code_fd)
    os.close(done_w)
    report.write(marshal.dumps({"layers": layers, "notes": notes, "pid": pid}))
    report.flush()
    _, status = os.waitpid(pid, 0)
    report.write(marshal.dumps({"wait_status": status, "ran_to_end": _revealed(done_r)}))
    report.close()


if __name__ == "__main__":
    main()
