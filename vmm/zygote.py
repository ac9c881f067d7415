"""The baton-vmm zygote: ``baton-vmm --zygote FD ROOM``, one per worker version.

Why: a worker started by exec pays a Python interpreter, its imports (vmm,
the cffi module, msgpack, the broker client) and, when jailed, a second
interpreter for the jail launcher (pyseccomp, libseccomp) before it does any
work of its own: most of a cold prepare. The zygote pays that once per worker
command: it imports everything a worker and the jail need, warms up on a
throwaway machine of its own (``warm_up``), freezes the heap
(``gc.freeze``, so no collection of a child writes to the pages it shares
with the zygote), and then forks one worker per request. Every child
shares the zygote's pages copy-on-write, which is also what brings the memory
of many small VMs down.

The supervisor (``supervisor.zygote``) starts it as root with one end of a
socket pair (FD) and serves it requests over ``baton.wire``: ``hello`` and
``fork``. It stays single-threaded, so a fork copies no lock held by another
thread. It exits when the socket closes (the supervisor is gone); the workers
it forked are not its children and run on.

A ``fork`` request carries the worker's arguments, its environment, its nice
value, the jail spec (or none) and its fds (SCM_RIGHTS) with the numbers the
arguments name. The zygote forks a child that at once closes the zygote's
socket (no worker ever holds it), puts the fds at their numbers, closes every
other fd, starts its own session and does what the jail launcher does
(``baton.jail_launcher.launch``: unshare, fork PID 1 of the new namespace,
root, rlimits, privileges, seccomp), except that the worker's ``main`` runs
in-process instead of ``execve``. That child reports ``pid N`` on the
report fd and exits: the worker, orphaned, becomes the supervisor's child
(it is a child subreaper), which identifies it by pidfd, start time and
hello as any worker. Without a jail the same fork happens, without the jail's
steps.

The worker's command line: a fork has the zygote's. The supervisor reserves
ROOM bytes of argument space (one argument of spaces) and each worker writes
its own command line there, so ``ps`` and ``/proc/PID/cmdline`` show what an
exec'd worker would (cut at ROOM bytes).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import gc
import itertools
import json
import logging
import os
import select
import socket
import struct
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import pyseccomp  # type: ignore[import-untyped]  # noqa: F401  (the jail's filter is built in the fork: import it once here)

from baton import codestamp, jail_launcher, logs, wire
from baton.contract import RAM, DiskArg, NicArg, WorkerArgs
from baton.paths import paths_from_args
from baton.rpc import Dispatcher, Peer, Request, frame_error_reply, handles
from baton.schema import AnyMap, Int, ListOf, Nullable, Str
from baton.trace import mark
from vmm import kvm, layout, vcpu, worker

# What the worker imports lazily (vmm.state's assembly): imported here, once.
from vmm import machine, vcpu_state, vm  # noqa: F401  isort: skip
from vmm.devices import block, i8042, net, serial  # noqa: F401  isort: skip

log = logging.getLogger("vmm.zygote")

#: fds one request may carry (log, token, ready, report, /dev/kvm and spares)
MAX_FDS = 16
#: seccomp filters kept built (one per policy: a worker version has one or two)
MAX_FILTERS = 8
#: how long the zygote is idle after a request before it forks the next spare: the
#: fork (its page-table copy, the child's first faults) then overlaps no worker's start
SPARE_IDLE_MS = 10
#: "0" in the zygote's environment: no spare, every request forks (the A/B switch)
SPARE_ENV = "BATON_ZYGOTE_SPARE"


def warm_up() -> str | None:
    """Build, rehearse and close one throwaway machine (a memfd of its own, a KVM
    VM, one vCPU whose thread starts and is joined), so that every fork inherits
    the code a worker's build and rehearsal run already imported and specialised
    (the guest image's reader, the state accessors, the save and load paths): its
    own build is then about half as long. Nothing of
    that machine crosses a fork (a KVM VM belongs to the mm that made it): it is
    closed first, and the zygote is single-threaded again. Why not, or None."""
    # argparse's parser, built once for every fork, and one parse of a worker's kind of
    # command line: its first parse fills caches (compiled patterns, messages) that a
    # fork would otherwise fill itself on each start, ~1 ms of its 2 here
    sample = WorkerArgs(
        Path("/"),
        "zygote-warm-up",
        incoming=True,
        instance="0" * 32,
        control="/zygote-warm-up.sock",
        guest=Path("/zygote-warm-up.bin"),
        disks=[DiskArg("disk0", True)],
        nets=[NicArg("net0", "52:54:00:00:00:01")],
        ready_fd=3,
        token_fd=4,
        kvm_fd=5,
    )
    paths_from_args(worker.parse_args(sample.argv([])))
    why: str | None = None
    ram = os.memfd_create("baton-zygote-warm-up", os.MFD_CLOEXEC)
    try:
        os.ftruncate(ram, layout.MIN_RAM)
        vcpu.install_kick_handler()  # as a worker does before its vCPU threads start
        m = machine.Machine(machine.MachineSpec("zygote-warm-up"), {RAM: ram})
        m.close()
    except (kvm.KvmUnavailable, OSError, ValueError) as e:
        why = str(e)
    finally:
        os.close(ram)
    for t in threading.enumerate():  # a half-built machine's memory-slot thread, say
        if t is not threading.main_thread():
            t.join(5)
    if threading.active_count() != 1:  # a thread that did not end: never fork then
        raise RuntimeError(f"{threading.active_count() - 1} threads outlived the warm-up")
    return why


class StampCheck:
    """``codestamp.changed(codestamp.remember())`` for the zygote, which asks it at
    every request and every spare: the same answer, from the stamp packed into one
    bytes of paths (an array of where each ends) and one bytes of their stats, so
    that a check touches no Python object per file. Why: each object it touched (a
    path's str, its list of four ints: the reference counts a loop over the stamp
    writes) is on a page a child forked before the check shares with the zygote,
    and the write copies it for the child too: ~0.3 MiB per worker and per standby
    here (docs/benchmarks.md, the fleetmem branch)."""

    _STAT = struct.Struct("QQqq")  # st_dev, st_ino, st_size, st_mtime_ns

    def __init__(self, stamp: codestamp.Stamp) -> None:
        paths = [os.fsencode(p) for p in stamp]
        self._paths = b"".join(paths)
        self._ends = array.array("q", itertools.accumulate(len(p) for p in paths))
        self._stats = b"".join(self._STAT.pack(*s) for s in stamp.values())

    def changed(self) -> str | None:
        pack, size = self._STAT.pack, self._STAT.size
        start = at = 0
        for end in self._ends:
            path = self._paths[start:end]
            try:
                st = os.stat(path)
            except OSError:
                return f"{os.fsdecode(path)} is gone"
            if (
                pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                != self._stats[at : at + size]
            ):
                return f"{os.fsdecode(path)} has changed"
            start, at = end, at + size
        return None


def set_cmdline(argv: list[str]) -> None:
    """Write ``argv`` over this process's argument area (the zygote's, with the
    supervisor's ROOM in it), NUL-separated, cut to fit; the rest zeroed. The
    environment area is zeroed too: ``/proc/PID/environ`` would otherwise show
    the zygote's environment, not the worker's (``os.environ`` has been replaced,
    so nothing points there any more)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # arg_start, arg_end, env_start, env_end: fields 48-51 of proc(5)
    start, end, env_start, env_end = (int(x) for x in fields[45:49])
    size = end - start
    data = b"\0".join(a.encode() for a in argv)[: size - 1]
    ctypes.memmove(start, data + b"\0" * (size - len(data)), size)
    if env_end > env_start:
        ctypes.memset(env_start, 0, env_end - env_start)


def _place(received: list[int], targets: list[int]) -> None:
    """Each received fd at its target number (above every one first, so that no
    target overwrites a received fd not yet placed); the copies closed."""
    base = max([*received, *targets]) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, base) for fd in received]
    wire.close_fds(received)
    for fd, target in zip(high, targets, strict=True):
        os.dup2(fd, target)
    wire.close_fds(high)


class Spare:
    """A child forked ahead of the next request (``Zygote.fork_spare``): it waits on
    its end of a socket pair for one ``go`` (the request's fields and fds) and then
    is that request's fork. Why: a fork of the zygote (a ~30 MB Python process) and
    the child's first run cost 2-5 ms here, on the path of every cold start; made
    while the zygote is idle, a request only hands its fds over."""

    def __init__(self, pid: int, sock: socket.socket, filters: frozenset[str]) -> None:
        self.pid = pid
        self.sock = sock
        self.filters = filters  # the seccomp filters it inherited built (their keys)

    def close(self) -> None:
        """Our end closed: a spare still waiting exits (its reap is the zygote's)."""
        self.sock.close()


def _policy_key(jail: dict[str, Any] | None) -> str | None:
    policy = jail.get("seccomp") if jail is not None else None
    return json.dumps(policy, sort_keys=True) if policy else None


class Zygote:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: set[int] = set()
        self._filters: dict[str, Any] = {}  # seccomp policy (JSON) -> its built filter
        self.spare: Spare | None = None
        self._last_jail: dict[str, Any] | None = None  # the last fork's jail spec
        self.spares = os.environ.get(SPARE_ENV, "1") != "0"
        self.stamp: StampCheck | None = None  # set once everything is imported (``main``)

    def _stale(self) -> str | None:
        """Why this zygote's code is no longer what is on disk, or None."""
        if self.stamp is None:
            self.stamp = StampCheck(codestamp.remember())
        return self.stamp.changed()

    def _filter(self, jail: dict[str, Any] | None, key: str | None) -> Any:
        """The jail's seccomp filter, built here once per policy (2-3 ms each time a
        fork built it), so each fork only loads it; None: the fork builds it (and
        reports what is wrong with it)."""
        if key is None or jail is None:  # key: _policy_key(jail)
            return None
        if key not in self._filters:
            try:
                built = jail_launcher.build_filter(jail["seccomp"])
            except Exception:  # a bad policy: the fork says why, as an exec'd launcher would
                return None
            if len(self._filters) >= MAX_FILTERS:
                self._filters.pop(next(iter(self._filters)))
            self._filters[key] = built
        return self._filters[key]

    @handles("hello")
    def hello(self, req: Request) -> dict[str, Any]:
        """``stale``: why this zygote's code is no longer what is on disk (a file it
        loaded replaced or changed since it started), or None; ``spare``: the pid of
        the child the next fork will be (``Spare``), or None."""
        return {
            "pid": os.getpid(),
            "forks": len(self.children) - (self.spare is not None),
            "spare": self.spare.pid if self.spare is not None else None,
            "stale": self._stale(),
        }

    @handles(
        "fork",
        args=ListOf(Str(4096), 256),
        cmdline=ListOf(Str(4096), 512, 1),
        env=AnyMap(),
        fds=ListOf(Int(3, 65535), MAX_FDS, 2),
        stdout=Int(3, 65535),
        report=Int(3, 65535),
        nice=Int(-20, 19),
        jail=Nullable(AnyMap()),
    )
    def fork(
        self,
        req: Request,
        args: list[str],
        cmdline: list[str],
        env: dict[str, Any],
        fds: list[int],
        stdout: int,
        report: int,
        nice: int,
        jail: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Fork one worker (see the module's docstring); the intermediate child's pid."""
        mark("Z.fork_received")
        received = req.take_fds()
        try:
            self._check(received, fds, stdout, report, env, jail)
            stale = self._stale()
            if stale:  # a fork would run the code this zygote loaded, not what is installed
                raise wire.RemoteError(wire.Code.STALE, f"this zygote's code is stale: {stale}")
            key = _policy_key(jail)
            filt = self._filter(jail, key)
            self._last_jail = jail
            fields: dict[str, Any] = {
                "fds": fds,
                "stdout": stdout,
                "report": report,
                "args": args,
                "cmdline": cmdline,
                "env": env,
                "nice": nice,
                "jail": jail,
            }
            pid = self._hand_to_spare(fields, received, key)
            if pid is None:
                pid = os.fork()
                if pid == 0:
                    self._child(received, filt=filt, **fields)
                self.children.add(pid)
        finally:
            wire.close_fds(received)
        mark("Z.forked")
        return {"pid": pid}

    def _hand_to_spare(
        self, fields: dict[str, Any], received: list[int], key: str | None
    ) -> int | None:
        """The request given to the spare, whose pid is then the fork's; None if
        there is none that can take it (none yet, or it lacks the request's filter,
        or it is gone): the caller forks. The zygote's scheduling policy goes with
        it (SCHED_IDLE while a pause is in flight, ``supervisor.priority``), as a
        fork made now would inherit it."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        try:
            if key is not None and key not in spare.filters:
                return None  # a new policy: built now, the next spare inherits it
            go = {"op": "go", "args": {**fields, "policy": os.sched_getscheduler(0)}}
            wire.send_message(spare.sock, go, received)
            return spare.pid
        except (OSError, wire.WireError, ValueError) as e:
            log.warning("spare pid %d cannot take a request (%s): forking", spare.pid, e)
            return None
        finally:
            spare.close()  # taken or not, it never waits for another

    def fork_spare(self) -> None:
        """Fork the next spare (``Spare``), once the zygote holds no request's fds."""
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            pid = os.fork()
        except OSError as e:
            ours.close()
            theirs.close()
            log.warning("cannot fork a spare: %s", e)
            return
        if pid == 0:
            ours.close()
            self._spare(theirs)
        theirs.close()
        self.children.add(pid)
        self.spare = Spare(pid, ours, frozenset(self._filters))
        # The fork made every page of ours copy-on-write again: the next request's
        # own checks would take those faults. Taken now, while idle: the code stamp's
        # (a few hundred paths and stats) and the last policy's key.
        self._stale()
        if self._last_jail is not None:
            _policy_key(self._last_jail)

    def _spare(self, sock: socket.socket) -> None:
        """The spare's life: never returns. It closes the zygote's socket first (no
        worker ever holds it) and waits; ``go`` makes it the request's fork, end of
        file (the zygote took another path, or is gone) ends it."""
        code = 0
        try:
            self.sock.close()
            try:
                msg, received = wire.recv_message(sock)
            except wire.WireError:
                os._exit(0)
            sock.close()  # before the request's fds take their numbers
            f = msg.get("args")
            if msg.get("op") != "go" or not isinstance(f, dict):
                wire.close_fds(received)
                os._exit(1)
            policy = f.pop("policy")
            if os.sched_getscheduler(0) != policy:
                os.sched_setscheduler(0, policy, os.sched_param(0))
            filt = self._filters.get(_policy_key(f["jail"]) or "")
            self._child(received, filt=filt, **f)
        except BaseException:
            code = 1
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(code)

    @staticmethod
    def _check(
        received: list[int],
        fds: list[int],
        stdout: int,
        report: int,
        env: dict[str, Any],
        jail: dict[str, Any] | None,
    ) -> None:
        if len(received) != len(fds):
            raise wire.RemoteError(
                wire.Code.BAD_REQUEST, f"fds names {len(fds)} numbers but {len(received)} came"
            )
        if len(set(fds)) != len(fds):
            raise wire.RemoteError(wire.Code.BAD_REQUEST, "fds: a number appears twice")
        for what, n in (("stdout", stdout), ("report", report)):
            if n not in fds:
                raise wire.RemoteError(wire.Code.BAD_REQUEST, f"{what}: fd {n} is not in fds")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise wire.RemoteError(wire.Code.BAD_REQUEST, "env: keys and values must be strings")
        if jail is not None:
            missing = {"uid", "gid", "root", "namespaces", "keep_fds", "env"} - set(jail)
            if missing:
                raise wire.RemoteError(
                    wire.Code.BAD_REQUEST, f"jail: missing {', '.join(sorted(missing))}"
                )

    def _child(
        self,
        received: list[int],
        *,
        fds: list[int],
        stdout: int,
        report: int,
        args: list[str],
        cmdline: list[str],
        env: dict[str, Any],
        nice: int,
        jail: dict[str, Any] | None,
        filt: Any,
    ) -> None:
        """The fork: never returns. The zygote's socket goes first."""
        code = 1
        zygote_pid = os.getppid()
        mark("C.born")
        try:
            self.sock.close()
            _place(received, fds)
            os.dup2(stdout, 1)
            os.dup2(stdout, 2)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            keep = {0, 1, 2, *fds} - {stdout}
            jail_launcher.close_fds(keep)
            os.setsid()
            os.chdir("/")
            if nice:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            os.environ.clear()
            os.environ.update(env)

            def become(err_w: int) -> None:
                os.close(err_w)
                with contextlib.suppress(OSError):
                    os.close(report)
                _run_worker(args, cmdline, zygote_pid)

            def first() -> None:
                with contextlib.suppress(OSError, ValueError):
                    set_cmdline(cmdline)

            if jail is not None:
                os.umask(0o022)  # as the launcher: the jail's directories
                spec = {**jail, "report_fd": report}
                code = jail_launcher.launch(spec, become, filt, first=first)
            else:
                say = jail_launcher.reporter(report)
                code = jail_launcher.fork_worker(None, None, say, become, first=first)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(code)

    def drop_spare(self) -> None:
        """The spare told to end (our end closed) and reaped: the zygote is exiting,
        and a spare left behind would end as a zombie of the supervisor."""
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(spare.pid, 0)
            self.children.discard(spare.pid)

    def reap(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            self.children.discard(pid)
            if self.spare is not None and self.spare.pid == pid:  # died waiting
                self.spare.close()
                self.spare = None


def _run_worker(args: list[str], cmdline: list[str], zygote_pid: int) -> None:
    """The worker, in this process; exits with its status, whatever happens (an
    exception must never reach the launcher's error pipe, whose number the
    worker may since have reused)."""
    code = 1
    try:
        sys.argv = list(cmdline)
        print(f"baton-vmm: forked by zygote pid {zygote_pid}", file=sys.stderr, flush=True)
        code = worker.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> int:
    """``--zygote FD [ROOM]``: serve fork requests on FD until it closes."""
    if not argv or not argv[0].isdigit():
        print("usage: baton-vmm --zygote FD [ROOM]", file=sys.stderr)
        return 2
    logs.setup("baton-vmm/zygote")
    fd = int(argv[0])
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    peer = Peer.of(sock)
    if peer.uid not in (0, os.getuid()):
        log.error("refusing to serve uid %d", peer.uid)
        return 1
    zygote = Zygote(sock)
    dispatcher = Dispatcher()
    dispatcher.bind(zygote)
    # libseccomp's first filter costs ~30 ms (its tables): paid here, not by each fork
    jail_launcher.build_filter({"default": "kill", "allow": ["read"], "deny": []})
    why = warm_up()
    if why is not None:  # no KVM here: the forks build cold, as exec'd workers do
        log.info("no warm-up (%s): each fork rehearses in full", why)
    zygote.stamp = StampCheck(codestamp.remember())  # what every fork runs: the files now
    gc.collect()
    gc.freeze()  # a child's collections never touch (and so never copy) these pages
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        while True:
            if zygote.spares and zygote.spare is None:
                timeout: int | None = SPARE_IDLE_MS
            else:
                timeout = 1000 if zygote.children else None
            if poller.poll(timeout):
                try:
                    msg, fds = wire.recv_message(sock)
                except wire.ConnectionClosed:
                    forks = len(zygote.children) - (zygote.spare is not None)
                    log.info("the supervisor has gone: exiting (%d forks live)", forks)
                    return 0
                except wire.FrameError as e:
                    wire.send_message(sock, frame_error_reply(e))
                    continue
                reply, _ = dispatcher.dispatch(msg, fds, peer)
                wire.send_message(sock, reply)
            elif zygote.spares and zygote.spare is None:
                zygote.fork_spare()  # idle for SPARE_IDLE_MS: no start to compete with
            zygote.reap()
    finally:
        zygote.drop_spare()
