"""The handoff's state through the new worker's sealed memfd (``vmm.state_shm``):
used between two workers that both do it, datagrams with any other, and every
bad memfd, publication or peer refused with a clear error and no fd left open."""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import beats, more_beats, paused_frame
from vmm._kvm import ffi, lib

from baton import contract, wire
from baton.wire import Code, RemoteError
from baton_lab.harness import BrokerProcess, WorkerProcess, hand_off
from supervisor.provision import provision
from vmm import state, state_shm
from vmm.guest import continuity_problems

pytestmark = pytest.mark.kvm
MiB = 1 << 20
NO_SHM = {"BATON_VMM_SHM": "0"}  # a worker as from before the state went through memory


@pytest.fixture
def vm(broker: BrokerProcess) -> dict:
    with broker.client() as c:
        provision(c, broker.paths, "vm1", 64 * MiB, [])
    return {"broker": broker, "log": broker.paths.console_log("vm1")}


def worker(vm: dict, **kw: Any) -> WorkerProcess:
    return WorkerProcess(vm["broker"].root, "vm1", tick_ms=20.0, **kw)


def open_fds(w: WorkerProcess) -> int:
    return int(w.call("status")["open_fds"])


def test_shm_only_between_workers_that_both_use_it_and_every_mix_works(vm):
    """2 vCPUs along new -> older -> new -> new -> older: the state goes through
    the memfd only in the new -> new handoff (its two sections: head, vCPUs),
    datagrams otherwise; every handoff commits, no heartbeat is lost, and the
    old worker holds as many fds after its send as before it."""
    chain = [
        worker(vm, vcpus=2),
        worker(vm, vcpus=2, incoming=True, env=NO_SHM),
        worker(vm, vcpus=2, incoming=True),
        worker(vm, vcpus=2, incoming=True),
        worker(vm, vcpus=2, incoming=True, env=NO_SHM),
    ]
    try:
        chain[0].start()
        more_beats(vm, 3)
        for w in chain[1:]:
            w.start()
        used = []
        for i, (old, new) in enumerate(itertools.pairwise(chain)):
            before = open_fds(old), open_fds(new)
            r = hand_off(old, new, commit_by_ns=2**62 if i % 2 == 0 else None, timeout=30)
            assert r["sent"]["state_format"] == "frame"
            assert r["sent"]["shm_sections"] == r["loaded"]["shm_sections"]
            used.append(r["loaded"]["shm_sections"])
            assert open_fds(old) == before[0]
            if r["loaded"].get("committed"):
                assert open_fds(new) == before[1]
            assert old.quit() == 0
            more_beats(vm, 2)
        assert used == [0, 0, 2, 0]
        assert continuity_problems(beats(vm)) == []
    finally:
        for w in chain:
            w.kill()


# -- the new worker's side, against a hand-made old worker on a real channel


@contextmanager
def receiving(new: WorkerProcess, timeout_ms: int = 5000) -> Iterator[tuple[Any, int, Any]]:
    """A prewake ``handoff.receive`` on ``new``: (our end of the channel, the
    request's id, the memfd it offered, mapped here)."""
    a, b = wire.make_seqpacket_pair()
    try:
        args = {"timeout_ms": timeout_ms, "prewake": True}
        rid = new.conn.send_request("handoff.receive", args, [b.fileno()])
        b.close()
        assert wire.wait_readable(a.fileno(), 30_000)
        msg, fds = wire.recv_message(a)
        assert msg["op"] == contract.PREWAKE and len(fds) == 1
        fd = fds[0]
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals == state_shm.SEALS  # it can neither shrink nor grow, writes stay
            assert os.fstat(fd).st_size == state_shm.SIZE
            mm = mmap.mmap(fd, state_shm.SIZE)
        finally:
            os.close(fd)
        try:
            yield a, rid, mm
        finally:
            mm.close()
    finally:
        a.close()
        b.close()


def publish(mm: Any, k: int, data: bytes, length: int | None = None, at: int = 0) -> None:
    """Publication ``k`` as the old worker makes it: the bytes, then the word."""
    mm[state_shm.HEAD + at : state_shm.HEAD + at + len(data)] = data
    ptr = ffi.from_buffer(mm)
    lib.baton_shm_publish(ptr, k, len(data) if length is None else length)
    del ptr


def refused(new: WorkerProcess, rid: int) -> RemoteError:
    with pytest.raises(RemoteError) as e:
        new.conn.wait_reply(rid, timeout=30)
    assert new.call("status")["state"] == "incoming"
    return e.value


def test_bad_publications_and_dead_peers_are_refused_clearly(vm):
    """A published length beyond the buffer; garbage there (the frame's own checks
    refuse it); a frame whose head lies; a publication that never comes, the old
    worker alive (the deadline, not a hang) or dead (the channel's close); the
    vCPUs that never come after the head. Each is a clear error, nothing was
    loaded, the new worker leaks no fd and still takes a good state afterwards."""
    old = worker(vm).start()
    new = worker(vm, incoming=True).start()
    try:
        more_beats(vm, 2)
        head, vcpus = paused_frame(old)
        frame, end = head + vcpus, len(head)
        lying = head[:8] + (end - state.FRAME.size + 4).to_bytes(4, "little") + head[12:]
        base = open_fds(new)

        r, w = os.pipe()  # not a channel: refused before any memfd is made, none left open
        try:
            with pytest.raises(RemoteError) as err:
                new.call("handoff.receive", {"timeout_ms": 1000, "prewake": True}, [r])
        finally:
            os.close(r)
            os.close(w)
        assert err.value.code == Code.BAD_REQUEST and "socket" in err.value.message
        assert open_fds(new) == base

        with receiving(new) as (a, rid, mm):
            publish(mm, 1, b"x" * 64, length=state_shm.SIZE - state_shm.HEAD + 1)
            e = refused(new, rid)
        assert e.code == Code.BAD_REQUEST and "bytes left there" in e.message, e

        with receiving(new) as (a, rid, mm):
            publish(mm, 1, state.FRAME_MAGIC + os.urandom(4000))
            e = refused(new, rid)
        assert e.code == Code.BAD_REQUEST and "state refused" in e.message, e

        with receiving(new) as (a, rid, mm):
            publish(mm, 1, lying + vcpus)
            e = refused(new, rid)
        assert "state frame's head" in e.message, e

        with receiving(new, timeout_ms=1000) as (a, rid, mm):
            t0 = time.monotonic()
            e = refused(new, rid)
            assert time.monotonic() - t0 < 10
        assert e.code == Code.TIMEOUT and "did not come" in e.message, e

        with receiving(new) as (a, rid, mm):
            a.close()  # the old worker died after the pre-wake
            e = refused(new, rid)
        assert e.code == Code.UNAVAILABLE and "closed the channel" in e.message, e

        with receiving(new, timeout_ms=1000) as (a, rid, mm):
            publish(mm, 1, head)
            e = refused(new, rid)
        assert "the vCPUs did not come" in e.message, e

        with receiving(new) as (a, rid, mm):  # a vCPU section of zeros
            publish(mm, 1, head)
            publish(mm, 2, b"\0" * len(vcpus), at=len(head))
            e = refused(new, rid)
        assert e.code == Code.BAD_REQUEST and "state refused" in e.message, e
        assert open_fds(new) == base

        with receiving(new) as (a, rid, mm):  # the good one, in its two sections
            publish(mm, 1, head)
            publish(mm, 2, vcpus, at=len(head))
            got = new.conn.wait_reply(rid, timeout=30).result
        assert got["shm_sections"] == 2 and got["state_size"] == len(frame)
        assert new.call("status")["state"] == "paused"
        assert open_fds(new) == base
    finally:
        new.kill()
        old.kill()


def test_a_doorbell_wakes_a_new_worker_asleep_and_datagrams_still_count(vm):
    """Past its spin the new worker sleeps: a publication with the doorbell wakes
    it (a stale doorbell before the vCPUs is passed over), and a sender that
    ignored the memfd is heard on the channel as before."""
    old = worker(vm).start()
    new = worker(vm, incoming=True).start()
    try:
        more_beats(vm, 2)
        head, vcpus = paused_frame(old)
        frame = head + vcpus
        ring = {"id": 0, "op": state_shm.RING_OP, "args": {}}

        with receiving(new, timeout_ms=60_000) as (a, rid, mm):
            ptr = ffi.from_buffer(mm)
            sleeping = ffi.cast("uint32_t *", ptr + 32)  # struct baton_shm_head.sleeping
            t0 = time.monotonic()
            while not sleeping[0]:
                assert time.monotonic() - t0 < 30, "the new worker never slept"
                time.sleep(0.005)
            del sleeping, ptr
            publish(mm, 1, head)
            wire.send_message(a, ring)
            a.send(vcpus)  # the vCPUs by datagram: as a sender whose memory ran out
            got = new.conn.wait_reply(rid, timeout=30).result
        assert got["shm_sections"] == 1 and got["state_size"] == len(frame)
        assert new.call("status")["state"] == "paused"
    finally:
        new.kill()
        old.kill()


# -- the old worker's side, against a hand-made new worker


def _memfd(size: int = state_shm.SIZE, seals: int = state_shm.SEALS) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _offers() -> dict[str, list[int]]:
    r, w = os.pipe()
    os.close(w)
    return {
        "a pipe": [r],
        "unsealed": [_memfd(seals=0)],
        "may still grow": [_memfd(seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)],
        "one page short": [_memfd(size=state_shm.SIZE - 4096)],
        "sealed against writes": [_memfd(seals=state_shm.SEALS | fcntl.F_SEAL_WRITE)],
        "surplus fds": [_memfd(), _memfd()],
        "good": [_memfd()],
    }


def test_the_old_worker_uses_only_a_good_memfd_and_closes_every_fd(vm):
    """With its pre-wake a new worker offers a pipe, an unsealed memfd, one that may
    grow, one of the wrong size, one sealed against writes, or two: the old worker
    sends the state on the channel as before, and holds no fd more afterwards; a
    good memfd gets it, published there whole."""
    old = worker(vm).start()
    try:
        more_beats(vm, 2)
        base = open_fds(old)
        for name, fds in _offers().items():
            a, b = wire.make_seqpacket_pair()
            mm = None
            try:
                if name == "good":
                    mm = mmap.mmap(fds[0], state_shm.SIZE)
                args = {"prewake": True, "frame": True}
                rid = old.conn.send_request("handoff.send", args, [a.fileno()])
                a.close()
                wire.send_message(b, {"id": 0, "op": contract.PREWAKE, "args": {}}, fds)
                sent = old.conn.wait_reply(rid, timeout=30).result
                if mm is None:
                    assert sent["shm_sections"] == 0, name
                    assert wire.wait_readable(b.fileno(), 5000), name
                    blob = b.recv(state.FRAME_RAW_MAX)
                else:
                    assert sent["shm_sections"] == 1, name
                    word = int.from_bytes(mm[0:8], "little")
                    assert word >> 32 == 1, name
                    blob = mm[state_shm.HEAD : state_shm.HEAD + (word & 0xFFFFFFFF)]
                    assert b.recv(64) == b"", "a datagram beside it (a doorbell nobody asked for)"
                assert len(blob) == sent["state_size"], name
                assert state.decode(blob)["vcpu"], name  # the whole frame, as it was sent
            finally:
                wire.close_fds(fds)
                if mm is not None:
                    mm.close()
                a.close()
                b.close()
            old.call("resume")
            assert open_fds(old) == base, name
            more_beats(vm, 2)
        assert continuity_problems(beats(vm)) == []
    finally:
        old.kill()
