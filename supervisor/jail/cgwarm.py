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
in the worker's path. Each write blocks forks host-wide only while the (empty)
migration runs, as any cgroup move does; it stops when the worker has started
(``stop``) or after ``LIMIT_S``. Where the kernel waits for no grace period (a
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
    """One worker's start: ``start()`` before its request leaves, ``stop()`` once it
    has joined its cgroups (or failed). The thread is never joined: a write may be
    waiting out the grace period, and the caller must not."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._writer: Aside[None] | None = None
        self.writes = 0  # how many went through

    def start(self) -> Warmer:
        path = own_procs_file()
        if path is not None:  # on a kept thread (``Aside``): no thread start to wait for
            self._writer = Aside(lambda: self._run(path), name="cgroup-warm")
        return self

    def _run(self, path: Path) -> None:
        deadline = time.monotonic() + LIMIT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                with open(path, "w") as f:
                    f.write("0")
                self.writes += 1
            except OSError:  # not ours to write (no root, a read-only hierarchy): no gain
                return
            self._stop.wait(PERIOD_S)

    def stop(self) -> None:
        self._stop.set()

    def ended(self) -> bool:
        """Its writes are over (stopped, or never started)."""
        return self._writer is None or self._writer.done()


@contextlib.contextmanager
def warmed(enabled: bool) -> Iterator[None]:
    """Warm (``Warmer``) for the duration of the block, if ``enabled`` (the worker
    started in it is jailed, so joins cgroups)."""
    w = Warmer()
    if enabled:
        w.start()
    try:
        yield
    finally:
        w.stop()
