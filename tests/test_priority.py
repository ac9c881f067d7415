"""Background work yields to pauses (``supervisor.priority``), on real processes: every
thread of a registered process is SCHED_IDLE exactly while a pause is in flight, and
the two workers of a pause get the shortest slice for its length."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import wait_until

from supervisor.priority import SHORT_SLICE_NS, Background, set_policy, urgent

# a process with three threads, at nice 10 like an incoming worker, that waits
CHILD = (
    "import os, threading, time\n"
    "os.setpriority(os.PRIO_PROCESS, 0, 10)\n"
    "for _ in range(2): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started = [subprocess.Popen([sys.executable, "-c", CHILD]) for _ in range(2)]
    for p in started:
        wait_until(lambda p=p: len(tids(p.pid)) == 3, 10, what="its threads")
    yield started
    for p in started:
        p.kill()
        p.wait()


def tids(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def policies(pid: int) -> set[tuple[int, int]]:
    """(policy, nice) of each thread of ``pid``."""
    return {(os.sched_getscheduler(t), os.getpriority(os.PRIO_PROCESS, t)) for t in tids(pid)}


def slices(pid: int) -> set[int]:
    out = set()
    for t in tids(pid):
        with open(f"/proc/{pid}/task/{t}/sched") as f:
            out |= {int(line.split(":")[1]) for line in f if line.startswith("se.slice")}
    return out


NORMAL = {(os.SCHED_OTHER, 10)}
IDLE = {(os.SCHED_IDLE, 10)}


def test_registered_processes_are_idle_only_while_a_pause_is_in_flight(procs) -> None:
    a, b = (p.pid for p in procs)
    bg = Background()
    bg.add(a)
    assert policies(a) == NORMAL  # no pause: it builds at its own nice value
    with bg.quiet():
        assert policies(a) == IDLE
        bg.add(b)  # one that registers during a pause yields at once
        assert policies(b) == IDLE
        with bg.quiet():  # a second pause in flight
            pass
        assert policies(a) == IDLE, "idle until the last pause ends"
        bg.discard(b)  # ready (or reaped) during a pause: back to normal at once
        assert policies(b) == NORMAL
    assert policies(a) == NORMAL, "normal again, its nice value kept"
    assert bg.pids == {a}
    bg.discard(a)
    with bg.quiet():
        assert policies(a) == NORMAL, "no longer registered"


def test_a_process_born_idle_is_normal_once_registered_after_the_pause(procs) -> None:
    """A worker forked by the (registered) zygote during a pause inherits SCHED_IDLE;
    registering it once no pause is in flight must not leave it idle for good."""
    a = procs[0].pid
    set_policy(a, idle=True)  # as a fork of an idle zygote is born
    assert policies(a) == IDLE
    bg = Background()
    bg.add(a)
    assert policies(a) == NORMAL
    bg.discard(a)


def test_a_yielding_thread_of_ours_is_idle_only_during_pauses() -> None:
    """The supervisor's thread preparing a worker (its /proc scan for the jail uid)
    yields to other VMs' pauses; the process's other threads do not."""
    me = threading.get_native_id()
    other = threading.Thread(target=time.sleep, args=(5,), daemon=True)
    other.start()
    bg = Background()
    with bg.yielding():
        assert os.sched_getscheduler(me) == os.SCHED_OTHER  # no pause in flight
        with bg.quiet():
            assert os.sched_getscheduler(me) == os.SCHED_IDLE
            assert os.sched_getscheduler(other.native_id or 0) == os.SCHED_OTHER
        assert os.sched_getscheduler(me) == os.SCHED_OTHER
        with bg.quiet():
            pass
    with bg.quiet():
        assert os.sched_getscheduler(me) == os.SCHED_OTHER, "its block ended"
    with bg.quiet(), bg.yielding():  # a block that starts inside a pause
        assert os.sched_getscheduler(me) == os.SCHED_IDLE
    assert os.sched_getscheduler(me) == os.SCHED_OTHER


def test_the_workers_of_a_pause_get_the_shortest_slice_for_its_length(procs) -> None:
    a, b = (p.pid for p in procs)
    default = slices(a)
    assert SHORT_SLICE_NS not in default
    with urgent(a, b):
        assert slices(a) == slices(b) == {SHORT_SLICE_NS}
        assert policies(a) == NORMAL, "the policy and nice value are left alone"
    assert slices(a) == slices(b) == default
