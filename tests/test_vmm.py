"""baton-vmm with real KVM: boot, pause/resume, handoff chains, hostile state, leaks."""

from __future__ import annotations

import contextlib
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import hand_off, read_log, wait_until

from baton import __version__, wire
from baton.contract import WorkerExit
from baton.wire import Code, RemoteError
from baton_lab.harness import BrokerProcess, WorkerProcess, offer_lease
from supervisor.provision import CONSOLE_IN_WRITER, DiskImage, provision
from vmm import kvm, state, vcpu_record
from vmm.guest import continuity_problems, expected_ram, heartbeats

pytestmark = pytest.mark.kvm
MiB = 1 << 20
TICK_MS = 20.0


@contextlib.contextmanager
def small_machine() -> Iterator[Any]:
    """A one-vCPU ``Machine`` in this process on 64 MiB of memfd, not booted; closed
    with its RAM after (the in-process tests of the pause's own pieces)."""
    from vmm.machine import Machine, MachineSpec
    from vmm.vcpu import install_kick_handler

    install_kick_handler()
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 64 * MiB)
    m = Machine(MachineSpec("t", tick_ns=int(TICK_MS * 1e6)), {"ram": fd})
    try:
        yield m
    finally:
        m.close()
        os.close(fd)


@pytest.fixture
def vm(broker: BrokerProcess) -> dict:
    disk = DiskImage("disk0", broker.paths.lib / "images" / "vm1-disk0.img", MiB)
    with broker.client() as c:
        provision(c, broker.paths, "vm1", 64 * MiB, [disk])
        token = c.mint_token("vm1", "test worker")
    return {"broker": broker, "token": token, "disk": disk, "log": broker.paths.console_log("vm1")}


def worker(vm: dict, **kw) -> WorkerProcess:
    kw.setdefault("tick_ms", TICK_MS)
    return WorkerProcess(vm["broker"].root, "vm1", disks=("disk0",), token=vm["token"], **kw)


def beats(vm: dict):
    return heartbeats(read_log(vm["log"]))


def wait_beats(vm: dict, n: int, timeout: float = 30.0):
    return wait_until(
        lambda: (b := beats(vm)) and len(b) >= n and b, timeout, 0.02, f"{n} heartbeats"
    )


def type_line(vm: dict, line: str) -> None:
    with vm["broker"].client() as c:
        fd = c.get("vm1", [CONSOLE_IN_WRITER])[CONSOLE_IN_WRITER]
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_guest_boots_and_heartbeats(vm, vcpus):
    w = worker(vm, vcpus=vcpus).start()
    try:
        got = wait_beats(vm, 10)
        assert continuity_problems(got) == []
        assert got[0].seq == 0 and got[0].ram == expected_ram()
        assert f"baton-guest boot cpus={vcpus}" in read_log(vm["log"])
        st = w.call("status")
        assert st["state"] == "running" and st["vcpus"] == vcpus
        assert st["ram_size"] == 64 * MiB
        hello = w.call("hello")
        assert hello["vm"] == "vm1" and hello["state_versions"]["serial"] == [1, 1]
        assert hello["state_versions"]["vcpu"] == [1, 2]
        # a few handoffs: every vCPU's record saved, sent and applied (vCPU 0 by
        # sync regs on its own thread, the others by ioctls from it)
        for _ in range(3):
            nxt = worker(vm, vcpus=vcpus, incoming=True).start()
            seen = len(beats(vm))
            hand_off(w, nxt)
            assert w.quit() == 0
            w = nxt
            wait_until(lambda s=seen: len(beats(vm)) > s + 2, 20, 0.01, "heartbeats after it")
        assert continuity_problems(beats(vm)) == []
    finally:
        assert w.quit() == 0


def test_console_echo_and_block_device(vm):
    w = worker(vm).start()
    try:
        wait_beats(vm, 2)
        type_line(vm, "w3 marker-from-the-guest")
        type_line(vm, "r3")
        type_line(vm, "f")
        type_line(vm, "nonsense")
        text = wait_until(
            lambda: (t := read_log(vm["log"])) and "unknown command" in t and t, 20, 0.02
        )
        assert "baton-guest echo w3 marker-from-the-guest" in text
        assert "baton-guest disk write sector=3 status=0" in text
        assert "baton-guest disk read sector=3 status=0 data=marker-from-the-guest" in text
        assert "baton-guest disk flush sector=0 status=0" in text
        with open(vm["disk"].path, "rb") as f:
            f.seek(3 * 512)
            assert f.read(22) == b"marker-from-the-guest\0"
        # heartbeat lines are never split by console traffic
        assert continuity_problems(beats(vm)) == []
    finally:
        w.quit()


def test_pause_resume_keeps_time_consistent(vm):
    w = worker(vm).start()
    try:
        wait_beats(vm, 5)
        paused = w.call("pause")
        assert paused["pause_us"] > 0
        with pytest.raises(RemoteError) as e:
            w.call("pause")
        assert e.value.code == Code.INVALID_STATE
        size = os.path.getsize(vm["log"])
        # Observe for ten tick periods: nothing may be printed while paused.
        deadline = time.monotonic() + 10 * TICK_MS / 1000
        while time.monotonic() < deadline:
            assert os.path.getsize(vm["log"]) == size, "the guest printed while paused"
            time.sleep(TICK_MS / 4000)
        before = beats(vm)
        t0 = time.monotonic()
        w.call("resume")
        after = wait_until(lambda: (b := beats(vm)) and len(b) >= len(before) + 10 and b, 30)
        elapsed = time.monotonic() - t0
        assert continuity_problems(after) == []
        # ticks after the resume advance at the tick rate, not in a burst
        gained = after[-1].ticks - before[-1].ticks
        assert gained <= elapsed * 1000 / TICK_MS + 3
    finally:
        w.quit()


def test_handoff_chain_of_50(vm):
    """A pauses and saves; B (already built, same RAM memfd) loads and resumes. 50 times."""
    current = worker(vm).start()
    wait_beats(vm, 3)
    type_line(vm, "w1 survives-fifty-handoffs")
    wait_until(lambda: "disk write sector=1 status=0" in read_log(vm["log"]), 20)
    pids = {current.pid}
    try:
        for i in range(50):
            nxt = worker(vm, incoming=True).start()
            assert nxt.call("status")["state"] == "incoming"
            seen = len(beats(vm))
            if i % 2:
                hand_off(current, nxt)
            else:  # through this process instead of a direct socket pair
                offer_lease(current, nxt)
                current.call("pause")
                blob = current.call("save")["state"]
                nxt.call("load", {"state": blob})
                nxt.call("resume")
            assert current.quit() == 0
            pids.add(nxt.pid)
            current = nxt
            wait_until(lambda s=seen: len(beats(vm)) > s, 20, 0.01, "heartbeat after a handoff")
        type_line(vm, "r1")
        # the whole line: the UART writes it byte by byte, one I/O exit each
        line = wait_until(
            lambda: re.search(r"disk read sector=1 [^\n]*\n", read_log(vm["log"])), 20
        )
        assert "data=survives-fifty-handoffs" in line.group(0)
        got = beats(vm)
        assert continuity_problems(got) == []
        assert len(pids) == 51
    finally:
        current.quit()


def _bad_states(good: bytes) -> dict[str, bytes]:
    env = msgpack.unpackb(good)
    body = msgpack.unpackb(env["body"])

    def rewrap(b: dict, **over) -> bytes:
        raw = msgpack.packb(b, use_bin_type=True)

        return msgpack.packb(
            {**env, "body": raw, "crc32": zlib.crc32(raw), **over}, use_bin_type=True
        )

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x40
    comps = body["components"]
    assert comps["vcpu"]["version"] == 2  # one record per vCPU
    rec = comps["vcpu"]["data"][0]
    vcpu0 = dict(state.decode(good)["vcpu"][0])  # the same vCPU as version 1's map

    def vcpu_v2(*records: object) -> bytes:
        return rewrap({"components": {**comps, "vcpu": {"version": 2, "data": list(records)}}})

    def header(flags: int = -1, cpuid: int = -1, xsave: int = -1) -> bytes:
        f, c, x, z = struct.unpack_from("<4I", rec)
        f, c, x = (
            (f if flags < 0 else flags),
            (c if cpuid < 0 else cpuid),
            (x if xsave < 0 else xsave),
        )
        return struct.pack("<4I", f, c, x, z) + rec[16:]

    lay = vcpu_record.parse(rec).lay
    nmsrs = struct.unpack_from("<I", rec, lay.msrs)[0]
    foreign = struct.pack("<IIQ", 0xDEAD0000, 0, 0)
    return {
        "record-not-bytes": vcpu_v2("x" * len(rec)),
        "record-truncated": vcpu_v2(rec[:-1]),
        "record-header-only": vcpu_v2(rec[:12]),
        "record-surplus": vcpu_v2(rec + bytes(16)),
        "record-unknown-flags": vcpu_v2(header(flags=0x80)),
        "record-cpuid-size": vcpu_v2(header(cpuid=41)),
        "record-xsave-size": vcpu_v2(header(xsave=100)),
        "record-too-many-msrs": vcpu_v2(
            rec[: lay.msrs] + struct.pack("<II", 5000, 0) + rec[lay.msrs + 8 :]
        ),
        "record-foreign-msr": vcpu_v2(
            rec[: lay.msrs] + struct.pack("<II", nmsrs + 1, 0) + rec[lay.msrs + 8 :] + foreign
        ),
        "record-xsave-bigger-than-host": vcpu_v2(
            header(xsave=1 << 16)[: lay.xsave] + bytes(1 << 16) + rec[lay.msrs :]
        ),
        "record-two-vcpus": vcpu_v2(rec, rec),
        "v1-sregs-wrong-size": rewrap(
            {
                "components": {
                    **comps,
                    "vcpu": {"version": 1, "data": [{**vcpu0, "sregs": vcpu0["sregs"][:200]}]},
                }
            }
        ),
        "corrupted": bytes(flipped),
        "truncated": good[: len(good) // 2],
        "empty-map": msgpack.packb({}),
        "not-msgpack": os.urandom(512),
        "bad-magic": rewrap(body, magic="qemu"),
        "too-new": rewrap({"components": {**comps, "serial": {**comps["serial"], "version": 99}}}),
        "too-old": rewrap({"components": {**comps, "vm": {**comps["vm"], "version": 0}}}),
        "missing-component": rewrap({"components": {k: v for k, v in comps.items() if k != "vm"}}),
        "unknown-component": rewrap({"components": {**comps, "gpu": {"version": 1, "data": {}}}}),
        "wrong-type": rewrap(
            {
                "components": {
                    **comps,
                    "serial": {"version": 1, "data": {**comps["serial"]["data"], "ier": "x"}},
                }
            }
        ),
        "huge-length": rewrap(
            {
                "components": {
                    **comps,
                    "vcpu": {"version": 1, "data": [{**vcpu0, "lapic": b"\0" * 70000}]},
                }
            }
        ),
        "short-regs": rewrap(
            {
                "components": {
                    **comps,
                    "vcpu": {"version": 1, "data": [{**vcpu0, "regs": b"\0" * 8}]},
                }
            }
        ),
        "extra-field": rewrap(
            {
                "components": {
                    **comps,
                    "i8042": {"version": 1, "data": {**comps["i8042"]["data"], "x": 1}},
                }
            }
        ),
        "two-vcpus": rewrap(
            {"components": {**comps, "vcpu": {"version": 1, "data": [vcpu0, vcpu0]}}}
        ),
        "other-ram": rewrap(
            {
                "components": {
                    **comps,
                    "machine": {
                        "version": 1,
                        "data": {**comps["machine"]["data"], "ram_size": 4 * MiB},
                    },
                }
            }
        ),
        "foreign-msr": rewrap(
            {
                "components": {
                    **comps,
                    "vcpu": {
                        "version": 1,
                        "data": [
                            {
                                **vcpu0,
                                "msrs": vcpu0["msrs"]
                                + (0xDEAD0000).to_bytes(4, "little")
                                + bytes(12),
                            }
                        ],
                    },
                }
            }
        ),
    }


def _frame(head: dict | bytes, recs: list[bytes], n: int = -1, sizes: list[int] | None = None):
    """A state frame (``state.encode_frame``'s layout) from its parts, any of them wrong."""
    h = head if isinstance(head, bytes) else msgpack.packb(head, use_bin_type=True)
    sizes = [len(r) for r in recs] if sizes is None else sizes
    return b"".join(
        [
            state.FRAME.pack(state.FRAME_MAGIC, len(h), 0, 0),
            h,
            state.VCPUS.pack(state.VCPUS_MAGIC, len(sizes) if n < 0 else n, 0, 0),
            struct.pack(f"<{len(sizes)}I", *sizes),
            *recs,
        ]
    )


def _bad_frames(good: bytes) -> dict[str, bytes]:
    """Hostile state frames (format 2), from a good format-1 state."""
    comps = msgpack.unpackb(msgpack.unpackb(good)["body"])["components"]
    rec = comps.pop("vcpu")["data"][0]
    head = {"writer": __version__, "components": comps}
    frame = _frame(head, [rec])
    assert frame == state.encode_frame(state.decode(good))  # this builder is the format
    lay = vcpu_record.parse(rec).lay
    nmsrs = struct.unpack_from("<I", rec, lay.msrs)[0]
    foreign = rec[: lay.msrs] + struct.pack("<II", nmsrs + 1, 0) + rec[lay.msrs + 8 :]
    foreign += struct.pack("<IIQ", 0xDEAD0000, 0, 0)
    end = state.head_length(frame)
    return {
        "frame-truncated": frame[:-1],
        "frame-truncated-in-head": frame[: end - 3],
        "frame-header-only": frame[: state.FRAME.size],
        "frame-surplus": frame + bytes(16),
        "frame-head-alone": frame[:end],
        "frame-head-length-wrong": frame[:8] + struct.pack("<I", end + 5) + frame[12:],
        "frame-header-reserved": frame[:12] + struct.pack("<I", 1) + frame[16:],
        "frame-no-vcpu-section-magic": frame[:end] + b"BATNVXXX" + frame[end + 8 :],
        "frame-vcpu-count-wrong": _frame(head, [rec], n=2),
        "frame-too-many-vcpus": _frame(head, [rec] * 9),
        "frame-record-size-wrong": _frame(head, [rec], sizes=[len(rec) + 16]),
        "frame-record-surplus": _frame(head, [rec + bytes(16)]),
        "frame-record-truncated": _frame(head, [rec[:-1]]),
        "frame-record-header-only": _frame(head, [rec[:16]]),
        "frame-record-unknown-flags": _frame(head, [struct.pack("<I", 0x80) + rec[4:]]),
        "frame-wrong-msr-set": _frame(head, [foreign]),
        "frame-two-vcpus": _frame(head, [rec, rec]),
        "frame-no-vcpus": _frame(head, []),
        "frame-head-not-msgpack": _frame(os.urandom(64), [rec]),
        "frame-head-carries-vcpu": _frame(
            {**head, "components": {**comps, "vcpu": {"version": 2, "data": [rec]}}}, [rec]
        ),
        "frame-head-missing-component": _frame(
            {**head, "components": {k: v for k, v in comps.items() if k != "vm"}}, [rec]
        ),
        "frame-head-extra-key": _frame({**head, "vcpu": [len(rec)]}, [rec]),
        "frame-head-bad-field": _frame(
            {
                **head,
                "components": {
                    **comps,
                    "serial": {"version": 1, "data": {**comps["serial"]["data"], "ier": "x"}},
                },
            },
            [rec],
        ),
        "frame-other-vm": _frame(
            {
                **head,
                "components": {
                    **comps,
                    "machine": {"version": 1, "data": {**comps["machine"]["data"], "name": "vm9"}},
                },
            },
            [rec],
        ),
    }


def test_hostile_state_is_refused_and_vm_untouched(vm):
    w = worker(vm).start()
    try:
        wait_beats(vm, 3)
        w.call("pause")
        good = w.call("save")["state"]
        with pytest.raises(RemoteError) as e:
            w.call("load", {"state": "not bytes"})
        assert e.value.code == Code.BAD_REQUEST
        for name, blob in _bad_states(good).items():
            with pytest.raises(RemoteError) as e:
                w.call("load", {"state": blob})
            assert e.value.code in (Code.BAD_REQUEST, Code.INCOMPATIBLE), name
            assert "state" in e.value.message or "version" in e.value.message, (name, e.value)
            assert w.call("status")["state"] == "paused", name
        for name, blob in _bad_frames(good).items():  # the handoff's frame (format 2)
            with pytest.raises(RemoteError) as e:
                w.call("load", {"state": blob})
            assert e.value.code in (Code.BAD_REQUEST, Code.INCOMPATIBLE), name
            assert "state" in e.value.message or "version" in e.value.message, (name, e.value)
            assert w.call("status")["state"] == "paused", name
        # the same state as a good frame loads (and changes nothing)
        w.call("load", {"state": state.encode_frame(state.decode(good))})
        assert _vcpu_regs(w.call("save")["state"]) == _vcpu_regs(good)
        # valid, but KVM refuses it (a non-canonical kernel GS base) part-way
        # through its batch of SETs: the previous state is put back
        with pytest.raises(RemoteError) as e:
            w.call("load", {"state": _kvm_refuses(good)})
        assert "previous state restored" in e.value.message, e.value
        assert "0xc0000102" in e.value.message, e.value
        assert w.call("status")["state"] == "paused"
        # untouched: the saved state is still exactly what it was
        assert _vcpu_regs(w.call("save")["state"]) == _vcpu_regs(good)
        w.call("resume")
        n = len(beats(vm))
        wait_until(lambda: len(beats(vm)) >= n + 5, 20)
        assert continuity_problems(beats(vm)) == []
        with pytest.raises(RemoteError) as e:
            w.call("load", {"state": good})  # not while running
        assert e.value.code == Code.INVALID_STATE
        # an incoming worker refuses a bad state, then still takes the good one
        w.call("pause")
        good = w.call("save")["state"]
        nxt = worker(vm, incoming=True).start()
        with pytest.raises(RemoteError):
            nxt.call("load", {"state": _bad_states(good)["too-new"]})
        nxt.call("load", {"state": good})
        # without the supervisor's offer it may not take the guest, and nothing ran
        with pytest.raises(RemoteError) as e:
            nxt.call("resume")
        assert "not offered to this worker" in e.value.message, e.value
        assert nxt.call("status")["state"] == "paused" and nxt.call("status")["exits"] == 0
        offer_lease(w, nxt)
        nxt.call("resume")
        w.quit()
        w = nxt
        n = len(beats(vm))
        wait_until(lambda: len(beats(vm)) >= n + 3, 20)
        assert continuity_problems(beats(vm)) == []
    finally:
        w.quit()


def _kvm_refuses(good: bytes) -> bytes:
    """``good`` with MSR_KERNEL_GS_BASE (0xc0000102) set to a non-canonical
    address: it passes every check before KVM, and KVM_SET_MSRS refuses it."""
    parts = state.decode(good)
    v = dict(parts["vcpu"][0])
    at = kvm.msr_indices(v["msrs"]).index(0xC0000102) * kvm.MSR_ENTRY
    msrs = v["msrs"][: at + 8] + (1 << 63).to_bytes(8, "little")
    v["msrs"] = msrs + v["msrs"][at + 16 :]
    parts["vcpu"] = [vcpu_record.from_fields(v)]
    return state.encode(parts)


def _vcpu_regs(blob: bytes) -> bytes:
    return state.decode(blob)["vcpu"][0]["regs"]


def test_control_errors_are_replies(vm):
    w = worker(vm).start()
    try:
        for op, args, code in [
            ("no.such.op", {}, Code.UNKNOWN_OP),
            ("save", {"versions": {"serial": "one"}}, Code.BAD_REQUEST),
            ("load", {}, Code.BAD_REQUEST),
            ("resume", {}, Code.INVALID_STATE),
            ("handoff.receive", {"timeout_ms": 0}, Code.BAD_REQUEST),
            ("handoff.send", {}, Code.FD_MISMATCH),
        ]:
            with pytest.raises(RemoteError) as e:
                w.call(op, args)
            assert e.value.code == code, (op, e.value)
        r, wfd = os.pipe()
        with pytest.raises(RemoteError) as e:
            w.call("handoff.send", {}, [r])
        assert e.value.code == Code.BAD_REQUEST and "socket" in e.value.message
        os.close(r)
        os.close(wfd)
        assert w.call("status")["state"] == "running"
    finally:
        w.quit()


def test_no_fd_or_thread_leak_over_100_cycles(vm):
    w = worker(vm).start()
    try:
        wait_beats(vm, 2)

        def cycle() -> None:
            w.call("pause")
            blob = w.call("save")["state"]
            w.call("load", {"state": blob})
            w.call("resume")

        cycle()
        base = w.call("status")
        for _ in range(100):
            cycle()
        end = w.call("status")
        assert end["open_fds"] == base["open_fds"]
        assert end["threads"] == base["threads"]
        n = len(beats(vm))
        wait_until(lambda: len(beats(vm)) >= n + 3, 20)
        assert continuity_problems(beats(vm)) == []
    finally:
        w.quit()


def test_guest_reboot_request_stops_the_worker_cleanly(vm):
    w = worker(vm).start()
    wait_beats(vm, 2)
    type_line(vm, "reboot")
    assert w.proc.wait(20) == WorkerExit.GUEST_RESET
    assert not w.control_path.exists()


def test_without_kvm_the_worker_says_so(vm):
    w = worker(vm, env={"BATON_KVM_DEVICE": "/nonexistent/kvm"})
    with pytest.raises(RuntimeError) as e:
        w.start()
    assert "cannot open /nonexistent/kvm" in str(e.value)
    assert w.proc.wait(10) == WorkerExit.NO_KVM


def test_guest_image_builds_reproducibly(tmp_path: Path):
    src = Path(__file__).resolve().parent.parent / "vmm" / "guest"
    outs = []
    for n in ("a", "b"):
        out = tmp_path / n
        out.mkdir()
        subprocess.run(["make", "-s", "-C", str(src), f"OUT={out}"], check=True)
        outs.append((out / "guest.bin").read_bytes())
    assert outs[0] == outs[1]
    from importlib import resources

    assert resources.files("vmm.guest").joinpath("guest.bin").read_bytes() == outs[0]


def test_worker_usage_errors():
    out = subprocess.run(
        [sys.executable, "-m", "vmm.worker", "--vm", "../x"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "not a valid VM name" in out.stderr


def test_handoff_refuses_a_dead_old_worker(vm):
    """The new worker's receive fails cleanly if the old side closes the channel."""
    nxt = worker(vm, incoming=True).start()
    try:
        a, b = wire.make_seqpacket_pair()
        rid = nxt.conn.send_request("handoff.receive", {"timeout_ms": 5000}, [b.fileno()])
        b.close()
        a.close()
        with pytest.raises(RemoteError) as e:
            nxt.conn.wait_reply(rid)
        assert e.value.code == Code.UNAVAILABLE
        assert nxt.call("status")["state"] == "incoming"
    finally:
        nxt.quit()


def test_pio_bus_routes_by_port_and_refuses_overlaps():
    from vmm import bus
    from vmm.devices import i8042

    seen = []

    class Dev:
        def pio_read(self, offset, size):
            return 0x40 + offset

        def pio_write(self, offset, size, value):
            seen.append((offset, size, value))

    b = bus.PioBus()
    dev = Dev()
    b.register(dev, 0x3F8, 8)
    b.register(dev, 0x64, 1, i8042.COMMAND)
    assert b.read(0x3FA, 1) == 0x42 and b.read(0x64, 1) == 0x40 + i8042.COMMAND
    assert b.read(0x3F7, 1) == 0xFF and b.read(0x61, 2) == 0xFFFF  # unclaimed: all ones
    b.write(0x3FF, 1, 7)
    b.write(0x400, 1, 9)  # unclaimed: dropped
    assert seen == [(7, 1, 7)]
    with pytest.raises(bus.BusError):
        b.register(dev, 0x3FF, 2)
    m = bus.MmioBus()
    assert m.read(0xFEE00000, 4) == b"\xff" * 4  # no MMIO device yet


def test_device_state_is_saved_and_restored_from_its_one_field_list(tmp_path: Path):
    from vmm.devices import i8042
    from vmm.devices.block import BLOCK_STATE, Block
    from vmm.devices.serial import SERIAL_STATE, Serial

    a, b = Serial(lambda level: None, None, None), Serial(lambda level: None, None, None)
    try:
        a.pio_write(7, 1, 0x5A)  # scratch register
        a.pio_write(4, 1, 0x10)  # loopback: the byte lands in a's receive FIFO
        a.pio_write(0, 1, ord("x"))
        saved = a.save()
        assert list(saved) == list(SERIAL_STATE.fields) and saved["rx"] == b"x"
        b.restore(SERIAL_STATE.read(1, saved))
        assert b.save() == saved and b.pio_read(7, 1) == 0x5A
    finally:
        a.close()
        b.close()
    resets = []
    k = i8042.I8042(lambda: resets.append(1))
    k.pio_write(i8042.DATA, 1, i8042.CMD_RESET)  # the data port: no command, no reset
    k.pio_write(i8042.COMMAND, 1, 0x20)
    assert k.save() == {"command": 0x20, "reset_requested": False} and not resets
    assert list(k.save()) == list(i8042.I8042_STATE.fields)
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    fd = os.open(img, os.O_RDWR)
    try:
        d = Block("disk0", fd, None, read_only=True)
        d.restore({**d.save(), "capacity_sectors": 1, "read_only": False, "reads": 5})
        # the disk's own description is never restored over it; its counters are
        assert (d.capacity_sectors, d.read_only, d.reads) == (8, True, 5)
        assert list(d.save()) == list(BLOCK_STATE.fields)
    finally:
        os.close(fd)


def test_compiled_state_reader_agrees_with_the_generic_checker():
    """Each component version's straight-line reader accepts exactly what the
    generic checker accepts, returns the same instance (defaults for newer
    fields), and on anything else the error is the generic checker's own."""
    from baton.schema import U8, U64, Bool, Int, Nullable, Str
    from vmm.state import Component, F, RawArray

    comp = Component(
        "t",
        version=2,
        min_version=1,
        fields={
            "n": F(Int(1, 8)),
            "big": F(U64),
            "flag": F(Bool()),
            "raw": F(RawArray(0, 64, entry=16)),
            "name": F(Str(8)),
            "opt": F(Nullable(U64)),
            "added": F(U8, since=2, default=7),
        },
    )
    good = {"n": 3, "big": 2**64 - 1, "flag": True, "raw": bytes(32), "name": "a", "opt": None}
    assert comp.read(1, good) == {**good, "added": 7}
    assert comp.read(2, {**good, "added": 9}) == {**good, "added": 9}
    assert comp.read(2, {**good, "added": 9}) == comp._check_one(2, {**good, "added": 9}, "t")
    bad = {
        "missing": {k: v for k, v in good.items() if k != "big"},
        "extra": {**good, "x": 1},
        "newer field at v1": {**good, "added": 1},
        "bool as int": {**good, "n": True},
        "int out of range": {**good, "n": 9},
        "negative": {**good, "big": -1},
        "int as bool": {**good, "flag": 1},
        "str as bytes": {**good, "raw": "x" * 32},
        "partial entry": {**good, "raw": bytes(20)},
        "too long": {**good, "raw": bytes(80)},
        "long name": {**good, "name": "x" * 9},
        "not a map": [good],
    }
    for why, data in bad.items():
        assert comp._fast_readers[1](data) is None, why
        with pytest.raises(state.StateError) as refused:
            comp.read(1, data)
        with pytest.raises(Exception) as generic:
            comp._check_one(1, data, "t")
        assert str(refused.value) == str(generic.value), why


def test_the_handoff_record_read_in_c_matches_save_record_and_says_what_it_cannot():
    """``baton_save_vcpus`` reads a parked vCPU's record as ``Vcpu.save_record`` does;
    classic sregs that are not complete leave it to Python (sregs2), a GET that fails
    is raised as ``save_record`` would raise it, and each vCPU is read once."""
    import errno

    from vmm._kvm import ffi, lib

    from vmm import vcpu_record

    with small_machine() as m:
        v = m.vcpus[0]
        m.boot()
        wait_until(lambda: v.exits_total > 20, 10, 0.01, "the guest to run")
        m.pause()
        slot = ffi.new("struct baton_save_vcpu *")
        v.save_slot(slot)
        v.arm_slot(slot)
        assert lib.baton_save_vcpus(slot, 1) == 1 and lib.baton_save_vcpus(slot, 1) == 0
        assert lib.baton_save_wait(slot, 1, 0, 1_000_000) == 1
        got = bytes(v.slot_record(slot))
        want = v.save_record()
        lay = want.lay
        for at, size in ((lay.regs, vcpu_record.SIZE["regs"]), (lay.xsave, lay.xsave_len)):
            assert got[at : at + size] == want.raw[at : at + size]
        assert got[: lay.regs] == want.raw[: lay.regs]  # header and CPUID
        if v.has_sync_regs and v.has_sregs2:
            sr = ffi.cast("struct kvm_sregs *", v._sync_sregs)
            saved = bytes(ffi.buffer(sr))
            sr.efer &= ~(1 << 10)  # as if under PAE paging outside long mode
            sr.cr4 |= 1 << 5
            sr.cr0 |= 1 << 31
            v.save_slot(slot)
            v.arm_slot(slot)
            lib.baton_save_vcpus(slot, 1)
            assert lib.baton_save_wait(slot, 1, 0, 1_000_000) == 2
            assert slot.state == lib.BATON_SAVE_SREGS2
            ffi.memmove(sr, saved, len(saved))
        v.save_slot(slot)
        slot.fd = -1  # every GET fails: EBADF, named
        lib.baton_save_vcpus(slot, 1)
        assert lib.baton_save_wait(slot, 1, 0, 1_000_000) == 2
        with pytest.raises(OSError, match="KVM_GET_SREGS") as e:
            v.slot_record(slot)
        assert e.value.errno == errno.EBADF
        m.resume()


def test_sync_regs_capture_matches_the_ioctls_and_knows_its_limits():
    """A parked vCPU's regs and sregs as KVM left them in kvm_run equal what the
    GET ioctls read; regs, sregs and events go back in one sync-regs run, only on
    the vCPU's own thread; setting anything drops the copy; classic sregs are not
    complete under PAE paging outside long mode (PDPTRs)."""
    import threading

    from vmm._kvm import ffi

    from vmm import vcpu_state

    with small_machine() as m:
        v = m.vcpus[0]
        if not v.has_sync_regs:
            pytest.skip("this KVM lacks KVM_CAP_SYNC_REGS")
        m.boot()
        wait_until(lambda: v.exits_total > 20, 10, 0.01, "the guest to run")
        m.pause()
        got: dict = {}

        def on_vcpu_thread() -> None:
            got["captured"] = v.captured()
            got["ioctls"] = (v.get_regs(), v.get_classic_sregs())
            got["events"] = v.get_events()
            got["saved"] = vcpu_state.save(v)
            regs, sregs = got["captured"]
            v.apply_synced(regs, sregs, got["events"])  # the same values back: a no-op
            got["after"] = (v.get_regs(), v.get_classic_sregs(), v.get_events(), v.captured())
            done.set()

        done = threading.Event()
        v.post_task(on_vcpu_thread)
        assert done.wait(10)
        cap, ioctls = got["captured"], got["ioctls"]
        assert cap is not None
        assert cap == ioctls
        assert got["saved"]["sregs_kind"] == "sregs" and got["saved"]["regs"] == ioctls[0]
        assert got["after"] == (*ioctls, got["events"], None)
        with pytest.raises(RuntimeError, match="own thread"):
            v.apply_synced(*cap, got["events"])  # from this thread: refused before KVM is touched
        assert v.captured_sregs_complete()  # the built-in guest runs in long mode
        sr = ffi.cast("struct kvm_sregs *", v._sync_sregs)
        sr.efer &= ~(1 << 10)  # as if under PAE paging outside long mode
        sr.cr4 |= 1 << 5
        sr.cr0 |= 1 << 31
        assert not v.captured_sregs_complete()
        m.resume()
        wait_until(lambda: v.captured() is None, 5, 0.01, "the copy dropped on resume")


@pytest.mark.parametrize("frame", [False, True])
def test_no_garbage_collection_inside_an_in_process_handoff(frame: bool):
    """The cyclic collector is off from the warm-up to the resume on both sides of
    a handoff (``machine.collector_paused``), on again afterwards, and the guest
    runs on in the new machine; with the state frame too (two sections)."""
    import gc

    from vmm.machine import Machine, MachineSpec
    from vmm.vcpu import install_kick_handler

    install_kick_handler()
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 64 * MiB)
    spec = MachineSpec("t", tick_ns=int(TICK_MS * 1e6))
    seen: dict[str, bool] = {}
    src = Machine(spec, {"ram": fd})
    dst: Machine | None = None
    try:
        src.boot()
        wait_until(lambda: src.vcpus[0].exits_total > 20, 10, 0.01, "the guest to run")
        assert gc.isenabled()
        dst = Machine(spec, {"ram": fd})
        dst.mark_incoming()
        box: list[bytes] = []

        def send(pieces: list) -> None:
            seen["send"] = gc.isenabled()
            box.append(b"".join(pieces))

        def receive() -> bytes:
            seen["receive"] = gc.isenabled()
            return box.pop(0)

        out = src.handoff_out(send, None, frame=frame)
        assert out["state_format"] == ("frame" if frame else "v1")
        assert len(box) == 1  # one vCPU: even the frame goes whole (no head ahead of it)
        assert gc.isenabled(), "the collector is back on once the state has left"
        dst.handoff_in(receive, time.monotonic_ns() + 5_000_000_000)
        assert seen == {"send": False, "receive": False}
        assert gc.isenabled()
        ran = dst.vcpus[0].exits_total
        wait_until(lambda: dst.vcpus[0].exits_total > ran + 5, 10, 0.01, "the guest to run on")
    finally:
        src.close()
        if dst is not None:
            dst.close()
        os.close(fd)


def test_frame_vcpu_scan_in_c_accepts_only_what_python_accepts():
    """The frame's vCPU section read and checked in one C call
    (``vcpu_state.FrameReader``, the handoff's fast path): it takes a good section
    (records equal to ``state.decode_vcpus``'s), and for every hostile frame and
    every flipped byte of the section's headers it either declines (the Python
    path then refuses, saying why) or accepts what the Python path accepts too."""
    from vmm import vcpu_state

    with small_machine() as m:
        good = state.encode(m._collect())
        frame = state.encode_frame(state.decode(good))
        end = state.head_length(frame)
        reader = m._frame_reader
        got = reader.read(frame[end:])
        want = state.decode_vcpus(frame[end:])
        assert got is not None, "the fast path declines this VM's own frame"
        assert [(r.raw, r.lay, r.nmsrs) for r in got] == [(r.raw, r.lay, r.nmsrs) for r in want]
        readable = set(m.vcpus[0].msr_indices)

        def python_accepts(section: bytes) -> bool:
            try:
                recs = state.decode_vcpus(section)
                if len(recs) != len(m.vcpus):
                    return False
                for i, (v, r) in enumerate(zip(m.vcpus, recs, strict=True)):
                    vcpu_state.check(v, r, i, readable)
            except state.StateError:
                return False
            return True

        sections = {n: b[state.head_length(b) :] for n, b in _bad_frames(good).items()}
        section = frame[end:]
        rec_at = state.VCPUS.size + 4
        lay = want[0].lay
        for i in [*range(rec_at + 16), *range(rec_at + lay.msrs, rec_at + lay.msrs + 24)]:
            flipped = bytearray(section)
            flipped[i] ^= 0x41
            sections[f"flipped-{i}"] = bytes(flipped)
        sections["truncated"] = section[:-1]
        sections["surplus"] = section + bytes(16)
        refused = 0
        for name, sec in sections.items():
            if not python_accepts(sec):
                refused += 1
                assert reader.read(sec) is None, name
        assert refused > 40  # the mutations above are mostly refused: they test something
        assert python_accepts(section) and reader.read(section) is not None
