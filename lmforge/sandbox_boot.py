"""The sandbox's trusted first process: isolate, start the program's interpreter, report.

Run by `lmforge.sandbox` as `python -I -S sandbox_boot.py [--pool]` with its configuration
(marshal) on stdin and the write end of a report pipe (its number in the configuration).
Standard library only and no lmforge imports: `-S` keeps site-packages off the path, and
everything is imported before privileges are dropped (the interpreter may live where the
unprivileged user cannot read). This process uses ctypes; the interpreter that runs the
program (`sandbox_runner.py`, whose docstring has the pass token's argument) never does.

Order matters:
1. as root, open handles to the interpreter's directories, then drop to the run's own uid
   (if that uid could not start the interpreter and no mount namespace re-exposes it, the
   runner drops instead, after importing the usual modules);
2. unshare user + mount + net + pid + ipc + uts namespaces (each layer recorded if it held);
3. make the whole filesystem read-only except the work directory, re-exposing the
   interpreter's directories if a parent directory (e.g. /root) hid them from that uid;
4. stop being dumpable, then fork: the child is PID 1 of the new PID namespace, so when it
   exits the kernel kills every process it left behind (daemons included); it hides /proc,
   drops capabilities and installs the seccomp filter;
5. report the layers that held, and the end.

One shot (the default): stdin also holds the program. PID 1 sets the run's rlimits, forks the
program's process, which execs `sandbox_runner.py --run` (a fresh interpreter that runs the
program), and reaps until it ends; this process then reports its wait status and whether it
ran to its end (its done pipe).

Pool (`--pool`): a pre-forked worker that serves many runs. Its work directory gets a tmpfs of
the worker's own (size-capped; every run's files live and die there), and PID 1 execs
`sandbox_runner.py --zygote`, which serves runs on a control socket the parent passed in:
each run a fork of that interpreter, with the run's rlimits. The uid, the namespaces, the
read-only view, the dropped capabilities and the seccomp filter are the worker's; as the
namespaces outlive a run, the filter also refuses the System V IPC, POSIX message queue and
keyring calls, whose objects would outlive it too. This process reports the layers and the
zygote's pid, then watches both ends: when the parent goes (stdin closes) it kills the zygote,
and with it the namespaces; when the zygote ends, it reports that and exits.
"""

from __future__ import annotations

import _signal
import ctypes
import marshal
import os
import resource
import sys

SETUP_FAILED = 4  # as sandbox_runner's (this file cannot import it: see the docstring)
TOKEN_BYTES = 16  # as sandbox_runner's
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py")

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
SECCOMP_MODE_FILTER, SECCOMP_RET_ALLOW, SECCOMP_RET_EPERM = 2, 0x7FFF0000, 0x00050001
# always: rt_sigaction, ptrace, process_vm_readv, process_vm_writev; persistent (a pool
# worker's): shmget, semget, msgget, mq_open, add_key, request_key, keyctl
SECCOMP_ARCH = {
    "x86_64": {"arch": 0xC000003E, "always": (13, 101, 310, 311), "socket": 41, "execve": 59,
               "execveat": 322, "persistent": (29, 64, 68, 240, 248, 249, 250)},
    "aarch64": {"arch": 0xC00000B7, "always": (134, 117, 270, 271), "socket": 198,
                "execve": 221, "execveat": 281,
                "persistent": (194, 190, 186, 180, 217, 218, 219)}}
POOL_NPROC = 4096  # a worker's ceiling; each run sets its own RLIMIT_NPROC below it

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


def _read_only_view(workdir: str, keep: list[str], hidden: list[str], tmpfs: str | None) -> None:
    """Everything read-only but `workdir`. `hidden` directories (ones the run's uid cannot
    enter, e.g. a 0700 /root) are covered with an empty tmpfs and only `keep` under them is
    bound back, so the interpreter stays importable while the rest stays out of sight. With
    `tmpfs` (its mount options), `workdir` is a fresh tmpfs rather than the host's directory."""
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
    if tmpfs is not None:
        _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
        return
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


def _seccomp(machine: str, sockets: bool, exec_fd: int | None, persistent: bool = False) -> bool:
    """Refuse (EPERM) signal handlers, ptrace, process_vm_readv/writev, sockets unless
    `sockets` (the weak stand-in for a network namespace), with `persistent` the calls that
    create IPC objects and keys (they outlive a process), and every syscall of another ABI
    (i386, x32); inherited by every process the program starts. With `exec_fd`, also refuse
    starting programs: execve, and execveat but on `exec_fd`, a descriptor numbered past
    RLIMIT_NOFILE that only the runner's own start uses. False on an unknown architecture."""
    if machine not in SECCOMP_ARCH:
        return False
    nr = SECCOMP_ARCH[machine]
    denied = (nr["always"] + (() if sockets else (nr["socket"],))
              + (nr["persistent"] if persistent else ()))
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
    os.execve(exe, [python, "-I", "-S", RUNNER, "--run", str(code_fd), str(done), str(drop)],
              os.environ)


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
            _read_only_view(workdir, dirs, hidden, cfg.get("tmpfs"))
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
        cfg["nproc_base"] = _processes_of(os.geteuid())
        cfg["limits"]["RLIMIT_NPROC"] += cfg["nproc_base"]
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
            _read_only_view(workdir, dirs, [], cfg.get("tmpfs"))
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
    os.close(done_r)
    report.close()


# -- a pool worker (module docstring) -----------------------------------------------------------


def pool_main() -> None:
    """Isolate once, start the zygote as PID 1 of the worker's namespaces, watch both ends."""
    cfg = marshal.load(sys.stdin.buffer)  # stdin stays open: its end is the parent's
    report = os.fdopen(cfg["report_fd"], "wb")
    layers = {"unprivileged": os.geteuid() != 0, "user_ns": False, "net_ns": False,
              "pid_ns": False, "readonly_fs": False}
    notes: list[str] = []
    drop = _isolate(cfg, layers, notes)
    if drop >= 0 or not all(layers.values()):  # the parent runs one shot at a time instead
        report.write(marshal.dumps({"layers": layers, "notes": notes, "pid": None}))
        return
    _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")  # before the fork
    pid = os.fork()
    if pid == 0:
        try:
            _zygote(cfg)
        except BaseException:  # noqa: BLE001 - the parent sees the worker end before it is ready
            import traceback

            traceback.print_exc()
        finally:
            os._exit(SETUP_FAILED)
    os.close(cfg["ctl_fd"])  # the zygote's alone: its end closes when the zygote ends
    report.write(marshal.dumps({"layers": layers, "notes": notes, "pid": pid}))
    report.flush()
    report.write(marshal.dumps({"wait_status": _watch(pid)}))
    report.close()


def _zygote(cfg: dict) -> None:
    """PID 1 of the worker's namespaces: hide /proc, drop what no run needs, exec the zygote."""
    os.close(cfg["report_fd"])
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    # no /proc at all: no other process, not the runs' memory; without it a worker would have
    # to refuse exec like the one-shot fallback, so there is no worker then
    _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
           "size=4k,mode=0555")
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)  # not the parent's pipe: only this worker's boot process watches that
    os.close(fd)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _drop_capabilities()
    os.chdir(cfg["workdir"])
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # see _child
    _seccomp(os.uname().machine, sockets=True, exec_fd=None, persistent=True)
    os.set_inheritable(cfg["ctl_fd"], True)
    python = os.path.realpath(sys.executable)
    os.execv(python, [python, "-I", "-S", RUNNER, "--zygote", str(cfg["ctl_fd"]),
                      cfg["workdir"], str(cfg.get("nproc_base", 0))])


def _watch(zygote: int) -> int:
    """Wait for the zygote; if the parent goes first (stdin closes), kill it. Its wait status."""
    import select

    poller = select.poll()
    poller.register(0, select.POLLIN)
    try:
        poller.register(os.pidfd_open(zygote), select.POLLIN)
        timeout = None
    except (AttributeError, OSError):  # Linux < 5.3: look every 100 ms
        timeout = 100
    while True:
        ready = [fd for fd, _ in poller.poll(timeout)]
        if 0 in ready:
            os.kill(zygote, 9)
        pid, status = os.waitpid(zygote, 0 if ready else os.WNOHANG)
        if pid:
            return status


if __name__ == "__main__":
    pool_main() if sys.argv[1:2] == ["--pool"] else main()
