"""The live upgrade: one worker replaced by another while the guest pauses ~1 ms.

The transaction's shape (steps, outcomes, the table of allowed transitions,
what is journaled when in each commit mode, the point of no return) is in
``supervisor.transaction``; this module drives it. Before the point of no
return any failure (crash, error reply, deadline) kills the new worker,
waits until the kernel confirms it is dead, and resumes the old one. After
it, the old worker is never resumed. The VM's run lease, which the broker
grants to one live process at a time, settles a new worker that dies around
the commit (see ``supervisor.transaction``).

The upgrader talks to workers only through their kind
(``supervisor.kinds.base.WorkerKind``) and to the supervisor only through
its public surface.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from baton import contract, wire
from baton.trace import mark
from baton.wire import Code, RemoteError
from supervisor import faults
from supervisor.aside import Aside
from supervisor.kinds.base import (
    Loaded,
    Preflight,
    Resumed,
    Sent,
    Transfer,
    WorkerKind,
)
from supervisor.lifecycle import LifecycleError, VmRuntime, VmState
from supervisor.priority import BACKGROUND, EXCLUSION, realtime_block, urgent
from supervisor.service import Supervisor
from supervisor.transaction import Journal, Outcome, Report, Resolution, Step, resolve
from supervisor.workers import RETIRE_NICE, WorkerGone, WorkerHandle

log = logging.getLogger("supervisor.upgrade")
COMMIT_MARGIN_MS = 500
LEASE_WAIT_S = 5.0  # how long a broker restart may keep us from asking about the lease
S = VmState


@dataclass
class Handover:
    """What the pause produced once the new worker runs the guest (for the report)."""

    loaded: Loaded
    resumed: Resumed
    loaded_seen_ns: int
    commit_written_ns: int


class Upgrade:
    """One transaction: a VM, its journal and its report, ended exactly once."""

    def __init__(
        self,
        rt: VmRuntime,
        journal: Journal,
        report: Report,
        sup: Supervisor,
        retire_aside: bool = False,
    ) -> None:
        self.rt = rt
        self.journal = journal
        self.report = report
        self.sup = sup
        self.t_start = time.monotonic_ns()
        # What this transaction made, so that any failure can undo it (``Upgrader._unexpected``).
        self.new: WorkerHandle | None = None
        self.transfer: Transfer | None = None
        self.committed = False  # the new worker runs the guest and is the VM's worker
        self.ended = False
        self.settled_ns: int | None = None  # the new worker runs, the old one is parked
        #: the old worker retired off the caller's path (``Upgrader._retire_aside``)
        self.retire_aside = retire_aside

    def end(self, outcome: Outcome, reason: str = "") -> Report:
        r, rt = self.report, self.rt
        if outcome is Outcome.ROLLED_BACK and self.journal.last in (Step.BEGIN, Step.PREPARED):
            outcome = Outcome.ABORTED  # the guest never paused
        r.outcome, r.reason = outcome, reason
        r.total_ms = round(((self.settled_ns or time.monotonic_ns()) - self.t_start) / 1e6, 3)
        self.ended = True
        try:
            self.journal.append(Step.DONE, outcome=str(outcome), reason=reason)
        except Exception:  # a full disk, say: the VM's state below is what counts
            log.exception("vm %s: cannot journal the upgrade's end", rt.name)
        self.journal.close()
        rt.last_upgrade = r.to_dict()
        if outcome is Outcome.COMMITTED:
            rt.upgrades += 1
        self.sup.persist(rt)
        log.info("vm %s: upgrade %s %s", rt.name, outcome, reason)
        self.sup.events.upgrade_finished(r)
        return r


class Upgrader:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.dir = sup.paths.lib / "upgrade"
        # Many VMs may prepare at once (at low priority), but only one is ever inside
        # its pause: each pause is about a millisecond, so this costs nothing in total
        # time and keeps the CPUs for the guest that is waiting.
        self._one_pause_at_a_time = threading.Lock()
        self._retiring: set[int] = set()  # pids of old workers retired aside, in flight
        self._retired = threading.Condition()

    # ---------------------------------------------------------------- helpers
    def _ever_ran(self, rt: VmRuntime, instance: str) -> bool:
        """Did worker ``instance`` ever hold the VM's run lease (and so may have run
        the guest)? Asked of the broker, waiting out a broker restart; if it cannot
        say, the answer is yes: an old state is never resumed on a guess."""
        deadline = time.monotonic() + LEASE_WAIT_S
        while True:
            try:
                lease = self.sup.broker.lease_status(rt.name)
            except (RemoteError, wire.WireError) as e:
                if time.monotonic() >= deadline:
                    log.warning("vm %s: the broker cannot say who ran the guest: %s", rt.name, e)
                    return True
                time.sleep(0.1)
                continue
            holder = lease.get("holder") or {}
            return (
                holder.get("instance") == instance
                or instance in lease.get("past", [])
                or lease.get("flag") == instance  # settled already; this errs on the safe side
            )

    def _withdraw_offer(self, rt: VmRuntime, old: WorkerHandle) -> None:
        with contextlib.suppress(RemoteError, wire.WireError):
            self.sup.broker.lease_offer(rt.name, old.instance, None)

    # ---------------------------------------------------------------- upgrade
    def upgrade(
        self,
        name: str,
        command: list[str] | None,
        handoff_timeout_ms: int | None,
        retire_aside: bool = False,
    ) -> Report:
        """One VM's upgrade, its report once the new worker runs the guest and the old
        one is parked; then (``retire_aside`` false) once the old one has exited, or
        at once while it exits (``retire_aside``: a rollout's, see ``_retire_aside``)."""
        pool = self.sup.standby
        # No standby is built while upgrades run (a rollout's replacements wait for
        # its end); the next one once none has run for a moment (supervisor.standby).
        with (
            pool.upgrading() if pool is not None else contextlib.nullcontext(),
            self._running_vm(name, "an upgrade") as rt,
        ):
            return self._upgrade_locked(rt, command, handoff_timeout_ms, retire_aside)

    @contextlib.contextmanager
    def _running_vm(self, name: str, what: str) -> Iterator[VmRuntime]:
        """The VM, locked for an upgrade or a preflight, which both need it running."""
        rt = self.sup.get(name)
        with rt.operation(what):
            if rt.state is not S.RUNNING or rt.worker is None:
                raise RemoteError(
                    Code.INVALID_STATE,
                    f"VM {name} is {rt.state}; only a running VM can be upgraded",
                )
            yield rt

    def _upgrade_locked(
        self,
        rt: VmRuntime,
        command: list[str] | None,
        handoff_timeout_ms: int | None,
        retire_aside: bool = False,
    ) -> Report:
        sup, cfg = self.sup, self.sup.settings.upgrade
        kind = sup.kind(rt)
        old = rt.worker
        assert old is not None
        timeout_ms = handoff_timeout_ms or cfg.handoff_timeout_ms
        report = Report(rt.name, uuid.uuid4().hex, old.pid, old.version)
        journal = Journal(self.dir, rt.name)
        journal.open()
        journal.append(Step.BEGIN, txid=report.txid, old=old.record(), command=command)
        up = Upgrade(rt, journal, report, sup, retire_aside)
        rt.change_state(S.UPGRADING)
        try:
            return self._run(up, kind, command, timeout_ms)
        except Exception as e:  # whatever it was, the VM ends consistent
            log.exception("vm %s: the upgrade failed unexpectedly", rt.name)
            return self._unexpected(up, kind, f"internal error: {type(e).__name__}: {e}")

    def _run(
        self, up: Upgrade, kind: WorkerKind, command: list[str] | None, timeout_ms: int
    ) -> Report:
        sup, cfg, rt, report, journal = (
            self.sup,
            self.sup.settings.upgrade,
            up.rt,
            up.report,
            up.journal,
        )
        old = rt.worker
        assert old is not None
        # No record is written for the state ``upgrading``: ``begin`` (on disk) is what a
        # restarted supervisor goes by; adoption reads only a record's worker,
        # ``suspended`` and ``failed``. The record changes at the end, with the worker.

        # 1. prepare: the new worker builds everything while the guest runs on; the
        # VM's standby (supervisor.standby), if it has one for this command, already has.
        mark("S.upgrade_start")
        t0 = time.monotonic_ns()
        pool = sup.standby
        standby = pool.take(rt, command, cfg.prepare_timeout_s) if pool is not None else None
        report.standby = standby is not None
        if standby is not None:
            new = up.new = standby
        else:
            try:
                new = sup.start_incoming(rt, "worker (upgrade)", command=command, source=old)
            except RemoteError as e:
                rt.change_state(S.RUNNING)
                return up.end(Outcome.ABORTED, f"the new worker failed in prepare: {e.message}")
        up.new = new
        report.new_pid, report.new_version = new.pid, new.version
        journal.append(Step.PREPARED, new=new.record())
        faults.fail("prepared")
        # The new worker may take the run lease from the old one (by writing the run
        # flag, inside the pause, or asking the broker): the commit point. The offer (a
        # broker round trip and its fsync) goes out while the old worker answers
        # ``check``: neither needs the other, and nothing pauses before both are done.
        offer = Aside(
            lambda: sup.broker.lease_offer(
                rt.name, old.instance, new.instance, pid=new.pid, start_time=new.create_time
            )
        )
        try:
            compat = kind.check(old, new)
        except RemoteError as e:
            offer.join()
            sup.kill_confirmed(rt, new)
            self._withdraw_offer(rt, old)
            rt.change_state(S.RUNNING)
            return up.end(Outcome.ABORTED, f"refused before the pause: {e.message}")
        except BaseException:
            offer.join()  # made before whoever handles this withdraws it
            raise
        report.state_versions = compat.versions
        mark("S.prepare_end")
        report.phase("prepare", t0)
        try:
            offer.result()
        except (RemoteError, wire.WireError) as e:
            sup.kill_confirmed(rt, new)
            rt.change_state(S.RUNNING)
            return up.end(Outcome.ABORTED, f"the run lease cannot be offered: {e}")
        mark("S.lease_offered")

        # 2-4. transfer and commit: the guest pauses now.
        t = up.transfer = Transfer(
            old, new, compat.versions, prewake=compat.prewake, frame=compat.frame
        )
        # The two workers of the pause take their CPU at once when they wake, and other
        # VMs' background work yields to the pause itself (supervisor.priority).
        # No old worker's exit nor unregistered fork runs beside the pause: one under
        # way ends first, before the guest stops (supervisor.priority.Exclusion).
        with self._one_pause_at_a_time, EXCLUSION.pause():
            new.renice(0)  # built at low priority; its part of the pause runs at full
            with urgent(old.pid, new.pid):
                try:
                    handover = self._transfer_and_commit(up, kind, t, timeout_ms)
                except RemoteError as e:
                    return self._roll_back(up, kind, t, e.message)
                except Exception as e:  # a malformed reply, say: the same as an error reply
                    if up.committed:
                        raise
                    log.exception("vm %s: the handoff failed unexpectedly", rt.name)
                    reason = f"internal error: {type(e).__name__}: {e}"
                    return self._roll_back(up, kind, t, reason)
                finally:
                    if t.inflight is not None:
                        t.inflight.close()  # a channel never handed to the old worker, say
        return self._reap_and_report(up, kind, t, handover)

    def _unexpected(self, up: Upgrade, kind: WorkerKind, reason: str) -> Report:
        """An exception nothing else handled: end the transaction consistent. The
        new worker is killed (confirmed dead, its token revoked) unless it already
        runs the guest; the old one keeps or takes back the guest, or, if even that
        fails, both are confirmed dead and the VM is failed."""
        sup, rt = self.sup, up.rt
        if up.ended:
            return up.report  # the outcome is recorded; what failed came after it
        try:
            if up.committed and up.transfer is not None:
                old = up.transfer.old
                if old.pidfd >= 0:  # not yet retired
                    sup.retire_worker(rt, old, force=True)
                return up.end(Outcome.COMMITTED, reason)
            if up.transfer is not None and up.journal.last not in (Step.BEGIN, Step.PREPARED):
                return self._roll_back(up, kind, up.transfer, reason)
            # Before the pause: the old worker still runs the guest.
            if up.new is not None and not sup.kill_confirmed(rt, up.new):
                raise RuntimeError(f"the new worker pid {up.new.pid} would not die")
            if rt.worker is not None:
                self._withdraw_offer(rt, rt.worker)
            rt.change_state(S.RUNNING)
            return up.end(Outcome.ABORTED, reason)
        except Exception:
            log.exception("vm %s: cannot settle the upgrade; failing the VM", rt.name)
        return self._give_up(up, reason)

    def _give_up(self, up: Upgrade, reason: str) -> Report:
        """The last resort: no worker this transaction touched is left running
        unwatched; the VM is failed (and restarted by its policy)."""
        sup, rt = self.sup, up.rt
        for h in {id(w): w for w in (up.new, rt.worker) if w is not None}.values():
            with contextlib.suppress(Exception):
                if not sup.kill_confirmed(rt, h):
                    log.error("vm %s: pid %d would not die", rt.name, h.pid)
        if up.new is not None:
            sup.revoke(rt, up.new)  # even one that would not die loses its token
        rt.worker = None
        try:
            rt.change_state(S.FAILED, f"upgrade failed: {reason}")
        except LifecycleError:  # the last resort may not be a transition the table knows
            rt.state, rt.reason = S.FAILED, f"upgrade failed: {reason}"
        sup.schedule_restart(rt, "upgrade")
        if up.ended:
            with contextlib.suppress(Exception):
                sup.persist(rt)
            return up.report
        return up.end(Outcome.FAILED, rt.reason)

    def _transfer_and_commit(
        self, up: Upgrade, kind: WorkerKind, t: Transfer, timeout_ms: int
    ) -> Handover:
        """Steps 2-4, under the one-pause-at-a-time lock. Returns once the new worker
        runs the guest; a RemoteError means it does not (roll back)."""
        sup, cfg, rt, journal = self.sup, self.sup.settings.upgrade, up.rt, up.journal
        worker_commits = cfg.commit == "worker" and kind.commits_itself
        commit_by = time.monotonic_ns() + timeout_ms * 1_000_000 if worker_commits else None
        # The new worker gets ready (its lease question, its warm-up) while the record
        # goes to disk; the old one is asked to pause only once it is there.
        kind.ready_receiver(t, timeout_ms, commit_by)
        faults.fail("receiver-ready")
        journal.append(
            Step.TRANSFER,
            commit="worker" if worker_commits else "supervisor",
            commit_by_ns=commit_by,
        )
        mark("S.transfer_journaled")
        t1 = time.monotonic_ns()
        margin = COMMIT_MARGIN_MS if worker_commits else 0
        try:
            with (
                BACKGROUND.quiet(),  # the pause: in worker-commit mode, all of it
                realtime_block(t.old.pid, t.new.pid, on=worker_commits and cfg.realtime_pause),
            ):
                kind.begin_transfer(t, timeout_ms, commit_by)
                # In worker-commit mode give a late worker a margin past its deadline: it
                # will not resume after it, and we must not kill it while it might.
                loaded = kind.wait_loaded(t, timeout_ms + margin)
        except RemoteError as e:
            raise RemoteError(e.code, f"before commit: {e.message}") from None
        loaded_seen = time.monotonic_ns()
        mark("S.loaded")
        up.report.phase("transfer", t1)
        up.report.load_ms = round(((loaded.validate_us or 0) + (loaded.apply_us or 0)) / 1000, 3)
        if loaded.resumed is not None:  # the new worker committed by itself, in time
            resumed, commit_written = loaded.resumed, loaded_seen
        else:
            if worker_commits:
                raise RemoteError(Code.INVALID_STATE, "the new worker loaded but did not commit")
            journal.append(Step.LOADED)
            journal.append(Step.COMMIT)  # the point of no return in supervisor mode
            commit_written = time.monotonic_ns()
            try:
                with BACKGROUND.quiet():  # the rest of the pause
                    resumed = kind.resume_new(t, cfg.commit_timeout_ms)
            except RemoteError as e:
                raise RemoteError(e.code, f"the new worker failed to resume: {e.message}") from None
        up.report.phase("commit", commit_written)
        up.report.commit_by = "worker" if worker_commits else "supervisor"
        rt.worker = t.new
        up.committed = True
        rt.change_state(S.RUNNING)
        sup.watch(t.new)
        return Handover(loaded, resumed, loaded_seen, commit_written)

    def _record_resumed(self, up: Upgrade, t: Transfer) -> None:
        """``resumed`` and the VM's record naming its new worker: after the old worker
        confirmed it is parked, not before. Neither guards a step of the guest's (the
        commit is journaled already; a restarted supervisor finds the new worker by
        its run lease, and keeps it), and the old worker is retired only after both."""
        up.journal.append(Step.RESUMED, new=t.new.record())
        mark("S.resumed_journaled")
        self.sup.persist(up.rt)
        mark("S.persisted")

    def _reap_and_report(self, up: Upgrade, kind: WorkerKind, t: Transfer, h: Handover) -> Report:
        """Step 5, outside the lock: the old worker's teardown (tens of ms) overlaps
        other VMs' pauses."""
        report = up.report
        t3 = time.monotonic_ns()
        try:
            sent = kind.finish_transfer(t, 5000)
        except RemoteError:
            sent = Sent()
        # The guest runs in the new worker and the old one said it is parked: that is
        # the upgrade's total. The old worker's KVM teardown is reported as reap_ms.
        up.settled_ns = time.monotonic_ns()
        mark("S.settled")
        self._record_resumed(up, t)
        self._timeline(report, sent, h)
        t4 = time.monotonic_ns()
        # Its KVM teardown and exit (tens to hundreds of ms of CPU here) come just as
        # the new worker catches up on what queued during the pause: they wait.
        t.old.renice(RETIRE_NICE)
        BACKGROUND.add(t.old.pid)  # and idle during other VMs' pauses, until reaped
        if up.retire_aside:
            self._retire_aside(up.rt, t.old)
            return up.end(Outcome.COMMITTED)
        report.old_exit = self.sup.retire_worker(up.rt, t.old, force=False)
        report.reap_ms = round((time.monotonic_ns() - t4) / 1e6, 3)
        report.phase("reap", t3)
        return up.end(Outcome.COMMITTED)

    def _retire_aside(self, rt: VmRuntime, old: WorkerHandle) -> None:
        """The old worker retired (``quit``, exit, reap, token revoked) on a thread of
        its own, the VM's lock released meanwhile. Why: at 100 VMs a rollout's slot
        otherwise waits out each old worker's exit (its KVM teardown and unmap at
        nice 19: 66 ms median at load ~1.5, 130-220 ms at load 7-15) before it
        upgrades the next VM. Safe to leave running: it is parked, it said so, and the
        run lease is the new worker's (the commit came first), so it can never run the
        guest again; a supervisor that dies meanwhile leaves an orphan the next one
        sweeps (``Supervisor.sweep_orphans``), as during any reap."""
        t0 = time.monotonic_ns()

        def retire() -> None:
            try:
                status = self.sup.retire_worker(rt, old, force=False)
                took = (time.monotonic_ns() - t0) / 1e6
                log.info(
                    "vm %s: old worker pid %d %s (aside, %.1f ms)", rt.name, old.pid, status, took
                )
            except Exception:
                log.exception("vm %s: retiring old worker pid %d", rt.name, old.pid)
            finally:
                with self._retired:
                    self._retiring.discard(old.pid)
                    self._retired.notify_all()

        with self._retired:
            self._retiring.add(old.pid)
        Aside(retire, name=f"retire-{rt.name}")

    def close(self, timeout_s: float = 10.0) -> list[int]:
        """At supervisor shutdown: wait (up to ``timeout_s``) for the old workers being
        retired aside; returns the pids still retiring (the next supervisor's orphan
        sweep ends them)."""
        with self._retired:
            self._retired.wait_for(lambda: not self._retiring, timeout_s)
            return sorted(self._retiring)

    @staticmethod
    def _timeline(report: Report, sent: Sent, h: Handover) -> None:
        loaded, resumed = h.loaded, h.resumed
        if sent.stopped_at_ns is not None:
            # The guest is paused from the moment its first vCPU left KVM_RUN (not from
            # when we asked: until then it runs, or idles in HLT as it would anyway).
            origin = sent.stopped_at_ns
            report.blackout_ms = round((resumed.resumed_at_ns - origin) / 1e6, 3)
            same_clock = sent.clock != "realtime"  # our marks are CLOCK_MONOTONIC
            if same_clock:  # the blackout's window, for lining up with perf and other marks
                pids = f"{report.old_pid} {report.new_pid}"
                mark(f"S.blackout {pids} {origin} {resumed.resumed_at_ns}")
            marks = {
                "pause_requested": sent.paused_at_ns,
                "old_parked": sent.parked_at_ns,
                "old_sent": sent.sent_at_ns,
                "new_waiting": loaded.waiting_at_ns,
                "new_readable": loaded.readable_at_ns,
                "new_received": loaded.received_at_ns,
                "new_loaded": loaded.loaded_at_ns,
                "supervisor_saw_loaded": h.loaded_seen_ns if same_clock else None,
                "commit_journaled": h.commit_written_ns if same_clock else None,
                "new_resume_started": resumed.resume_started_ns,
                "new_vcpus_running": resumed.resumed_at_ns,
            }
            report.timeline_us = {
                k: round((v - origin) / 1000, 1) for k, v in marks.items() if v is not None
            }
        report.state_bytes = sent.state_size or loaded.state_size
        report.old_side_us = sent.phases_us or {}
        report.new_side_us = {
            "validate_us": loaded.validate_us,
            "apply_us": loaded.apply_us,
            "resume_us": resumed.resume_us,
            "lease_us": resumed.lease_us,
            "unmerge_us": loaded.unmerge_us,
        }

    def _roll_back(self, up: Upgrade, kind: WorkerKind, t: Transfer, reason: str) -> Report:
        """Kill the new worker, make sure it is dead, then give the guest back to the old one."""
        sup, rt = self.sup, up.rt
        if not sup.kill_confirmed(rt, t.new):
            rt.change_state(
                S.FAILED,
                "upgrade: the new worker would not die; the guest stays paused in the old one",
            )
            return up.end(Outcome.FAILED, rt.reason)
        self._withdraw_offer(rt, t.old)
        if self._ever_ran(rt, t.new.instance):
            # It reached its point of no return: the guest may have run there.
            rt.change_state(
                S.FAILED, f"upgrade: the new worker died after it took the guest ({reason})"
            )
            rt.worker = None
            sup.kill_confirmed(rt, t.old)
            return up.end(Outcome.FAILED, rt.reason)
        with contextlib.suppress(RemoteError):
            kind.finish_transfer(t, 5000)
        try:
            kind.resume_old(t.old, sup.settings.upgrade.commit_timeout_ms)
        except RemoteError as e:
            rt.change_state(
                S.FAILED, f"upgrade rolled back but the old worker could not resume: {e.message}"
            )
            rt.worker = None
            sup.kill_confirmed(rt, t.old)
            sup.schedule_restart(rt, "upgrade")
            return up.end(Outcome.FAILED, rt.reason)
        rt.change_state(S.RUNNING)
        return up.end(Outcome.ROLLED_BACK, reason)

    # ------------------------------------------------------------- preflight
    def check(self, name: str, command: list[str] | None) -> dict[str, Any]:
        """``vmctl upgrade --check``: what an upgrade to ``command`` would do, and why
        not where it would not, with the guest running throughout.

        Under the VM's lock like an upgrade, but nothing is journaled and nothing
        changes: the VM stays ``running``, the run lease is never offered, and the
        new worker is ended (killed, confirmed dead, its token revoked) whatever
        it found. A supervisor killed during a check leaves at most that incoming
        worker, which never held the lease and so never ran the guest."""
        with self._running_vm(name, "a preflight") as rt:
            return self._check_locked(rt, command)

    def _check_locked(self, rt: VmRuntime, command: list[str] | None) -> dict[str, Any]:
        sup = self.sup
        kind = sup.kind(rt)
        old = rt.worker
        assert old is not None
        t_start = time.monotonic_ns()
        out: dict[str, Any] = {
            "vm": rt.name,
            "check": True,
            "ok": False,
            "reason": "",
            "kind": kind.name,
            "old_pid": old.pid,
            "old_version": old.version,
            "new_pid": None,
            "new_version": None,
        }

        def ms(since: int) -> float:
            return round((time.monotonic_ns() - since) / 1e6, 3)

        try:
            new = sup.start_incoming(rt, "worker (check)", command=command, source=old)
        except RemoteError as e:
            out["reason"] = f"the new worker failed to start: {e.message}"
            out["total_ms"] = ms(t_start)
            return out
        out["new_pid"], out["new_version"] = new.pid, new.version
        out["prepare_ms"] = ms(t_start)
        pf = Preflight()
        try:
            kind.preflight(old, new, pf)
        except RemoteError as e:
            pf.refused = pf.refused or f"{e.message} ({e.code})"
        finally:
            if not sup.kill_confirmed(rt, new):
                pf.refused = pf.refused or "the new worker would not die"
                pf.notes.append(f"the new worker (pid {new.pid}) would not die")
        out.update(
            ok=not pf.refused,
            reason=pf.refused,
            new_version=pf.new_version or new.version,
            versions=pf.versions,
            rollback={
                "ok": pf.rollback_versions is not None,
                "versions": pf.rollback_versions,
                "reason": pf.rollback_reason,
            },
            state_bytes=pf.state_bytes,
            preview_ms=None if pf.preview_us is None else round(pf.preview_us / 1000, 3),
            validate_ms=None if pf.validate_us is None else round(pf.validate_us / 1000, 3),
            notes=pf.notes,
            total_ms=ms(t_start),
        )
        verdict = "ok" if out["ok"] else "refused"
        log.info("vm %s: upgrade check %s %s", rt.name, verdict, pf.refused)
        return out

    # -------------------------------------------------------------- recovery
    def resolve_journals(self) -> dict[str, str]:
        """Finish or roll back every upgrade a previous supervisor left open; then
        resume any adopted worker still paused with no journal to explain it (a
        supervisor that died between starting a QEMU with -S and its cont)."""
        out = self._resolve_open_journals()
        for rt in list(self.sup.vms.values()):
            with rt.lock:
                if rt.state is S.PAUSED and rt.worker is not None and rt.name not in out:
                    try:
                        self.sup.kind(rt).resume_old(rt.worker, 5000)
                        rt.adopted(S.RUNNING, "")
                        out[rt.name] = f"resumed paused worker pid {rt.worker.pid}"
                    except RemoteError as e:
                        out[rt.name] = f"paused worker pid {rt.worker.pid} did not resume: {e}"
                    self.sup.persist(rt)
                    log.info("vm %s: %s", rt.name, out[rt.name])
        return out

    def _resolve_open_journals(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.journal")):
            vm = path.stem
            journal = Journal(self.dir, vm)
            try:
                records = journal.read()
            except OSError as e:
                log.error("vm %s: cannot read the upgrade journal %s: %s", vm, path, e)
                continue
            if journal.problem is not None:
                aside = journal.set_aside()
                log.error(
                    "vm %s: upgrade journal %s: %s; kept as %s; recovering from the %d "
                    "readable records and from what is live",
                    vm,
                    path,
                    journal.problem,
                    aside.name,
                    len(records),
                )
            rt = self.sup.vms.get(vm)
            if rt is None or not records:
                journal.close(keep_as_last=bool(records))
                continue
            with rt.lock:
                try:
                    out[vm] = self._resolve(rt, journal, records)
                except Exception as e:  # never let one journal stop the supervisor
                    log.exception("vm %s: resolving the upgrade journal failed", vm)
                    out[vm] = f"unresolved: {e}"
            log.info("vm %s: upgrade journal resolved: %s", vm, out[vm])
        return out

    def _adopt(self, kind: WorkerKind, rec: dict[str, Any] | None) -> WorkerHandle | None:
        if not rec:
            return None
        try:
            h = WorkerHandle.adopt(rec)
        except (WorkerGone, KeyError, TypeError, ValueError):
            return None
        try:
            kind.adopt(h)
        except RemoteError:
            h.close()
            return None
        return h

    def _resolve(self, rt: VmRuntime, journal: Journal, records: list[dict[str, Any]]) -> str:
        """Decide by what is true now (``transaction.resolve``) and settle the journal."""
        if journal.last is Step.DONE:
            journal.close()
            return "already finished"
        journal.open()
        begin = records[0]
        prepared = next((r for r in records if r["step"] == Step.PREPARED), {})
        old_rec = begin.get("old") if isinstance(begin.get("old"), dict) else {}
        new_rec = prepared.get("new") if isinstance(prepared.get("new"), dict) else {}
        assert isinstance(old_rec, dict) and isinstance(new_rec, dict)
        new_instance = str(new_rec.get("instance", ""))
        kind = self.sup.kind(rt)
        old = rt.worker if rt.worker and rt.worker.instance == old_rec.get("instance") else None
        watched = old is not None  # adopt_all already watches it
        if old is None:
            old = self._adopt(kind, old_rec)
        new = self._adopt(kind, new_rec)
        steps = journal.steps

        def settle(outcome: Outcome, reason: str) -> str:
            # Whichever recorded worker is not the VM's now is dead: its token goes too.
            keep = rt.worker.instance if rt.worker is not None else None
            for rec in (old_rec, new_rec):
                if rec and rec.get("instance") != keep:
                    self.sup.revoke_hash(rt, WorkerHandle.recorded_token_hash(rec))
            journal.append(
                Step.DONE,
                outcome=str(outcome),
                reason=f"resolved after a supervisor restart: {reason}",
            )
            journal.close()
            self.sup.persist(rt)
            return f"{outcome}: {reason}"

        def found(state: VmState, reason: str = "") -> None:
            rt.adopted(state, reason)
            if state is S.RUNNING:
                rt.restart_at = None

        new_runs = False
        if new is not None:
            try:
                new_runs = kind.describe(new).state == contract.GuestState.RUNNING
            except RemoteError:
                new_runs = False
        decision = resolve(
            steps,
            new_alive=new is not None,
            new_runs_guest=new_runs,
            old_alive=old is not None,
            new_ran=False,  # asked only once the new worker is confirmed dead
        )
        if decision is Resolution.FORWARD:
            assert new is not None
            # If it already runs the guest this says "cannot resume a machine that is running".
            with contextlib.suppress(RemoteError):
                kind.resume_new(Transfer(old or new, new, {}), 5000)
            if old is not None:
                self.sup.kill_confirmed(rt, old)
            rt.worker = new
            found(S.RUNNING, "")
            self.sup.watch(new)
            rt.upgrades += 1
            return settle(Outcome.COMMITTED, f"new worker pid {new.pid} runs the guest")
        if new is not None and not self.sup.kill_confirmed(rt, new):
            rt.worker = old
            found(S.FAILED, "upgrade: the new worker would not die")
            return settle(Outcome.FAILED, rt.reason)
        decision = resolve(
            steps,
            new_alive=False,
            new_runs_guest=False,
            old_alive=old is not None,
            new_ran=bool(new_instance) and self._ever_ran(rt, new_instance),
        )
        if decision is Resolution.STALE:
            if old is not None:
                self.sup.kill_confirmed(rt, old)
            rt.worker = None
            found(S.FAILED, "upgrade: the new worker died after it took the guest")
            return settle(Outcome.FAILED, rt.reason)
        if decision is Resolution.LOST or old is None:
            rt.worker = None
            found(S.FAILED, "upgrade: both workers were lost while the supervisor was down")
            return settle(Outcome.FAILED, rt.reason)
        kind.resume_old(old, 5000)
        rt.worker = old
        found(S.RUNNING, "")
        if not watched:
            self.sup.watch(old)
        outcome = Outcome.ROLLED_BACK if Step.TRANSFER in steps else Outcome.ABORTED
        return settle(outcome, f"old worker pid {old.pid} runs the guest")
