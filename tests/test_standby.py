"""Standby workers (supervisor/standby.py) with real daemons and real KVM: an
upgrade consumes the VM's pre-warmed incoming worker, a new one follows, and
every standby ends (killed, token revoked) with its VM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import wait_until

from baton_lab.harness import BrokerProcess, Host
from vmm.guest import continuity_problems

pytestmark = pytest.mark.kvm
WORKER = [sys.executable, "-m", "vmm.worker"]
WAIT = 60.0


def write_vm(root: Path, name: str, **extra: object) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    lines = ["memory_mib = 32", "tick_ms = 20", f"worker = {json.dumps(WORKER)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    (d / f"{name}.toml").write_text("\n".join(lines) + "\n")


def write_settings(root: Path, text: str) -> None:
    (root / "etc" / "baton").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "baton" / "baton.toml").write_text(text)


def standby(host: Host, vm: str = "vm1") -> dict[str, Any]:
    result: dict[str, Any] = host.status(vm)["standby"]
    return result


def ready_standby(host: Host, vm: str = "vm1", other_than: int | None = None) -> int:
    """The pid of the VM's standby once one is ready (and is not ``other_than``)."""
    sb = wait_until(
        lambda: (s := standby(host, vm))["ready"] and s["pid"] != other_than and s,
        WAIT,
        0.05,
        f"a standby for {vm}",
    )
    return int(sb["pid"])


def tokens(host: Host, vm: str) -> int:
    for v in host.broker.status()["vms"]:
        if v["name"] == vm:
            return int(v["tokens"])
    return 0


def record(host: Host, vm: str) -> Path:
    return host.paths.lib / "standby" / f"{vm}.json"


@pytest.fixture
def host(root: Path, broker: BrokerProcess) -> Iterator[Host]:
    write_settings(root, "[upgrade]\nstandby = true\n")
    write_vm(root, "vm1")
    with Host(root, broker, vm="vm1") as h:
        h.supervisor()
        h.wait_beats(3)
        yield h


def test_upgrades_consume_the_standby_and_a_new_one_follows(host: Host) -> None:
    pid = ready_standby(host)
    rec = json.loads(record(host, "vm1").read_text())
    assert rec["pid"] == pid and "token" not in rec and rec["token_sha256"]
    assert psutil.Process(pid).nice() == 10  # prepared at low priority, like any prepare
    assert tokens(host, "vm1") == 2  # the running worker's and the standby's
    beats0 = len(host.beats())
    for _ in range(5):
        rc, r = host.upgrade()
        assert rc == 0 and r["outcome"] == "committed", r
        assert r["standby"] is True and r["new_pid"] == pid, (r, pid)
        assert host.status()["pid"] == pid
        assert r["reap_ms"] > 0 and r["total_ms"] >= r["blackout_ms"] > 0, r
        assert set(r["phases_ms"]) >= {"prepare", "transfer", "commit", "reap"}
        pid = ready_standby(host, other_than=pid)
        assert {p.pid for p in host.workers_of("vm1")} == {host.status()["pid"], pid}
        assert tokens(host, "vm1") == 2  # the retired worker's token went with it
    beats = host.more_beats(5)
    assert len(beats) > beats0 and continuity_problems(beats) == []


def test_the_next_standby_waits_until_no_upgrade_runs(host: Host) -> None:
    """A replacement is built only once upgrades have stopped for QUIET_S: a rollout
    does not rebuild the standbys it consumes beside its own pauses."""
    from supervisor.standby import QUIET_S

    pid = ready_standby(host)
    asked = time.time()
    rc, r = host.upgrade()
    assert rc == 0 and r["standby"] is True, r
    # The upgrade ended no earlier than this (its total, then its reap, both after
    # the request was sent): the next prepare may begin only QUIET_S after that.
    ended = asked + (r["total_ms"] + r["reap_ms"]) / 1000
    ready_standby(host, other_than=pid)
    sb = standby(host)
    began = sb["ready_since"] - sb["prepare_ms"] / 1000  # when its prepare started
    assert began >= ended + QUIET_S, (began - ended, sb)


def test_a_dead_standby_is_reaped_revoked_and_replaced(host: Host) -> None:
    pid = ready_standby(host)
    os.kill(pid, signal.SIGKILL)
    new = ready_standby(host, other_than=pid)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != "zombie"
    assert tokens(host, "vm1") == 2  # the dead standby's token is revoked
    assert json.loads(record(host, "vm1").read_text())["pid"] == new


def test_stop_ends_the_standby(host: Host) -> None:
    pid = ready_standby(host)
    r = host.vmctl("stop", "vm1")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not host.workers_of("vm1"), WAIT, 0.05, "no worker of vm1 left")
    assert not psutil.pid_exists(pid)
    assert not record(host, "vm1").exists()
    assert tokens(host, "vm1") == 0


def test_worker_to_another_command_prepares_cold_and_keeps_the_standby(host: Host) -> None:
    pid = ready_standby(host)
    other = " ".join(["env", "BATON_OTHER_VERSION=1", *WORKER])
    rc, r = host.upgrade(worker=other)
    assert rc == 0 and r["outcome"] == "committed", r
    assert r["standby"] is False and r["new_pid"] != pid
    assert standby(host)["pid"] == pid and psutil.Process(pid).is_running()
    rc, r = host.upgrade()  # the configured command again: the standby's
    assert rc == 0 and r["standby"] is True and r["new_pid"] == pid, r
    assert continuity_problems(host.more_beats(3)) == []


def test_standby_false_in_the_vm_file_has_none(root: Path, broker: BrokerProcess) -> None:
    write_settings(root, "[upgrade]\nstandby = true\n")
    write_vm(root, "vm1", standby=False)
    write_vm(root, "vm2")
    with Host(root, broker, vm="vm1") as host:
        host.supervisor()
        host.wait_beats(2)
        host.wait_beats(2, "vm2")
        ready_standby(host, "vm2")  # the pool has looked at every VM by now
        sb = standby(host)
        assert sb["enabled"] is False and not sb["ready"] and sb["prepared"] == 0, sb
        assert len(host.workers_of("vm1")) == 1
        rc, r = host.upgrade()
        assert rc == 0 and r["outcome"] == "committed" and r["standby"] is False, r
        assert len(host.workers_of("vm1")) == 1
        assert tokens(host, "vm1") == 1


def test_a_restarted_supervisor_kills_its_predecessors_standby(host: Host) -> None:
    pid = ready_standby(host)
    host.sup.kill9()
    host.supervisor()
    wait_until(lambda: not psutil.pid_exists(pid), WAIT, 0.05, "the old standby to be gone")
    new = ready_standby(host, other_than=pid)
    assert new != pid
    assert tokens(host, "vm1") == 2
    rc, r = host.upgrade()
    assert rc == 0 and r["standby"] is True and r["new_pid"] == new, r


def pidfds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
    return n


def test_a_restarted_supervisor_kills_many_standbys_at_once_and_leaks_nothing(
    root: Path, broker: BrokerProcess
) -> None:
    """Three VMs' standbys after a ``kill -9``: all killed (the orphan sweep and the
    pool's records; reaped off the start's path, ``workers.Reaper``), their tokens
    revoked and their records gone once they are dead, fresh ones prepared; the new
    supervisor holds as many pidfds as its predecessor did (none for the dead)."""
    write_settings(root, "[upgrade]\nstandby = true\n")
    names = ["vm1", "vm2", "vm3"]
    for name in names:
        write_vm(root, name)
    with Host(root, broker, vm="vm1") as host:
        host.supervisor()
        for name in names:
            host.wait_state("running", name)
        old = {name: ready_standby(host, name) for name in names}
        before = wait_until(lambda: (n := pidfds(host.sup.pid)) >= 6 and n, WAIT, 0.05, "pidfds")
        host.sup.kill9()
        host.supervisor()
        for name in names:
            host.wait_state("running", name)
        gone = lambda: not any(psutil.pid_exists(p) for p in old.values())  # noqa: E731
        wait_until(gone, WAIT, 0.05, "the old standbys to be gone")
        new = {name: ready_standby(host, name, other_than=old[name]) for name in names}
        for name in names:
            wait_until(lambda n=name: tokens(host, n) == 2, WAIT, 0.05, f"{name}'s tokens")
            assert json.loads(record(host, name).read_text())["pid"] == new[name]
        wait_until(lambda: pidfds(host.sup.pid) == before, WAIT, 0.05, f"{before} pidfds")
        rc, r = host.upgrade("vm2")
        assert rc == 0 and r["standby"] is True and r["new_pid"] == new["vm2"], r
