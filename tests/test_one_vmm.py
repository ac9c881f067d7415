"""Never two VMMs on one guest: a live worker the supervisor cannot reach, or has lost
track of, is found through the broker's run lease and reported, never doubled."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_until

from baton_lab.harness import Host
from vmm.guest import continuity_problems

pytestmark = pytest.mark.kvm
WORKER = [sys.executable, "-m", "vmm.worker"]


def write_vm(root: Path, name: str) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(
        f'memory_mib = 32\ntick_ms = 20\nworker = {json.dumps(WORKER)}\nrestart = "on-failure"\n'
    )


class Sampler:
    """Counts the VM's live workers every 20 ms, for as long as the block runs."""

    def __init__(self, host: Host, vm: str) -> None:
        self.host, self.vm = host, vm
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.most = max(self.most, len(self.host.workers_of(self.vm)))
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def record_path(host: Host, vm: str) -> Path:
    return host.root / "var" / "lib" / "baton" / "supervisor" / f"{vm}.json"


def running(host: Host) -> int:
    write_vm(host.root, "vm1")
    host.supervisor()
    host.wait_beats(3, "vm1")
    return int(host.status("vm1")["pid"])


def test_stopped_worker_across_a_supervisor_restart_is_never_doubled(host: Host) -> None:
    pid = running(host)
    with Sampler(host, "vm1") as s:
        os.kill(pid, signal.SIGSTOP)  # an overloaded or swapping worker looks like this
        try:
            host.sup.kill9()
            host.supervisor()
            st = host.wait_state("unresponsive", "vm1")
            assert st["pid"] == pid and "does not answer" in st["reason"]
            # Nothing may start another VMM on this guest, whatever is asked.
            r = host.vmctl("start", "vm1")
            assert r.returncode != 0 and "already" in r.stderr, r.stderr
            r = host.vmctl("stop", "vm1")
            assert r.returncode != 0 and "--force" in r.stderr, r.stderr
            # the supervisor keeps asking (every 2 s): let it ask at least twice, watched
            # all along (on a busy host a sample can take far longer than its 20 ms)
            since = time.monotonic()
            wait_until(
                lambda: time.monotonic() - since > 5 and s.samples > 50, 60, what="5 s of samples"
            )
            assert host.status("vm1")["state"] == "unresponsive"
        finally:
            os.kill(pid, signal.SIGCONT)
        st = host.wait_state("running", "vm1")
        assert st["pid"] == pid
        assert continuity_problems(host.more_beats(5, "vm1")) == []
    assert s.most == 1, f"{s.most} workers ran the guest at once"


@pytest.mark.parametrize("miss", ["record-lost", "start-time-moved", "control-socket-removed"])
def test_adoption_misses_find_the_worker_through_the_lease(host: Host, miss: str) -> None:
    pid = running(host)
    with Sampler(host, "vm1") as s:
        host.sup.kill9()
        rec_path = record_path(host, "vm1")
        if miss == "record-lost":  # as a record that failed to persist on a full disk
            rec_path.unlink()
        elif miss == "start-time-moved":  # as after a clock step
            rec = json.loads(rec_path.read_text())
            rec["worker"]["create_time"] += 7.0
            rec_path.write_text(json.dumps(rec))
        else:
            Path(json.loads(rec_path.read_text())["worker"]["control"]).unlink()
        host.supervisor()
        if miss == "control-socket-removed":
            st = host.wait_state("unresponsive", "vm1")
            assert st["pid"] == pid
            # the guest runs on in its worker; only a deliberate --force ends it
            assert continuity_problems(host.more_beats(3, "vm1")) == []
            r = host.vmctl("stop", "vm1", "--force")
            assert r.returncode == 0, r.stderr
            wait_until(lambda: not host.workers_of("vm1"), 15, what="the worker to be gone")
            assert host.vmctl("start", "vm1").returncode == 0
            host.wait_state("running", "vm1")
        else:
            st = host.wait_state("running", "vm1")
            assert st["pid"] == pid, "the same worker, adopted again"
            assert continuity_problems(host.more_beats(5, "vm1")) == []
    assert s.most == 1, f"{s.most} workers ran the guest at once"


def test_several_vms_adopted_at_once_keep_their_workers_and_leases(host: Host) -> None:
    """Adoption runs many VMs at a time: each keeps its worker, its lease and its
    record (unchanged, so not written again); one that does not answer is
    unresponsive and never replaced, and holds up no other."""
    names = ["vm1", "vm2", "vm3"]
    for name in names:
        write_vm(host.root, name)
    host.supervisor()
    for name in names:
        host.wait_beats(3, name)
    pids = {name: int(host.status(name)["pid"]) for name in names}
    os.kill(pids["vm3"], signal.SIGSTOP)
    try:
        host.sup.kill9()
        written = {n: record_path(host, n).stat().st_mtime_ns for n in names}
        host.supervisor()
        for name in ("vm1", "vm2"):
            st = host.wait_state("running", name)
            assert st["pid"] == pids[name], "the same worker, adopted again"
            assert record_path(host, name).stat().st_mtime_ns == written[name]
        st = host.wait_state("unresponsive", "vm3")
        assert st["pid"] == pids["vm3"] and "does not answer" in st["reason"]
        with host.broker.client() as broker:
            for name in names:
                assert broker.lease_status(name)["holder"]["pid"] == pids[name], name
        assert host.worker_pids() == set(pids.values())
    finally:
        os.kill(pids["vm3"], signal.SIGCONT)
    assert host.wait_state("running", "vm3")["pid"] == pids["vm3"]
    for name in names:
        assert continuity_problems(host.more_beats(3, name)) == [], name
