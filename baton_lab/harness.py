"""Run real Baton daemons under a temporary root: used by the tests, the
benchmarks and the demo (one implementation, so they all start daemons the
same way).

``BrokerProcess`` and ``SupervisorProcess`` are one daemon each, in the
foreground; ``WorkerProcess`` is a baton-vmm worker started by hand (no
supervisor); ``Host`` is a broker with its supervisors, the questions tests
ask of them, and a teardown that leaves nothing running under the root.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import psutil

from baton import contract, wire
from baton.contract import DiskArg, WorkerArgs
from baton.daemonize import read_pidfile, start_with_ready_pipe
from baton.paths import Paths
from broker.client import BrokerClient
from vmm.guest import Heartbeat, heartbeats

T = TypeVar("T")
D = TypeVar("D", bound="DaemonProcess")

#: how long a Host waits for a VM by default: the machine is shared and nested KVM is slow
WAIT = 30.0


def wait_until(
    cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # the condition may not be checkable yet
            last_exc = e
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout}s waiting for {what or cond}"
            if last_exc is not None:
                msg += f" (last error: {last_exc!r})"
            raise AssertionError(msg)
        time.sleep(interval)


def short_root() -> Path:
    """A root short enough for unix socket paths (108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="baton-", dir="/tmp"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_processes_matching(pattern: str) -> list[psutil.Process]:
    """Non-zombie processes whose command line contains ``pattern``."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(pattern in part for part in p.info["cmdline"] or []):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def terminate(pid: int, what: str, timeout: float = 15.0) -> None:
    """SIGTERM, and SIGKILL if ``pid`` still lives after ``timeout``; returns once it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not alive(pid), timeout, 0.02, f"{what} (pid {pid}) to stop")
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), timeout, 0.02, f"{what} (pid {pid}) to die")


class DaemonProcess:
    """A real Baton daemon in the foreground: ``python -m MODULE --root ROOT --foreground``.

    ``start`` returns once its hello answers with its own pid; ``stop`` is
    SIGTERM, then SIGKILL; ``kill9`` is SIGKILL at once."""

    module: ClassVar[str]
    what: ClassVar[str]
    start_timeout: ClassVar[float] = 30.0

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.paths = Paths(root)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    # -- what each daemon says differently
    @property
    def pidfile(self) -> Path:
        raise NotImplementedError

    def hello(self, timeout: float = 5.0) -> dict[str, Any]:
        raise NotImplementedError

    # -- shared
    def start(self: D, timeout: float | None = None) -> D:
        timeout = self.start_timeout if timeout is None else timeout
        proc = self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--root", str(self.root), "--foreground"],
            env={**os.environ, **(self.env or {})},
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{self.what} exited with {proc.returncode}")
            with contextlib.suppress(OSError, wire.WireError):
                if self.hello()["pid"] == proc.pid:
                    return self
            if time.monotonic() > deadline:
                self.kill9()
                raise AssertionError(f"{self.what} did not serve within {timeout}s")
            time.sleep(0.01)

    def running_pid(self) -> int | None:
        """The pid to signal to stop this daemon, if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        return None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.what} was never started"
        return self.proc.pid

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        pid = self.running_pid()
        if pid is not None:
            terminate(pid, self.what, timeout)
        self._reap(timeout)

    def kill9(self) -> None:
        pid = self.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), what=f"pid {pid} to die")
        self._reap(10)

    def _reap(self, timeout: float) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class BrokerProcess(DaemonProcess):
    """A real baton-brokerd in the foreground, under ``root``.

    Its pid is the one in the pid file: after a self-upgrade that is the
    successor's, not the process this object started."""

    module = "broker"
    what = "broker"
    start_timeout = 15.0

    @property
    def pidfile(self) -> Path:
        return self.paths.broker_pidfile

    def hello(self, timeout: float = 5.0) -> dict[str, Any]:
        with BrokerClient(self.paths.broker_socket) as c:
            return c.hello()

    @property
    def pid(self) -> int:
        pid = read_pidfile(self.paths.broker_pidfile)
        assert pid is not None, "broker pid file is not locked"
        return pid

    def running_pid(self) -> int | None:
        return read_pidfile(self.paths.broker_pidfile)

    def client(self, token: str | None = None) -> BrokerClient:
        return BrokerClient(self.paths.broker_socket, token=token)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()


class SupervisorProcess(DaemonProcess):
    """A real baton-supervisord in the foreground, under ``root``."""

    module = "supervisor"
    what = "supervisor"

    @property
    def pidfile(self) -> Path:
        return self.paths.supervisor_pidfile

    def hello(self, timeout: float = 5.0) -> dict[str, Any]:
        result: dict[str, Any] = self.call("hello", timeout=timeout)
        return result

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 120) -> Any:
        with wire.Connection.connect(self.paths.control_socket, timeout=timeout) as c:
            return c.call(op, args).result


class WorkerProcess:
    """A real baton-vmm worker for VM ``vm`` (whose fds the broker already holds)."""

    def __init__(
        self,
        root: Path,
        vm: str,
        *,
        incoming: bool = False,
        vcpus: int = 1,
        tick_ms: float = 50.0,
        disks: Sequence[str | DiskArg] = (),
        token: str | None = None,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.paths = Paths(root)
        self.vm = vm
        self.incoming = incoming
        self.vcpus = vcpus
        self.tick_ms = tick_ms
        self.disks = tuple(d if isinstance(d, DiskArg) else DiskArg.parse(d) for d in disks)
        self.token = token
        self.command = command or [sys.executable, "-m", "vmm.worker"]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._conn: wire.Connection | None = None

    def args(self, *, ready_fd: int | None = None, token_fd: int | None = None) -> WorkerArgs:
        return WorkerArgs(
            root=self.root,
            vm=self.vm,
            incoming=self.incoming,
            vcpus=self.vcpus,
            tick_ms=self.tick_ms,
            disks=self.disks,
            ready_fd=ready_fd,
            token_fd=token_fd,
        )

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        token_r: int | None = None
        if self.token is not None:  # a pipe, as the supervisor does: never in ps
            token_r, token_w = os.pipe2(os.O_CLOEXEC)
            os.write(token_w, self.token.encode())
            os.close(token_w)
        try:
            self.proc, text = start_with_ready_pipe(
                lambda ready_fd: self.args(ready_fd=ready_fd, token_fd=token_r).argv(self.command),
                deadline=time.monotonic() + timeout,
                pass_fds=() if token_r is None else (token_r,),
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
            )
        finally:
            if token_r is not None:
                os.close(token_r)
        if text != "ready":
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)  # a worker that failed exits on its own: keep its status
            self.kill()
            raise RuntimeError(f"worker for {self.vm} did not start: {text or 'no answer'}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def control_path(self) -> Path:
        return self.paths.vm_run_dir(self.vm) / f"worker.{self.pid}.sock"

    @property
    def conn(self) -> wire.Connection:
        if self._conn is None:
            self._conn = wire.Connection.connect(self.control_path, timeout=30)
        return self._conn

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        fds: Any = (),
        timeout: float | None = None,
    ) -> Any:
        return self.conn.call(op, args, fds=fds, timeout=timeout).result

    def quit(self, timeout: float = 15.0) -> int:
        with contextlib.suppress(wire.WireError, OSError):
            self.call("quit")
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self.close_conn()

    def close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def kill(self) -> None:
        self.close_conn()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def offer_lease(old: WorkerProcess, new: WorkerProcess) -> None:
    """As the supervisor does before a handoff: ``new`` may take the run lease from
    ``old`` (which the broker otherwise refuses while ``old`` lives)."""
    hello = new.call("hello")
    with BrokerClient(old.paths.broker_socket) as broker:
        broker.lease_offer(
            old.vm,
            old.call("hello")["instance"],
            hello["instance"],
            pid=hello["pid"],
            start_time=psutil.Process(hello["pid"]).create_time(),
        )


def hand_off(
    old: WorkerProcess,
    new: WorkerProcess,
    *,
    commit_by_ns: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """A live handoff by hand, the way the supervisor does it: the VM's run lease
    offered from the old worker to the new one, then a socket pair between them;
    the old worker pre-wakes the new one if both say they can (``contract.PREWAKE``),
    and sends the state frame if both know it (``contract.STATE_FRAME``).

    With ``commit_by_ns`` the new worker resumes by itself once loaded (worker-
    commit mode); otherwise this sends it ``resume``. Returns each side's reply.
    ``timeout``: for each reply (the connection's own, 30 s, if None)."""
    offer_lease(old, new)
    a, b = wire.make_seqpacket_pair()
    args: dict[str, Any] = {"timeout_ms": 10000}
    if commit_by_ns is not None:
        args["commit_by_ns"] = commit_by_ns
    hellos = contract.Hello.parse(old.call("hello")), contract.Hello.parse(new.call("hello"))
    send: dict[str, Any] = {}
    if contract.prewake_between(*hellos):
        args["prewake"] = send["prewake"] = True
    if contract.frame_between(*hellos):
        send["frame"] = True
    try:
        rid = new.conn.send_request("handoff.receive", args, [b.fileno()])
        sent = old.call("handoff.send", send, [a.fileno()], timeout=timeout)
    finally:
        a.close()
        b.close()
    loaded = new.conn.wait_reply(rid, timeout=timeout).result
    resumed = loaded if commit_by_ns is not None else new.call("resume", timeout=timeout)
    return {"sent": sent, "loaded": loaded, "resumed": resumed}


def vmctl(
    root: Path, *args: str, timeout: float = 300, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real vmctl command line."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor.vmctl", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input.decode() if input is not None else None,
    )


def processes_under(root: Path) -> list[psutil.Process]:
    """Live processes that belong to ``root``: anything run with ``--root ROOT``
    (daemons, baton-vmm workers, vmctl), and QEMU workers (which hold their QMP
    socket under the root's run directory)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status", "name"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            ours = ("--root", str(root)) in itertools.pairwise(p.info["cmdline"] or [])
            if not ours and "qemu-system" in (p.info["name"] or ""):
                ours = any(str(c.laddr).startswith(f"{root}/") for c in p.net_connections("unix"))
            if ours:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


class Host:
    """A broker and its supervisors under one root, the questions tests ask of
    them, and a teardown that leaves nothing running.

    ``vm`` is the VM the helpers mean when they are not told one. Use as a
    context manager (or call ``cleanup``)."""

    def __init__(
        self,
        root: Path,
        broker: BrokerProcess | None = None,
        *,
        vm: str = "demo",
        wait: float = WAIT,
    ) -> None:
        self.root = root
        self.paths = Paths(root)
        self.vm = vm
        self.wait = wait
        self.broker = broker if broker is not None else BrokerProcess(root).start()
        self.supervisors: list[SupervisorProcess] = []

    @classmethod
    def start(
        cls, root: Path, *, vm: str = "demo", supervisor_env: dict[str, str] | None = None
    ) -> Host:
        """A new broker and one supervisor under ``root``."""
        host = cls(root, vm=vm)
        try:
            host.supervisor(env=supervisor_env)
        except BaseException:
            host.cleanup()
            raise
        return host

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- the daemons
    def supervisor(self, env: dict[str, str] | None = None) -> SupervisorProcess:
        """Start one more supervisor (the one before must be gone); it becomes ``sup``."""
        s = SupervisorProcess(self.root, env=env)
        self.supervisors.append(s)  # before it starts: a half-started one is stopped too
        return s.start()

    def restart_daemons(self, between: Callable[[], None], fds: set[str]) -> None:
        """Every way the supervisor and the broker are restarted under a running VM,
        one after the other, ``between()`` after each (say: traffic still flows): the
        supervisor stopped and started (how it is upgraded: the VMs keep running and
        the next one adopts them), killed -9 and started, the broker's self-upgrade,
        the broker killed -9 and started (it gets ``fds`` of the VM back)."""
        self.sup.stop()
        between()
        self.supervisor()
        self.wait_state("running")
        between()
        self.sup.kill9()
        between()
        self.supervisor()
        self.wait_state("running")
        between()
        r = self.vmctl("broker", "upgrade")
        assert r.returncode == 0, r.stderr
        between()
        self.broker.kill9()
        between()
        self.broker.start()
        with self.broker.client() as c:
            wait_until(
                lambda: {f["name"] for f in c.list_fds(self.vm) if f["state"] == "held"} >= fds,
                20,
                0.1,
                f"{sorted(fds)} back in the new broker",
            )
        between()

    @property
    def sup(self) -> SupervisorProcess:
        """The supervisor started last."""
        assert self.supervisors, "no supervisor started yet"
        return self.supervisors[-1]

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 120) -> Any:
        """A control request to whichever supervisor serves the root (daemonized ones too)."""
        with wire.Connection.connect(self.paths.control_socket, timeout=timeout) as c:
            return c.call(op, args).result

    def vmctl(
        self, *args: str, timeout: float = 300, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return vmctl(self.root, *args, timeout=timeout, input=input)

    # -- VMs, through vmctl
    def _json(self, *args: str) -> Any:
        r = self.vmctl("--json", *args, timeout=120)
        assert r.returncode == 0, f"vmctl {' '.join(args)}: exit {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def status(self, vm: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._json("status", vm or self.vm)
        return result

    def vm_list(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in self._json("list")}

    def wait_state(
        self, state: str, vm: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        name = vm or self.vm
        return wait_until(
            lambda: (st := self.status(name))["state"] == state and st,
            self.wait if timeout is None else timeout,
            0.1,
            f"{name} to be {state}",
        )

    def upgrade(self, vm: str | None = None, worker: str | None = None) -> tuple[int, Any]:
        """``vmctl --json upgrade``: its exit status and its report."""
        args = ["--json", "upgrade", vm or self.vm] + (["--worker", worker] if worker else [])
        r = self.vmctl(*args)
        assert r.stdout, r.stderr
        return r.returncode, json.loads(r.stdout)

    # -- the guest's console
    def console_log(self, vm: str | None = None) -> Path:
        return self.paths.console_log(vm or self.vm)

    def console_text(self, vm: str | None = None) -> str:
        try:
            return self.console_log(vm).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def beats(self, vm: str | None = None) -> list[Heartbeat]:
        """The built-in guest's heartbeats in the console log so far."""
        return heartbeats(self.console_text(vm))

    def wait_beats(
        self, n: int, vm: str | None = None, timeout: float | None = None
    ) -> list[Heartbeat]:
        """Once there are at least ``n`` heartbeats: all of them."""
        name = vm or self.vm
        return wait_until(
            lambda: b if len(b := self.beats(name)) >= n else [],
            self.wait if timeout is None else timeout,
            0.02,
            f"{n} heartbeats of {name}",
        )

    def more_beats(
        self, k: int = 3, vm: str | None = None, timeout: float | None = None
    ) -> list[Heartbeat]:
        """Once ``k`` more heartbeats than now have come: all of them."""
        return self.wait_beats(len(self.beats(vm)) + k, vm, timeout)

    def type_line(self, line: str, vm: str | None = None) -> None:
        """Write a line into the guest's serial input (the pipe the broker holds)."""
        with self.broker.client() as c:
            fd = c.get(vm or self.vm, [contract.CONSOLE_IN_WRITER])[contract.CONSOLE_IN_WRITER]
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    # -- processes
    def workers_of(self, vm: str | None = None) -> list[psutil.Process]:
        """Live baton-vmm workers of this root (of ``vm``, or of any VM if None)."""
        out = []
        for p in processes_under(self.root):
            with contextlib.suppress(psutil.Error):
                cmd = p.cmdline()
                if "baton.jail_launcher" in cmd[:3]:
                    continue  # a jail launcher (or its fork, not yet the worker): no VMM
                names = [b for a, b in itertools.pairwise(cmd) if a == "--vm"]
                if names and (vm is None or names == [vm]):
                    out.append(p)
        return out

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.workers_of(None)}

    # -- teardown
    def cleanup(self, timeout: float = 15.0) -> None:
        """Stop every VM through the supervisor, then every supervisor (a daemonized
        one too), the broker, and kill whatever still runs under the root; returns
        once all of it is gone."""
        with contextlib.suppress(Exception):
            for v in self.call("vm.list", timeout=60):
                if v["state"] != "stopped" or v["pid"]:
                    with contextlib.suppress(Exception):
                        self.call("vm.stop", {"vm": v["name"], "force": True}, timeout=60)
        for s in self.supervisors:
            s.stop(timeout)
        pid = read_pidfile(self.paths.supervisor_pidfile)  # one nobody here started
        if pid is not None:
            terminate(pid, "supervisor", timeout)
        self.broker.stop(timeout)
        for p in processes_under(self.root):  # only if something failed half-way
            with contextlib.suppress(psutil.Error):
                p.kill()
        wait_until(
            lambda: not processes_under(self.root), timeout, 0.05, f"nothing left under {self.root}"
        )
