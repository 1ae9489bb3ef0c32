"""The sandbox's trusted first process: isolate, fork the program's process, report.

Run by `lmforge.sandbox` as `python -I -S sandbox_boot.py CONFIG_JSON` with the program on
stdin and the write end of a report pipe (its number in the config). Standard library only and no lmforge imports: `-S` keeps
site-packages off the path, and everything is imported before privileges are dropped (the
interpreter may live where the unprivileged user cannot read).

Order matters:
1. as root, open handles to the interpreter's directories, then drop to the run's own uid;
2. unshare user + mount + net + pid + ipc + uts namespaces (each layer recorded if it held);
3. make the whole filesystem read-only except the work directory, re-exposing the
   interpreter's directories if a parent directory (e.g. /root) hid them from that uid;
4. fork: the child is PID 1 of the new PID namespace, so when it exits the kernel kills
   every process it left behind (daemons included); it sets rlimits, drops capabilities,
   and runs the program in this already-started interpreter (no second startup);
5. wait for it and write its wait status to the report pipe.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SETUP_FAILED = 4  # exit codes 0-3 are the program's (see _run_program), 128+N a signal

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


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


def _processes_of(uid: int) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        try:
            n += entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid
        except OSError:
            pass
    return n


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


def _block_sockets() -> None:
    """The weak stand-in for a network namespace: no socket objects from Python code."""
    import socket

    def refuse(*_a: object, **_k: object) -> None:
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket = socket.create_connection = refuse  # type: ignore[assignment,misc]
    sys.modules["_socket"] = None  # type: ignore[assignment]


def _print_exc(e: BaseException) -> None:
    """The traceback from the program's own frames on (this file's frame says nothing)."""
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
    traceback.print_exception(type(e), e, tb)


def _run_program(code: str, nonce: str) -> int:
    """Run to the end -> print the nonce, exit 0. Exit 1: an assert failed; 3: the program
    exited (sys.exit) before its end; 2: any other exception."""
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    status = 0
    try:
        exec(compile(code, "program.py", "exec"), ns)
    except SystemExit as e:
        sys.stderr.write(f"SandboxEarlyExit: the program exited ({e.code!r}) before its end\n")
        status = 3
    except AssertionError as e:
        _print_exc(e)
        status = 1
    except BaseException as e:  # noqa: BLE001 - every failure of untrusted code is a result
        _print_exc(e)
        status = 2
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - a closed or over-limit stream
        status = status or 2
    if status == 0:
        os.write(1, f"\n{nonce}\n".encode())
    return status


def _init(program: int) -> int:
    """PID 1's job: reap everything until the program itself ends; its status is ours.
    (The program does not run as PID 1, whose default signal dispositions the kernel
    ignores: a stack overflow there would hang instead of ending the run.)"""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _child(cfg: dict, code: str, nonce: str, layers: dict[str, bool]) -> None:
    os.close(cfg["report_fd"])  # the report pipe is the boot process's, not the program's
    if layers["pid_ns"]:
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass  # the outer /proc stays visible (read-only); processes are still confined
    _set_limits(cfg["limits"])
    if layers["user_ns"]:
        _drop_capabilities()
    if not layers["net_ns"]:
        _block_sockets()
    os.chdir(cfg["workdir"])
    if layers["pid_ns"]:
        program = os.fork()
        if program != 0:
            os._exit(_init(program))
    os._exit(_run_program(code, nonce))


# what solutions to MBPP/HumanEval-style problems import; see _preload
_COMMON = ("array bisect collections copy datetime decimal fractions functools hashlib heapq "
           "itertools math operator random re socket statistics string sys typing "
           "unicodedata").split()


def _preload(notes: list[str]) -> None:
    """Without a mount namespace, an interpreter under a directory the run's uid cannot enter
    could import nothing new after the uid drop: import the usual modules while still root."""
    import importlib

    for name in _COMMON:
        importlib.import_module(name)
    notes.append("interpreter unreadable by the run's uid: common modules preloaded, others "
                 "will fail to import")


def _isolate(cfg: dict, layers: dict[str, bool], notes: list[str]) -> None:
    """Steps 1-3 of the module docstring. As root the read-only view is built first, in a
    mount namespace the program's user namespace does not own: the kernel then locks it, so
    not even the program's namespace-local capabilities could undo it."""
    uid, workdir, dirs = cfg["uid"], cfg["workdir"], cfg["interpreter_dirs"]
    if os.geteuid() == 0 and uid is not None:
        try:
            if not cfg["namespaces"]:
                raise OSError("namespaces turned off")
            _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
            _read_only_view(workdir, dirs, _hidden_roots(dirs, uid))
            layers["readonly_fs"] = True
        except OSError as e:
            notes.append(str(e))
            if _hidden_roots(dirs, uid):
                _preload(notes)
        _drop_user(uid)
        layers["unprivileged"] = True
    else:
        # a shared uid's other processes count too: give the program its budget on top
        cfg["limits"]["RLIMIT_NPROC"] += _processes_of(os.geteuid())
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["limits"]["RLIMIT_NPROC"],) * 2)
    if not cfg["namespaces"]:
        notes.append("namespaces turned off")
        return
    if not _enter_namespaces(os.geteuid(), os.getegid()):
        notes.append(f"unshare: {os.strerror(ctypes.get_errno())}")
        return
    layers.update(user_ns=True, net_ns=True, pid_ns=True)
    if not layers["readonly_fs"]:
        try:
            _read_only_view(workdir, dirs, [])
            layers["readonly_fs"] = True
        except OSError as e:
            notes.append(str(e))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    payload = json.loads(sys.stdin.buffer.read())
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    report = os.fdopen(cfg["report_fd"], "w")
    layers = {"unprivileged": os.geteuid() != 0, "user_ns": False, "net_ns": False,
              "pid_ns": False, "readonly_fs": False}
    notes: list[str] = []
    _isolate(cfg, layers, notes)
    pid = os.fork()
    if pid == 0:
        try:
            _child(cfg, payload["code"], payload["nonce"], layers)
        except BaseException:  # noqa: BLE001 - a setup failure must not look like a result
            traceback.print_exc()
        finally:
            os._exit(SETUP_FAILED)
    report.write(json.dumps({"layers": layers, "notes": notes, "pid": pid}) + "\n")
    report.flush()
    _, status = os.waitpid(pid, 0)
    report.write(json.dumps({"wait_status": status}) + "\n")
    report.close()


if __name__ == "__main__":
    main()
