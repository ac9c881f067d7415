"""Live upgrade with real daemons and real KVM: continuity, rollback, recovery, versions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import make_vcpu_v1, make_version, wait_until

from baton_lab.harness import Host, fd_count, vmctl
from vmm.guest import continuity_problems, heartbeats

pytestmark = pytest.mark.kvm
WORKER = f"{sys.executable} -m vmm.worker"
TICK_MS = 20


def write_vm(root: Path, name: str, **extra: object) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    lines = [
        f"memory_mib = {extra.pop('memory_mib', 32)}",
        f"tick_ms = {extra.pop('tick_ms', TICK_MS)}",
    ]
    for k, v in extra.items():
        lines.append(f"{k} = {json.dumps(v)}")
    lines.append('[[disk]]\nname = "disk0"\nsize_mib = 1')
    (d / f"{name}.toml").write_text("\n".join(lines) + "\n")


def write_settings(root: Path, text: str) -> None:
    (root / "etc" / "baton").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "baton" / "baton.toml").write_text(text)


@pytest.fixture
def host(root: Path, broker):
    """vm1 running under a broker and a supervisor (overrides tests/conftest.py's)."""
    write_vm(root, "vm1", worker=WORKER.split())
    with Host(root, broker, vm="vm1") as h:
        h.supervisor()
        h.wait_beats(3)
        yield h


def test_twenty_upgrades_keep_the_guest_whole(host: Host):
    host.type_line("w2 written-before-the-upgrades")
    wait_until(lambda: "disk write sector=2 status=0" in host.console_text(), 20)
    pids = {host.status()["pid"]}
    t0, ticks0 = time.monotonic(), host.beats()[-1].ticks
    reports = []
    for _ in range(20):
        rc, r = host.upgrade()
        assert rc == 0 and r["outcome"] == "committed", r
        reports.append(r)
        pids.add(r["new_pid"])
        assert host.status()["pid"] == r["new_pid"]
    beats = host.more_beats(5)
    elapsed = time.monotonic() - t0
    assert continuity_problems(beats) == []
    assert len(pids) == 21
    # guest time: ticks kept arriving at the tick rate through 20 handovers
    rate = (beats[-1].ticks - ticks0) / (elapsed * 1000 / TICK_MS)
    assert 0.7 < rate < 1.2, f"ticks advanced at {rate:.2f} of the tick rate"
    host.type_line("r2")
    # the whole line: the console may be read while the guest is still writing it
    text = wait_until(
        lambda: (t := host.console_text()) and "\n" in t.partition("disk read sector=2")[2] and t,
        20,
    )
    assert "data=written-before-the-upgrades" in text
    for r in reports:
        assert r["blackout_ms"] > 0 and r["total_ms"] >= r["blackout_ms"]
        assert set(r["phases_ms"]) >= {"prepare", "transfer", "commit", "reap"}
        assert r["state_bytes"] > 1000 and r["old_version"] and r["new_version"]
    # the human report says the same
    r = vmctl(host.root, "upgrade", "vm1")
    assert r.returncode == 0 and "vm1: committed, blackout" in r.stdout and "phases" in r.stdout


@pytest.mark.parametrize("commit", ["worker", "supervisor"])
@pytest.mark.parametrize(
    "fault,outcome,why",
    [
        ("prepare", "aborted", "failed in prepare"),
        ("load", "rolled-back", "died while loading"),
        ("loaded", "rolled-back", "new worker"),
        ("hang", "rolled-back", "did not load the state within"),
    ],
)
def test_rollback_keeps_the_old_worker(
    root: Path, broker, fault: str, outcome: str, why: str, commit: str
):
    write_settings(root, f'[upgrade]\nhandoff_timeout_ms = 1500\ncommit = "{commit}"\n')
    write_vm(root, "vm1", worker=WORKER.split())
    with Host(root, broker, vm="vm1") as host:
        host.supervisor()
        host.wait_beats(3)
        old = host.status()["pid"]
        rc, r = host.upgrade(worker=f"env BATON_FAULT={fault} {WORKER}")
        assert rc == 4, r
        assert r["outcome"] == outcome, r
        assert why in r["reason"], r["reason"]
        st = host.status()
        assert st["state"] == "running" and st["pid"] == old
        assert st["last_upgrade"]["outcome"] == outcome
        beats = host.more_beats(5)
        assert continuity_problems(beats) == []
        # and a normal upgrade still works afterwards
        rc, r = host.upgrade()
        assert rc == 0 and r["outcome"] == "committed"
        assert continuity_problems(host.more_beats(3)) == []


@pytest.mark.parametrize("commit", ["worker", "supervisor"])
def test_a_new_worker_dead_after_its_commit_is_never_rolled_back(root: Path, broker, commit: str):
    """The new worker writes the run flag (the commit) and dies before its vCPUs run:
    it may have run the guest as far as anyone can prove, so the old worker is never
    resumed over it; the broker, asked afterwards, names the dead one as the holder."""
    write_settings(root, f'[upgrade]\ncommit = "{commit}"\n')
    write_vm(root, "vm1", worker=WORKER.split(), restart="no")
    with Host(root, broker, vm="vm1") as host:
        host.supervisor()
        host.wait_beats(3)
        old = host.status()["pid"]
        rc, r = host.upgrade(worker=f"env BATON_FAULT=committed {WORKER}")
        assert r["outcome"] == "failed" and "after it took the guest" in r["reason"], r
        assert rc != 0
        wait_until(lambda: not psutil.pid_exists(old), 10, what="the old worker killed")
        assert host.status()["state"] == "failed"
        with broker.client() as c:
            lease = c.lease_status("vm1")
        assert lease["holder"]["pid"] == r["new_pid"] and not lease["holder"]["alive"]
        assert lease["flag"] == lease["holder"]["instance"]


# What each commit mode journals (supervisor/transaction.py): in worker mode the
# commit is delegated in "transfer", and "resumed" follows it directly.
JOURNAL_STEPS = {
    "supervisor": ["begin", "prepared", "transfer", "loaded", "commit", "resumed"],
    "worker": ["begin", "prepared", "transfer", "resumed"],
}


@pytest.mark.parametrize(
    "commit,step", [(c, s) for c, steps in JOURNAL_STEPS.items() for s in steps]
)
def test_supervisor_killed_mid_upgrade_is_resolved(root: Path, broker, step: str, commit: str):
    write_settings(root, f'[upgrade]\ncommit = "{commit}"\n')
    write_vm(root, "vm1", worker=WORKER.split())
    with Host(root, broker, vm="vm1") as host:
        host.supervisor(env={"BATON_FAULT_SUPERVISOR": f"crash-after-{step}"})
        host.wait_beats(3)
        old = host.status()["pid"]
        r = vmctl(host.root, "upgrade", "vm1")
        assert r.returncode == 3 and "lost the connection" in r.stderr, (r.returncode, r.stderr)
        host.sup.proc.wait(10)
        assert host.sup.proc.returncode == -signal.SIGKILL
        host.supervisor()  # a normal supervisor
        st = wait_until(lambda: (s := host.status()) and s["state"] == "running" and s, 20)
        workers = host.workers_of("vm1")
        assert [p.pid for p in workers] == [st["pid"]], "exactly one worker runs the guest"
        forward = ("resumed",) if commit == "worker" else ("commit", "resumed")
        if step in forward:
            assert st["pid"] != old, "after the commit the new worker must run the guest"
        else:
            assert st["pid"] == old, "before the commit the old worker keeps the guest"
        journal = root / "var" / "lib" / "baton" / "upgrade"
        assert not (journal / "vm1.journal").exists()
        done = [json.loads(line) for line in (journal / "vm1.last").read_text().splitlines()][-1]
        assert done["step"] == "done" and "resolved after a supervisor restart" in done["reason"]
        assert continuity_problems(host.more_beats(5)) == []


def test_sixty_upgrades_leak_nothing(host: Host):
    """A leak of one fd, worker or token per upgrade shows after any number of
    them; sixty keep the suite in its budget (200 took 90 s). The long run is the
    1000-round chaos soak, ``python -m bench.chaos``."""
    rc, _ = host.upgrade()
    assert rc == 0
    base = (fd_count(host.broker.pid), fd_count(host.sup.pid), len(host.workers_of("vm1")))
    for i in range(60):
        rc, r = host.upgrade()
        assert rc == 0, (i, r)
    wait_until(
        lambda: (
            (fd_count(host.broker.pid), fd_count(host.sup.pid), len(host.workers_of("vm1"))) == base
        ),
        20,
        what="fd counts and worker count back to baseline",
    )
    # every old worker's token was revoked: only the running worker's remains
    (vm,) = host.broker.status()["vms"]
    assert vm["tokens"] == 1
    assert continuity_problems(host.more_beats(3)) == []


def test_bad_upgrade_requests_change_nothing(host: Host, tmp_path: Path):
    old = host.status()["pid"]
    r = vmctl(host.root, "upgrade", "nope")
    assert r.returncode == 1 and "no VM named 'nope'" in r.stderr
    r = vmctl(host.root, "upgrade")
    assert r.returncode == 2
    rc, rep = host.upgrade(worker="/nonexistent/baton-vmm")
    assert rc == 4 and rep["outcome"] == "aborted" and "/nonexistent/baton-vmm" in rep["reason"]
    # one at a time: a second request while a slow one prepares is refused
    slow = tmp_path / "slow-worker"
    slow.write_text(f'#!/bin/sh\nsleep 2\nexec {WORKER} "$@"\n')
    slow.chmod(0o755)
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor.vmctl",
            "--root",
            str(host.root),
            "upgrade",
            "vm1",
            "--worker",
            str(slow),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: host.status()["state"] == "upgrading", 20)
    r = vmctl(host.root, "upgrade", "vm1")
    assert r.returncode == 1 and "busy" in r.stderr
    assert first.wait(60) == 0
    first.stdout.close()
    assert host.status()["pid"] != old
    # a stopped VM
    vmctl(host.root, "stop", "vm1")
    r = vmctl(host.root, "upgrade", "vm1")
    assert r.returncode == 1 and "only a running VM can be upgraded" in r.stderr
    assert host.status()["state"] == "stopped"


def test_attached_console_carries_on_across_upgrades(host: Host):
    con = subprocess.Popen(
        [sys.executable, "-m", "supervisor.vmctl", "--root", str(host.root), "console", "vm1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    out = bytearray()

    def reader() -> None:
        while chunk := con.stdout.read1(4096):
            out.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    wait_until(lambda: len(heartbeats(out.decode(errors="replace"))) >= 3, 20)
    for _ in range(5):
        rc, _ = host.upgrade()
        assert rc == 0
    con.stdin.write(b"w1 typed-through-the-console\n")
    con.stdin.flush()
    wait_until(lambda: b"disk write sector=1 status=0" in out, 20)
    n = len(heartbeats(out.decode()))
    wait_until(lambda: len(heartbeats(out.decode(errors="replace"))) >= n + 3, 20)
    con.stdin.write(b"\x1d")
    con.stdin.flush()
    assert con.wait(10) == 0
    t.join(5)
    seen = heartbeats(out.decode(errors="replace"))
    problems = continuity_problems(seen)
    assert [p for p in problems if "first heartbeat" not in p] == []
    assert b"baton-guest echo w1 typed-through-the-console" in out
    # what the console showed is exactly what the log holds
    assert out.decode() in host.console_text()


def test_upgrade_all_halts_at_first_failure_unless_keep_going(root: Path, broker):
    write_vm(root, "a-first", worker=["env", "BATON_FAULT=load", *WORKER.split()], tick_ms=200)
    for vm in ("vm2", "vm3"):
        write_vm(root, vm, worker=WORKER.split(), tick_ms=200)
    with Host(root, broker) as host:
        host.supervisor()
        for vm in ("a-first", "vm2", "vm3"):
            host.wait_beats(2, vm)
        r = vmctl(root, "--json", "upgrade", "--all")
        events = [json.loads(line) for line in r.stdout.splitlines()]
        assert r.returncode == 4
        summary = events[-1]
        assert summary["event"] == "summary" and summary["halted"] and summary["skipped"] == 2
        assert events[0]["vm"] == "a-first" and events[0]["outcome"] == "rolled-back"
        r = vmctl(root, "upgrade", "--all", "--keep-going", "--max-parallel", "2")
        assert r.returncode == 4  # stdout is not a terminal: JSON lines, as with --json
        summary = json.loads(r.stdout.splitlines()[-1])
        assert summary["upgraded"] == 2 and summary["halted"] is None
        assert summary["not_committed_vms"] == ["a-first"] and summary["blackout_ms"]["median"]
        for vm in ("a-first", "vm2", "vm3"):
            assert continuity_problems(host.more_beats(2, vm)) == []


# -- versioned state across real versions -----------------------------------------


def test_state_versions_across_real_versions(root: Path, broker, tmp_path: Path):
    v2 = make_version(tmp_path / "v2", "0.2.0", serial_min=1)
    v3 = make_version(tmp_path / "v3", "0.3.0", serial_min=2)
    write_vm(root, "vm1", worker=WORKER.split())
    with Host(root, broker, vm="vm1") as host:
        host.supervisor()
        host.wait_beats(3)
        # old (serial v1) to new (reads 1..2): works, the state travels as v1
        rc, r = host.upgrade(worker=v2)
        assert rc == 0 and r["new_version"] == "0.2.0" and r["state_versions"]["serial"] == 1
        # new to old where the minimum version allows: v2 writes v1 for it
        rc, r = host.upgrade(worker=WORKER)
        assert rc == 0 and (r["old_version"], r["new_version"]) == ("0.2.0", "0.1.0")
        # into the strict version (reads and writes serial 2 only): v1 cannot feed it
        rc, r = host.upgrade(worker=v3)
        assert rc == 4 and r["outcome"] == "aborted" and "serial" in r["reason"]
        # from v2 (writes 1..2) into v3 (2..2): works, at serial v2
        rc, r = host.upgrade(worker=v2)
        assert rc == 0
        rc, r = host.upgrade(worker=v3)
        assert rc == 0 and r["state_versions"]["serial"] == 2
        # and back from v3 to the original: refused before the pause, guest untouched
        pid = host.status()["pid"]
        rc, r = host.upgrade(worker=WORKER)
        assert rc == 4 and r["outcome"] == "aborted"
        assert (
            "serial: the old worker writes versions 2..2, the new worker reads 1..1" in r["reason"]
        )
        assert host.status()["pid"] == pid
        assert continuity_problems(host.more_beats(5)) == []
        # the vcpu component: into a worker that knows only version 1 (a map of
        # fields per vCPU) and back; each direction travels at version 1
        rc, r = host.upgrade(worker=v2)  # from v3: serial 2 back to a worker that writes 1
        assert rc == 0 and r["state_versions"]["vcpu"] == 2, r
        v1 = make_vcpu_v1(tmp_path / "vcpu1", "0.0.9")
        for worker in (v1, WORKER):
            rc, r = host.upgrade(worker=worker)
            assert rc == 0 and r["state_versions"]["vcpu"] == 1, r
        rc, r = host.upgrade(worker=WORKER)
        assert rc == 0 and r["state_versions"]["vcpu"] == 2, r
        assert continuity_problems(host.more_beats(5)) == []
