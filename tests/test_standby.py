"""Standby workers (supervisor/standby.py) with real daemons and real KVM: an
upgrade consumes the VM's pre-warmed incoming worker, a new one follows, and
every standby ends (killed, token revoked) with its VM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import wait_until

from baton_lab.harness import BrokerProcess, Host, alive, fd_count
from vmm import idle_merge
from vmm.guest import continuity_problems

pytestmark = pytest.mark.kvm
WORKER = [sys.executable, "-m", "vmm.worker"]
WAIT = 60.0


def write_vm(root: Path, name: str, **extra: object) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    values = {"memory_mib": 32, "tick_ms": 20, "worker": WORKER, **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
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


def merge_any(pid: int) -> bool:
    """Whether the kernel has ``pid``'s memory offered for merging (``PR_SET_MEMORY_MERGE``)."""
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except FileNotFoundError:
        pytest.skip("this kernel has no /proc/PID/ksm_stat")
    return "ksm_merge_any: yes" in text


def test_standby_merge_offers_only_idle_standbys_and_takes_it_back_before_the_pause(
    root: Path, broker: BrokerProcess
) -> None:
    """``[upgrade] standby_merge``: the standby offers its memory to KSM once ready; the
    running worker never does; the standby taken by an upgrade has stopped offering
    (and unmerged) before it loaded the state, and the next standby offers again."""
    write_settings(root, "[upgrade]\nstandby = true\nstandby_merge = true\n")
    write_vm(root, "vm1")
    with Host(root, broker, vm="vm1") as host:
        host.supervisor()
        host.wait_beats(3)
        pid = ready_standby(host)
        assert merge_any(pid)  # offered before its ready word: no handoff can come first
        assert not merge_any(host.status()["pid"])
        assert isinstance(standby(host)["merging_pages"], int)  # 0 unless the host runs ksmd
        for _ in range(2):
            rc, r = host.upgrade()
            assert rc == 0 and r["outcome"] == "committed" and r["standby"] is True, r
            assert r["new_pid"] == pid and not merge_any(pid)
            assert r["new_side_us"]["unmerge_us"] >= 0.0, r  # it took its pages back
            pid = ready_standby(host, other_than=pid)
            assert merge_any(pid)
        assert continuity_problems(host.more_beats(3)) == []


def test_without_standby_merge_no_worker_offers_its_memory(host: Host) -> None:
    pid = ready_standby(host)
    assert not merge_any(pid) and not merge_any(host.status()["pid"])
    assert standby(host)["merging_pages"] is None


def test_idle_merge_offers_and_takes_back_this_process_memory() -> None:
    """``vmm.idle_merge`` in process: ``leave`` is a no-op until ``offer``, then stops the
    kernel's merging of this process (its unmerge of any merged page)."""
    assert idle_merge.leave() == 0.0 and not idle_merge.merging()
    if not idle_merge.offer():
        pytest.skip("this kernel cannot merge a whole process (PR_SET_MEMORY_MERGE)")
    try:
        assert idle_merge.merging()
    finally:
        assert idle_merge.leave() >= 0.0
    assert not idle_merge.merging()
    assert idle_merge.leave() == 0.0


def pidfds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
    return n


def test_a_restarted_supervisor_adopts_its_predecessors_standby(host: Host) -> None:
    """After a ``kill -9`` the standby is kept, not rebuilt: the same pid, no fresh
    prepare, its token still the one held; the next upgrade consumes it; the new
    supervisor holds as many pidfds as its predecessor, and no more threads or fds."""
    pid = ready_standby(host)
    rec_before = record(host, "vm1").read_bytes()
    worker = host.status()["pid"]
    before = wait_until(lambda: (n := pidfds(host.sup.pid)) >= 2 and n, WAIT, 0.05, "pidfds")
    threads = psutil.Process(host.sup.pid).num_threads()
    fds = fd_count(host.sup.pid)
    host.sup.kill9()
    host.supervisor()
    sb = wait_until(lambda: (s := standby(host))["ready"] and s, WAIT, 0.05, "the standby")
    assert sb["pid"] == pid and sb["adopted"] is True and sb["prepared"] == 0, sb
    assert host.status()["pid"] == worker
    assert record(host, "vm1").read_bytes() == rec_before  # still true: kept as it was
    assert tokens(host, "vm1") == 2
    assert {p.pid for p in host.workers_of("vm1")} == {worker, pid}
    wait_until(lambda: pidfds(host.sup.pid) == before, WAIT, 0.05, f"{before} pidfds")
    sup = psutil.Process(host.sup.pid)
    # no adoption thread left (the predecessor also kept its prepare's aside thread)
    wait_until(lambda: sup.num_threads() <= threads, WAIT, 0.05, f"<= {threads} threads")
    # (its predecessor also held its zygote's socket; a connection just served may
    # not be closed yet)
    wait_until(lambda: fd_count(sup.pid) <= fds, WAIT, 0.05, f"<= {fds} fds")
    rc, r = host.upgrade()
    assert rc == 0 and r["outcome"] == "committed", r
    assert r["standby"] is True and r["new_pid"] == pid, (r, pid)
    assert host.status()["pid"] == pid and not alive(worker)
    new = ready_standby(host, other_than=pid)
    assert {p.pid for p in host.workers_of("vm1")} == {pid, new}
    assert tokens(host, "vm1") == 2  # the retired worker's token went with it
    assert continuity_problems(host.more_beats(3)) == []


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is no worker of ours."""
    p = subprocess.Popen(["sleep", "600"])
    yield p
    p.kill()
    p.wait()


def test_a_restarted_supervisor_kills_only_the_standbys_that_fail_a_check(
    root: Path, broker: BrokerProcess, bystander: subprocess.Popen[bytes]
) -> None:
    """A ``kill -9``, then, while no supervisor runs: one standby left as it is
    (adopted), and one of each bad case (killed, not adopted, a fresh one prepared):
    a record for a dead pid, a record that is a symlink (to the good one's record:
    never followed), a FIFO (never blocks the start), garbage, a revoked token, a
    stopped process, a VM whose worker command changed (another worker version), a
    record naming a process that is no worker (left alone) and the VM's running
    worker's token (not revoked). Every old pid but the adopted one dies; no
    worker is left over; the new supervisor holds as many pidfds as its
    predecessor did."""
    write_settings(root, "[upgrade]\nstandby = true\n")
    names = ["good", "dead", "link", "fifo", "junk", "revoked", "stopped", "other", "alien"]
    for name in names:
        write_vm(root, name)
    with Host(root, broker, vm="good") as host:
        host.supervisor()
        for name in names:
            host.wait_state("running", name)
        old = {name: ready_standby(host, name) for name in names}
        workers = {name: host.status(name)["pid"] for name in names}
        want = 2 * len(names)
        before = wait_until(lambda: (n := pidfds(host.sup.pid)) >= want and n, WAIT, 0.05, "fds")
        good = record(host, "good").read_bytes()
        host.sup.kill9()
        os.kill(old["dead"], signal.SIGKILL)
        wait_until(lambda: not alive(old["dead"]), WAIT, 0.05, "the dead standby to die")
        record(host, "link").unlink()
        record(host, "link").symlink_to(record(host, "good"))
        record(host, "fifo").unlink()
        os.mkfifo(record(host, "fifo"))
        record(host, "junk").write_text("{not json")
        sha = json.loads(record(host, "revoked").read_text())["token_sha256"]
        with host.broker.client() as c:
            c.call("token.revoke", {"vm": "revoked", "sha256": sha})
        os.kill(old["stopped"], signal.SIGSTOP)
        other = " ".join(["env", "BATON_OTHER_VERSION=1", *WORKER])
        write_vm(root, "other", worker=other.split())
        alien = json.loads(record(host, "alien").read_text())
        vm_rec = json.loads((host.paths.lib / "supervisor" / "alien.json").read_text())
        worker_sha = vm_rec["worker"]["token_sha256"]
        alien |= {"pid": bystander.pid, "create_time": psutil.Process(bystander.pid).create_time()}
        alien["token_sha256"] = worker_sha
        record(host, "alien").write_text(json.dumps(alien))
        host.supervisor()
        for name in names:
            assert host.wait_state("running", name)["pid"] == workers[name]
        sb = wait_until(lambda: (s := standby(host, "good"))["ready"] and s, WAIT, 0.05, "good")
        assert sb["pid"] == old["good"] and sb["adopted"] is True, sb
        assert record(host, "good").read_bytes() == good  # the symlink's target untouched
        gone = [n for n in names if n != "good"]
        for name in gone:
            wait_until(lambda n=name: not alive(old[n]), WAIT, 0.05, f"{name}'s old standby gone")
            s = wait_until(
                lambda n=name: (s := standby(host, n))["ready"] and s["pid"] != old[n] and s,
                WAIT,
                0.05,
                f"a fresh standby of {name}",
            )
            assert s["adopted"] is False, (name, s)
            rec = record(host, name)
            assert not rec.is_symlink() and rec.is_file(), name
            assert json.loads(rec.read_text())["pid"] == s["pid"], name
        for name in names:
            sb_pid = standby(host, name)["pid"]
            assert {p.pid for p in host.workers_of(name)} == {workers[name], sb_pid}, name
        assert bystander.poll() is None  # no worker: never killed on a record's word
        with host.broker.client() as c:
            assert worker_sha in {t["sha256"] for t in c.list_tokens("alien")}
        for name in ["good", "dead", "revoked", "stopped", "other"]:
            # (link's, fifo's, junk's and alien's old tokens had no record to name them:
            # the periodic token sweep revokes them after its grace, as any orphan's)
            wait_until(lambda n=name: tokens(host, n) == 2, WAIT, 0.05, f"{name}'s tokens")
        wait_until(lambda: pidfds(host.sup.pid) == before, WAIT, 0.05, f"{before} pidfds")
        fresh = standby(host, "other")
        assert fresh["command"] == other.split(), fresh  # built for the new command
        rc, r = host.upgrade("other")
        assert rc == 0 and r["standby"] is True and r["new_pid"] == fresh["pid"], r
        rc, r = host.upgrade("good")
        assert rc == 0 and r["standby"] is True and r["new_pid"] == old["good"], r
