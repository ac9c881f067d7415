"""Worker processes as the supervisor sees them: spawned or adopted, watched by pidfd.

A worker is identified by more than its pid: the pid, the process start time
(psutil), a pidfd opened before that check (so a recycled pid is caught),
and the instance id the worker itself reports in hello. Workers run in
their own session so that a signal to the supervisor's process group never
reaches them, and a supervisor restart re-adopts them rather than killing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from baton import contract, wire
from baton.contract import WorkerArgs
from baton.daemonize import read_ready, start_with_ready_pipe
from baton.trace import mark
from baton.wire import Code, RemoteError
from supervisor.jail.launch import JailLaunch, JailPlan, become_subreaper
from supervisor.priority import BACKGROUND, EXCLUSION, set_policy
from supervisor.zygote import Zygote, ZygoteStale, ZygoteUnavailable, command_env

log = logging.getLogger("supervisor.workers")


class WorkerGone(RuntimeError):
    """The process is not the worker we knew (dead, or its pid was reused)."""


class KindData(Protocol):
    """What a worker kind keeps about one of its workers (a QEMU's QMP session and
    fd numbers, say). The kind defines it; the handle only carries it, persists
    its ``record()`` and closes it with the handle."""

    def record(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class Forked:
    """A worker a zygote forked: our child (we are its subreaper), not a Popen's."""

    pid: int
    returncode: int | None = None


@dataclass
class WorkerHandle:
    vm: str
    kind: str
    pid: int
    create_time: float
    instance: str
    control: str
    started_at: float
    pidfd: int
    version: str = ""
    token: str | None = None  # in memory only (a worker we started)
    token_hash: str | None = None  # what records keep (a worker we adopted)
    proc: subprocess.Popen[bytes] | Forked | None = None  # None when adopted after a restart
    expected_exit: bool = False
    exit_status: str | None = None
    kind_data: KindData | None = field(default=None, repr=False)
    recorded_kind_data: dict[str, Any] = field(default_factory=dict, repr=False)  # at adoption
    _conn: wire.Connection | None = field(default=None, repr=False)
    #: what the worker's ready word said after ``ready`` (``contract.READY_HELLO_ENV``)
    ready_detail: str = field(default="", repr=False)

    # -- identity and persistence
    def record(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "kind": self.kind,
            "pid": self.pid,
            "create_time": self.create_time,
            "instance": self.instance,
            "control": self.control,
            "started_at": self.started_at,
            "version": self.version,
            # Never the token itself: its hash is enough to revoke it (token.revoke sha256).
            "token_sha256": self.token_sha256,
            "kind_data": self.kind_data.record() if self.kind_data else self.recorded_kind_data,
        }

    @property
    def token_sha256(self) -> str | None:
        return hashlib.sha256(self.token.encode()).hexdigest() if self.token else self.token_hash

    @staticmethod
    def recorded_token_hash(rec: dict[str, Any]) -> str | None:
        """The token hash a record keeps (older records kept the token itself)."""
        h = rec.get("token_sha256")
        if isinstance(h, str):
            return h
        legacy = rec.get("token")
        return hashlib.sha256(legacy.encode()).hexdigest() if isinstance(legacy, str) else None

    @classmethod
    def adopt(cls, rec: dict[str, Any]) -> WorkerHandle:
        """Re-attach to a worker a previous supervisor started; WorkerGone if it is not there."""
        pid = int(rec["pid"])
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise WorkerGone(f"pid {pid} is gone") from None
        try:
            created = start_time(pid)
        except OSError:
            os.close(pidfd)
            raise WorkerGone(f"pid {pid} is gone") from None
        if abs(created - float(rec["create_time"])) > 0.01:
            os.close(pidfd)
            raise WorkerGone(f"pid {pid} now belongs to another process (start time differs)")
        h = cls(
            vm=rec["vm"],
            kind=rec["kind"],
            pid=pid,
            create_time=created,
            instance=rec["instance"],
            control=rec["control"],
            started_at=float(rec["started_at"]),
            pidfd=pidfd,
            version=rec.get("version", ""),
            token_hash=cls.recorded_token_hash(rec),
            recorded_kind_data=dict(rec.get("kind_data") or {}),
        )
        if not h.alive():
            h.close()
            raise WorkerGone(f"pid {pid} has exited")
        return h

    # -- liveness
    def alive(self) -> bool:
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return not p.poll(0)

    def wait_exit(self, timeout: float) -> bool:
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(max(0, timeout) * 1000))

    def reap(self) -> str:
        """Collect the exit status (children only); a description either way."""
        if self.exit_status is not None:
            return self.exit_status
        BACKGROUND.discard(self.pid)  # before its pid may go to someone else
        desc = "exited (not our child: status unknown)"
        if self.proc is not None:
            try:
                res = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                res = None
            if res is not None:
                if res.si_code == os.CLD_EXITED:
                    desc = f"exited with status {res.si_status}"
                    self.proc.returncode = res.si_status
                else:
                    sig = signal.Signals(res.si_status).name
                    desc = f"killed by {sig}"
                    self.proc.returncode = -res.si_status
        self.exit_status = desc
        return desc

    @property
    def exit_code(self) -> int | None:
        if self.proc is not None and self.proc.returncode is not None:
            return self.proc.returncode
        return None

    def renice(self, value: int) -> None:
        """Every thread's nice value (Linux keeps it per thread)."""
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(tid), value)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, sig)

    def kill(self, timeout: float = 10.0) -> bool:
        """SIGKILL and wait until the kernel says it is gone."""
        self.signal(signal.SIGKILL)
        return self.wait_exit(timeout)

    def kill_and_reap(self, timeout: float = 10.0) -> bool:
        """The one way a worker is ended for good: marked as an expected exit, killed,
        confirmed dead by its pidfd, reaped and closed. False (and nothing closed)
        if the kernel did not confirm its death within ``timeout``."""
        self.expected_exit = True
        if self.alive() and not self.kill(timeout):
            return False
        self.reap()
        self.close()
        return True

    # -- control connection
    @property
    def conn(self) -> wire.Connection:
        if self._conn is None:
            try:
                self._conn = wire.Connection.connect(self.control, timeout=30)
            except OSError as e:
                raise RemoteError(
                    Code.UNAVAILABLE, f"cannot reach worker {self.pid} at {self.control}: {e}"
                ) from None
        return self._conn

    def call(
        self, op: str, args: dict[str, Any] | None = None, fds: Any = (), timeout: float = 30.0
    ) -> Any:
        conn = self.conn
        try:
            return conn.call(op, args, fds=fds, timeout=timeout).result
        except RemoteError:
            raise  # the worker answered: its error is the caller's to read
        except (wire.WireError, OSError) as e:
            # A timed-out or broken connection is never reused (a late reply would be
            # taken for the next one's); another thread may already have replaced it.
            if self._conn is conn:
                self.drop_conn()
            raise RemoteError(Code.UNAVAILABLE, f"worker {self.pid}: {e}") from None

    def drop_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        BACKGROUND.discard(self.pid)
        self.drop_conn()
        if self.kind_data is not None:
            with contextlib.suppress(Exception):
                self.kind_data.close()
            self.kind_data = None
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1

    # -- resource usage
    def usage(self) -> dict[str, Any]:
        try:
            p = psutil.Process(self.pid)
            with p.oneshot():
                mem = p.memory_info()
                cpu = p.cpu_times()
                return {
                    "rss_bytes": mem.rss,
                    "cpu_user_s": round(cpu.user, 3),
                    "cpu_system_s": round(cpu.system, 3),
                    "threads": p.num_threads(),
                    "open_fds": p.num_fds(),
                }
        except psutil.Error:
            return {}


PREPARE_NICE = 10
#: a worker whose guest runs elsewhere now tears down at the lowest priority
RETIRE_NICE = 19


#: how long a SIGKILLed worker may take to die before the reaper says so
REAP_WARN_S = 10.0

_Reaping = tuple["WorkerHandle", "list[Callable[[WorkerHandle], None]]", float]


class Watcher:
    """One thread, one epoll set of pidfds: calls back when a worker exits, and
    ``tick`` (if given) about once a second."""

    def __init__(
        self,
        on_exit: Callable[[WorkerHandle], None],
        tick: Callable[[], None] | None = None,
        name: str = "watcher",
    ) -> None:
        self._ep = select.epoll()
        self._handles: dict[int, WorkerHandle] = {}
        self._lock = threading.Lock()
        self._on_exit = on_exit
        self._tick = tick
        self._stop = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add(self, h: WorkerHandle) -> None:
        with self._lock:
            self._handles[h.pidfd] = h
            self._ep.register(h.pidfd, select.EPOLLIN)  # level-triggered: never missed

    def remove(self, h: WorkerHandle) -> None:
        with self._lock:
            if self._handles.pop(h.pidfd, None) is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._ep.unregister(h.pidfd)

    def _run(self) -> None:
        while not self._stop:
            try:
                events = self._ep.poll(1.0)
            except InterruptedError:
                continue
            except (OSError, ValueError):  # closed under us
                return
            for fd, _ in events:
                with self._lock:
                    h = self._handles.pop(fd, None)
                    if h is not None:
                        with contextlib.suppress(OSError, ValueError):
                            self._ep.unregister(fd)
                if h is not None:
                    try:
                        self._on_exit(h)
                    except Exception:
                        log.exception("handling the exit of pid %d", h.pid)
            if self._tick is not None:
                self._tick()

    def close(self) -> None:
        self._stop = True
        if self.thread.is_alive():
            self.thread.join(3)
        self._ep.close()


class Reaper:
    """Workers ended off the caller's path: each SIGKILLed at once (``kill``); one
    thread reaps and closes each when its pidfd says it has died, then calls its
    ``then`` (revoke a token, forget a record).

    Why: a KVM worker's death takes ~20 ms of CPU here (its VM's teardown, its
    mm), so a restarted supervisor that killed a predecessor's 100 standbys one
    after another, waiting for each, spent 2 s before serving. Killed all at
    once and ``SCHED_IDLE`` (at nice 19, 100 of them dying outweighed the
    supervisor's one thread), they die while it adopts and serves. What a caller
    needs done after a death comes in ``then``, once the kernel has confirmed it,
    as before. One not dead after ``REAP_WARN_S`` is logged and stays watched,
    its ``then`` still waiting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[int, _Reaping] = {}  # by pid
        self._watcher = Watcher(self._died, tick=self._warn_late, name="reaper")

    def kill(self, h: WorkerHandle, then: Callable[[WorkerHandle], None] | None = None) -> None:
        """SIGKILL ``h`` now (an expected exit) and reap it in the background;
        ``then(h)`` once it is dead, reaped and closed."""
        h.expected_exit = True
        set_policy(h.pid, idle=True)  # its teardown yields to whatever else runs
        with self._lock:
            self._pending[h.pid] = (h, [then] if then else [], time.monotonic() + REAP_WARN_S)
            self._watcher.add(h)
            if not self._watcher.thread.is_alive():
                self._watcher.thread.start()
        h.signal(signal.SIGKILL)

    def pending(self) -> list[int]:
        """The pids killed and not yet reaped."""
        with self._lock:
            return list(self._pending)

    def after(self, pid: int, then: Callable[[WorkerHandle], None]) -> bool:
        """``then`` too once ``pid``, killed here and not reaped yet, is; False (and
        nothing done) if no such pid is pending."""
        with self._lock:
            item = self._pending.get(pid)
            if item is None:
                return False
            item[1].append(then)
            return True

    def wait(self, timeout: float) -> bool:
        """Until every worker given is reaped (or ``timeout``); whether they all are."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            return not self._pending

    def _died(self, h: WorkerHandle) -> None:
        """From the watcher's thread: reap, close, then what was asked."""
        with self._lock:
            item = self._pending.get(h.pid)
        try:
            h.reap()
            h.close()
            for then in item[1] if item else []:
                then(h)
        except Exception:
            log.exception("after the death of pid %d", h.pid)
        finally:
            with self._idle:
                if self._pending.get(h.pid, (None,))[0] is h:  # not a reused pid's since
                    del self._pending[h.pid]
                self._idle.notify_all()

    def _warn_late(self) -> None:
        now = time.monotonic()
        with self._lock:
            for pid, (h, thens, warn_at) in list(self._pending.items()):
                if now >= warn_at:
                    log.error("pid %d, killed %.0f s ago, is not dead yet", pid, REAP_WARN_S)
                    self._pending[pid] = (h, thens, float("inf"))

    def close(self) -> None:
        """At shutdown: stop watching (whatever is still dying dies unwatched)."""
        self._watcher.close()
        with self._lock:
            for h, _, _ in self._pending.values():
                h.close()
            self._pending.clear()


@dataclass(frozen=True)
class LaunchSpec:
    """Who a new worker process is and how it runs, whatever its kind."""

    vm: str
    kind: str
    control: str  # its control socket (or QMP socket)
    instance: str
    token: str | None
    log_path: Path
    env: dict[str, str] | None = None
    #: an incoming worker builds its VM at low priority, so that the building of
    #: one never crowds out the guest's pause in another; the supervisor raises it
    #: (every thread) just before its own pause
    nice: int = 0
    #: run it inside this jail (``supervisor.jail.prepare``), through the launcher
    jail: JailPlan | None = None


def _niced(spec: LaunchSpec, argv: Sequence[str]) -> list[str]:
    if not spec.nice:
        return list(argv)
    if shutil.which(argv[0]) is None:  # say so ourselves: nice would only exit 127
        raise RemoteError(Code.NOT_FOUND, f"cannot run worker command {argv[0]!r}: not found")
    return ["nice", "-n", str(spec.nice), *argv]


@contextlib.contextmanager
def _started(spec: LaunchSpec, argv: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Popen's arguments for a worker: its own session, cwd /, output to its log."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with open(spec.log_path, "ab") as logf:
            yield {
                "stdin": subprocess.DEVNULL,
                "stdout": logf,
                "stderr": logf,
                "start_new_session": True,
                "cwd": "/",  # never depend on (or pin) the supervisor's working directory
                "env": {**os.environ, **(spec.env or {})},
            }
    except OSError as e:
        raise RemoteError(
            Code.NOT_FOUND, f"cannot run worker command {argv[0]!r}: {e.strerror}"
        ) from None


def _handle(spec: LaunchSpec, proc: subprocess.Popen[bytes] | Forked) -> WorkerHandle:
    # Our unreaped child keeps its pid, so this pidfd is the process we started.
    return WorkerHandle(
        vm=spec.vm,
        kind=spec.kind,
        pid=proc.pid,
        create_time=_create_time(proc.pid),
        instance=spec.instance,
        control=spec.control,
        started_at=time.time(),
        pidfd=os.pidfd_open(proc.pid),
        token=spec.token,
        proc=proc,
    )


def launch(spec: LaunchSpec, argv: Sequence[str], *, pass_fds: Sequence[int]) -> WorkerHandle:
    """Start a worker process that reports nothing at start (QEMU), with a pidfd."""
    argv = _niced(spec, argv)
    with _started(spec, argv) as popen_args:
        if spec.jail is not None:  # the jail launcher, which execs the worker
            jl = JailLaunch(spec.jail)
            try:
                full = jl.argv(argv, [*pass_fds, *spec.jail.pass_fds])
                proc = subprocess.Popen(full, pass_fds=(*pass_fds, *jl.pass_fds), **popen_args)
                proc = jl.settle(proc)
            finally:
                jl.close()
        else:
            proc = subprocess.Popen(argv, pass_fds=tuple(pass_fds), **popen_args)
    return _handle(spec, proc)


def abandon(handle: WorkerHandle, why: str) -> RemoteError:
    """A worker that failed to come up: kill, reap, and the error to raise."""
    handle.kill_and_reap()
    return RemoteError(Code.UNAVAILABLE, f"worker did not start ({handle.exit_status}): {why}")


def spawn(
    spec: LaunchSpec,
    args: WorkerArgs,
    command: Sequence[str],
    *,
    timeout: float,
    zygote: Callable[[], Zygote | None] | None = None,
    on_sent: Callable[[], None] = lambda: None,
) -> WorkerHandle:
    """Start a baton-vmm style worker and wait until it says it is ready (or why not).

    The worker gets ``--ready-fd`` and ``--token-fd`` (a pipe, so the token
    never shows in ``ps``). With a ``zygote`` (``supervisor.zygote``: what gives the
    command's zygote, or None) it is forked from it, from a fresh one if that one's
    code was stale; if no zygote can take the request, it is exec'd. ``on_sent`` is
    called once, when the request has left (a fork's) or just before the exec: what
    the caller overlaps with the worker's build without delaying its start."""
    sent = _Once(on_sent)
    token_r, token_w = os.pipe2(os.O_CLOEXEC)
    os.write(token_w, (spec.token or "").encode())
    os.close(token_w)
    deadline = time.monotonic() + timeout
    try:
        started: tuple[subprocess.Popen[bytes] | Forked, str] | None = None
        for _ in range(2 if zygote is not None else 0):  # a stale one, then a fresh one
            z = zygote() if zygote is not None else None
            if z is None:
                break
            try:
                started = _fork(z, spec, args, command, token_r, deadline, sent)
                break
            except ZygoteStale as e:
                log.info("vm %s: %s; asking a fresh zygote", spec.vm, e)
            except ZygoteUnavailable as e:
                log.warning("vm %s: %s; starting the worker by exec", spec.vm, e)
                break
        if started is None:
            sent()
            started = _exec(spec, args, command, token_r, deadline)
        proc, text = started
    finally:
        os.close(token_r)
    mark("S.ready_read")
    try:
        handle = _handle(spec, proc)
    except BaseException:  # no handle, no pidfd: kill it the plain way, never leave it
        BACKGROUND.discard(proc.pid)
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)
        raise
    detail = contract.ready_detail(text)
    if detail is None:
        reason = text.removeprefix("error: ") if text else f"no answer within {timeout:.0f}s"
        raise abandon(handle, reason)
    handle.ready_detail = detail
    BACKGROUND.discard(handle.pid)  # built: it waits for requests now
    return handle


class _Once:
    """``call`` run at most once, however often this is called."""

    def __init__(self, call: Callable[[], None]) -> None:
        self._call: Callable[[], None] | None = call

    def __call__(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call()


def _exec(
    spec: LaunchSpec, args: WorkerArgs, command: Sequence[str], token_r: int, deadline: float
) -> tuple[subprocess.Popen[bytes], str]:
    """The worker exec'd (through the jail launcher when jailed); it and its word."""
    command = _niced(spec, command)
    jail = spec.jail
    jl = JailLaunch(jail) if jail is not None else None

    def argv(fd: int) -> list[str]:
        full = dataclasses.replace(args, ready_fd=fd, token_fd=token_r).argv(command)
        if jl is None or jail is None:
            return full
        return jl.argv(full, (token_r, fd, *jail.pass_fds))

    try:
        with _started(spec, command) as popen_args:
            proc, text = start_with_ready_pipe(
                argv,
                deadline=deadline,
                pass_fds=(token_r, *(jl.pass_fds if jl else ())),
                **popen_args,
            )
            if jl is not None:
                proc = jl.settle(proc)
    finally:
        if jl is not None:
            jl.close()
    return proc, text


def _fork(
    zygote: Zygote,
    spec: LaunchSpec,
    args: WorkerArgs,
    command: Sequence[str],
    token_r: int,
    deadline: float,
    sent: Callable[[], None],
) -> tuple[Forked, str]:
    """The worker forked by the zygote; it and its word. ZygoteUnavailable if nothing
    was started (the caller execs instead)."""
    become_subreaper()  # the worker's parent exits: it must become ours, not init's
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    try:
        full = dataclasses.replace(args, ready_fd=ready_w, token_fd=token_r).argv(command)
        extra = spec.jail.pass_fds if spec.jail is not None else []
        request: dict[str, Any] = {
            "args": full[len(command) :],
            "cmdline": full,
            "env": {**os.environ, **(spec.env or {})},
            "nice": spec.nice,
            "report": report_w,
            "jail": None,
        }
        if spec.jail is not None:
            keep = sorted({token_r, ready_w, *extra})
            request["jail"] = {**spec.jail.spec, "keep_fds": keep, "report_fd": report_w}
            request["env"] = dict(spec.jail.spec["env"])
        request["env"].update(command_env(command))  # what `env VAR=VALUE CMD` would set
        # From the fork to its registration the child is no background work yet: no
        # pause overlaps that (supervisor.priority.Exclusion).
        with EXCLUSION.apart() if spec.nice > 0 else contextlib.nullcontext():
            with _started(spec, command) as popen_args:
                logf = popen_args["stdout"]
                request["stdout"] = logf.fileno()
                fds = [logf.fileno(), token_r, ready_w, report_w, *extra]
                request["fds"] = fds
                mark("S.fork_sent")
                forked = zygote.fork(request, fds)  # None: it failed after the request left
                sent()
            os.close(ready_w)
            os.close(report_w)
            ready_w = report_w = -1
            text = read_ready(report_r, deadline)  # "pid N", "error: ...", or EOF: none forked
            if not text:
                raise ZygoteUnavailable(f"zygote pid {zygote.pid} forked no worker")
            if not text.startswith("pid "):
                raise RemoteError(Code.UNAVAILABLE, text.removeprefix("error: "))
            child = Forked(int(text.split()[1]))
            _wait_adopted(child.pid, deadline, parent=forked)
            if spec.nice > 0:  # an incoming worker: it builds below any pause
                BACKGROUND.add(child.pid)
        return child, read_ready(ready_r, deadline)
    finally:
        for fd in (ready_r, ready_w, report_r, report_w):
            if fd >= 0:
                os.close(fd)


#: how long the wait for the zygote's fork to exit goes by its pidfd alone
PARENT_EXIT_WAIT_S = 1.0


def _wait_adopted(pid: int, deadline: float, parent: int | None = None) -> None:
    """Until the forked worker is our child (its parent, the zygote's fork
    ``parent``, has exited; we are a child subreaper), so that ``waitid`` reaps it.
    The wait is on ``parent``'s pidfd (readable once it has exited, by which time
    its child is ours), not a read of /proc every millisecond: that was a few ms of
    the supervisor's CPU per upgrade while the fork tore down its copy of the
    zygote's memory. Whatever that pidfd says, the worker's parent is then checked."""
    if parent is not None:
        with contextlib.suppress(OSError, psutil.Error):
            fd = os.pidfd_open(parent)
            try:
                if psutil.Process(pid).ppid() == parent:
                    left = min(deadline - time.monotonic(), PARENT_EXIT_WAIT_S)
                    p = select.poll()
                    p.register(fd, select.POLLIN)
                    p.poll(max(0.0, left) * 1000)
            finally:
                os.close(fd)
    while time.monotonic() < deadline:
        try:
            ppid = psutil.Process(pid).ppid()
        except psutil.NoSuchProcess:
            return  # a zombie of ours soon, or already: reap finds out
        if ppid == os.getpid():
            return
        time.sleep(0.001)


def processes_logging_to(log_path: Path) -> list[int]:
    """Pids whose standard output is ``log_path``: every worker (of either kind) of
    one VM under one root writes there, and nothing else does. How a restarted
    supervisor finds workers no record or journal names (started by a
    supervisor that died before it could write them down)."""
    return processes_logging_to_each([log_path])[log_path]


def logs_to(pid: int, log_path: Path) -> bool:
    """Whether ``pid``'s standard output is ``log_path`` (``processes_logging_to`` for
    one process: no scan of /proc)."""
    try:
        a, b = os.stat(f"/proc/{pid}/fd/1"), os.stat(log_path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def processes_logging_to_each(log_paths: Sequence[Path]) -> dict[Path, list[int]]:
    """``processes_logging_to`` for many logs in one pass over /proc (a restarted
    supervisor sweeps every VM's log: one scan each would be O(VMs x processes))."""
    wanted: dict[tuple[int, int], Path] = {}
    for path in log_paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            wanted[(st.st_dev, st.st_ino)] = path
    found: dict[Path, list[int]] = {path: [] for path in log_paths}
    if not wanted:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/fd/1")
        except OSError:
            continue
        log_of = wanted.get((st.st_dev, st.st_ino))
        if log_of is not None:
            found[log_of].append(int(entry.name))
    return {path: sorted(pids) for path, pids in found.items()}


_TICKS = os.sysconf("SC_CLK_TCK")
_boot_time: list[float] = []  # psutil.boot_time(), read once: it rereads /proc/stat each call


def start_time(pid: int) -> float:
    """``psutil.Process(pid).create_time()``, the same float (its formula: boot time
    plus the start in clock ticks of /proc/PID/stat), in a third of its time: it
    reads the boot time again for every process (a restart asks for 200 with a
    standby per VM). OSError if the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
    if not _boot_time:
        _boot_time.append(psutil.boot_time())
    return ticks / _TICKS + _boot_time[0]


def _create_time(pid: int) -> float:
    try:
        return start_time(pid)
    except OSError:
        return 0.0
