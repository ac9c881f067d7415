"""Background work never delays a guest's pause: SCHED_IDLE while a pause is in flight.

During a rollout, while one VM is inside its pause, other VMs' new workers are
being built (forked, jailed, building their KVM VMs) and old ones are tearing
theirs down. They already run at nice 10 and 19, but on the fair scheduler a
lower weight does not preempt: a task that is running keeps its CPU for the
rest of its slice (about 1.5 ms on two CPUs) when a pausing worker's thread
wakes, and a pause is a chain of such wake-ups. SCHED_IDLE is the one policy
the kernel preempts at once for any normal task that wakes on that CPU.

So every process registered here (``add``: an incoming worker from the moment
its pid is known until it says ready, an old worker from its retirement until
it is reaped) has each of its threads switched to SCHED_IDLE for as long as
some pause is in flight (``quiet``), and back to SCHED_OTHER at its own nice
value when the last one ends. Outside pauses it runs as before, so a host
whose guests keep the CPUs busy does not starve its upgrades (SCHED_IDLE all
the time would: it gets about 0.3% of a CPU beside one busy task). The
supervisor is root and may change any process's policy; a jailed worker could
not raise its own back (no CAP_SYS_NICE, RLIMIT_NICE 0), and never needs to.

The zygotes (``supervisor.zygote``) are registered for as long as they live:
a fork (the page-table copy in the kernel, then the child's own start) during
a pause otherwise preempted the pausing workers for milliseconds (seen with
``perf sched`` in a 100-VM ``--all``: a fresh fork ran 12 ms on the CPU a
pausing worker was waiting for). Their forks are born SCHED_IDLE then, and
``add`` sets a worker's policy either way when it registers it.

A pid is dropped before its process is reaped (``WorkerHandle.reap``,
``Zygote.close``, ``Zygote.alive``: it peeks with WNOWAIT), so a pid reused
by someone else is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator

_IDLE = os.sched_param(0)
#: the shortest slice the fair scheduler takes (sched_setattr's sched_runtime), in ns
SHORT_SLICE_NS = 100_000
_SYS_SCHED_SETATTR = 314  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


class _SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


def _each_thread(pid: int, change: Callable[[int], None]) -> int:
    """``change(tid)`` for every thread of ``pid``. Threads started meanwhile inherit
    from the thread that started them, so the listing is repeated until no new one
    shows. Returns the threads changed."""
    done: set[int] = set()
    while True:
        try:
            tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")} - done
        except OSError:
            return len(done)  # gone
        if not tids:
            return len(done)
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that just ended
                change(tid)
        done |= tids


def set_policy(pid: int, idle: bool) -> int:
    """Every thread of ``pid`` to SCHED_IDLE (or back to SCHED_OTHER, its nice value
    kept)."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    return _each_thread(pid, lambda tid: os.sched_setscheduler(tid, policy, _IDLE))


def _set_thread(tid: int, idle: bool) -> None:
    """One thread alone to SCHED_IDLE (or back to SCHED_OTHER, its nice value kept)."""
    with contextlib.suppress(OSError):  # it ended meanwhile
        os.sched_setscheduler(tid, os.SCHED_IDLE if idle else os.SCHED_OTHER, _IDLE)


def set_slice(pid: int, slice_ns: int) -> int:
    """Every thread of ``pid`` SCHED_OTHER with this slice (0: the default), its nice
    value kept. A waking task whose slice is shorter than the running one's takes
    the CPU at once (EEVDF's PREEMPT_SHORT, Linux 6.12+) instead of waiting out that
    task's slice: what the two workers of a pause want for their few wake-ups.
    Kernels without custom slices ignore it (or refuse: nothing is changed then)."""

    def change(tid: int) -> None:
        attr = _SchedAttr(
            size=ctypes.sizeof(_SchedAttr),
            sched_policy=os.SCHED_OTHER,
            sched_nice=os.getpriority(os.PRIO_PROCESS, tid),
            sched_runtime=slice_ns,
        )
        if _libc.syscall(_SYS_SCHED_SETATTR, tid, ctypes.byref(attr), 0) != 0:
            raise OSError(ctypes.get_errno(), "sched_setattr")

    return _each_thread(pid, change)


@contextlib.contextmanager
def urgent(*pids: int) -> Iterator[None]:
    """The processes of a pause run with the shortest slice while the block runs."""
    for pid in pids:
        set_slice(pid, SHORT_SLICE_NS)
    try:
        yield
    finally:
        for pid in pids:
            set_slice(pid, 0)


class Background:
    """The processes that yield to pauses, and how many pauses are in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pids: set[int] = set()
        self._threads: set[int] = set()  # our own threads, in ``yielding`` blocks
        self._pauses = 0

    def add(self, pid: int) -> None:
        """From now until ``discard``; idle at once if a pause is in flight, and
        SCHED_OTHER at once if none is: a worker forked by the (registered)
        zygote during a pause inherits SCHED_IDLE, and may be added after that
        pause ended."""
        with self._lock:
            self._pids.add(pid)
            set_policy(pid, idle=bool(self._pauses))

    def discard(self, pid: int) -> None:
        """It runs as it is from now on (SCHED_OTHER): called before it is reaped."""
        with self._lock:
            if pid in self._pids:
                self._pids.discard(pid)
                if self._pauses:
                    set_policy(pid, idle=False)

    @contextlib.contextmanager
    def yielding(self) -> Iterator[None]:
        """The calling thread (of this process: the supervisor's) is background work
        for as long as the block runs: SCHED_IDLE whenever a pause is in flight.
        For preparing an incoming worker, whose uid check alone reads every
        process's status in /proc (about 20 ms of CPU per upgrade with 100 VMs)."""
        tid = threading.get_native_id()
        with self._lock:
            self._threads.add(tid)
            if self._pauses:
                _set_thread(tid, idle=True)
        try:
            yield
        finally:
            with self._lock:
                self._threads.discard(tid)
                if self._pauses:
                    _set_thread(tid, idle=False)

    @property
    def pids(self) -> set[int]:
        with self._lock:
            return set(self._pids)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """A pause is in flight for as long as the block runs."""
        with self._lock:
            self._pauses += 1
            if self._pauses == 1:
                for pid in self._pids:
                    set_policy(pid, idle=True)
                for tid in self._threads:
                    _set_thread(tid, idle=True)
        try:
            yield
        finally:
            with self._lock:
                self._pauses -= 1
                if self._pauses == 0:
                    for pid in self._pids:
                        set_policy(pid, idle=False)
                    for tid in self._threads:
                        _set_thread(tid, idle=False)


#: the supervisor's one registry (a process has one scheduler to share)
BACKGROUND = Background()
