"""Keep the kernel's cgroup migration path warm while a jailed worker starts.

Why: a jailed worker joins its VM's cgroups (``baton.jail_launcher.join_cgroups``)
by writing its pid to ``cgroup.procs``. The kernel takes the host-wide
``cgroup_threadgroup_rwsem`` for writing, and when no migration ran in the last
grace period that write first waits for an RCU grace period (``rcu_sync_enter``):
8-17 ms on this 2-CPU host, one of the largest steps of a cold prepare. Once one
writer has waited, others find the grace period passed for as long as writes keep
coming less than a grace period apart.

So while a jailed worker is being started, a thread of the supervisor writes its
own pid (``0``: the writer itself) into the ``cgroup.procs`` of the cgroup it is
already in, every ``PERIOD_S``: a migration of nothing, which only takes that
lock, so the first wait overlaps the supervisor's own prepare instead of sitting
in the worker's path. One such thread serves every start in flight. Each write
blocks forks host-wide only while the (empty) migration runs, as any cgroup move
does; it stops when the last start in flight has its worker (``stop``) or
``LIMIT_S`` after the latest start. Where the kernel waits for no grace period (a
cgroup v2 hierarchy mounted with ``favordynmods``) the writes cost next to nothing.
Nothing here changes any process's cgroup or the worker's confinement.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from supervisor.aside import Aside
from supervisor.jail import CGROUP_ROOT

PERIOD_S = 0.004  # under the shortest grace period seen here (7 ms)
LIMIT_S = 1.0


def own_procs_file() -> Path | None:
    """The ``cgroup.procs`` of the cgroup this process is in, on the memory
    hierarchy (v1) or the unified one (v2); None if neither is found."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            candidate = CGROUP_ROOT / "memory" / path.lstrip("/") / "cgroup.procs"
            if candidate.exists():
                return candidate
    for line in lines:
        if line.startswith("0::"):
            candidate = CGROUP_ROOT / line[3:].lstrip("/") / "cgroup.procs"
            if candidate.exists():
                return candidate
    return None


class Warmer:
    """One run of writes: ``start()``, then ``stop()`` (or ``LIMIT_S`` after its
    start or its last ``extend``). The thread is never joined: a write may be
    waiting out the grace period, and the caller must not."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + LIMIT_S
        self._done = False  # its thread has ended (or will write no more)
        self._writer: Aside[None] | None = None
        self.writes = 0  # how many went through

    def start(self) -> Warmer:
        path = own_procs_file()
        if path is not None:  # on a kept thread (``Aside``): no thread start to wait for
            self._writer = Aside(lambda: self._run(path), name="cgroup-warm")
        return self

    def extend(self) -> bool:
        """Keep writing until ``LIMIT_S`` from now; False if it has already ended."""
        with self._lock:
            if self._done or self._stop.is_set():
                return False
            self._deadline = max(self._deadline, time.monotonic() + LIMIT_S)
            return True

    def _run(self, path: Path) -> None:
        while True:
            with self._lock:
                if self._stop.is_set() or time.monotonic() >= self._deadline:
                    self._done = True
                    return
            try:
                with open(path, "w") as f:
                    f.write("0")
                self.writes += 1
            except OSError:  # not ours to write (no root, a read-only hierarchy): no gain
                with self._lock:
                    self._done = True
                return
            self._stop.wait(PERIOD_S)

    def stop(self) -> None:
        self._stop.set()

    def ended(self) -> bool:
        """Its writes are over (stopped, or never started)."""
        return self._writer is None or self._writer.done()


class _Shared:
    """One warmer for every worker start in flight: one start's writes keep the grace
    period passed for all of them, so concurrent starts (a rollout's
    ``--max-parallel``) share one thread and one write every ``PERIOD_S`` instead of
    one each (~0.3 ms of CPU per write here)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self.warmer: Warmer | None = None

    def enter(self) -> None:
        with self._lock:
            self._users += 1
            if self.warmer is None or not self.warmer.extend():
                self.warmer = Warmer().start()

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self.warmer is not None:
                self.warmer.stop()
                self.warmer = None


SHARED = _Shared()


@contextlib.contextmanager
def warmed(enabled: bool) -> Iterator[None]:
    """Warm (``Warmer``, shared by every start in flight) for the duration of the
    block, if ``enabled`` (the worker started in it is jailed, so joins cgroups)."""
    if not enabled:
        yield
        return
    SHARED.enter()
    try:
        yield
    finally:
        SHARED.leave()
