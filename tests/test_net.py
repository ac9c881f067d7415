"""baton-vmm's NIC with real daemons and real taps, in the test's own network
namespace (tests/netns.py): the host sends numbered frames into the VM's tap
at 1,000 a second and the built-in guest echoes each one (MACs swapped,
payload intact) while the VM is upgraded, and while the supervisor and the
broker are restarted. Every frame must come back exactly once, in order; the
tap (its ifindex) never changes; it is gone after vmctl stop."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from netns import isolated

from baton.paths import Paths
from baton_lab.harness import Host, wait_until
from baton_lab.netlab import Traffic
from supervisor import netdev

pytestmark = pytest.mark.kvm
VM = "n1"
TAP = "bt-n1-0"
MAC = "52:54:00:00:00:42"


def write_vm(root: Path) -> None:
    path = Paths(root).vms_dir / f"{VM}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    nic = f'[[net]]\nname = "net0"\nmac = "{MAC}"\n'
    path.write_text(f"memory_mib = 16\ntick_ms = 50\nautostart = false\n\n{nic}")


def start(root: Path) -> tuple[Host, int]:
    write_vm(root)
    host = Host.start(root, vm=VM)
    r = host.vmctl("start", VM)
    assert r.returncode == 0, r.stderr
    host.wait_beats(2)
    link = netdev.lookup(TAP)
    assert link is not None and link.up
    return host, link.index


def flowing(t: Traffic, n: int = 50) -> None:
    """Wait until ``n`` more echoes came back than now."""
    have = len(t.echoes)
    wait_until(lambda: len(t.echoes) >= have + n, 20, 0.01, f"{n} more echoes")


def finish(host: Host, t: Traffic, index: int) -> None:
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
    r = host.vmctl("stop", VM)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: netdev.lookup(TAP) is None, 10, 0.05, "the tap to go with the VM")


@isolated(timeout=170)
def test_every_frame_echoed_once_in_order_across_10_upgrades(root):
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
        finish(host, t, index)
        print(f"blackouts {blackouts} ms; longest echo gap {t.longest_gap() * 1000:.1f} ms")


@isolated(timeout=170)
def test_no_frame_lost_across_supervisor_and_broker_restarts(root):
    host, index = start(root)
    with host:
        t = Traffic(TAP, MAC, rate=1000).start()
        flowing(t)
        # the supervisor: kill -9, then a new one adopts the worker
        host.sup.kill9()
        flowing(t)
        host.supervisor()
        host.wait_state("running")
        flowing(t)
        # the broker upgrades itself in place
        r = host.vmctl("broker", "upgrade")
        assert r.returncode == 0, r.stderr
        flowing(t)
        # the broker dies; a new one gets every fd back from the supervisor and workers
        host.broker.kill9()
        flowing(t)
        host.broker.start()
        with host.broker.client() as c:
            wait_until(
                lambda: (
                    {f["name"] for f in c.list_fds(VM) if f["state"] == "held"}
                    >= {"ram", "tap-net0"}
                ),
                20,
                0.1,
                "the tap back in the new broker",
            )
        flowing(t)
        rc, report = host.upgrade()  # and the VM still upgrades after all of that
        assert rc == 0 and report["outcome"] == "committed", report
        flowing(t)
        time.sleep(0.2)
        finish(host, t, index)
