"""Background work yields to pauses (``supervisor.priority``), on real processes: every
thread of a registered process is SCHED_IDLE exactly while a pause is in flight, and
the two workers of a pause get the shortest slice for its length (real time for the
pause itself), and pauses exclude the work that no priority holds back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import WORKER, wait_until

from supervisor.priority import (
    SHORT_SLICE_NS,
    Background,
    Exclusion,
    realtime,
    realtime_block,
    set_policy,
    set_realtime,
    urgent,
)

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


def test_the_workers_of_a_worker_commit_pause_run_real_time_for_its_length(procs) -> None:
    a, b = (p.pid for p in procs)
    fifo = {(os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, 10)}
    with urgent(a, b):
        with realtime_block(a, b):
            assert policies(a) == policies(b) == fifo, "every thread, children not inheriting"
            assert realtime(a) and realtime(b)
        assert policies(a) == policies(b) == NORMAL, "back to SCHED_OTHER, the nice value kept"
        assert slices(a) == slices(b) == {SHORT_SLICE_NS}, "and the short slice"
        assert not realtime(a)
        with realtime_block(a, b, on=False):
            assert policies(a) == NORMAL


def test_pauses_and_work_apart_exclude_each_other() -> None:
    """A pause waits for the work under way (a teardown) and no work begins while a
    pause is in flight or waiting; each side is told how long it waited."""
    ex = Exclusion()
    ex.enabled = True
    log: list[str] = []
    in_work, release = threading.Event(), threading.Event()

    def work() -> None:
        with ex.apart():
            log.append("work begins")
            in_work.set()
            release.wait(10)
            log.append("work ends")

    def pause() -> None:
        with ex.pause() as waited:
            log.append(f"pause begins after {waited:.2f}")
            time.sleep(0.05)
            log.append("pause ends")

    w = threading.Thread(target=work)
    w.start()
    in_work.wait(10)
    p = threading.Thread(target=pause)
    p.start()
    wait_until(lambda: ex._pauses == 1, 10, what="the pause waiting")
    late = threading.Thread(target=work)  # comes while the pause waits: goes after it
    in_work.clear()
    late.start()
    time.sleep(0.1)
    assert log == ["work begins"], "the pause waits for the work under way"
    release.set()
    for t in (w, p, late):
        t.join(10)
    assert log[:2] == ["work begins", "work ends"]
    assert log[2].startswith("pause begins after 0.1")
    assert log[3:] == ["pause ends", "work begins", "work ends"]


def test_the_exclusion_waits_are_bounded_and_it_can_be_off() -> None:
    ex = Exclusion()
    ex.enabled = True
    with ex.apart():  # a teardown that never ends in time
        t0 = time.monotonic()
        with ex.pause(wait_s=0.1) as waited:
            assert 0.1 <= waited < 1 and time.monotonic() - t0 < 1
            with ex.apart(wait_s=0.1) as w2:  # and work past a pause that never ends
                assert 0.1 <= w2 < 1
    ex.enabled = False
    with ex.apart(), ex.pause() as waited, ex.apart() as w2:
        assert waited < 0.05 and w2 < 0.05


@pytest.mark.kvm
def test_a_supervisor_that_died_inside_a_pause_leaves_no_worker_real_time(host) -> None:
    """The pair is real-time only inside its pause; a supervisor killed there cannot
    restore it, so the next one does as it adopts the worker (a real worker, its
    threads made SCHED_FIFO as ``realtime_block`` leaves them)."""
    vms = host.root / "etc" / "baton" / "vms.d"
    vms.mkdir(parents=True, exist_ok=True)
    (vms / "vm.toml").write_text(f"memory_mib = 32\nworker = {json.dumps(WORKER.split())}\n")
    host.supervisor()
    host.wait_beats(1, "vm")
    pid = host.status("vm")["pid"]
    host.sup.kill9()
    set_realtime(pid)
    assert realtime(pid)
    host.supervisor()
    wait_until(lambda: host.status("vm")["state"] == "running", 30, what="adopted")
    assert host.status("vm")["pid"] == pid
    assert {p for p, _nice in policies(pid)} == {os.SCHED_OTHER}, "every thread"
