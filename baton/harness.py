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

from baton.daemonize import read_pidfile
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
