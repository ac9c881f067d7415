"""A VM's lifecycle as the supervisor sees it: named states, one guarded transition.

Every change of ``VmRuntime.state`` goes through ``VmRuntime.change_state``,
which refuses a transition the table does not list: a bug shows up as an
error at the site that made it, not as a VM in a state nothing expects.

    stopped   -> starting                 vmctl start, autostart
    starting  -> running | failed
    running   -> upgrading | suspending | stopping | failed | stopped
                 (stopped: the guest shut down)
    suspending -> suspended | running | failed   (running: the suspend was aborted)
    suspended -> resuming | stopping             (its image on disk; no worker, no fds)
    resuming  -> running | suspended | failed    (suspended: the image was refused, kept)
    upgrading -> running | failed
    paused    -> running | failed | stopping | stopped
                 (adopted mid-upgrade; journal recovery settles it)
    failed    -> starting | stopping | stopped
    stopping  -> stopped
    unresponsive -> running | paused | stopping | failed
                 (its worker lives but does not answer: never replaced while it lives;
                 it answers again, or vmctl stop --force kills it, or it dies)

Adoption and journal recovery after a supervisor restart set the state
they find (``adopted``), which is refused in the middle of an operation;
so does a start that finds the VM's run lease held by a live worker.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from baton.wire import Code, RemoteError
from supervisor.vmconfig import VmConfig
from supervisor.workers import WorkerHandle


class VmState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    UPGRADING = "upgrading"
    PAUSED = "paused"
    STOPPING = "stopping"
    FAILED = "failed"
    UNRESPONSIVE = "unresponsive"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESUMING = "resuming"


S = VmState
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED}),
    S.RUNNING: frozenset({S.UPGRADING, S.SUSPENDING, S.STOPPING, S.FAILED, S.STOPPED}),
    S.UPGRADING: frozenset({S.RUNNING, S.FAILED}),
    S.PAUSED: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.STOPPED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.UNRESPONSIVE: frozenset({S.RUNNING, S.PAUSED, S.STOPPING, S.FAILED}),
    S.SUSPENDING: frozenset({S.SUSPENDED, S.RUNNING, S.FAILED}),
    S.SUSPENDED: frozenset({S.RESUMING, S.STOPPING}),
    S.RESUMING: frozenset({S.RUNNING, S.SUSPENDED, S.FAILED}),
}


HOUSEKEEPING_WAIT_S = 2.0  # longer than any housekeeping hold of a VM's lock


class LifecycleError(RuntimeError):
    """A transition the table does not allow: a bug in the caller."""


@dataclass
class VmRuntime:
    """One configured VM: its state, its worker, and our copies of its broker fds.

    ``lock`` is held for the whole of a lifecycle operation, so two operations
    on one VM never interleave while other VMs carry on."""

    config: VmConfig
    state: VmState = VmState.STOPPED
    reason: str = ""
    worker: WorkerHandle | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    restart_at: float | None = None  # monotonic
    last_exit: str | None = None
    last_upgrade: dict[str, Any] | None = None
    removed: bool = False  # its file left vms.d while it ran
    held: dict[str, int] = field(default_factory=dict)  # our copies of its broker fds
    upgrades: int = 0
    unresponsive_since: float | None = None  # monotonic
    next_probe: float = 0.0  # monotonic: when to ask an unresponsive worker again
    busy_with: str | None = None  # the operation holding ``lock``, for ``busy`` errors
    image: str | None = None  # suspended: the directory of its image (supervisor.ramimage)

    @property
    def name(self) -> str:
        return self.config.name

    @contextlib.contextmanager
    def operation(self, what: str, wait_s: float | None = HOUSEKEEPING_WAIT_S) -> Iterator[None]:
        """Hold ``lock`` for an operation (``what``: "an upgrade", "a start"), or
        raise ``busy`` naming the one that is running.

        Housekeeping (the token sweep, a probe of an unresponsive worker, the
        standby pool deciding to refill) holds the lock for a few broker round
        trips without naming itself: an operation that arrives then waits that
        out (up to ``wait_s``) rather than failing. Another operation holding it
        means ``busy`` at once, however long it would take. ``wait_s=None``
        waits for whatever holds the lock (a stop waits for an upgrade)."""
        if wait_s is None:
            self.lock.acquire()
        else:
            deadline = time.monotonic() + wait_s
            while not self.lock.acquire(timeout=0.02):
                running = self.busy_with
                if running is not None or time.monotonic() >= deadline:
                    raise RemoteError(
                        Code.BUSY, f"VM {self.name} is busy: {running or 'an operation'} is running"
                    )
        before, self.busy_with = self.busy_with, what
        try:
            yield
        finally:
            self.busy_with = before
            self.lock.release()

    def change_state(self, new: VmState, reason: str | None = None) -> None:
        """The one way the state changes; ``reason`` replaces the reason if given."""
        if new is not self.state and new not in TRANSITIONS[self.state]:
            raise LifecycleError(f"VM {self.name}: {self.state} -> {new} is not a transition")
        self.state = new
        if reason is not None:
            self.reason = reason

    def adopted(self, found: VmState, reason: str | None = None) -> None:
        """The state a previous supervisor left this VM in, found after a restart
        (adoption, then journal recovery). Never in the middle of an operation."""
        if self.state in (
            VmState.STARTING, VmState.STOPPING, VmState.UPGRADING, VmState.SUSPENDING,
            VmState.RESUMING,
        ):  # fmt: skip
            raise LifecycleError(f"VM {self.name}: adopted while {self.state}")
        self.state = found
        if reason is not None:
            self.reason = reason
