"""Daemon plumbing shared by baton-brokerd and baton-supervisord.

python-daemon does the classic detach (fork, setsid, chdir, close fds). Around
it we fix its known traps:

* umask 0o077, never its default of 0;
* stdout/stderr go to ``DIR/var/log/baton/NAME.log`` (or stay on journald
  when systemd gave us a journal stream), never to /dev/null;
* signal handlers only set flags and write a self-pipe (no lock: see
  ``Signals``); python-daemon's default SIGTERM handler
  raises SystemExit wherever the main thread happens to be;
* the pid file is an ``flock`` on an open fd, so a ``kill -9`` never leaves
  a stale lock behind;
* the command that starts a daemon returns only once the daemon serves (a
  readiness pipe), with a non-zero exit and the reason if it failed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import daemon

from baton.paths import Paths, add_root_argument

PR_SET_CHILD_SUBREAPER = 36


class AlreadyRunning(RuntimeError):
    pass


class Flag:
    """A flag a signal handler may set: a plain attribute, no lock.

    ``threading.Event.set`` takes a lock the interrupted main thread may be
    holding (inside ``Event.wait`` or ``clear``): a signal at that moment
    deadlocks the daemon. Setting an attribute cannot."""

    def __init__(self, signals: Signals) -> None:
        self._signals = signals
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def clear(self) -> None:
        self._set = False

    def wait(self, timeout: float) -> bool:
        """Until this flag or any other signal arrives, or ``timeout``; then is_set()."""
        if not self._set:
            self._signals.wait(timeout)
        return self._set


class Signals:
    """SIGTERM/SIGINT set ``term``; SIGHUP sets ``hup``.

    The handler does only what is safe at any instant: it sets a plain
    attribute and writes one byte to a self-pipe (``os.write``), which
    ``wait`` (the main loop's sleep) reads. No lock is taken, so a signal
    that lands while the main thread holds one cannot deadlock it, and a
    storm of signals only fills the pipe (extra bytes are dropped: one is
    enough to wake the loop). ``on_signal`` must be just as careful."""

    def __init__(self) -> None:
        self.term = Flag(self)
        self.hup = Flag(self)
        self.on_signal: Callable[[], None] | None = None
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def fds(self) -> list[int]:
        """The self-pipe, which a daemonizing fork must keep open."""
        return [self._r, self._w]

    def handler(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.hup.set()
        else:
            self.term.set()
        with contextlib.suppress(OSError):  # full: the loop is woken already
            os.write(self._w, b"\0")
        if self.on_signal is not None:
            self.on_signal()

    def wait(self, timeout: float) -> None:
        """Sleep until a signal arrives (or ``timeout``), then empty the pipe."""
        poller = select.poll()
        poller.register(self._r, select.POLLIN)
        poller.poll(max(0.0, timeout) * 1000)  # a signal (EINTR) is retried: it wrote the pipe
        with contextlib.suppress(OSError):
            while os.read(self._r, 4096):
                pass

    @property
    def signal_map(self) -> dict[int, object]:
        return {
            signal.SIGTERM: self.handler,
            signal.SIGINT: self.handler,
            signal.SIGHUP: self.handler,
            signal.SIGPIPE: signal.SIG_IGN,
            signal.SIGTTIN: None,
            signal.SIGTTOU: None,
            signal.SIGTSTP: None,
        }

    def install(self) -> None:
        for sig, action in self.signal_map.items():
            if action is not None:
                signal.signal(sig, action)  # type: ignore[arg-type]


class PidLock:
    """A pid file held with ``flock``: the lock dies with the process."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path: Path) -> PidLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(f"already running as pid {other} ({path} is locked)") from None
            raise
        return cls(path, fd)

    def write(self, pid: int | None = None) -> None:
        data = f"{pid or os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


def read_pidfile(path: Path) -> int | None:
    """The pid in a pid file, but only if some process still holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_ready(fd: int, deadline: float) -> str:
    """The other side of ``Readiness``: ``ready`` or ``error: ...``, or what came
    before EOF or ``deadline`` (time.monotonic())."""
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while (remaining := deadline - time.monotonic()) > 0:
        if not poller.poll(remaining * 1000):
            break
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
        if b"\n" in data:
            break
    return b"".join(chunks).decode(errors="replace").strip()


def start_with_ready_pipe(
    argv: Sequence[str] | Callable[[int], Sequence[str]],
    *,
    deadline: float,
    pass_fds: Sequence[int] = (),
    **popen_kwargs: Any,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a process that says on a pipe when it is ready, and wait for its word.

    ``argv`` is either the command line, to which ``--ready-fd N`` is
    appended, or a function that takes N and returns the whole command line
    (``lambda fd: WorkerArgs(..., ready_fd=fd).argv(command)``). The child
    inherits the pipe's write end besides ``pass_fds`` (which stay the
    caller's to close); our copy is closed as soon as the child runs, so a
    child that dies early reads as EOF at once. ``popen_kwargs`` go to
    ``subprocess.Popen`` as they are.

    Returns the process and what it said (``read_ready``): ``ready``,
    ``error: ...``, or '' (EOF, or nothing by ``deadline``, time.monotonic()).
    A process that did not say ``ready`` may still run: killing and reaping
    it is the caller's choice. If it cannot be started, Popen's OSError
    propagates and no fd of ours is left open."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            full = argv(ready_w) if callable(argv) else [*argv, "--ready-fd", str(ready_w)]
            proc = subprocess.Popen(list(full), pass_fds=(*pass_fds, ready_w), **popen_kwargs)
        finally:
            os.close(ready_w)
        try:
            return proc, read_ready(ready_r, deadline)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        os.close(ready_r)


def add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    add_root_argument(parser)
    parser.add_argument("--foreground", action="store_true", help="do not daemonize")
    parser.add_argument("--debug", action="store_true", help="log at debug level")


class Readiness:
    """Tells the command that started us whether we came up (daemon mode only)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def ready(self, detail: str = "") -> None:
        """``detail``: one line more for the starter (``contract.READY_HELLO_ENV``)."""
        self._send(f"ready {detail}\n".encode() if detail else b"ready\n")

    def failed(self, reason: str) -> None:
        self._send(f"error: {reason}\n".encode())

    def _send(self, data: bytes) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, data)
        os.close(self.fd)
        self.fd = None


def _set_child_subreaper() -> None:
    """Orphans of the detach forks come back to us, so we reap them (no zombies
    left behind even where PID 1 does not reap)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _wait_for_child(read_fd: int, child: int, name: str) -> None:
    """In the launching process: exit 0 once the daemon is ready, 1 if it failed."""
    chunks = []
    while True:
        data = os.read(read_fd, 4096)
        if not data:
            break
        chunks.append(data)
    text = b"".join(chunks).decode(errors="replace").strip()
    # Reap the intermediate processes of the double fork; the daemon lives on.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    if text == "ready":
        os._exit(0)
    sys.stderr.write(f"{name}: {text or 'failed to start (see its log)'}\n")
    os._exit(1)


def start(
    name: str,
    paths: Paths,
    *,
    foreground: bool,
    signals: Signals,
    preserve: list[int],
) -> Readiness:
    """Become the daemon (unless ``foreground``); returns the readiness channel.

    Call before opening sockets, /dev/kvm or memfds: python-daemon closes
    every fd that is not in ``preserve``.
    """
    os.umask(0o077)
    if foreground or os.environ.get("NOTIFY_SOCKET") or os.getppid() == 1:
        # systemd (or init) supervises us directly: detaching would look like an exit.
        signals.install()
        return Readiness(None)
    paths.log.mkdir(parents=True, exist_ok=True, mode=0o700)
    keep_journal = bool(os.environ.get("JOURNAL_STREAM"))
    if keep_journal:
        out = err = None
        stdio: tuple[object, object] = (sys.stdout, sys.stderr)
    else:
        out = err = open(paths.log / f"{name}.log", "a", buffering=1)  # noqa: SIM115
        stdio = (out, err)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    _set_child_subreaper()
    child = os.fork()
    if child > 0:
        os.close(write_fd)
        _wait_for_child(read_fd, child, name)
    os.close(read_fd)
    ctx = daemon.DaemonContext(
        umask=0o077,
        working_directory="/",
        detach_process=True,
        files_preserve=[*preserve, *signals.fds, write_fd, *(f for f in (out,) if f is not None)],
        stdout=stdio[0],
        stderr=stdio[1],
        signal_map=signals.signal_map,
        prevent_core=False,
    )
    ctx.open()
    return Readiness(write_fd)
