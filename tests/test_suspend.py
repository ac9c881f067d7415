"""vmctl suspend / resume with real daemons: a VM saved to disk survives every Baton
process (the broker too, so every memfd) and runs on exactly where it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import wait_until
from netns import isolated
from test_supervisor import write_vm

from baton.paths import Paths
from baton_lab.harness import BrokerProcess, Host, processes_under
from baton_lab.netlab import Traffic
from supervisor import netdev, ramimage
from vmm.guest import continuity_problems

pytestmark = pytest.mark.kvm
WAIT = 30.0
VMCTL = [sys.executable, "-m", "supervisor.vmctl"]


def psutil_alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


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


def refused(host: Host, *args: str, says: str) -> None:
    r = host.vmctl(*args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert says in r.stderr, r.stderr


def untouched_suspended(host: Host, vm: str) -> None:
    """A refused resume left nothing behind: image kept, no worker, no fds in the broker."""
    suspended(host, vm)
    assert not host.workers_of(vm)
    assert vm not in host.broker.client().list_vms()


def test_bad_requests_and_refused_images_change_nothing(host: Host) -> None:
    root = host.root
    write_vm(root, "r", autostart=True, tick_ms=20)
    write_vm(root, "idle", autostart=False)
    host.supervisor()
    host.wait_beats(3, "r")
    refused(host, "suspend", "idle", says="only a running VM can be suspended")
    assert host.status("idle")["state"] == "stopped"
    refused(host, "resume", "r", says="is running, not suspended")
    pid = host.status("r")["pid"]

    # Two suspends at once: one suspends, the other is refused.
    procs = [
        subprocess.Popen(
            [*VMCTL, "--root", str(root), "suspend", "r"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(rc for rc, _ in outs) == [0, 1], outs
    err = next(e for rc, e in outs if rc == 1)
    assert "busy" in err or "only a running VM" in err, err
    untouched_suspended(host, "r")
    assert not psutil_alive(pid)
    refused(host, "start", "r", says="is suspended")
    refused(host, "suspend", "r", says="only a running VM can be suspended")

    img = image(host, "r")
    ram, manifest = img / ramimage.RAM_FILE, img / ramimage.MANIFEST
    m = json.loads(manifest.read_bytes())
    good_manifest = manifest.read_bytes()
    off = m["regions"][-1]["offset"]
    with open(ram, "r+b") as f:  # a flipped byte in a populated page
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))
    refused(host, "resume", "r", says="fails its checksum")
    untouched_suspended(host, "r")
    with open(ram, "r+b") as f:
        f.seek(off)
        f.write(byte)

    size = ram.stat().st_size
    with open(ram, "rb") as f:
        f.seek(size - 4096)
        tail = f.read()
    os.truncate(ram, size - 4096)
    refused(host, "resume", "r", says="truncated")
    untouched_suspended(host, "r")
    with open(ram, "r+b") as f:  # whole again
        f.seek(size - 4096)
        f.write(tail)

    for change, says in (
        (("ram_size", m["ram_size"] + (1 << 20)), "wrong RAM size"),
        (("state_versions", {**m["state_versions"], "vcpu": 999}), "unknown state version"),
    ):
        manifest.write_text(json.dumps({**m, change[0]: change[1]}))
        refused(host, "resume", "r", says=says)
        untouched_suspended(host, "r")
    manifest.write_bytes(good_manifest)

    # A FIFO where the manifest belongs (a plain read would block the supervisor's
    # thread for good), a symlink where the state belongs: refused, kept.
    state_file = img / ramimage.STATE_FILE
    good_state = state_file.read_bytes()
    manifest.unlink()
    os.mkfifo(manifest)
    refused(host, "resume", "r", says="not a regular file")
    untouched_suspended(host, "r")
    manifest.unlink()
    manifest.write_bytes(good_manifest)
    state_file.unlink()
    state_file.symlink_to("/etc/passwd")
    refused(host, "resume", "r", says="is a symlink")
    untouched_suspended(host, "r")
    state_file.unlink()
    state_file.write_bytes(good_state)

    r = host.vmctl("--json", "resume", "--all")  # what the boot half of the unit runs
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)["vms"]
    assert rep["name"] == "r", rep
    if rep["tsc_rebased"]:  # (the host's TSC is stable: KVM_CLOCK_HOST_TSC)
        # One host boot: its TSC ran on, so the recipe moves the guest's by ~nothing.
        assert abs(rep["tsc_shift_us"]) < 1000, rep
    host.wait_state("running", "r")
    assert continuity_problems(host.more_beats(5, "r")) == []
    assert not img.exists()
    # vmctl stop of a suspended VM discards its image (the operator said: the guest goes).
    assert host.vmctl("suspend", "r").returncode == 0 and img.exists()
    assert host.vmctl("stop", "r").returncode == 0
    assert host.status("r")["state"] == "stopped" and not img.exists()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 1 MiB (``small``) and one of 32 MiB (``roomy``), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []
    try:
        for name, size in (("small", "1m"), ("roomy", "32m")):
            d = tmp_path / name
            d.mkdir()
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True
            )
            mounted.append(d)
        yield tmp_path
    finally:
        for d in mounted:
            subprocess.run(["umount", str(d)], check=False)


def test_full_disk_aborts_the_suspend_and_the_guest_runs_on(host: Host, tmpfs: Path) -> None:
    write_vm(host.root, "f", autostart=True, tick_ms=20)
    # Fills the image's file system after the space check passed (as another tenant would).
    host.supervisor(env={"BATON_FAULT_SUPERVISOR": "fill-disk-suspend"})
    host.wait_beats(3, "f")
    pid = host.status("f")["pid"]

    # Too small from the start: refused before the guest is paused at all.
    small = tmpfs / "small"
    refused(host, "suspend", "f", "--dir", str(small), says="MiB free")
    st = host.status("f")
    assert (st["state"], st["pid"], st["worker"]["last_pause"]) == ("running", pid, {})
    assert list(small.iterdir()) == []

    # Room at the check, full during the write: aborted, the partial image removed.
    roomy = tmpfs / "roomy"
    refused(host, "suspend", "f", "--dir", str(roomy), says="suspend aborted, the guest runs on")
    st = host.status("f")
    assert (st["state"], st["pid"]) == ("running", pid)
    assert st["worker"]["last_pause"], "the write was meant to fail after the pause"
    assert [p.name for p in roomy.iterdir()] == [".fill"]
    assert continuity_problems(host.more_beats(5, "f")) == []


def test_supervisor_killed_mid_suspend_the_live_worker_wins(host: Host) -> None:
    """Killed with the image whole but the worker not yet stopped: the paused worker
    still holds the guest, so the next supervisor resumes it and drops the image."""
    write_vm(host.root, "k", autostart=True, tick_ms=20)
    host.supervisor(env={"BATON_FAULT_SUPERVISOR": "crash-after-suspend-written"})
    host.wait_beats(3, "k")
    pid = host.status("k")["pid"]
    r = host.vmctl("suspend", "k")
    assert r.returncode != 0
    wait_until(lambda: host.sup.running_pid() is None, WAIT, 0.05, "the supervisor to die")
    assert (image(host, "k") / ramimage.MANIFEST).exists()
    host.supervisor()
    st = host.wait_state("running", "k")
    assert st["pid"] == pid and st["image"] is None
    assert not image(host, "k").exists()
    assert continuity_problems(host.more_beats(5, "k")) == []


@isolated(timeout=120)
def test_nic_state_survives_suspend_and_a_new_tap(root: Path) -> None:
    """The NIC's state (its ring in guest RAM, its counters) comes back on a fresh tap:
    frames sent after the resume are echoed by the same guest, whose counters go on."""
    mac = "52:54:00:00:00:51"
    write_vm(root, "n", autostart=True, tick_ms=20)
    path = Paths(root).vms_dir / "n.toml"
    path.write_text(path.read_text() + f'\n[[net]]\nname = "net0"\nmac = "{mac}"\n')
    with Host.start(root, vm="n") as host:
        host.wait_beats(2)
        t = Traffic("bt-n-0", mac, rate=500).start()
        wait_until(lambda: len(t.echoes) >= 50, 20, 0.01, "50 echoes")
        t.stop()
        t.drain()
        assert t.problems() == []
        rx = host.more_beats(2)[-1].rx
        assert rx >= t.sent
        r = host.vmctl("suspend", "n")
        assert r.returncode == 0, r.stderr
        assert netdev.lookup("bt-n-0") is None, "the tap outlived the suspend"
        r = host.vmctl("resume", "n")
        assert r.returncode == 0, r.stderr
        t2 = Traffic("bt-n-0", mac, rate=500).start()
        wait_until(lambda: len(t2.echoes) >= 50, 20, 0.01, "50 echoes after the resume")
        t2.stop()
        t2.drain()
        assert t2.problems() == []
        beats = host.more_beats(2)
        assert beats[-1].rx >= rx + t2.sent, "the guest's NIC counters started again"
        assert continuity_problems(beats) == []
