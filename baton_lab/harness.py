"""Run real Baton daemons under a temporary root: used by the tests, the
benchmarks and the demo (one implementation, so they all start daemons the
same way)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from baton.daemonize import read_pidfile, read_ready
from baton.paths import Paths
from broker.client import BrokerClient

T = TypeVar("T")


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


class BrokerProcess:
    """A real baton-brokerd in the foreground, under ``root``."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.paths = Paths(root)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> BrokerProcess:
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "--root", str(self.root), "--foreground"],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        wait_until(self._ready, timeout, what="broker to serve")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}")
        with BrokerClient(self.paths.broker_socket) as c:
            return c.hello()["pid"] == self.pid

    @property
    def pid(self) -> int:
        pid = read_pidfile(self.paths.broker_pidfile)
        assert pid is not None, "broker pid file is not locked"
        return pid

    def client(self, token: str | None = None) -> BrokerClient:
        return BrokerClient(self.paths.broker_socket, token=token)

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def kill9(self) -> None:
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), what=f"pid {pid} to die")
        if self.proc is not None and self.proc.pid == pid:
            self.proc.wait()

    def stop(self) -> None:
        pid = read_pidfile(self.paths.broker_pidfile)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not _alive(pid), timeout=10, what="broker to stop")
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
        disks: tuple[str, ...] = (),
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
        self.disks = disks
        self.token = token
        self.command = command or [sys.executable, "-m", "vmm.worker"]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._conn: Any = None

    def argv(self) -> list[str]:
        argv = [*self.command, "--root", str(self.root), "--vm", self.vm]
        argv += ["--incoming" if self.incoming else "--boot", "--vcpus", str(self.vcpus)]
        argv += ["--tick-ms", str(self.tick_ms)]
        for d in self.disks:
            argv += ["--disk", d]
        return argv

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        pass_fds = [ready_w]
        argv = [*self.argv(), "--ready-fd", str(ready_w)]
        token_r = None
        if self.token is not None:
            token_r, token_w = os.pipe2(os.O_CLOEXEC)
            os.write(token_w, self.token.encode())
            os.close(token_w)
            pass_fds.append(token_r)
            argv += ["--token-fd", str(token_r)]
        self.proc = subprocess.Popen(
            argv,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
        )
        os.close(ready_w)
        if token_r is not None:
            os.close(token_r)
        try:
            text = read_ready(ready_r, time.monotonic() + timeout)
        finally:
            os.close(ready_r)
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
    def conn(self) -> Any:
        from baton import wire

        if self._conn is None:
            self._conn = wire.Connection.connect(self.control_path, timeout=30)
        return self._conn

    def call(self, op: str, args: dict[str, Any] | None = None, fds: Any = ()) -> Any:
        return self.conn.call(op, args, fds=fds).result

    def quit(self, timeout: float = 15.0) -> int:
        from baton import wire

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


class SupervisorProcess:
    """A real baton-supervisord in the foreground, under ``root``."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.paths = Paths(root)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> SupervisorProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--root", str(self.root), "--foreground"],
            env={**os.environ, **(self.env or {})},
            stdin=subprocess.DEVNULL,
        )
        wait_until(self._ready, timeout, what="supervisor to serve")
        return self

    def _ready(self) -> bool:
        from baton import wire

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {self.proc.returncode}")
        with wire.Connection.connect(self.paths.control_socket, timeout=5) as c:
            return c.call("hello").result["pid"] == self.proc.pid  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 120) -> Any:
        from baton import wire

        with wire.Connection.connect(self.paths.control_socket, timeout=timeout) as c:
            return c.call(op, args).result

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
