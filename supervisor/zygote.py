"""Zygotes: one per worker command, that fork baton-vmm workers (``vmm.zygote``).

Why a zygote under the standby (``supervisor.standby``): the two buy different
things. A zygote makes every cold start cheap (no interpreter, no imports, no
jail launcher's own interpreter: one fork of a process that has all of them)
and lets every worker of one version share the zygote's pages copy-on-write,
which is most of a small VM's memory; it costs one process per worker
version. A standby is a VM already built (fds fetched, RAM mapped, KVM VM,
vCPUs and devices made, rehearsed), which no fork can share (a KVM VM belongs
to the mm that created it), so it takes an upgrade's prepare to a few ms; it
costs a worker per VM. Standbys are forked by the zygote too.

``ZygotePool.get(command)`` starts the command's zygote on first use
(``COMMAND --zygote FD ROOM``, as root, its own session, its log
``DIR/var/log/baton/zygote.log``) and checks its ``hello``. A command that is
not a zygote-capable baton-vmm (an older worker from before it, an
operator's wrapper that is no worker) exits or does not answer: that command's
workers start by exec, as before, and the zygote is tried again after
``RETRY_S``. Only a command that names baton-vmm (``runs_baton_vmm``) gets a
zygote at all: the zygote runs as root, unconfined (it only imports and forks;
no guest input ever reaches it, and each fork is jailed before the worker's
code runs), so a command that is something else (a test's hostile worker, an
operator's wrapper) is never run that way: it is exec'd into its jail as
before. A zygote that died is replaced at the next start, and so is one whose
code is stale (``baton.codestamp``: a file it loaded was replaced since it
started, as an in-place install of a new baton-vmm does): it refuses the fork
(``ZygoteStale``) and closes, and the start asks the pool again, which starts a
fresh zygote, so no worker ever runs the code of an older install by mistake
(no hello before each fork: the zygote's own check at the fork is the one that
counts, and asking twice cost a round trip per start). It exits by
itself when the supervisor goes (its socket closes), never taking a worker with
it: a restarted supervisor adopts the workers and starts zygotes of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from baton import wire
from supervisor.priority import BACKGROUND

log = logging.getLogger("supervisor.zygote")

#: bytes of command line each forked worker can show in ``ps`` (vmm.zygote)
ROOM = 2048
START_TIMEOUT_S = 15.0
FORK_TIMEOUT_S = 10.0
#: how long a command whose zygote would not start runs its workers by exec
RETRY_S = 60.0
#: zygotes kept at once (one per worker command): starting another closes the
#: one used least recently (an upgrade to a new version leaves the old one idle)
MAX_ZYGOTES = 4


def _split_env(command: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``env VAR=VALUE... CMD...``: the assignments and CMD."""
    cmd = list(command)
    assigned: dict[str, str] = {}
    if cmd and os.path.basename(cmd[0]) == "env":
        cmd = cmd[1:]
        while cmd and "=" in cmd[0] and not cmd[0].startswith(("-", "=")):
            name, _, value = cmd.pop(0).partition("=")
            assigned[name] = value
    return assigned, cmd


def command_env(command: Sequence[str]) -> dict[str, str]:
    """What ``env VAR=VALUE`` in front of a worker command sets: an exec'd worker
    gets it from ``env``, a forked one from its request."""
    return _split_env(command)[0]


def runs_baton_vmm(command: Sequence[str]) -> bool:
    """``baton-vmm`` or ``PYTHON -m vmm.worker``, maybe behind ``env VAR=VALUE...``:
    the only commands a zygote is started for."""
    cmd = _split_env(command)[1]
    if len(cmd) == 1:
        return os.path.basename(cmd[0]) == "baton-vmm"
    return (
        len(cmd) == 3
        and cmd[1:] == ["-m", "vmm.worker"]
        and os.path.basename(cmd[0]).startswith("python")
    )


class ZygoteUnavailable(Exception):
    """The zygote cannot serve: the caller starts the worker by exec instead."""


class ZygoteStale(ZygoteUnavailable):
    """The zygote refused the fork: its code is no longer what is installed. It has
    closed itself; the pool's next ``get`` starts a fresh one."""


class Zygote:
    """One running zygote: its process and our end of its socket pair."""

    def __init__(self, command: Sequence[str], log_path: Path) -> None:
        self.command = tuple(command)
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        argv = [*command, "--zygote", str(theirs.fileno()), " " * ROOM]
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    argv,
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                    cwd="/",
                )
        except OSError as e:
            ours.close()
            raise ZygoteUnavailable(f"cannot run {argv[0]!r}: {e.strerror}") from None
        finally:
            theirs.close()
        self.conn = wire.Connection(ours, timeout=START_TIMEOUT_S)
        self._lock = threading.Lock()
        try:
            self.hello = self.conn.call("hello", timeout=START_TIMEOUT_S).result
        except (wire.WireError, OSError) as e:
            self.close()
            raise ZygoteUnavailable(f"no hello ({e}; exit status {self.proc.returncode})") from None
        self.pid = self.proc.pid
        BACKGROUND.add(self.pid)  # it and what it forks yield to pauses (supervisor.priority)

    def alive(self) -> bool:
        if self.proc.returncode is None:
            # Exited? Peek (WNOWAIT) first: its pid leaves BACKGROUND before the reap.
            with contextlib.suppress(ChildProcessError):
                flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
                if os.waitid(os.P_PID, self.proc.pid, flags) is None:
                    return True
            BACKGROUND.discard(self.proc.pid)
        return self.proc.poll() is None

    def fork(self, args: dict[str, Any], fds: Sequence[int]) -> int | None:
        """Ask for one fork; the intermediate child's pid, or None if the zygote
        failed after the request left (it may or may not have forked: the
        report pipe says). ZygoteUnavailable if the request never left."""
        with self._lock:
            try:
                rid = self.conn.send_request("fork", args, fds)
            except (wire.ConnectionClosed, OSError) as e:
                raise ZygoteUnavailable(f"zygote pid {self.proc.pid}: {e}") from None
            try:
                return int(self.conn.wait_reply(rid, FORK_TIMEOUT_S).result["pid"])
            except wire.RemoteError as e:
                if e.code != wire.Code.STALE:
                    raise  # it refused the request: ours to fix, not a reason to fall back
                log.info("zygote pid %d: %s; closing it", self.proc.pid, e.message)
                self.close()  # the pool starts a fresh one next time
                raise ZygoteStale(e.message) from None
            except (wire.WireError, OSError) as e:
                log.warning("zygote pid %d failed a fork: %s", self.proc.pid, e)
                self.close()
                return None

    def close(self) -> None:
        """Close our end: the zygote exits by itself; killed if it does not."""
        BACKGROUND.discard(self.proc.pid)  # before it is reaped and its pid may be reused
        self.conn.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ZygotePool:
    """One zygote per worker command, started on first use (``get``)."""

    def __init__(self, log_path: Path, enabled: Callable[[], bool]) -> None:
        self.log_path = log_path
        self.enabled = enabled
        self._lock = threading.Lock()
        self._zygotes: dict[tuple[str, ...], Zygote] = {}
        self._retry_at: dict[tuple[str, ...], float] = {}  # command -> monotonic

    def get(self, command: Sequence[str]) -> Zygote | None:
        """The command's running zygote (started now if need be), or None: start by exec."""
        if not self.enabled():
            self.close()  # switched off by a reload: the idle zygotes go
            return None
        if not runs_baton_vmm(command):
            return None
        key = tuple(command)
        with self._lock:
            z = self._zygotes.pop(key, None)
            # No hello first: a zygote whose code is stale refuses the fork itself
            # (ZygoteStale, closed), and the caller asks again.
            if z is not None and z.alive():
                self._zygotes[key] = z  # the most recently used last
                return z
            if z is not None:
                log.warning("the zygote of %s (pid %d) has gone; starting another", key, z.pid)
                z.close()
            if self._retry_at.get(key, 0.0) > time.monotonic():
                return None
            try:
                z = Zygote(command, self.log_path)
            except ZygoteUnavailable as e:
                log.warning("no zygote for %s: %s; its workers start by exec", key, e)
                self._retry_at[key] = time.monotonic() + RETRY_S
                return None
            log.info("zygote pid %d serves %s", z.pid, key)
            self._zygotes[key] = z
            while len(self._zygotes) > MAX_ZYGOTES:
                old = self._zygotes.pop(next(iter(self._zygotes)))
                log.info(
                    "closing the zygote of %s (pid %d): least recently used", old.command, old.pid
                )
                old.close()
            return z

    def describe(self) -> list[dict[str, Any]]:
        """What ``supervisor.status`` shows: each live zygote's pid and command."""
        return [{"pid": z.pid, "command": list(z.command)} for z in self.running()]

    def running(self) -> list[Zygote]:
        with self._lock:
            return [z for z in self._zygotes.values() if z.alive()]

    def close(self) -> None:
        with self._lock:
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        for z in zygotes:
            with contextlib.suppress(Exception):
                z.close()
