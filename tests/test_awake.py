"""The pause's waits awake (vmm/awake.py): the pre-wake between workers that both
know it, interoperation with workers that do not, and bounded spins."""

from __future__ import annotations

import itertools

import psutil
import pytest
from helpers import beats, more_beats, wait_until

from baton import contract, wire
from baton.wire import Code, RemoteError
from baton_lab.harness import BrokerProcess, WorkerProcess, hand_off
from supervisor.provision import provision
from vmm.guest import continuity_problems

pytestmark = pytest.mark.kvm
MiB = 1 << 20
ASLEEP = {"BATON_VMM_AWAKE": "0"}  # a worker as from before the pre-wake


@pytest.fixture
def vm(broker: BrokerProcess) -> dict:
    with broker.client() as c:
        provision(c, broker.paths, "vm1", 64 * MiB, [])
    return {"broker": broker, "log": broker.paths.console_log("vm1")}


def worker(vm: dict, **kw) -> WorkerProcess:
    return WorkerProcess(vm["broker"].root, "vm1", tick_ms=20.0, **kw)


def test_prewake_only_between_workers_that_both_know_it(vm):
    """2 vCPUs along new -> older -> new -> new: the pre-wake is used only in the last
    handoff, every one of them works, and the guest never misses a beat."""
    chain = [
        worker(vm, vcpus=2),
        worker(vm, vcpus=2, incoming=True, env=ASLEEP),
        worker(vm, vcpus=2, incoming=True),
        worker(vm, vcpus=2, incoming=True),
    ]
    try:
        chain[0].start()
        more_beats(vm, 3)
        hellos = []
        for w in chain[1:]:
            hellos.append(contract.Hello.parse(w.start().call("hello")))
        assert contract.PREWAKE not in hellos[0].features
        assert contract.PREWAKE in hellos[1].features
        used = []
        for old, new in itertools.pairwise(chain):
            r = hand_off(old, new, commit_by_ns=2**62, timeout=30)
            assert r["resumed"]["committed"] is True
            used.append("ready_at_ns" in r["loaded"])
            assert old.quit() == 0
            more_beats(vm, 2)
        assert used == [False, False, True]
        assert continuity_problems(beats(vm)) == []
    finally:
        for w in chain:
            w.kill()


def test_prewake_sender_never_pauses_for_a_new_worker_that_is_not_ready(vm):
    """The old worker waits for the word before it pauses: a channel that closes, or
    says something else, ends the handoff with the guest never paused."""
    old = worker(vm).start()
    try:
        more_beats(vm, 2)
        for reply, code in ((None, Code.UNAVAILABLE), ({"op": "state"}, Code.BAD_REQUEST)):
            a, b = wire.make_seqpacket_pair()
            rid = old.conn.send_request("handoff.send", {"prewake": True}, [a.fileno()])
            a.close()
            if reply is not None:
                wire.send_message(b, {"id": 0, **reply})
            b.close()
            with pytest.raises(RemoteError) as e:
                old.conn.wait_reply(rid, timeout=30)
            assert e.value.code == code, e.value.message
            st = old.call("status")
            assert st["state"] == "running" and st["last_pause"] == {}
            more_beats(vm, 2)
    finally:
        old.kill()


def test_a_state_that_never_comes_costs_no_cpu_after_the_spin(vm):
    """The new worker says it is ready and spins for the state, for a bounded time:
    then it sleeps (no CPU while the old worker's guest runs on), and the
    channel's close still ends the wait with a clear error."""
    old = worker(vm).start()
    new = worker(vm, incoming=True).start()
    try:
        more_beats(vm, 2)
        a, b = wire.make_seqpacket_pair()
        args = {"timeout_ms": 60_000, "prewake": True}
        rid = new.conn.send_request("handoff.receive", args, [b.fileno()])
        b.close()
        assert wire.wait_readable(a.fileno(), 30_000)
        msg, _ = wire.recv_message(a)
        assert msg["op"] == contract.PREWAKE
        proc = psutil.Process(new.pid)

        def asleep() -> bool:
            return all(psutil.Process(t.id).status() != "running" for t in proc.threads())

        wait_until(asleep, 10, 0.01, "every thread of the new worker asleep")
        cpu = sum(proc.cpu_times()[:2])
        more_beats(vm, 10)  # 200 ms of guest time, at least
        assert sum(proc.cpu_times()[:2]) - cpu < 0.05
        a.close()
        with pytest.raises(RemoteError) as e:
            new.conn.wait_reply(rid, timeout=30)
        assert e.value.code == Code.UNAVAILABLE and "closed the channel" in e.value.message
        assert new.call("status")["state"] == "incoming"
    finally:
        new.kill()
        old.kill()


def test_a_vcpu_resumed_from_its_parked_wait_is_never_taken_for_parked(vm):
    """With 2 vCPUs, vCPU 1 enters KVM_RUN straight from its wait in C; until its
    next exit its Python has not looked. A pause right after must still wait for
    it to stop (each pause's stop stamp is real), over many cycles."""
    w = worker(vm, vcpus=2).start()
    try:
        more_beats(vm, 2)
        for _ in range(30):
            p = w.call("pause")
            assert 0 < p["stopped_at_ns"] <= p["parked_at_ns"], p
            w.call("resume")
        more_beats(vm, 2)
        assert continuity_problems(beats(vm)) == []
    finally:
        w.kill()


@pytest.mark.parametrize("c_park", ["1", "0"])
def test_vcpus_that_park_in_c_pause_hand_off_and_stop_cleanly(vm, c_park):
    """vCPUs other than vCPU 0 park in C as their KVM_RUN returns for a pause
    (``baton_run_parking``; ``BATON_VMM_C_PARK=0``: through Python, as before):
    each pause still waits for every stop, a chain of handoffs between both
    kinds keeps the guest whole, and each worker quits with its vCPUs parked."""
    env = {"BATON_VMM_C_PARK": c_park}
    other = {"BATON_VMM_C_PARK": "0" if c_park == "1" else "1"}
    workers = [worker(vm, vcpus=2, env=env).start()]
    try:
        more_beats(vm, 2)
        for _ in range(20):
            p = workers[0].call("pause")
            assert 0 < p["stopped_at_ns"] <= p["parked_at_ns"], p
            workers[0].call("resume")
        for e in (other, env, other):
            new = worker(vm, vcpus=2, incoming=True, env=e).start()
            workers.append(new)
            hand_off(workers[-2], new, commit_by_ns=2**62)
            workers[-2].call("quit")
            assert workers[-2].proc is not None and workers[-2].proc.wait(10) == 0
            more_beats(vm, 2)
        assert continuity_problems(beats(vm)) == []
    finally:
        for w in workers:
            w.kill()


def test_a_vcpu_parked_in_c_is_parked_without_its_python():
    """In one process: vCPU 1 parks in C (its state word says parked while its
    Python never ran the park), its sync copy is taken, a save reads it, the
    machine resumes and pauses again many times, and closing it with vCPU 1
    parked in C ends its thread."""
    import os

    from vmm.machine import Machine, MachineSpec
    from vmm.vcpu import PARKED, install_kick_handler

    install_kick_handler()
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 64 * MiB)
    m = Machine(MachineSpec("t", vcpus=2, tick_ns=20_000_000), {"ram": fd})
    try:
        m.boot()
        v = m.vcpus[1]
        in_c = 0
        for _ in range(20):
            ran = m.vcpus[0].exits_total
            wait_until(lambda r=ran: m.vcpus[0].exits_total > r, 10, 0.005, "a run")
            m.pause()
            assert v._st[0] == PARKED and v.stopped_at_ns > 0
            in_c += not v._paused  # parked by C alone
            assert v.captured() is not None
            m.save()
            m.resume()
        assert in_c == 20
        m.pause()
        thread = v.thread
        assert thread is not None
    finally:
        m.close()
        os.close(fd)
    assert not thread.is_alive()
