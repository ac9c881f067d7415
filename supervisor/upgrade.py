"""The live upgrade: one worker replaced by another while the guest pauses ~1 ms.

    begin      journal opened; the old worker runs the guest
    prepared   the new worker is built (RAM mapped, VM and vCPUs made), incoming
    transfer   the old worker is told to pause and send its state
    loaded     the new worker holds the state; it has not run
    commit     decided: the new worker resumes the guest
    resumed    the new worker runs the guest; the old one is reaped next
    done       outcome recorded: committed, rolled-back or aborted

Before ``commit`` any failure (crash, error reply, deadline) kills the new
worker, waits until the kernel confirms it is dead, and resumes the old one.
After it, the old worker is never resumed. One more guard covers a new
worker that dies around the commit: just before its vCPUs first run it writes
its instance id into the VM's run flag (a broker-held memfd). A dead new
worker whose id is not there provably never ran the guest, so the old worker
may take it back; if it is there, the guest's memory may have moved on and
the old state is never resumed over it.

Every step is appended to ``DIR/var/lib/baton/upgrade/NAME.journal`` before
it is acted on (no fsync: it only has to survive a supervisor crash), and a
restarted supervisor resolves an unfinished journal before anything else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from baton import wire
from baton.wire import Code, RemoteError
from supervisor.kinds import Transfer, WorkerKind
from supervisor.provision import RUN_FLAG
from supervisor.service import Supervisor, VmRuntime
from supervisor.workers import WorkerGone, WorkerHandle

log = logging.getLogger("supervisor.upgrade")
COMMIT_MARGIN_MS = 500


class Journal:
    """Append-only JSON lines, one file per VM while an upgrade is open."""

    def __init__(self, directory: Path, vm: str) -> None:
        self.path = directory / f"{vm}.journal"
        self.vm = vm
        self._fd: int | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def write(self, step: str, **data: Any) -> None:
        assert self._fd is not None
        line = json.dumps({"step": step, "t": time.time(), **data}, separators=(",", ":"))
        os.write(self._fd, line.encode() + b"\n")
        # Test hook: die exactly here, as a kill -9 would, to prove recovery.
        if os.environ.get("BATON_FAULT_SUPERVISOR") == f"crash-after-{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self, keep_as_last: bool = True) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if keep_as_last:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, self.path.with_suffix(".last"))

    def read(self) -> list[dict[str, Any]]:
        records = []
        with open(self.path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


class Upgrader:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.dir = sup.paths.lib / "upgrade"
        # Many VMs may prepare at once (at low priority), but only one is ever inside
        # its pause: each pause is about a millisecond, so this costs nothing in total
        # time and keeps the CPUs for the guest that is waiting.
        self._one_pause_at_a_time = threading.Lock()

    # ---------------------------------------------------------------- helpers
    def _run_flag_says(self, rt: VmRuntime, instance: str) -> bool:
        """Did worker ``instance`` ever start running the guest?"""
        fd = rt.held.get(RUN_FLAG)
        if fd is None:
            return True  # cannot prove it did not: assume it did
        return os.pread(fd, 64, 0).rstrip(b"\0").decode(errors="replace") == instance

    def _kill_confirmed(self, h: WorkerHandle) -> bool:
        h.expected_exit = True
        self.sup.watcher.remove(h)
        dead = not h.alive() or h.kill(10)
        if dead:
            h.reap()
            h.close()
        return dead

    # ---------------------------------------------------------------- upgrade
    def upgrade(
        self, name: str, command: list[str] | None, handoff_timeout_ms: int | None
    ) -> dict[str, Any]:
        rt = self.sup.get(name)
        if not rt.lock.acquire(blocking=False):
            raise RemoteError(
                Code.BUSY, f"VM {name} is busy: an upgrade or another operation is running"
            )
        try:
            if rt.state != "running" or rt.worker is None:
                raise RemoteError(
                    Code.INVALID_STATE,
                    f"VM {name} is {rt.state}; only a running VM can be upgraded",
                )
            return self._upgrade_locked(rt, command, handoff_timeout_ms)
        finally:
            rt.lock.release()

    def _upgrade_locked(
        self, rt: VmRuntime, command: list[str] | None, handoff_timeout_ms: int | None
    ) -> dict[str, Any]:
        sup, cfg = self.sup, self.sup.settings.upgrade
        kind = sup.kind(rt)
        old = rt.worker
        assert old is not None
        timeout_ms = handoff_timeout_ms or cfg.handoff_timeout_ms
        t_start = time.monotonic_ns()
        report: dict[str, Any] = {
            "vm": rt.name,
            "txid": uuid.uuid4().hex,
            "outcome": None,
            "reason": "",
            "old_pid": old.pid,
            "old_version": old.version,
            "new_pid": None,
            "new_version": None,
            "blackout_ms": None,
            "state_bytes": None,
            "phases_ms": {},
        }
        phases = report["phases_ms"]
        journal = Journal(self.dir, rt.name)
        journal.open()
        journal.write("begin", txid=report["txid"], old=old.record(), command=command)
        rt.state = "upgrading"
        sup.persist(rt)

        def finish(outcome: str, reason: str = "") -> dict[str, Any]:
            report["outcome"] = outcome
            report["reason"] = reason
            report["total_ms"] = _ms(time.monotonic_ns() - t_start)
            journal.write("done", outcome=outcome, reason=reason)
            journal.close()
            rt.last_upgrade = report
            if outcome == "committed":
                rt.upgrades += 1
            sup.persist(rt)
            log.info("vm %s: upgrade %s %s", rt.name, outcome, reason)
            return report

        # 1. prepare: the new worker builds everything while the guest runs on.
        token = sup.broker.mint_token(rt.name, "worker (upgrade)") if kind.uses_token else None
        t0 = time.monotonic_ns()
        try:
            new = kind.start(
                rt.config,
                incoming=True,
                token=token,
                timeout=cfg.prepare_timeout_s,
                command=command,
                source=old,
            )
        except RemoteError as e:
            if token is not None:
                with contextlib.suppress(RemoteError, wire.WireError):
                    sup.broker.revoke_token(rt.name, token)
            rt.state = "running"
            return finish("aborted", f"the new worker failed in prepare: {e.message}")
        report["new_pid"] = new.pid
        report["new_version"] = new.version
        journal.write("prepared", new=new.record())
        try:
            compat = kind.check(old, new)
        except RemoteError as e:
            self._kill_confirmed(new)
            sup._revoke(rt, new)
            rt.state = "running"
            return finish("aborted", f"refused before the pause: {e.message}")
        report["state_versions"] = compat["versions"]
        phases["prepare"] = _ms(time.monotonic_ns() - t0)

        # 2-4. transfer and commit: the guest pauses now.
        t = Transfer(old, new, versions=compat["versions"], run_flag=rt.held.get(RUN_FLAG))
        with self._one_pause_at_a_time:
            new.renice(0)  # built at low priority; its part of the pause runs at full
            ended = self._transfer_and_commit(rt, kind, t, journal, timeout_ms, report, finish)
        return ended if ended is not None else self._reap_and_report(rt, kind, t, report, finish)

    def _transfer_and_commit(
        self,
        rt: VmRuntime,
        kind: WorkerKind,
        t: Transfer,
        journal: Journal,
        timeout_ms: int,
        report: dict[str, Any],
        finish: Any,
    ) -> dict[str, Any] | None:
        """Steps 2-4, under the one-pause-at-a-time lock: the finished report if it
        rolled back or failed, None once the new worker runs the guest."""
        sup, cfg = self.sup, self.sup.settings.upgrade
        new, phases = t.new, report["phases_ms"]
        worker_commits = cfg.commit == "worker"
        commit_by = time.monotonic_ns() + timeout_ms * 1_000_000 if worker_commits else None
        journal.write("transfer", commit=cfg.commit, commit_by_ns=commit_by)
        t1 = time.monotonic_ns()
        try:
            kind.begin_transfer(t, timeout_ms, commit_by)
            # In worker-commit mode give a late worker a margin past its deadline: it
            # will not resume after it, and we must not kill it while it might.
            loaded = kind.wait_loaded(t, timeout_ms + (COMMIT_MARGIN_MS if worker_commits else 0))
        except RemoteError as e:
            return self._roll_back(rt, kind, t, f"before commit: {e.message}", report, finish)
        loaded_seen = time.monotonic_ns()
        journal.write("loaded")
        phases["transfer"] = _ms(loaded_seen - t1)
        report["load_ms"] = round(
            (loaded.get("validate_us", 0) + loaded.get("apply_us", 0)) / 1000, 3
        )
        journal.write("commit")
        commit_written = time.monotonic_ns()
        if loaded.get("committed"):
            resumed = loaded
        else:
            try:
                resumed = kind.resume_new(t, sup.settings.upgrade.commit_timeout_ms)
            except RemoteError as e:
                return self._roll_back(
                    rt, kind, t, f"the new worker failed to resume: {e.message}", report, finish
                )
        phases["commit"] = _ms(time.monotonic_ns() - commit_written)
        report["commit_by"] = cfg.commit
        rt.worker = new
        rt.state = "running"
        sup.watcher.add(new)
        journal.write("resumed", new=new.record())
        sup.persist(rt)
        t.pending.update(
            loaded=loaded, resumed=resumed, loaded_seen=loaded_seen, commit_written=commit_written
        )
        return None

    def _reap_and_report(
        self, rt: VmRuntime, kind: WorkerKind, t: Transfer, report: dict[str, Any], finish: Any
    ) -> dict[str, Any]:
        """Step 5, outside the lock: the old worker's teardown (tens of ms) overlaps
        other VMs' pauses."""
        sup, old, phases = self.sup, t.old, report["phases_ms"]
        loaded, resumed = t.pending["loaded"], t.pending["resumed"]
        loaded_seen, commit_written = t.pending["loaded_seen"], t.pending["commit_written"]
        # 5. reap the old worker; its VM teardown happens now, after the guest runs again.
        t3 = time.monotonic_ns()
        try:
            sent = kind.finish_transfer(t, 5000)
        except RemoteError:
            sent = {}
        if "paused_at_ns" in sent and "resumed_at_ns" in resumed:
            # The guest is paused from the moment its first vCPU left KVM_RUN (not from
            # when we asked: until then it runs, or idles in HLT as it would anyway).
            stopped = sent.get("stopped_at_ns") or sent["paused_at_ns"]
            report["blackout_ms"] = _ms(resumed["resumed_at_ns"] - stopped)
            origin = stopped
            same_clock = sent.get("clock") != "realtime"  # our marks are CLOCK_MONOTONIC
            marks = {
                "pause_requested": sent["paused_at_ns"],
                "old_parked": sent.get("parked_at_ns"),
                "old_sent": sent.get("sent_at_ns"),
                "new_received": loaded.get("received_at_ns"),
                "new_loaded": loaded.get("loaded_at_ns"),
                "supervisor_saw_loaded": loaded_seen if same_clock else None,
                "commit_journaled": commit_written if same_clock else None,
                "new_resume_started": resumed.get("resume_started_ns"),
                "new_vcpus_running": resumed["resumed_at_ns"],
            }
            report["timeline_us"] = {
                k: round((v - origin) / 1000, 1) for k, v in marks.items() if v is not None
            }
        report["state_bytes"] = sent.get("state_size") or loaded.get("state_size")
        report["old_side_us"] = {
            k: sent[k] for k in ("pause_us", "collect_us", "save_us", "send_us") if k in sent
        }
        report["new_side_us"] = {
            "validate_us": loaded.get("validate_us"),
            "apply_us": loaded.get("apply_us"),
            "resume_us": resumed.get("resume_us"),
        }
        old_status = sup._end_worker(rt, old, force=False)
        phases["reap"] = _ms(time.monotonic_ns() - t3)
        report["old_exit"] = old_status
        return finish("committed")

    def _roll_back(
        self,
        rt: VmRuntime,
        kind: WorkerKind,
        t: Transfer,
        reason: str,
        report: dict[str, Any],
        finish: Any,
    ) -> dict[str, Any]:
        """Kill the new worker, make sure it is dead, then give the guest back to the old one."""
        sup = self.sup
        if not self._kill_confirmed(t.new):
            rt.state = "failed"
            rt.reason = (
                "upgrade: the new worker would not die; the guest stays paused in the old one"
            )
            return finish("failed", rt.reason)
        sup._revoke(rt, t.new)
        if self._run_flag_says(rt, t.new.instance):
            # It reached its point of no return: the guest may have run there.
            rt.state = "failed"
            rt.reason = f"upgrade: the new worker died after it took the guest ({reason})"
            rt.worker = None
            self._kill_confirmed(t.old)
            sup._revoke(rt, t.old)
            return finish("failed", rt.reason)
        with contextlib.suppress(RemoteError):
            kind.finish_transfer(t, 5000)
        try:
            kind.resume_old(t.old, sup.settings.upgrade.commit_timeout_ms)
        except RemoteError as e:
            rt.state = "failed"
            rt.reason = f"upgrade rolled back but the old worker could not resume: {e.message}"
            rt.worker = None
            self._kill_confirmed(t.old)
            sup._revoke(rt, t.old)
            sup._schedule_restart(rt)
            return finish("failed", rt.reason)
        rt.state = "running"
        return finish("rolled-back", reason)

    # -------------------------------------------------------------- recovery
    def resolve_journals(self) -> dict[str, str]:
        """Finish or roll back every upgrade a previous supervisor left open."""
        out: dict[str, str] = {}
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.journal")):
            vm = path.stem
            journal = Journal(self.dir, vm)
            records = journal.read()
            rt = self.sup.vms.get(vm)
            if rt is None or not records:
                journal.close()
                continue
            with rt.lock:
                try:
                    out[vm] = self._resolve(rt, journal, records)
                except Exception as e:  # never let one journal stop the supervisor
                    log.exception("vm %s: resolving the upgrade journal failed", vm)
                    out[vm] = f"unresolved: {e}"
            log.info("vm %s: upgrade journal resolved: %s", vm, out[vm])
        return out

    def _adopt(self, rec: dict[str, Any] | None) -> WorkerHandle | None:
        if not rec:
            return None
        try:
            return WorkerHandle.adopt(rec)
        except WorkerGone:
            return None

    def _resolve(self, rt: VmRuntime, journal: Journal, records: list[dict[str, Any]]) -> str:
        """Decide by what is true now: which workers live, and the run flag."""
        steps = [r["step"] for r in records]
        if "done" in steps:
            journal.close()
            return "already finished"
        journal.open()
        begin = records[0]
        prepared = next((r for r in records if r["step"] == "prepared"), {})
        new_instance = prepared.get("new", {}).get("instance", "")
        kind = self.sup.kind(rt)
        old = rt.worker if rt.worker and rt.worker.instance == begin["old"]["instance"] else None
        watched = old is not None  # adopt_all already watches it
        if old is None:
            old = self._adopt(begin.get("old"))
        new = self._adopt(prepared.get("new"))

        def settle(outcome: str, reason: str) -> str:
            journal.write(
                "done", outcome=outcome, reason=f"resolved after a supervisor restart: {reason}"
            )
            journal.close()
            self.sup.persist(rt)
            return f"{outcome}: {reason}"

        if new is not None:
            try:
                new_state = kind.describe(new).get("state")
            except RemoteError:
                new_state = "unknown"
            # Forward if it already runs the guest, if the commit was journaled, or if
            # the old worker is gone and the new one holds the whole state.
            if new_state == "running" or "commit" in steps or (old is None and "loaded" in steps):
                with contextlib.suppress(RemoteError):
                    kind.resume_new(Transfer(old or new, new), 5000)
                if old is not None:
                    self._kill_confirmed(old)
                    self.sup._revoke(rt, old)
                rt.worker, rt.state, rt.reason = new, "running", ""
                self.sup.watcher.add(new)
                rt.upgrades += 1
                return settle("committed", f"new worker pid {new.pid} runs the guest")
            self._kill_confirmed(new)
            self.sup._revoke(rt, new)
        # The new worker is dead now. If it ever ran the guest, the old state is stale.
        if new_instance and self._run_flag_says(rt, new_instance):
            if old is not None:
                self._kill_confirmed(old)
            rt.worker, rt.state = None, "failed"
            rt.reason = "upgrade: the new worker died after it took the guest"
            return settle("failed", rt.reason)
        if old is None:
            rt.worker, rt.state = None, "failed"
            rt.reason = "upgrade: both workers were lost while the supervisor was down"
            return settle("failed", rt.reason)
        kind.resume_old(old, 5000)
        rt.worker, rt.state = old, "running"
        if not watched:
            self.sup.watcher.add(old)
        outcome = "rolled-back" if "transfer" in steps else "aborted"
        return settle(outcome, f"old worker pid {old.pid} runs the guest")
