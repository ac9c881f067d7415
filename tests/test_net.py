"""baton-vmm's NIC with real daemons and real taps, in the test's own network
namespace (tests/netns.py): the host sends numbered frames into the VM's tap
at 1,000 a second and the built-in guest echoes each one (MACs swapped,
payload intact) while the VM is upgraded, and while the supervisor and the
broker are restarted. Every frame must come back exactly once, in order; the
tap (its ifindex) never changes; it is gone after vmctl stop."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import WORKER, version_at
from netns import isolated

from baton.paths import Paths
from baton_lab.harness import Host, wait_until
from baton_lab.netlab import Traffic
from supervisor import netdev

pytestmark = pytest.mark.kvm
VM = "n1"
TAP = "bt-n1-0"
MAC = "52:54:00:00:00:42"


#: the last commit whose guest and NIC knew only ring layout 1 (one OUT per frame)
OLD_NIC = "e53c063"


@pytest.fixture(scope="module")
def old_worker_if_any(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """A real worker from before ring layout 2: its NIC and built-in guest (None in
    a checkout without that commit: a shallow clone)."""
    dest = tmp_path_factory.mktemp("old-nic")
    return version_at(dest, "0.0.9", OLD_NIC, ["vmm/devices/net.py", "vmm/guest/guest.S"])


@pytest.fixture
def old_worker(old_worker_if_any: str | None) -> str:
    if old_worker_if_any is None:  # here, not in the test: its body runs in a child
        pytest.skip(f"this checkout lacks commit {OLD_NIC} (a shallow clone)")
    return old_worker_if_any


def write_vm(root: Path, worker: str | None = None) -> None:
    path = Paths(root).vms_dir / f"{VM}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    nic = f'[[net]]\nname = "net0"\nmac = "{MAC}"\n'
    cmd = f"worker = {json.dumps(worker.split())}\n" if worker else ""
    path.write_text(f"memory_mib = 16\ntick_ms = 50\nautostart = false\n{cmd}\n{nic}")


def start(root: Path, worker: str | None = None) -> tuple[Host, int]:
    write_vm(root, worker)
    host = Host.start(root, vm=VM)
    r = host.vmctl("start", VM)
    assert r.returncode == 0, r.stderr
    host.wait_beats(2)
    link = netdev.lookup(TAP)
    assert link is not None and link.up and link.queue == netdev.TAP_QUEUE
    return host, link.index


def flowing(t: Traffic, n: int = 50) -> None:
    """Wait until ``n`` more echoes came back than now."""
    have = len(t.echoes)
    wait_until(lambda: len(t.echoes) >= have + n, 20, 0.01, f"{n} more echoes")


def same_tap_and_flowing(t: Traffic, index: int) -> None:
    link = netdev.lookup(TAP)
    assert link is not None and link.index == index, "the tap changed"
    flowing(t)


def finish(host: Host, t: Traffic, index: int) -> None:
    # at least a second of traffic at 1000/s crossed the upgrades (they may be quicker)
    wait_until(lambda: t.sent >= 1000, 20, 0.01, "1000 frames sent")
    t.stop()
    t.drain()
    assert t.problems() == [], t.problems()
    assert t.sent >= 1000
    link = netdev.lookup(TAP)
    assert link is not None and link.index == index, "the tap changed"
    nic = host.status(VM)["nets"][0]
    assert nic["tap"] == TAP and nic["mac"] == MAC
    beats = host.more_beats(2)
    assert beats[-1].rx >= t.sent and beats[-1].tx >= t.sent, host.console_text()[-3000:]
    # what an operator sees: the NIC (tap, MAC, bridge, both sides' counters), its fd
    text = host.vmctl("status", VM).stdout
    assert f"net0       tap {TAP}, mac {MAC}, no bridge" in text, text
    assert f"host: ifindex {index}, up, to guest " in text, text
    assert f"dropped, queue {netdev.TAP_QUEUE}), from guest " in text, text
    assert "device: rx " in text and "(0 dropped), tx " in text, text
    (row,) = [line for line in host.vmctl("fds", VM).stdout.splitlines() if "tap-net0" in line]
    assert " tun " in f" {row} " and TAP in row and " held " in f" {row} ", row
    r = host.vmctl("stop", VM)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: netdev.lookup(TAP) is None, 10, 0.05, "the tap to go with the VM")


@isolated(timeout=170)
def test_every_frame_echoed_once_in_order_across_10_upgrades(root, old_worker_if_any):
    """And then this guest (ring layout 2) is not handed to a worker from before
    layout 2: refused before the pause, every frame still echoed."""
    host, index = start(root)
    with host:
        t = Traffic(TAP, MAC, rate=1000).start()
        flowing(t)
        blackouts = []
        for i in range(10):
            rc, report = host.upgrade()
            assert rc == 0 and report["outcome"] == "committed", report
            blackouts.append(report["blackout_ms"])
            link = netdev.lookup(TAP)
            assert link is not None and link.index == index, f"the tap changed at upgrade {i}"
            flowing(t, 20)
        if old_worker_if_any is not None:  # without it the 10 upgrades still count
            rc, report = host.upgrade(worker=old_worker_if_any)
            assert rc == 4 and report["outcome"] == "aborted", report
            want = "net: the old worker writes versions 2..2, the new worker reads 1..1"
            assert want in report["reason"], report
            flowing(t)
        finish(host, t, index)
        print(f"blackouts {blackouts} ms; longest echo gap {t.longest_gap() * 1000:.1f} ms")


@isolated(timeout=170)
def test_no_frame_lost_across_supervisor_and_broker_restarts(root):
    host, index = start(root)
    with host:
        t = Traffic(TAP, MAC, rate=1000).start()
        flowing(t)
        host.restart_daemons(lambda: same_tap_and_flowing(t, index), {"ram", "tap-net0"})
        rc, report = host.upgrade()  # and the VM still upgrades after all of that
        assert rc == 0 and report["outcome"] == "committed", report
        flowing(t)
        finish(host, t, index)


@isolated(timeout=170)
def test_a_guest_booted_by_an_older_worker_keeps_its_nic_across_versions(root, old_worker):
    """The VM boots on a worker from before ring layout 2 (its guest, in its RAM,
    drives layout 1 for life); this worker takes it over and serves layout 1 (the
    net state travels as version 1), hands it back, and takes it again."""
    host, index = start(root, old_worker)
    with host:
        t = Traffic(TAP, MAC, rate=1000).start()
        flowing(t)
        for worker, version in ((WORKER, "0.1.0"), (old_worker, "0.0.9"), (WORKER, "0.1.0")):
            rc, report = host.upgrade(worker=worker)
            assert rc == 0 and report["outcome"] == "committed", report
            assert report["new_version"] == version and report["state_versions"]["net"] == 1
            flowing(t)
        finish(host, t, index)


def test_both_ring_layouts_and_the_state_that_says_which():
    """The device alone, on a datagram socket pair standing in for the tap (one
    frame per read and write, as a tap gives). Layout 1 is what a guest booted
    by an older worker drives (one OUT per echoed frame) and keeps driving
    after an upgrade; layout 2 sends a batch per doorbell. A full ring leaves
    frames in the fd's queue. A version-1 state means layout 1; a layout-2
    state is never written as version 1 (an older worker would misread it)."""
    import socket

    from baton_lab.netlab import HOST_MAC, frame
    from vmm import state
    from vmm.devices import net
    from vmm.memory import GuestMemory

    ram_fd = os.memfd_create("ram")
    os.ftruncate(ram_fd, 4 << 20)
    mem = GuestMemory(ram_fd)
    host_end, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    host_end.settimeout(5)
    levels: list[int] = []
    nic = net.Net("net0", MAC, dev_end.fileno(), mem, levels.append)
    area, slot0 = 0x120000, 0x120000 + net.SLOT_BASE

    def u32(gpa: int) -> int:
        return int.from_bytes(mem.read(gpa, 4), "little")

    def send(seqs: range) -> None:
        for s in seqs:
            host_end.send(frame(MAC, HOST_MAC, s))

    def received(n: int) -> list[int]:
        return [int.from_bytes(host_end.recv(2048)[14:22], "big") for _ in range(n)]

    try:
        nic.start()
        nic.unquiesce()
        # layout 1: 20 frames into a 16-slot ring; 4 wait in the fd's queue
        nic.pio_write(net.REG_AREA, 4, area)
        assert mem.read(area + 8, 6) == bytes.fromhex(MAC.replace(":", ""))
        send(range(20))
        wait_until(lambda: u32(area) == 16, 10, 0.01, "16 frames in the ring")
        assert levels == [1] and nic.rx_frames == 16
        for i in range(16):
            nic.pio_write(net.REG_TX, 4, slot0 + i * net.SLOT_SIZE)
        assert received(16) == list(range(16)) and u32(slot0 + 4) == net.TX_OK
        mem.write(area + 4, (16).to_bytes(4, "little"))
        nic.pio_write(net.REG_ACK, 4, 0)
        wait_until(lambda: u32(area) == 20, 10, 0.01, "the 4 that waited")
        saved = nic.save()
        assert saved["layout"] == 1 and levels == [1, 0, 1]
        v1 = state.components()["net"].write([saved], 1)
        assert "layout" not in v1["data"][0]
        assert state.components()["net"].read(1, v1["data"])[0]["layout"] == 1
        # layout 2: a new area, 70 frames: 64 slots, one doorbell sends them all
        mem.zero(area, net.AREA_SIZE)
        nic.pio_write(net.REG_AREA, 4, area | net.AREA_LAYOUT2)
        send(range(100, 170))
        wait_until(lambda: u32(area) == 64, 10, 0.01, "64 frames in the ring")
        for i in range(64):
            mem.write(area + net.TX_DESC + 4 * i, (slot0 + i * net.SLOT_SIZE).to_bytes(4, "little"))
        mem.write(area + net.TX_HEAD, (64).to_bytes(4, "little"))
        sent_before = nic.tx_frames
        nic.pio_write(net.REG_BELL, 4, 64)
        assert received(64) == list(range(100, 164))
        assert u32(area + 4) == 64 and u32(area + net.TX_HEAD + 4) == 64  # rx_tail, tx_tail
        assert u32(area + net.TX_HEAD + 8) == sent_before + 64 == nic.tx_frames  # tx_ok
        wait_until(lambda: u32(area) == 70, 10, 0.01, "the 6 that waited")
        assert levels[-2:] == [0, 1]  # the doorbell lowered the line; the 6 raised it
        saved = nic.save()
        assert saved["layout"] == 2
        assert state.components()["net"].oldest_for([saved]) == 2
        with pytest.raises(state.IncompatibleState, match="layout = 2 needs version 2"):
            state.components()["net"].write([saved], 1)
        v2 = state.components()["net"].write([saved], 2)
        other = net.Net("net0", MAC, dev_end.fileno(), mem, levels.append)
        try:
            other.restore(state.components()["net"].read(2, v2["data"])[0])
            assert (other.layout, other.slots, other.area) == (2, 64, area)
        finally:
            other.close()
    finally:
        nic.close()
        mem.close()
        os.close(ram_fd)
        host_end.close()
        dev_end.close()
