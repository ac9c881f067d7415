"""The state frame (``vmm.state``, format 2) between real workers: used only where
both hellos offer it (``contract.STATE_FRAME``), format 1 with any older worker,
and the guest whole across every mix, in both commit modes."""

from __future__ import annotations

import itertools
import os

import pytest
from helpers import beats, more_beats, paused_frame, wait_until

from baton import contract, wire
from baton.wire import RemoteError
from baton_lab.harness import BrokerProcess, WorkerProcess, hand_off, offer_lease
from broker.client import BrokerClient
from supervisor.provision import provision
from vmm import kvm, state, vcpu_record
from vmm.guest import continuity_problems

pytestmark = pytest.mark.kvm
MiB = 1 << 20
OLDER = {"BATON_VMM_FRAME": "0"}  # a worker as from before the frame


@pytest.fixture
def vm(broker: BrokerProcess) -> dict:
    with broker.client() as c:
        provision(c, broker.paths, "vm1", 64 * MiB, [])
    return {"broker": broker, "log": broker.paths.console_log("vm1")}


def worker(vm: dict, **kw) -> WorkerProcess:
    return WorkerProcess(vm["broker"].root, "vm1", tick_ms=20.0, vcpus=2, **kw)


def test_frame_only_between_workers_that_both_offer_it(vm):
    """2 vCPUs along new -> older -> new -> new -> older (asleep too) -> new: the
    frame travels only between two new workers, each handoff commits (worker-commit
    mode and, every other one, the explicit resume), and no heartbeat is lost."""
    chain = [
        worker(vm),
        worker(vm, incoming=True, env=OLDER),
        worker(vm, incoming=True),
        worker(vm, incoming=True),
        worker(vm, incoming=True, env={**OLDER, "BATON_VMM_AWAKE": "0"}),
        worker(vm, incoming=True),
    ]
    try:
        chain[0].start()
        more_beats(vm, 3)
        offers = [contract.STATE_FRAME in contract.Hello.parse(chain[0].call("hello")).features]
        for w in chain[1:]:
            offers.append(
                contract.STATE_FRAME in contract.Hello.parse(w.start().call("hello")).features
            )
        assert offers == [True, False, True, True, False, True]
        used = []
        for i, (old, new) in enumerate(itertools.pairwise(chain)):
            r = hand_off(old, new, commit_by_ns=2**62 if i % 2 == 0 else None, timeout=30)
            assert new.call("status")["state"] == "running"
            used.append(r["sent"]["state_format"])
            # the frame arrives in its two sections, as raw datagrams
            assert ("vcpus_readable_at_ns" in r["loaded"]) == (used[-1] == "frame")
            assert old.quit() == 0
            more_beats(vm, 2)
        assert used == ["v1", "v1", "frame", "v1", "v1"]
        assert continuity_problems(beats(vm)) == []
    finally:
        for w in chain:
            w.kill()


def _refused_on_vcpu1(blob: bytes) -> bytes:
    """``blob`` as a frame whose vCPU 1 has MSR_KERNEL_GS_BASE (0xc0000102)
    non-canonical: it passes every check before KVM, and KVM_SET_MSRS refuses it."""
    parts = state.decode(blob)
    v = dict(parts["vcpu"][1])
    at = kvm.msr_indices(v["msrs"]).index(0xC0000102) * kvm.MSR_ENTRY
    v["msrs"] = v["msrs"][: at + 8] + (1 << 63).to_bytes(8, "little") + v["msrs"][at + 16 :]
    parts["vcpu"][1] = vcpu_record.from_fields(v)
    frame = state.encode_frame(parts)
    assert frame is not None
    return frame


def test_a_frame_that_kvm_refuses_fails_the_handoff_cleanly(vm):
    """A frame that passes every check but whose vCPU 1 KVM refuses, sent as the
    old worker sends it (head, then vCPUs, raw): the new worker refuses it (and
    says exactly what was refused, unless it exits first), never takes the
    lease nor runs the guest, and the old worker takes the guest back."""
    old = worker(vm).start()
    new = worker(vm, incoming=True).start()
    try:
        more_beats(vm, 3)
        old.call("pause")
        frame = _refused_on_vcpu1(old.call("save")["state"])
        offer_lease(old, new)
        a, b = wire.make_seqpacket_pair()
        try:
            args = {"timeout_ms": 10000, "commit_by_ns": 2**62}
            rid = new.conn.send_request("handoff.receive", args, [b.fileno()])
            end = state.head_length(frame)
            a.send(frame[:end])  # as the old worker sends it: the head, then the vCPUs
            a.send(frame[end:])
            # An error reply that names the refusal, unless the worker (its guest
            # failed) exited before its reply went out.
            with pytest.raises((RemoteError, wire.ConnectionClosed)) as e:
                new.conn.wait_reply(rid, timeout=30)
        finally:
            a.close()
            b.close()
        if isinstance(e.value, RemoteError):
            assert "KVM refused the state" in e.value.message, e.value
            assert "0xc0000102" in e.value.message, e.value
        # a worker whose guest failed exits on its own; it never took the lease
        assert new.proc is not None and new.proc.wait(10) != 0
        with BrokerClient(old.paths.broker_socket) as broker:
            holder = broker.lease_status("vm1")["holder"]
        assert holder["pid"] == old.pid, holder
        old.call("resume")
        more_beats(vm, 3)
        assert continuity_problems(beats(vm)) == []
    finally:
        new.kill()
        old.kill()


def test_each_vcpu_gets_exactly_its_state_from_a_frame():
    """In one process, a chain of 2-vCPU handoffs by frame, each loaded without
    resuming: what KVM then holds for each vCPU (read back) is what was sent
    (vCPU 1 is a fresh AP, in KVM_MP_STATE_UNINITIALIZED, until its state lands)."""
    from vmm.machine import Machine, MachineSpec
    from vmm.vcpu import install_kick_handler

    install_kick_handler()
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 64 * MiB)
    spec = MachineSpec("t", vcpus=2, tick_ns=20_000_000)
    src = Machine(spec, {"ram": fd})
    machines = [src]

    def still(lapic: bytes) -> bytes:  # but the timer's current count (0x390), which runs
        return lapic[:0x390] + lapic[0x394:]

    try:
        src.boot()
        for i in range(4):
            ran = src.vcpus[0].exits_total
            wait_until(lambda s=src, r=ran: s.vcpus[0].exits_total > r + 5, 10, 0.01, "a run")
            dst = Machine(spec, {"ram": fd})
            machines.append(dst)
            dst.mark_incoming()
            box: list[bytes] = []
            out = src.handoff_out(lambda p, b=box: b.append(b"".join(p)), None, frame=True)
            assert out["state_format"] == "frame"
            assert len(box) == 2 and state.head_length(box[0]) == len(box[0])
            sent = state.decode(b"".join(box))
            # Read in C by the vCPUs' own threads or vCPU 0's: as the plain save reads
            # them from the source, still paused (the TSC MSR and timer count run on).
            for n, v in enumerate(src.vcpus):
                again = v.save_record()
                for key in ("regs", "sregs", "xsave", "xcrs", "debugregs", "mp_state", "events"):
                    assert again[key] == sent["vcpu"][n][key], (i, n, key)
            dst.handoff_in(lambda b=box: b.pop(0), None)
            back = state.decode(dst.save())
            for n in (0, 1):
                for key in ("regs", "sregs", "xsave", "xcrs", "debugregs", "mp_state"):
                    assert back["vcpu"][n][key] == sent["vcpu"][n][key], (i, n, key)
                assert still(back["vcpu"][n]["lapic"]) == still(sent["vcpu"][n]["lapic"])
            dst.resume()
            src.close()
            machines.remove(src)
            src = dst
    finally:
        for m in machines:
            m.close()
        os.close(fd)


def test_the_head_encoder_writes_exactly_what_encode_head_writes():
    """``state.HeadEncoder`` reuses what it packed before; its head is byte for byte
    ``encode_head``'s, whatever changed in between (a device, the pause stamp, the
    versions asked for), and like it refuses versions a frame cannot carry."""
    from vmm.machine import Machine, MachineSpec
    from vmm.vcpu import install_kick_handler

    install_kick_handler()
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 64 * MiB)
    m = Machine(MachineSpec("t", tick_ns=20_000_000), {"ram": fd})
    try:
        enc = state.HeadEncoder()
        parts = m._collect_head()
        changed_serial = {**parts, "serial": {**parts["serial"], "tx_bytes": 7}}
        later = {**changed_serial, "machine": {**parts["machine"], "paused_at_ns": 12345}}
        for p, target in [
            (parts, None),
            (parts, None),  # all reused
            (changed_serial, None),
            (later, None),
            (later, {"serial": 1, "net": 1}),
            (parts, {"vcpu": 2}),
        ]:
            got = enc.encode(p, target)
            assert got is not None and got == state.encode_head(p, target)
            assert state.decode_head(got)["serial"] == p["serial"]
        assert enc.encode(parts, {"vcpu": 1}) is None
    finally:
        m.close()
        os.close(fd)


def test_a_hostile_frame_on_the_channel_is_refused_before_kvm(vm):
    """Sections on the state channel as raw datagrams, each wrong in its own way
    (a head whose length lies, a vCPU section cut short, a vCPU section that never
    comes): each handoff is refused with a clear error and the incoming worker,
    which touched nothing, still takes the good state afterwards."""
    old = worker(vm).start()
    new = worker(vm, incoming=True).start()
    try:
        more_beats(vm, 3)
        head, vcpus = paused_frame(old)
        frame, end = head + vcpus, len(head)
        lying = head[:8] + (end - state.FRAME.size + 4).to_bytes(4, "little") + head[12:]
        cases = {
            "head length lies": ([lying + vcpus], "state frame's head"),
            "vCPUs cut short": ([head, vcpus[:-5]], "truncated"),
            "vCPUs never come": ([head], "did not come"),
        }
        for name, (sections, why) in cases.items():
            a, b = wire.make_seqpacket_pair()
            try:
                args = {"timeout_ms": 1000}
                rid = new.conn.send_request("handoff.receive", args, [b.fileno()])
                for s in sections:
                    a.send(s)
                with pytest.raises(RemoteError) as e:
                    new.conn.wait_reply(rid, timeout=30)
            finally:
                a.close()
                b.close()
            assert why in e.value.message, (name, e.value)
            assert new.call("status")["state"] == "incoming", name
        new.call("load", {"state": frame})  # the good one, whole, still loads
        assert new.call("status")["state"] == "paused"
    finally:
        new.kill()
        old.kill()
