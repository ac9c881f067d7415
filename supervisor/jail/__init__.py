"""The jail every worker runs in, of either kind: planned and built in the prepare phase.

``prepare`` (called by a kind's ``start``, before the worker is launched, so an
upgrade's pause never pays for it) checks and makes everything the launcher
(``baton.jail_launcher``) needs: the VM's uid and gid (``[jail] uid_range``,
base + a stable per-VM index kept in ``DIR/var/lib/baton/jail/uids.json``, or
the VM file's ``user``), checked unused by any other process; ``/dev/kvm``
opened (baton-vmm gets the fd, ``--kvm-fd``; QEMU 7.2 cannot take one, so its
jail has a ``/dev/kvm`` node of its own, owned by the VM's uid); the VM's
cgroup (v2 where its controllers are, else v1 ``memory`` and ``pids``) with its
limits; the VM's run directory owned by its uid; the broker told that the
VM's tokens work only from that uid (``vm.allow uid``). ``workers.py`` then
execs the launcher with the spec (``JailPlan.spec``) on an fd.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import pwd
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.config import broker_config, load_toml
from baton.durable import write_atomic
from baton.paths import Paths
from baton.schema import Bool, Field, Int, ListOf, OneOf, SchemaError, Str, optional, record
from baton.wire import Code, RemoteError
from supervisor.aside import Aside
from supervisor.priority import BACKGROUND

log = logging.getLogger("supervisor.jail")

KVM_ENV = "BATON_KVM_DEVICE"  # the same override baton-vmm honours
CGROUP_ROOT = Path("/sys/fs/cgroup")

JAIL_SCHEMA = record(
    # Unset: on when the supervisor runs as root (it can build a jail), else off.
    enabled=optional(Bool()),
    uid_range=Field(ListOf(Int(1, 2**32 - 2), 2, 2), factory=lambda: [700000, 799999]),
    seccomp=Field(OneOf(("kill", "log", "off")), "kill"),
    memory_overhead_mib=Field(Int(16, 1 << 20), 512),
    pids_max=Field(Int(8, 1 << 22), 512),
    nofile=Field(Int(64, 1 << 20), 4096),
    tmp_size_mib=Field(Int(1, 1 << 16), 64),
    # RLIMIT_FSIZE: at least guest RAM (a memfd used as RAM counts against it)
    fsize_min_mib=Field(Int(1, 1 << 30), 64 << 10),
    cgroup_parent=Field(Str(64, pattern=r"[A-Za-z0-9_.-]+"), "baton"),
)


@dataclass(frozen=True)
class JailConfig:
    enabled: bool = False
    uid_range: tuple[int, int] = (700000, 799999)
    seccomp: str = "kill"
    memory_overhead_mib: int = 512
    pids_max: int = 512
    nofile: int = 4096
    tmp_size_mib: int = 64
    fsize_min_mib: int = 64 << 10
    cgroup_parent: str = "baton"


def load_config(paths: Paths) -> JailConfig:
    raw = load_toml(paths.config_file) if paths.config_file.exists() else {}
    try:
        j = JAIL_SCHEMA.check(raw.get("jail", {}), "jail")
    except SchemaError as e:
        raise RemoteError(Code.BAD_REQUEST, f"{paths.config_file}: {e}") from None
    lo, hi = j["uid_range"]
    if lo > hi:
        raise RemoteError(Code.BAD_REQUEST, f"jail.uid_range: {lo} > {hi}")
    enabled = os.geteuid() == 0 if j["enabled"] is None else j["enabled"]
    return JailConfig(**{**j, "uid_range": (lo, hi), "enabled": enabled})


def jailed(paths: Paths, raw_vm: dict[str, Any]) -> bool:
    """Whether this VM's workers run jailed: ``[jail] enabled`` unless its file says
    ``jail = false`` (or true)."""
    per_vm = raw_vm.get("jail")
    if isinstance(per_vm, bool):
        return per_vm
    return load_config(paths).enabled


# ------------------------------------------------------------------- uids
_uid_lock = threading.Lock()


def _uid_table(paths: Paths) -> Path:
    return paths.lib / "jail" / "uids.json"


#: host-wide, whatever the root: a uid one supervisor holds, no other picks
CLAIMS = Path("/run/baton-jail-uids")
_claims: dict[int, int] = {}  # uid -> the fd whose flock holds it


def _claim(uid: int) -> bool:
    """Hold ``uid`` for this supervisor's life (an flock on a host-wide file, gone
    with the process), so that no other supervisor on the host (under another
    root) picks it in the window before our worker runs as it."""
    if uid in _claims:
        return True
    CLAIMS.mkdir(mode=0o700, exist_ok=True)
    path = CLAIMS / str(uid)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:  # a release unlinks the file: a lock on the unlinked one claims nothing
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                _claims[uid] = fd
                return True
        except FileNotFoundError:
            pass
        os.close(fd)


def _read_table(path: Path) -> dict[str, int]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def allocate_uid(paths: Paths, cfg: JailConfig, vm: str) -> int:
    """base + the VM's stable index: kept for the VM's life in uids.json, held
    host-wide while this supervisor lives (``_claim``)."""
    lo, hi = cfg.uid_range
    path = _uid_table(paths)
    with _uid_lock:
        table = _read_table(path)
        uid = table.get(vm)
        if isinstance(uid, int) and lo <= uid <= hi:
            if not _claim(uid):
                raise RemoteError(
                    Code.CONFLICT,
                    f"jail: uid {uid} (VM {vm}'s) is held by another supervisor on this "
                    "host: give the VM another [jail] uid_range or user",
                )
            return uid
        taken = {u for n, u in table.items() if n != vm}
        # never one another process already runs as (another root's VM, a squatter)
        taken |= set(uid_users())
        uid = next((u for u in range(lo, hi + 1) if u not in taken and _claim(u)), None)
        if uid is None:
            raise RemoteError(
                Code.QUOTA,
                f"jail: uid range [{lo}, {hi}] is exhausted (every uid in it is another "
                "VM's or in use by a process): widen [jail] uid_range",
            )
        table[vm] = uid
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, json.dumps(table, sort_keys=True).encode())
        return uid


def release_uid(paths: Paths, vm: str) -> int | None:
    """A VM gone for good (out of the config, its workers confirmed dead): its entry in
    uids.json and its host-wide claim go, so the uid can serve another VM, and its
    jail's directories go or become root's, so that VM never inherits them. Never
    while any process runs as the uid (a straggler; a worker of the VM adopted
    later): then it all stays, and the next supervisor start tries again. Returns the
    uid released, or None."""
    path = _uid_table(paths)
    with _uid_lock:
        table = _read_table(path)
        uid = table.get(vm)
        if not isinstance(uid, int):
            return None
        # strict: a process without fds may have closed them, not be exiting
        users = users_of(uid, exiting=True)
        if users:
            log.warning("vm %s: uid %d stays reserved: pids %s run as it", vm, uid, users)
            return None
        _drop_dirs(paths, vm, uid)
        del table[vm]
        write_atomic(path, json.dumps(table, sort_keys=True).encode())
        if _claim(uid):  # ours (or no one's): the file goes; another supervisor's stays
            with contextlib.suppress(FileNotFoundError):
                (CLAIMS / str(uid)).unlink()
            os.close(_claims.pop(uid))
    log.info("vm %s: gone; uid %d released", vm, uid)
    return uid


def release_gone(paths: Paths, keep: set[str]) -> list[int]:
    """At a supervisor's start: release the uids of VMs that went while it was down."""
    names = set(_read_table(_uid_table(paths))) - keep
    return [u for n in sorted(names) if (u := release_uid(paths, n)) is not None]


def _drop_dirs(paths: Paths, vm: str, uid: int) -> None:
    """The VM's run directory (its uid's, holding its dead workers' sockets) and its
    jail's (empty) mount point."""
    run_dir = paths.vm_run_dir(vm)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(run_dir):
            if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        try:
            run_dir.rmdir()
        except OSError:  # something else in it: no longer the uid's
            if run_dir.stat().st_uid == uid:
                os.chown(run_dir, 0, 0)
    for d in (paths.lib / "jail" / vm / "root", paths.lib / "jail" / vm):
        with contextlib.suppress(OSError):
            d.rmdir()


def uid_users(exiting: bool = False, only: int | None = None) -> dict[int, list[int]]:
    """Every uid live processes run as (real, effective, saved or filesystem) -> their
    pids (``only``: that uid's alone). A zombie holds nothing: not counted; nor,
    unless ``exiting``, a process that is exiting (its file table is gone, the
    status's ``FDSize: 0``), such as a stopped VM's last worker."""
    return _scan(None if only is None else frozenset((only,)), exiting)


def _scan(only: frozenset[int] | None, exiting: bool) -> dict[int, list[int]]:
    """One pass over /proc (``uid_users``), for the uids in ``only`` or all. Each
    status is read with one ``os.read`` (no file object: half the pass's CPU was
    Python's ``open``); most of what remains is the kernel writing the status.
    Whether a process has exited its files is read from the same status
    (``FDSize``), not by listing its fds: a listing leaves a dentry per fd under
    ``/proc/PID``, which the kernel walks when the process is reaped (~2 ms of the
    supervisor's CPU per old worker in a rollout)."""
    found: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                text = os.read(fd, 4096)  # Uid: is in the first few hundred bytes
            finally:
                os.close(fd)
            uid_line = text.split(b"\nUid:", 1)[1].split(b"\n", 1)[0]
            uids = {int(x) for x in uid_line.split()}
            if only is not None and uids.isdisjoint(only):
                continue
            state = text.split(b"\nState:", 1)[1].split(None, 1)[0]
            if state in (b"Z", b"X"):
                continue
            if not exiting and _fd_table_size(text, name) == 0:
                continue
            for u in uids if only is None else uids & only:
                found.setdefault(u, []).append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _fd_table_size(status: bytes, pid: str) -> int:
    """``FDSize`` of a process's status: 0 once its file table is gone (it exits).
    Where a kernel shows none, the count of its fds instead."""
    try:
        return int(status.split(b"\nFDSize:", 1)[1].split(None, 1)[0])
    except (IndexError, ValueError):
        return len(os.listdir(f"/proc/{pid}/fd"))


class SharedScan:
    """Checks made at once share one pass over /proc: each pass serves every check
    that asked before the pass began (never one that began earlier), so each still
    sees the processes of a moment after it asked, as its own pass would.

    Why: the pass is the supervisor's largest CPU cost in a rollout (~10-20 ms at
    300 processes, O(VMs) per prepare, so O(VMs²) per rollout), and a rollout
    prepares several workers at once (``--max-parallel``). Whichever asking thread
    finds no pass running makes the next one, for every uid asked meanwhile; the
    others wait for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._asked: list[_Ask] = []
        self._scanning = False
        self.passes = 0  # how many were made (for tests and benchmarks)
        self.asks = 0

    def users_of(self, uid: int) -> list[int]:
        """``users_of(uid)`` (processes not exiting), from a pass begun after this call."""
        ask = _Ask(uid)
        with self._cond:
            self._asked.append(ask)
            self.asks += 1
            while not ask.done:
                if self._scanning:
                    self._cond.wait()
                    continue
                batch, self._asked = self._asked, []
                self._scanning = True
                self.passes += 1
                found: dict[int, list[int]] = {}
                error: BaseException | None = None
                self._cond.release()
                try:
                    found = _scan(frozenset(a.uid for a in batch), exiting=False)
                except BaseException as e:  # each asker raises it
                    error = e
                finally:
                    self._cond.acquire()
                    self._scanning = False
                    for a in batch:
                        a.pids, a.error, a.done = list(found.get(a.uid, ())), error, True
                    self._cond.notify_all()
        if ask.error is not None:
            raise ask.error
        return ask.pids


@dataclass
class _Ask:
    uid: int
    pids: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False


#: the supervisor's one: every prepare's ``check_uid_unused``
SCANS = SharedScan()


def users_of(uid: int, exiting: bool = False) -> list[int]:
    return uid_users(exiting, only=uid).get(uid, [])


def check_uid_unused(uid: int, vm: str, ours: Callable[[int], bool]) -> None:
    """No process but this VM's own workers (``ours``: whether a pid is one) runs
    as ``uid`` (in a pass over /proc begun after this call: ``SCANS``)."""
    for pid in SCANS.users_of(uid):
        if ours(pid):
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue  # gone meanwhile
        raise RemoteError(
            Code.CONFLICT,
            f"jail: uid {uid} (VM {vm}'s) is already used by pid {pid} ({comm}), "
            "which is no worker of this VM: give the VM another [jail] uid_range or user",
        )


# ---------------------------------------------------------------- cgroups
def cgroup_layout() -> tuple[str, list[Path]]:
    """("v2", [root]) when the unified hierarchy has memory and pids, else
    ("v1", [memory root, pids root])."""
    ctl = CGROUP_ROOT / "cgroup.controllers"
    if ctl.exists() and {"memory", "pids"} <= set(ctl.read_text().split()):
        return "v2", [CGROUP_ROOT]
    roots = [CGROUP_ROOT / "memory", CGROUP_ROOT / "pids"]
    if all((r / "cgroup.procs").exists() for r in roots):
        return "v1", roots
    raise RemoteError(Code.UNAVAILABLE, "jail: no memory and pids cgroup controllers are mounted")


def cgroup_name(paths: Paths, cfg: JailConfig, vm: str) -> str:
    leaf = vm
    if str(paths.root) != "/":  # test hosts under a temporary root never share one
        leaf += "." + hashlib.sha256(str(paths.root).encode()).hexdigest()[:8]
    return f"{cfg.cgroup_parent}/{leaf}"


def make_cgroup(name: str, memory_max: int, pids_max: int) -> list[str]:
    """Create (or update) the VM's cgroup; the cgroup.procs files to join."""
    version, roots = cgroup_layout()
    procs = []
    try:
        if version == "v2":
            parent = CGROUP_ROOT
            for part in name.split("/"):
                with contextlib.suppress(OSError):
                    (parent / "cgroup.subtree_control").write_text("+memory +pids")
                parent = parent / part
                parent.mkdir(exist_ok=True)
            (parent / "memory.max").write_text(str(memory_max))
            (parent / "memory.swap.max").exists() and (parent / "memory.swap.max").write_text("0")
            (parent / "pids.max").write_text(str(pids_max))
            procs.append(str(parent / "cgroup.procs"))
        else:
            mem, pids = (r / name for r in roots)
            mem.mkdir(parents=True, exist_ok=True)
            pids.mkdir(parents=True, exist_ok=True)
            (mem / "memory.limit_in_bytes").write_text(str(memory_max))
            (pids / "pids.max").write_text(str(pids_max))
            procs += [str(mem / "cgroup.procs"), str(pids / "cgroup.procs")]
    except OSError as e:
        raise RemoteError(Code.UNAVAILABLE, f"jail: cgroup {name}: {e}") from None
    return procs


def remove_cgroup(paths: Paths, vm: str) -> None:
    """After the VM's last worker: best effort (a cgroup still in use stays)."""
    try:
        name = cgroup_name(paths, load_config(paths), vm)
        _, roots = cgroup_layout()
    except RemoteError:
        return
    for r in roots:
        try:
            (r / name).rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:  # EBUSY: a process of it still runs (a standby, a straggler)
            log.warning("vm %s: cgroup %s stays: %s", vm, r / name, e.strerror)


# ------------------------------------------------------------------ plan
def _python_paths() -> list[str]:
    """What the worker's Python runs from: its prefixes, its sys.path, and the
    tree this package was imported from (an editable install). Worked out once per
    sys.path (a few dozen stat calls each time: every prepare asked)."""
    return list(_python_paths_of(tuple(sys.path)))


@functools.lru_cache(maxsize=4)
def _python_paths_of(path: tuple[str, ...]) -> tuple[str, ...]:
    out = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    out.add(str(Path(__file__).resolve().parents[2]))
    for p in path:
        if p and os.path.isdir(p):
            out.add(os.path.realpath(p))
    return tuple(sorted(out))


def _minimal(paths: list[str]) -> list[str]:
    """Drop paths that another path in the list already contains."""
    keep: list[str] = []
    for p in sorted({os.path.normpath(p) for p in paths}):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in keep):
            keep.append(p)
    return keep


def command_files(command: Sequence[str]) -> list[str]:
    """The files and directories a worker command names (a script, a program outside
    /usr, ``env PYTHONPATH=DIR``'s DIR): bound read-only into its jail, like the rest
    of what it runs from. Never a top-level directory (``/``, ``/etc``) as a whole."""
    out = []
    for arg in command:
        for part in arg.partition("=")[2].split(":") if "=" in arg else [arg]:
            if os.path.isabs(part) and os.path.exists(part) and part.count("/") >= 2:
                out.append(part)
    return out


SYSTEM_RO = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache"]


@dataclass
class JailPlan:
    """One worker's jail, built: the launcher's spec but for the fds, and what it holds."""

    vm: str
    kind: str
    uid: int
    gid: int
    spec: dict[str, Any]
    kvm_fd: int | None = None  # baton-vmm's /dev/kvm, passed as --kvm-fd
    pass_fds: list[int] = field(default_factory=list)

    def launcher(self) -> list[str]:
        return [sys.executable, "-m", "baton.jail_launcher"]

    def close(self) -> None:
        if self.kvm_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.kvm_fd)
            self.kvm_fd = None


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    """A clean environment: a fixed PATH and Baton's own settings (fault hooks,
    the KVM device override); never NOTIFY_SOCKET, LISTEN_*, JOURNAL_STREAM."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("BATON_") and k != KVM_ENV})
    env.update(extra or {})
    env.pop("BATON_TOKEN", None)
    return env


def broker_groups(paths: Paths) -> list[int]:
    """The supplementary groups a jailed worker needs to reach the broker socket:
    ``[broker] socket_gid`` when the socket mode opens it to the group, none when
    it is open to all; an error when neither."""
    b = broker_config(paths)
    if b.socket_mode & 0o006 == 0o006:
        return []
    if b.socket_gid != 0 and b.socket_mode & 0o060 == 0o060:
        return [b.socket_gid]
    raise RemoteError(
        Code.BAD_REQUEST,
        f"jail: the broker socket (mode {b.socket_mode:04o}, group {b.socket_gid}) is not open "
        "to jailed workers: set [broker] socket_gid to a gid no account has and socket_mode "
        '= "0660" (the defaults)',
    )


def _open_kvm() -> tuple[int, str]:
    path = os.environ.get(KVM_ENV, "/dev/kvm")
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC), path
    except OSError as e:
        raise RemoteError(Code.UNAVAILABLE, f"jail: cannot open {path}: {e.strerror}") from None


def prepare(
    paths: Paths,
    broker: Any,
    vm: Any,
    kind: str,
    *,
    files: list[str],
    ours: Callable[[int], bool],
    env: dict[str, str] | None = None,
    kvm: bool = True,
) -> JailPlan | None:
    """The worker's jail, or None if this VM's workers run unjailed. ``vm`` is a
    VmConfig; ``files``: what the worker reads besides its Python (guest image,
    kernel); ``ours``: whether a pid is one of this VM's workers (they share its uid); ``kvm``:
    whether it needs /dev/kvm (not a QEMU on TCG)."""
    if not jailed(paths, vm.raw):
        return None
    cfg = load_config(paths)
    user = vm.raw.get("user")
    if user:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise RemoteError(Code.BAD_REQUEST, f"jail: no user named {user!r}") from None
        uid, gid = pw.pw_uid, pw.pw_gid
        if uid == 0:
            raise RemoteError(Code.BAD_REQUEST, f"jail: user {user!r} is root")
    else:
        uid = gid = allocate_uid(paths, cfg, vm.name)
    # The broker's binding of the VM's tokens to its uid (a round trip and the broker's
    # fsync) is set while /proc is scanned: the uid is the VM's stable one (uids.json
    # or its user), which its running worker's tokens are bound to already.
    allowing = Aside(lambda: broker.allow(vm.name, uid=uid), name="vm-allow")
    try:
        with BACKGROUND.yielding():  # a scan of all /proc: other VMs' pauses come first
            check_uid_unused(uid, vm.name, ours)
    except BaseException:
        allowing.join()
        raise
    groups = broker_groups(paths) if kind != "qemu" else []  # QEMU never calls the broker
    kvm_fd: int | None = None
    kvm_path = os.environ.get(KVM_ENV, "/dev/kvm")
    devices: list[list[Any]] = [
        ["/dev/null", 1, 3, 0o666, False],
        ["/dev/urandom", 1, 9, 0o666, False],
    ]
    if kvm:
        kvm_fd, kvm_path = _open_kvm()
    if kvm and kind == "qemu":  # QEMU 7.2's -accel kvm takes no fd: a node of the VM's own
        assert kvm_fd is not None
        st = os.fstat(kvm_fd)
        devices.append(["/dev/kvm", os.major(st.st_rdev), os.minor(st.st_rdev), 0o600, True])
        os.close(kvm_fd)
        kvm_fd = None
    try:
        # The run directories: traversable (never listable) by the VMs' uids, each
        # VM's own directory owned by its uid (its control socket lives there).
        for d in (paths.run, paths.run / "vm"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, os.stat(d).st_mode & 0o777 | 0o111)
        run_dir = paths.vm_run_dir(vm.name)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(run_dir, uid, gid)
        os.chmod(run_dir, 0o700)
        root = paths.lib / "jail" / vm.name / "root"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        memory_max = vm.memory_bytes + (cfg.memory_overhead_mib << 20)
        procs = make_cgroup(cgroup_name(paths, cfg, vm.name), memory_max, cfg.pids_max)
        allowing.result()
    except BaseException:
        allowing.join()
        if kvm_fd is not None:
            os.close(kvm_fd)
        raise
    ro = _minimal([*_python_paths(), *(os.path.realpath(f) for f in files if f)])
    spec: dict[str, Any] = {
        "vm": vm.name,
        "uid": uid,
        "gid": gid,
        "groups": groups,
        "hostname": f"baton-{vm.name}"[:64],
        "root": str(root),
        "namespaces": ["mnt", "pid", "net", "ipc", "uts"],
        "ro": [*SYSTEM_RO, *ro, str(paths.run)],
        "readable": ro,  # its code and files: checked as its uid (the run dir is only traversed)
        "rw": [str(run_dir)],
        "devices": devices,
        "tmp_size_mib": cfg.tmp_size_mib,
        "rlimits": {
            "NOFILE": cfg.nofile,
            "NPROC": cfg.pids_max,
            "CORE": 0,
            "FSIZE": max(vm.memory_bytes, cfg.fsize_min_mib << 20),
        },
        "cgroup_procs": procs,
        "env": _env(env),
        "seccomp": None,
        "kvm_path": kvm_path,
    }
    if cfg.seccomp != "off":
        from supervisor.jail import seccomp_baton, seccomp_qemu

        policy = seccomp_qemu if kind == "qemu" else seccomp_baton
        spec["seccomp"] = {
            "default": cfg.seccomp if policy.ALLOW else "allow",
            "allow": sorted(policy.ALLOW),
            "deny": sorted(policy.DENY),
        }
    return JailPlan(vm.name, kind, uid, gid, spec, kvm_fd, [kvm_fd] if kvm_fd is not None else [])


# ------------------------------------------------------------------ status
def describe(pid: int) -> dict[str, Any]:
    """What ``vmctl status`` shows of a worker's confinement, read from /proc."""
    out: dict[str, Any] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "Uid":
                    out["uid"] = int(value.split()[0])
                elif key == "Seccomp":
                    out["seccomp"] = {"0": "off", "1": "strict", "2": "filter"}.get(
                        value.strip(), value.strip()
                    )
                elif key == "NoNewPrivs":
                    out["no_new_privs"] = value.strip() == "1"
                elif key == "CapEff":
                    out["cap_eff"] = value.strip()
        own = {n: os.readlink(f"/proc/{pid}/ns/{n}") for n in ("mnt", "pid", "net", "ipc", "uts")}
        host = {n: os.readlink(f"/proc/self/ns/{n}") for n in own}
        out["namespaces"] = sorted(n for n in own if own[n] != host[n])
        cg = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        out["cgroup"] = sorted(
            {
                line.split(":", 2)[2]
                for line in cg
                if "memory" in line or "pids" in line or line.startswith("0::")
            }
            - {"/"}
        )
    except OSError:
        return out
    return out


def status(paths: Paths, raw_vm: dict[str, Any], pid: int | None) -> dict[str, Any]:
    """``vm.status``'s ``jail``: whether the VM is meant to be jailed, and what
    its running worker really is (uid, namespaces, cgroup, seccomp mode)."""
    try:
        on = jailed(paths, raw_vm)
    except RemoteError as e:
        return {"enabled": None, "error": e.message}
    out: dict[str, Any] = {"enabled": on}
    if raw_vm.get("jail") is False:
        out["warning"] = "jail = false in the VM's file: its workers run unconfined, as root"
    if pid is not None:
        out.update(describe(pid))
    return out
