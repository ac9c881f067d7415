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

The other side: the two workers of a pause get the shortest slice for the
whole handoff (``urgent``) and, in worker-commit mode, SCHED_FIFO for the pause
itself (``realtime_block``), so that they go before every normal task, not
only before the background. ``Exclusion`` (off by default) keeps the work
SCHED_IDLE cannot hold back, old workers' exits and unregistered forks, out of
pauses altogether.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator

_IDLE = os.sched_param(0)
#: the shortest slice the fair scheduler takes (sched_setattr's sched_runtime), in ns
SHORT_SLICE_NS = 100_000
#: the real-time priority of a pause's two workers in worker-commit mode (the lowest)
PAUSE_RT_PRIORITY = 1
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


def set_realtime(pid: int) -> int:
    """Every thread of ``pid`` SCHED_FIFO at the lowest real-time priority, which
    its children (threads included) do not inherit (SCHED_RESET_ON_FORK)."""
    param = os.sched_param(PAUSE_RT_PRIORITY)
    policy = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
    return _each_thread(pid, lambda tid: os.sched_setscheduler(tid, policy, param))


def realtime(pid: int) -> bool:
    """Whether ``pid``'s main thread runs a real-time policy (left by ``urgent``)."""
    try:
        return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK in (
            os.SCHED_FIFO,
            os.SCHED_RR,
        )
    except OSError:
        return False


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


@contextlib.contextmanager
def realtime_block(*pids: int, on: bool = True) -> Iterator[None]:
    """Inside ``urgent``: the processes run SCHED_FIFO while the block runs (where
    the kernel refuses, they keep the short slice), then the short slice again.

    The short slice makes a pausing worker's wake-up preempt a normal task, but
    EEVDF still picks among eligible tasks by lag: on a loaded host a pair's
    thread that had just run its share waited behind the supervisor's threads,
    unregistered forks and other sessions' processes for up to 24 ms while
    runnable (``bench.tailwhy``). A real-time task goes before every normal one
    at the next preemption point. Only for the pause itself (from the request to
    pause to the new worker's word that it runs the guest), and only where
    nothing in it waits for a normal task: in worker-commit mode (the new worker
    resumes by itself; the broker's lease answer comes after the vCPUs run), not
    when the supervisor commits. The workers' waits in it are bounded spins that
    go on asleep (``vmm.awake``), and the kernel's real-time throttling leaves
    normal tasks 5% regardless. A supervisor that dies inside the block leaves
    the pair real-time until the next one adopts them (``Supervisor._attach``)."""
    if not on:
        yield
        return
    for pid in pids:
        with contextlib.suppress(OSError):
            set_realtime(pid)
    try:
        yield
    finally:
        for pid in pids:
            set_slice(pid, SHORT_SLICE_NS)  # SCHED_OTHER, its nice value kept


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


#: how long a pause waits for work apart from pauses to end before it goes ahead anyway
PAUSE_WAIT_S = 1.0
#: how long work apart from pauses waits for them before it goes ahead anyway
APART_WAIT_S = 5.0


class Exclusion:
    """Pauses never overlap the background work that SCHED_IDLE cannot hold back.

    SCHED_IDLE (``Background``) makes a task give way at its next return to user
    space or ``cond_resched``, and only once it is registered. Two kinds of
    background work escape it:

    * an old worker's exit (``Supervisor.retire_worker``: from its ``quit`` to the
      kernel confirming it dead): its KVM teardown and ``exit_mmap`` are long
      in-kernel sections, and this kernel is built PREEMPT(none) (``perf sched``
      of a 100-VM ``--all``: a pausing worker waited behind one for up to 82 ms);
    * a worker the zygote forked just before a pause, from the fork to its
      registration (``workers._fork``: the jail's setup, the intermediate fork's
      exit, then ``BACKGROUND.add``), which runs as a normal task meanwhile.

    So such work (``apart``) does not begin while a pause is in flight or
    waiting, and a pause does not begin while any runs: it waits before the guest
    stops, outside the blackout. Pauses go first: a rollout whose slots all wait
    to retire their old workers makes no new pauses, so the work gets its turn.
    Both waits are bounded (a worker hanging in its exit must not stop every
    other VM's upgrade); past the bound the block runs anyway. ``enabled`` is
    ``[upgrade] exclusive_teardown``, off by default: with the real-time pause
    (``realtime_block``) it moved no blackout measurably on this host and made
    100-VM rollouts ~15% slower (docs/benchmarks.md, "tail branch"); off, both
    blocks run at once.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pauses = 0  # in flight or waiting to begin
        self._apart = 0
        self.enabled = False

    @contextlib.contextmanager
    def pause(self, wait_s: float = PAUSE_WAIT_S) -> Iterator[float]:
        """A pause's whole window; first waits (up to ``wait_s``) for the work under
        way to end. Yields how long it waited, in seconds."""
        t0 = time.monotonic()
        with self._cond:
            self._pauses += 1  # from now on no work apart begins
            if self.enabled:
                self._cond.wait_for(lambda: self._apart == 0, timeout=wait_s)
        try:
            yield time.monotonic() - t0
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def apart(self, wait_s: float = APART_WAIT_S) -> Iterator[float]:
        """Work that must not overlap a pause; first waits (up to ``wait_s``) until
        no pause is in flight or waiting. Such blocks may overlap one another.
        Yields the wait, in seconds."""
        t0 = time.monotonic()
        with self._cond:
            if self.enabled:
                self._cond.wait_for(lambda: self._pauses == 0, timeout=wait_s)
            self._apart += 1
        try:
            yield time.monotonic() - t0
        finally:
            with self._cond:
                self._apart -= 1
                self._cond.notify_all()


#: the supervisor's one: every VM's pauses against every VM's work apart
EXCLUSION = Exclusion()
