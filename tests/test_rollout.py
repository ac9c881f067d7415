"""Rollouts that halt on their own (vmctl upgrade --all) and the upgrade preflight
(vmctl upgrade --check), with real daemons and real KVM."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import WORKER, make_version, wait_until

from baton_lab.harness import Host, vmctl
from vmm.guest import HEARTBEAT, continuity_problems

pytestmark = pytest.mark.kvm


def write_vm(root: Path, name: str, worker: str = WORKER, tick_ms: int = 200) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(
        f"memory_mib = 32\ntick_ms = {tick_ms}\nworker = {json.dumps(worker.split())}\n"
    )


def faulty(point: str) -> str:
    return f"env BATON_FAULT={point} {WORKER}"


def rollout(root: Path, *args: str) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """``vmctl --json upgrade --all ARGS``: exit status, the VM reports, the summary."""
    r = vmctl(root, "--json", "upgrade", "--all", *args)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines and lines[-1]["event"] == "summary", (r.returncode, r.stdout, r.stderr)
    return r.returncode, lines[:-1], lines[-1]


def start(root: Path, broker, vms: dict[str, str], tick_ms: int = 200) -> Host:
    for name, worker in vms.items():
        write_vm(root, name, worker, tick_ms)
    host = Host(root, broker)
    host.supervisor()
    for name in vms:
        host.wait_beats(2, name)
    return host


def test_blackout_budget_halts_the_rollout(root: Path, broker):
    vms = {"a-slow": faulty("slow-load"), "b": WORKER, "c": WORKER}
    with start(root, broker, vms) as host:
        pids = {n: host.status(n)["pid"] for n in vms}
        rc, reports, summary = rollout(root, "--max-blackout-ms", "20", "--max-parallel", "1")
        assert rc == 5, (reports, summary)
        (first,) = reports
        assert first["vm"] == "a-slow" and first["outcome"] == "committed"
        assert first["blackout_ms"] > 50  # the injected 50 ms are inside the pause
        assert summary["halted"] == "blackout-budget"
        assert summary["over_budget_vms"] == ["a-slow"]
        assert summary["skipped_vms"] == ["b", "c"] and summary["skipped"] == 2
        assert summary["upgraded"] == 1 and summary["max_blackout_ms"] == 20
        for name in ("b", "c"):  # untouched
            assert host.status(name)["pid"] == pids[name]
        for name in vms:
            assert continuity_problems(host.more_beats(2, name)) == []


def test_canary_and_failure_limit(root: Path, broker):
    vms = {"a-bad": faulty("load"), "b": WORKER, "c-bad": faulty("load"), "d": WORKER}
    with start(root, broker, vms) as host:
        # a failing canary: nothing else is tried
        rc, reports, summary = rollout(root, "--canary", "1", "--keep-going")
        assert rc == 4, summary
        assert [(r["vm"], r["outcome"]) for r in reports] == [("a-bad", "rolled-back")]
        assert summary["halted"] == "canary" and summary["canary_vms"] == ["a-bad"]
        assert summary["skipped_vms"] == ["b", "c-bad", "d"]
        # one failure allowed: on past a-bad, halted at c-bad, d skipped
        d_pid = host.status("d")["pid"]
        rc, reports, summary = rollout(root, "--max-failures", "1", "--max-parallel", "1")
        assert rc == 4, summary
        assert [(r["vm"], r["outcome"]) for r in reports] == [
            ("a-bad", "rolled-back"),
            ("b", "committed"),
            ("c-bad", "rolled-back"),
        ]
        assert summary["halted"] == "failures" and summary["max_failures"] == 1
        assert summary["not_committed_vms"] == ["a-bad", "c-bad"]
        assert summary["skipped_vms"] == ["d"] and host.status("d")["pid"] == d_pid
        for name in vms:
            assert continuity_problems(host.more_beats(2, name)) == []


# -- the preflight ------------------------------------------------------------------

TICK_MS = 20


class BeatClock:
    """When each heartbeat line reached the console log (polled every millisecond)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.arrivals: list[tuple[int, float]] = []  # (seq, monotonic seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos, tail = 0, ""
        while not self._stop.is_set():
            with open(self.path, "rb") as f:
                f.seek(pos)
                data = f.read()
            now = time.monotonic()
            if data:
                pos += len(data)
                lines = (tail + data.decode(errors="replace")).split("\n")
                tail = lines.pop()
                for line in lines:
                    if m := HEARTBEAT.match(line):
                        self.arrivals.append((int(m[1]), now))
            time.sleep(0.001)

    def mark(self) -> float:
        return time.monotonic()

    def max_gap(self, start: float, end: float) -> float:
        times = [t for _, t in self.arrivals if start <= t <= end]
        assert len(times) >= 3, f"only {len(times)} heartbeats between the marks"
        return max(b - a for a, b in itertools.pairwise(times))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def vm1(root: Path, broker):
    write_vm(root, "vm1", WORKER, TICK_MS)
    with Host(root, broker, vm="vm1") as host:
        host.supervisor()
        host.wait_beats(3)
        yield host


def check(host: Host, worker: str) -> tuple[int, dict[str, Any]]:
    r = host.vmctl("--json", "upgrade", "vm1", "--check", "--worker", worker)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def unchanged_host_facts(host: Host) -> dict[str, Any]:
    """What a preflight must leave as it found: who runs the guest, its last pause,
    the run lease, the broker's tokens."""
    st = host.status()
    lease = host.broker.client().lease_status("vm1")
    (vm,) = host.broker.status()["vms"]
    return {
        "state": st["state"],
        "pid": st["pid"],
        "last_pause": st["worker"]["last_pause"],
        "workers": [p.pid for p in host.workers_of("vm1")],
        "lease": (lease["epoch"], lease["holder"]["instance"], lease["offer"], lease["past"]),
        "tokens": vm["tokens"],
    }


def test_check_refuses_an_incompatible_worker_and_never_pauses(vm1: Host, tmp_path: Path):
    host = vm1
    strict = make_version(tmp_path / "v3", "0.3.0", serial_min=2)  # reads serial 2 only
    before = unchanged_host_facts(host)
    clock = BeatClock(host.console_log())
    try:
        t0 = clock.mark()
        wait_until(lambda: len([a for a in clock.arrivals if a[1] > t0]) >= 40, 20)
        t1 = clock.mark()
        rc, r = check(host, strict)
        t2 = clock.mark()
        seen = len(clock.arrivals)
        wait_until(lambda: len(clock.arrivals) >= seen + 5, 20)
        t3 = clock.mark()
    finally:
        clock.stop()
    assert rc == 4 and r["ok"] is False, r
    assert r["new_version"] == "0.3.0" and r["versions"] is None
    assert r["reason"] == (
        "incompatible state versions: "
        "serial: the old worker writes versions 1..1, the new worker reads 2..2"
    )
    # and the way back would not work either: the strict version writes serial 2 only
    assert r["rollback"]["ok"] is False
    assert (
        "serial: the new worker writes versions 2..2, the old worker reads 1..1"
        in (r["rollback"]["reason"])
    )
    assert unchanged_host_facts(host) == before
    # the guest never paused: no beat missing, none late beyond the jitter seen before
    assert continuity_problems(host.beats()) == []
    quiet, during = clock.max_gap(t0, t1), clock.max_gap(t1, t3)
    assert during < max(2 * quiet, quiet + 0.04), (quiet, during, t2 - t1)
    # a worker that cannot start: said so, nothing left behind
    rc, r = check(host, "/nonexistent/baton-vmm")
    assert rc == 4 and r["reason"].startswith("the new worker failed to start")
    assert unchanged_host_facts(host) == before


def test_check_reports_both_directions_and_ends_the_new_worker(vm1: Host, tmp_path: Path):
    host = vm1
    v2 = make_version(tmp_path / "v2", "0.2.0", serial_min=1)  # reads and writes serial 1..2
    before = unchanged_host_facts(host)
    clock = BeatClock(host.console_log())
    try:
        t0 = clock.mark()
        wait_until(lambda: len([a for a in clock.arrivals if a[1] > t0]) >= 40, 20)
        t1 = clock.mark()
        rc, r = check(host, v2)
        seen = len(clock.arrivals)
        wait_until(lambda: len(clock.arrivals) >= seen + 5, 20)
        t3 = clock.mark()
    finally:
        clock.stop()
    assert rc == 0 and r["ok"] is True and r["reason"] == "", r
    assert (r["old_version"], r["new_version"]) == ("0.1.0", "0.2.0")
    assert r["versions"]["serial"] == 1  # what the upgrade would write for 0.2.0
    assert r["rollback"] == {"ok": True, "versions": r["versions"], "reason": ""}
    assert r["state_bytes"] > 1000 and r["validate_ms"] > 0 and r["preview_ms"] > 0
    assert r["prepare_ms"] > 0 and r["total_ms"] >= r["prepare_ms"]
    assert r["new_pid"] not in {p.pid for p in host.workers_of("vm1")}
    assert unchanged_host_facts(host) == before  # exactly one worker: the old one
    assert continuity_problems(host.beats()) == []
    quiet, during = clock.max_gap(t0, t1), clock.max_gap(t1, t3)
    assert during < max(2 * quiet, quiet + 0.04), (quiet, during)
    # --all --check: a line per VM and a summary; then the real upgrade does what it said
    r2 = host.vmctl("--json", "upgrade", "--all", "--check", "--worker", v2)
    lines = [json.loads(line) for line in r2.stdout.splitlines()]
    assert r2.returncode == 0 and lines[0]["ok"] and lines[0]["vm"] == "vm1"
    assert lines[-1] == {"event": "summary", "check": True, "vms": 1, "ok": 1, "refused_vms": []}
    rc, up = host.upgrade(worker=v2)
    assert rc == 0 and up["state_versions"] == r["versions"]


# -- the policy alone (supervisor.rollout), without daemons ------------------------


def test_halting_lets_in_flight_upgrades_finish_and_skips_the_rest():
    from supervisor.rollout import Policy, Rollout

    b_started, a_done = threading.Event(), threading.Event()

    def upgrade_one(name: str) -> dict[str, Any]:
        if name == "a":
            b_started.wait(10)
            return {"vm": "a", "outcome": "rolled-back"}
        a_done.wait(10)  # b is in flight when a fails
        return {"vm": name, "outcome": "committed", "blackout_ms": 1.0}

    run = Rollout(["a", "b", "c", "d"], Policy(parallel=2), upgrade_one)
    run.on_start = lambda name: b_started.set() if name == "b" else None
    run.on_report = lambda r: a_done.set() if r["vm"] == "a" else None
    s = run.run()
    assert s["halted"] == "failures" and s["not_committed_vms"] == ["a"]
    assert s["upgraded"] == 1 and s["skipped_vms"] == ["c", "d"]
    # no limit: everything is tried; a budget only counts committed upgrades
    s = Rollout(
        ["a", "b", "c"],
        Policy(parallel=1, max_failures=None, max_blackout_ms=0.5),
        lambda n: {"vm": n, "outcome": "rolled-back" if n == "a" else "committed",
                   "blackout_ms": 0.4 if n == "b" else 0.6},
    ).run()  # fmt: skip
    assert s["halted"] == "blackout-budget" and s["over_budget_vms"] == ["c"]
    assert s["skipped"] == 0 and s["blackout_ms"]["max"] == 0.6


def windows(trace: Path) -> tuple[list[tuple[int, int, int, int]], dict[int, tuple[int, int]]]:
    """The supervisor's marks: each blackout (old pid, new pid, the old worker's vCPU
    stop and the new one's vCPUs running, both as the workers read CLOCK_MONOTONIC)
    and each old worker's exit (its ``quit`` to the kernel confirming it gone)."""
    blackouts, exits, begun = [], {}, {}
    for line in trace.read_text().splitlines():
        f = line.split()
        if f[3] == "S.blackout":
            blackouts.append((int(f[4]), int(f[5]), int(f[6]), int(f[7])))
        elif f[3] == "S.teardown_begin":
            begun[int(f[4])] = int(f[1])
        elif f[3] == "S.teardown_end":
            exits[int(f[4])] = (begun.pop(int(f[4])), int(f[1]))
    return blackouts, exits


def test_no_old_worker_exits_inside_another_vms_pause(root: Path, broker):
    """``[upgrade] exclusive_teardown``: in a parallel rollout every old worker's
    exit, from its quit to its pidfd saying it is gone, lies outside every blackout
    the workers themselves timed (without the setting, most overlap one)."""
    trace = root / "trace.txt"
    trace.touch()
    (root / "etc" / "baton").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "baton" / "baton.toml").write_text("[upgrade]\nexclusive_teardown = true\n")
    vms = [f"vm{i}" for i in range(8)]
    for name in vms:
        write_vm(root, name, tick_ms=1000)
    with Host(root, broker) as host:
        host.supervisor(env={"BATON_TRACE": str(trace)})
        for name in vms:
            host.wait_beats(1, name)
        old = {n: host.status(n)["pid"] for n in vms}
        rc, _, summary = rollout(root, "--max-parallel", "4")
        assert rc == 0 and summary["upgraded"] == len(vms), summary
        # A rollout's old workers retire aside: the last may still be exiting.
        blackouts, exits = wait_until(
            lambda: (w := windows(trace)) and set(old.values()) <= set(w[1]) and w,
            60,
            0.05,
            "every old worker's exit timed",
        )
        assert sorted(b[0] for b in blackouts) == sorted(old.values())
        for pid, (t0, t1) in exits.items():
            for o, n, b0, b1 in blackouts:
                assert t1 <= b0 or b1 <= t0, (
                    f"old worker {pid} exited over {t0}..{t1}, inside the pause of "
                    f"{o} -> {n} ({b0}..{b1})"
                )
        for name in vms:
            assert continuity_problems(host.more_beats(1, name)) == []


def test_a_rollout_retires_old_workers_aside_and_leaks_nothing(root: Path, broker):
    """``--all`` asks each upgrade to reply once the old worker is parked, not once
    it exited (``retire_aside``): every old worker still exits, is reaped and loses
    its broker token, and the guests run on in the new ones."""
    vms = {f"vm{i}": WORKER for i in range(4)}
    with start(root, broker, vms) as host:
        old = {n: host.status(n)["pid"] for n in vms}
        rc, reports, summary = rollout(root, "--max-parallel", "2")
        assert rc == 0 and summary["upgraded"] == len(vms), summary
        for r in reports:
            assert r["outcome"] == "committed" and r["old_pid"] == old[r["vm"]], r
            assert "reap_ms" not in r and "reap" not in r["phases_ms"], r  # not waited for

        wait_until(
            lambda: not any(psutil.pid_exists(p) for p in old.values()),
            60,
            0.05,
            "old workers exited and reaped",
        )
        tokens = {v["name"]: v["tokens"] for v in host.broker.status()["vms"]}
        wait_until(
            lambda: all(v["tokens"] == 1 for v in host.broker.status()["vms"] if v["name"] in vms),
            30,
            0.05,
            f"one token per VM again (was {tokens})",
        )
        for name in vms:
            assert host.status(name)["pid"] not in old.values()
            assert continuity_problems(host.more_beats(2, name)) == []
