"""The jail launcher: ``python -m baton.jail_launcher SPEC_FD -- WORKER_ARGV...``.

A small single-threaded process that the supervisor execs between itself and
every jailed worker (never ``preexec_fn`` in the threaded supervisor). It
reads the jail's spec (JSON, written by ``supervisor.jail``) from SPEC_FD and,
as root, step by step:

1. checks the kernel: namespaces and seccomp (a clear error, nothing started);
2. builds the seccomp filter (libseccomp, through pyseccomp) to load later;
3. joins the VM's cgroups (memory, pids: v2 or v1);
4. unshares mount, PID, network, IPC and UTS namespaces;
5. forks once: the child is PID 1 of the new PID namespace and becomes the
   worker; the parent waits until the child has exec'd (a CLOEXEC pipe
   closes) or failed, reports ``pid N`` (the worker's host pid) or
   ``error: ...`` on the report fd, and exits. The supervisor, a child
   subreaper, inherits the worker as its own child;
6. in the child: a tmpfs root with read-only binds of what the worker runs
   from, a private /tmp, /proc of its own PID namespace, /dev/null and
   /dev/urandom (and /dev/kvm only where the worker cannot take the fd),
   pivot_root, the old root detached, / remounted read-only;
7. hostname, rlimits, every fd closed but the ones handed over;
8. the capability bounding set emptied, supplementary groups set to the broker
   socket's group only (none for QEMU), gid
   and uid set (every capability goes with uid 0), no_new_privs;
9. the seccomp filter loaded, then execve of the worker in a clean
   environment.

The same steps, as functions (``enter``, ``fork_worker``, ``confine``), also
run without any exec: in a baton-vmm zygote's fork (``vmm.zygote``), which
then runs the worker in-process instead of ``execve``. One implementation of
the jail for both paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import socket
import stat
import sys
from collections.abc import Callable
from typing import Any

from baton.trace import mark

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = {
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
}

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21

#: a test's way to play a kernel without namespaces or seccomp
SIMULATE_ENV = "BATON_JAIL_SIMULATE_MISSING"

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(RuntimeError):
    pass


def _call(what: str, ret: int) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(e)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
    _call(
        f"mount {src or fstype} on {dst}",
        _libc.mount(
            None if src is None else src.encode(),
            dst.encode(),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            None if data is None else data.encode(),
        ),
    )


def check_kernel(spec: dict[str, Any]) -> None:
    missing = set(filter(None, os.environ.get(SIMULATE_ENV, "").split(",")))
    for ns in spec["namespaces"]:
        if ns in missing or "namespaces" in missing or not os.path.exists(f"/proc/self/ns/{ns}"):
            raise JailError(f"this kernel has no {ns} namespaces (the jail needs them)")
    no_seccomp = "seccomp" in missing or _libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) < 0
    if spec.get("seccomp") is not None and no_seccomp:
        raise JailError("this kernel has no seccomp filters (the jail needs them)")


#: clone(2) flags that make namespaces: refused whatever the allowlist says (the
#: unshare syscall is denied by name; clone's flags are its first argument)
CLONE_NS_FLAGS = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
CLONE_NS_FLAGS |= 0x10000000 | 0x02000000 | 0x00000080  # NEWUSER, NEWCGROUP, NEWTIME


def build_filter(sc: dict[str, Any]) -> Any:
    """The worker's filter. clone3 answers ENOSYS (its flags sit in memory, where
    seccomp cannot look; glibc then falls back to clone), and clone is allowed only
    without namespace flags (EPERM with any)."""
    import pyseccomp as seccomp  # type: ignore[import-untyped]

    actions = {
        "kill": seccomp.KILL_PROCESS,
        "log": seccomp.LOG,
        "allow": seccomp.ALLOW,
        "errno": seccomp.ERRNO(errno.EPERM),
    }
    f = seccomp.SyscallFilter(defaction=actions[sc["default"]])
    # A binary tree of syscall numbers rather than libseccomp's default linear chain:
    # about a dozen tests instead of up to ~250 where the kernel must run the program (clone's
    # flag test; kernels before 5.11, which cache no constant verdicts).
    with contextlib.suppress(OSError, ValueError, RuntimeError):  # libseccomp < 2.5
        f.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    # SPEC_ALLOW stays off: where the host asks for it (spec_store_bypass_disable=
    # seccomp, spectre_v2_user=seccomp), a filtered worker keeps the mitigation. See
    # docs/ARCHITECTURE.md, "The seccomp filter's cost".
    f.set_attr(seccomp.Attr.CTL_SSB, 0)
    deny = set(sc.get("deny", ())) | {"clone", "clone3"}
    for name in sc.get("deny", ()):
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # not on this arch
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for bit in (1 << i for i in range(64) if CLONE_NS_FLAGS >> i & 1):
        f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, bit, bit))
    if sc["default"] != "allow":
        f.add_rule(seccomp.ALLOW, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NS_FLAGS, 0))
        for name in sc.get("allow", ()):
            if name in deny:
                continue
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                f.add_rule(seccomp.ALLOW, name)
    return f


def join_cgroups(procs_files: list[str]) -> None:
    for path in procs_files:
        try:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            raise JailError(f"cannot join cgroup {os.path.dirname(path)}: {e.strerror}") from None


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _bind(root: str, src: str, writable: bool) -> None:
    dst = _inside(root, src)
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):  # /lib -> usr/lib on a merged-/usr host
        _mkdirs(os.path.dirname(dst))
        if not os.path.lexists(dst):
            os.symlink(os.readlink(src), dst)
        return
    if stat.S_ISDIR(st.st_mode):
        _mkdirs(dst)
    else:
        _mkdirs(os.path.dirname(dst))
        if not os.path.exists(dst):
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
    _mount(src, dst, None, MS_BIND | (0 if writable else MS_REC), None)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV
    if not writable:
        flags |= MS_RDONLY
    try:
        _mount(None, dst, None, flags, None)
    except JailError:  # the source mount has locked flags (noexec...): keep them
        st2 = os.statvfs(dst)
        _mount(None, dst, None, flags | (st2.f_flag & (MS_NOEXEC | MS_RDONLY)), None)


def build_root(spec: dict[str, Any]) -> None:
    root = spec["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    _mount("baton-jail", root, "tmpfs", MS_NOSUID, "mode=0755,size=4m")
    _mkdirs(_inside(root, "tmp"))
    _mount(
        "baton-tmp",
        _inside(root, "tmp"),
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"mode=1777,size={spec['tmp_size_mib']}m",
    )
    for src in spec["ro"]:
        if os.path.lexists(src):
            _bind(root, src, False)
    for src in spec["rw"]:
        _bind(root, src, True)
    _mkdirs(_inside(root, "proc"))
    _mount("proc", _inside(root, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    _mkdirs(_inside(root, "dev"))
    for path, major, minor, mode, owned in spec["devices"]:
        dst = _inside(root, path)
        os.mknod(dst, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(dst, mode)
        if owned:
            os.chown(dst, spec["uid"], spec["gid"])
    old = _inside(root, ".old")
    os.mkdir(old)
    _call("pivot_root", _libc.syscall(SYS_PIVOT_ROOT, root.encode(), old.encode()))
    os.chdir("/")
    _call("umount the old root", _libc.umount2(b"/.old", MNT_DETACH))
    os.rmdir("/.old")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID, None)


def set_rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        res = getattr(resource, f"RLIMIT_{name}")
        v = resource.RLIM_INFINITY if value < 0 else value
        resource.setrlimit(res, (v, v))


def close_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def drop_privileges(uid: int, gid: int, groups: list[int]) -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _call(f"drop capability {cap}", _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0))
    os.setgroups(groups)  # at most the broker socket's group
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _call("no_new_privs", _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def check_readable(paths: list[str]) -> None:
    """The worker's code and files, seen as its uid: one it cannot read would not
    fail loudly later. Python skips an unreadable ``PYTHONPATH`` entry and imports
    the installed package instead, so an upgrade to a build in a private directory
    would silently run the old code."""
    for p in paths:
        if not os.path.lexists(p):
            continue
        need = os.R_OK | (os.X_OK if os.path.isdir(p) else 0)
        if not os.access(p, need):
            raise JailError(
                f"{p} is bound into the jail but uid {os.getuid()} cannot read it: "
                "make it (and its directories) readable by others"
            )


def enter(spec: dict[str, Any], filt: Any = None) -> Any:
    """Steps 1-4, in the process that will fork the worker: the kernel checked,
    the filter built (loaded later, in the worker) unless ``filt`` is that filter
    already (a zygote's, built once per policy), the cgroups joined, the
    namespaces unshared. Returns the filter (None without seccomp)."""
    check_kernel(spec)
    if not spec.get("seccomp"):
        filt = None
    elif filt is None:
        filt = build_filter(spec["seccomp"])
    join_cgroups(spec["cgroup_procs"])
    mark("C.cgroups_joined")
    flags = 0
    for ns in spec["namespaces"]:
        flags |= NAMESPACES[ns]
    _call("unshare", _libc.unshare(flags))
    mark("C.unshared")
    return filt


def confine(spec: dict[str, Any], err_w: int, filt: Any) -> None:
    """Steps 6-9 but the exec, in PID 1 of the new namespaces: the root, hostname,
    rlimits, fds, privileges, the filter. What runs after it is the worker."""
    build_root(spec)
    mark("W.root_built")
    socket.sethostname(spec["hostname"])
    set_rlimits(spec["rlimits"])
    close_fds({0, 1, 2, err_w, *spec["keep_fds"]})
    drop_privileges(spec["uid"], spec["gid"], spec.get("groups", []))
    check_readable(spec.get("readable", []))
    if filt is not None:
        filt.load()
    mark("W.confined")


def fork_worker(
    spec: dict[str, Any] | None,
    filt: Any,
    say: Callable[[str], None],
    become: Callable[[int], None],
    *,
    first: Callable[[], None] | None = None,
) -> int:
    """Step 5 and the child's side: fork the worker, which runs ``first`` (still
    root), then ``confine`` (only with a jail: with ``spec`` None the caller has
    closed what the worker must not hold) and ``become(err_w)``, which must not
    return: it execs the worker (this launcher; the pipe is CLOEXEC) or runs it
    in-process (the zygote, ``vmm.zygote``, which closes ``err_w`` first). The
    parent waits until the pipe closes or carries an error, tells ``say`` ``pid
    N`` (the host pid) or ``error: jail: ...``, and returns 0 or 1: its exit
    status."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(err_r)
            mark("W.born")
            if first is not None:
                first()
            if spec is not None:
                confine(spec, err_w, filt)
            become(err_w)
            raise JailError("the worker returned")  # become never returns
        except BaseException as e:
            msg = str(e) if isinstance(e, JailError) else f"{type(e).__name__}: {e}"
            try:
                os.write(err_w, msg.encode()[:4000])
            finally:
                os._exit(126)
    os.close(err_w)
    chunks = []
    while data := os.read(err_r, 4096):
        chunks.append(data)
    os.close(err_r)
    if chunks:
        os.waitpid(pid, 0)
        say(f"error: jail: {b''.join(chunks).decode(errors='replace')}")
        return 1
    say(f"pid {pid}\n")
    return 0


def reporter(fd: int) -> Callable[[str], None]:
    """What ``fork_worker`` tells: one write on the report fd, then closed."""

    def say(text: str) -> None:
        os.write(fd, text.encode())
        os.close(fd)

    return say


def launch(spec: dict[str, Any], become: Callable[[int], None], filt: Any = None, **kw: Any) -> int:
    """Steps 1-9 for one worker, reported on the spec's ``report_fd``; the exit status.
    ``filt``: the spec's seccomp filter, if built already (``enter``)."""
    say = reporter(spec["report_fd"])
    try:
        filt = enter(spec, filt)
    except (JailError, OSError) as e:
        say(f"error: jail: {e}")
        return 1
    return fork_worker(spec, filt, say, become, **kw)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m baton.jail_launcher SPEC_FD -- ARGV...", file=sys.stderr)
        return 2
    spec_fd = int(argv[0])
    with os.fdopen(spec_fd, "rb") as f:
        spec = json.loads(f.read())
    worker_argv = argv[2:]
    os.umask(0o022)  # the jail's own directories: traversable by the worker's uid
    return launch(spec, lambda err_w: os.execve(worker_argv[0], worker_argv, spec["env"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
