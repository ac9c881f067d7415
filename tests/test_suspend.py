"""vmctl suspend / resume with real daemons: a VM saved to disk survives every Baton
process (the broker too, so every memfd) and runs on exactly where it was."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from test_supervisor import write_vm

from baton_lab.harness import BrokerProcess, Host, processes_under
from supervisor import ramimage
from vmm.guest import continuity_problems

pytestmark = pytest.mark.kvm
WAIT = 30.0


def image(host: Host, vm: str) -> Path:
    return host.paths.suspend_dir / vm


def suspended(host: Host, vm: str) -> None:
    st = host.status(vm)
    assert st["state"] == "suspended", st
    assert (image(host, vm) / ramimage.MANIFEST).exists()


def disk_echo(host: Host, vm: str, line: str, expect: str) -> None:
    host.type_line(line, vm)
    wait_until(lambda: expect in host.console_text(vm), WAIT, 0.05, f"{expect!r} from {vm}")


def test_suspend_all_kill_everything_resume_where_it_was(host: Host) -> None:
    root = host.root
    write_vm(root, "a", autostart=True, tick_ms=20, disks=("disk0",))
    write_vm(root, "b", autostart=True, tick_ms=20)
    host.supervisor()
    host.wait_beats(3, "a")
    host.wait_beats(3, "b")
    disk_echo(host, "a", "w1 kept", "baton-guest disk write sector=1 status=0")

    r = host.vmctl("--json", "suspend", "--all")
    assert r.returncode == 0, r.stderr
    reports = {v["name"]: v for v in json.loads(r.stdout)["vms"]}
    assert set(reports) == {"a", "b"}
    for vm in ("a", "b"):
        rep = reports[vm]
        suspended(host, vm)
        assert 0 < rep["populated_bytes"] < rep["ram_size"], rep
        ram = image(host, vm) / ramimage.RAM_FILE
        assert os.stat(ram).st_blocks * 512 < rep["ram_size"], "the RAM file is not sparse"
    assert not host.workers_of(None)
    before = {vm: len(host.beats(vm)) for vm in ("a", "b")}

    # Every Baton process goes: the supervisor, then the broker (every memfd with it).
    host.sup.kill9()
    host.broker.kill9()
    assert not processes_under(root)
    host.broker = BrokerProcess(root).start()
    host.supervisor()  # resumes the autostart VMs it finds suspended
    for vm in ("a", "b"):
        host.wait_state("running", vm)
        beats = host.wait_beats(before[vm] + 5, vm)
        assert continuity_problems(beats) == [], vm  # no gap, no repeat, same RAM checksum
        assert not image(host, vm).exists(), "the image outlived a successful resume"
    disk_echo(host, "a", "r1", "baton-guest disk read sector=1 status=0 data=kept")
