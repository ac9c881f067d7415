"""The run lease, against a real broker and real processes: one live holder per guest."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import psutil
import pytest
from helpers import NOBODY, BrokerProcess, run_as, wait_until

from baton import runflag
from baton.wire import Code, RemoteError


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"])


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.kill()
            p.wait()


def acquire_for(c, vm: str, instance: str, p: subprocess.Popen[bytes]) -> dict:
    return c.lease_acquire(vm, instance, pid=p.pid, start_time=psutil.Process(p.pid).create_time())


def offer_to(c, vm: str, frm: str, to: str, p: subprocess.Popen[bytes]) -> dict:
    return c.lease_offer(vm, frm, to, pid=p.pid, start_time=psutil.Process(p.pid).create_time())


def code_of(fn) -> str:
    with pytest.raises(RemoteError) as e:
        fn()
    return str(e.value.code)


def test_one_live_holder_even_when_stopped(broker: BrokerProcess, procs) -> None:
    a, b = sleeper(), sleeper()
    procs += [a, b]
    with broker.client() as c:
        c.create_vm("vm1")
        lease = acquire_for(c, "vm1", "a" * 32, a)
        assert lease["holder"]["pid"] == a.pid and lease["epoch"] == 1
        assert code_of(lambda: acquire_for(c, "vm1", "b" * 32, b)) == Code.BUSY
        a.send_signal(signal.SIGSTOP)  # an overloaded or swapping worker looks like this
        assert code_of(lambda: acquire_for(c, "vm1", "b" * 32, b)) == Code.BUSY
        a.send_signal(signal.SIGCONT)
        # the holder re-acquiring is a no-op (a worker resuming after a rolled-back handoff)
        assert acquire_for(c, "vm1", "a" * 32, a)["epoch"] == 1
        a.kill()
        a.wait()
        lease = acquire_for(c, "vm1", "b" * 32, b)
        assert lease["holder"]["pid"] == b.pid and lease["epoch"] == 2
        assert lease["past"] == ["a" * 32]
        # an instance that ran the guest before someone else did is stale for ever
        a2 = sleeper()
        procs.append(a2)
        b.kill()
        b.wait()
        assert code_of(lambda: acquire_for(c, "vm1", "a" * 32, a2)) == Code.STALE
        assert acquire_for(c, "vm1", "c" * 32, a2)["epoch"] == 3


def test_offer_hands_over_while_the_holder_lives(broker: BrokerProcess, procs) -> None:
    old, new = sleeper(), sleeper()
    procs += [old, new]
    with broker.client() as c:
        c.create_vm("vm1")
        acquire_for(c, "vm1", "old", old)
        assert code_of(lambda: offer_to(c, "vm1", "someone-else", "new", new)) == Code.CONFLICT
        offer_to(c, "vm1", "old", "new", new)
        lease = acquire_for(c, "vm1", "new", new)
        assert lease["holder"]["instance"] == "new" and lease["offer"] is None
        # the old worker, still alive, can never take it back: the guest ran on
        assert code_of(lambda: acquire_for(c, "vm1", "old", old)) == Code.STALE
        # a withdrawn offer grants nothing
        third = sleeper()
        procs.append(third)
        offer_to(c, "vm1", "new", "third", third)
        c.lease_offer("vm1", "new", None)
        assert code_of(lambda: acquire_for(c, "vm1", "third", third)) == Code.BUSY


def test_the_run_flag_takes_the_offer_without_a_round_trip(broker: BrokerProcess, procs) -> None:
    """The commit of an upgrade is a pwrite of the run flag; everyone who asks the
    broker afterwards (even a broker restarted by kill -9 before it read the flag)
    gets the answer the flag gives, and the old worker can never take the guest back."""
    old, new, fresh = sleeper(), sleeper(), sleeper()
    procs += [old, new, fresh]
    with broker.client() as c:
        c.create_vm("vm1")
        acquire_for(c, "vm1", "old", old)
        flag = c.lease_flag("vm1")
        try:
            assert runflag.read(flag) == ""
            # an offer names the new worker's process, or it is refused
            with pytest.raises(RemoteError) as e:
                c.lease_offer("vm1", "old", "new")
            assert e.value.code == Code.BAD_REQUEST and "pid and start_time" in e.value.message
            with pytest.raises(RemoteError) as e:
                c.lease_offer("vm1", "old", "new", pid=new.pid, start_time=1.0)
            assert e.value.code == Code.NOT_FOUND  # not the process that started then
            offer_to(c, "vm1", "old", "new", new)
            # while the offered worker lives, nobody else runs, the holder included
            assert code_of(lambda: acquire_for(c, "vm1", "old", old)) == Code.BUSY
            runflag.write(flag, runflag.encode("new"))  # the commit, inside the pause
        finally:
            os.close(flag)
    broker.kill9()  # before the broker looked at the flag
    broker.start()
    with broker.client() as c:
        st = c.lease_status("vm1")
        assert st["holder"]["instance"] == "new" and st["holder"]["pid"] == new.pid
        assert st["epoch"] == 2 and st["past"] == ["old"] and st["offer"] is None
        assert st["flag"] == "new"
        assert code_of(lambda: acquire_for(c, "vm1", "old", old)) == Code.STALE
        assert acquire_for(c, "vm1", "new", new)["epoch"] == 2  # the new worker's confirm
        # a new worker that wrote the flag and died still held the lease: the old
        # state stays stale, and only a fresh boot may follow
        new.kill()
        new.wait()
        assert code_of(lambda: acquire_for(c, "vm1", "old", old)) == Code.STALE
        lease = acquire_for(c, "vm1", "fresh", fresh)
        assert lease["epoch"] == 3 and lease["past"] == ["old", "new"]
        assert lease["flag"] is None  # recorded in the lease now: the flag names nobody


def test_a_run_flag_written_without_an_offer_lets_nobody_else_run(
    broker: BrokerProcess, procs
) -> None:
    """A flag naming an instance nobody offered the lease (an incoming worker driven
    by hand): it may run the guest, so the holder may not resume, nor may anyone
    be offered it; dropping the VM clears it."""
    old, other = sleeper(), sleeper()
    procs += [old, other]
    with broker.client() as c:
        c.create_vm("vm1")
        acquire_for(c, "vm1", "old", old)
        flag = c.lease_flag("vm1")
        try:
            runflag.write(flag, runflag.encode("rogue"))
        finally:
            os.close(flag)
        with pytest.raises(RemoteError) as e:
            acquire_for(c, "vm1", "old", old)
        assert e.value.code == Code.CONFLICT and "never offered" in e.value.message
        # an instance may not be offered the lease once it wrote the flag unoffered
        assert code_of(lambda: offer_to(c, "vm1", "old", "rogue", other)) == Code.CONFLICT
        c.drop_vm("vm1")
        c.create_vm("vm1")
        assert c.lease_status("vm1")["flag"] is None
        assert acquire_for(c, "vm1", "old2", other)["epoch"] == 1


def test_lease_survives_broker_kill9_and_a_recycled_pid_is_not_the_holder(
    root, broker: BrokerProcess, procs
) -> None:
    holder = sleeper()
    procs.append(holder)
    with broker.client() as c:
        c.create_vm("vm1")
        acquire_for(c, "vm1", "h", holder)
    broker.kill9()
    broker.start()
    other = sleeper()
    procs.append(other)
    with broker.client() as c:
        st = c.lease_status("vm1")
        assert st["holder"]["pid"] == holder.pid and st["holder"]["alive"]
        assert code_of(lambda: acquire_for(c, "vm1", "x", other)) == Code.BUSY
    # A record whose pid now belongs to a process started at another time is no holder.
    broker.stop()
    path = root / "var" / "lib" / "baton" / "broker" / "leases.json"
    text = path.read_text().replace(str(psutil.Process(holder.pid).create_time()), "1.0")
    path.write_text(text)
    broker.start()
    with broker.client() as c:
        assert c.lease_status("vm1")["holder"]["alive"] is False
        assert acquire_for(c, "vm1", "x", other)["holder"]["pid"] == other.pid


def test_torn_or_garbage_lease_records_are_skipped_and_the_broker_serves(
    root, broker: BrokerProcess, procs
) -> None:
    holder = sleeper()
    procs.append(holder)
    with broker.client() as c:
        c.create_vm("vm1")
        c.create_vm("vm2")
        acquire_for(c, "vm1", "h", holder)
    broker.stop()
    path = root / "var" / "lib" / "baton" / "broker" / "leases.json"
    with open(path, "ab") as f:
        f.write(b'{"vm": "vm2", "lease": {"epoch": "x"}}\n\x00\xff garbage\n{"vm": "vm2", "le')
    broker.start()
    with broker.client() as c:
        assert c.hello()["pid"] == broker.pid
        st = c.lease_status("vm1")  # the good record before the garbage still counts
        assert st["holder"]["pid"] == holder.pid and st["holder"]["alive"]
        assert c.lease_status("vm2")["holder"] is None
    # compacted at start: only readable records are left
    assert all(line.startswith(b'{"lease"') for line in path.read_bytes().splitlines())


def test_token_holders_take_leases_only_for_their_own_vm(shared_broker: BrokerProcess) -> None:
    broker = shared_broker
    with broker.client() as c:
        c.create_vm("a")
        c.create_vm("b")
        token = c.mint_token("a")

    def as_worker() -> object:
        with broker.client(token=token) as w:
            mine = w.lease_acquire("a", "worker-a")["holder"]["pid"]
            try:
                w.lease_acquire("b", "worker-a")
            except RemoteError as e:
                return (mine, str(e.code))
            return (mine, "granted")

    pid, code = run_as(NOBODY, as_worker)  # a non-admin peer in a forked child
    assert code == Code.DENIED and pid != os.getpid()
    with broker.client() as c:
        wait_until(lambda: not c.lease_status("a")["holder"]["alive"], 10, what="child gone")
