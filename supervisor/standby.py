"""Standby workers: a pre-warmed incoming baton-vmm per VM, ready before anyone
asks for an upgrade.

A standby is exactly what an upgrade's prepare step builds (``--incoming``,
at nice 10): a worker that has started Python, imported everything, fetched
its fds from the broker with a token of its own, mapped RAM, built its VM,
vCPUs and devices and rehearsed its save and load paths. It never holds the
VM's run lease: it gets it at the commit, through the lease offer, as any
new worker does (``broker/lease.py``, ``supervisor.upgrade``). So an idle
standby is provably not running the guest, and killing it at any moment is
always safe.

The pool (``StandbyPool``, one per supervisor) keeps at most one standby per
VM, for the VM's configured worker command and the VM's configuration as it
was when the standby was built:

* an upgrade (``Upgrader``) takes it if its command is the one asked for
  (``vmctl upgrade`` without ``--worker``, or ``--worker`` naming that same
  command) and the VM's configuration has not changed since; if one is being
  prepared for that command it waits for it (it is further along than a cold
  start would be); otherwise the upgrade prepares a worker cold, as before;
* once no upgrade has been in flight for ``QUIET_S`` (and whenever a VM runs
  without one, checked each second), a new standby is prepared in the
  background, one prepare at a time per two CPUs, at nice 10 like every
  prepare. Not while upgrades run: a rollout (``vmctl upgrade --all``) that
  consumed standbys would otherwise rebuild them beside its own pauses, and a
  replacement's build (the uid scan, the jail, the fork, the machine: most
  of a cold upgrade's ~100 ms of CPU here) is worth nothing until that VM's next upgrade (100 VMs'
  ``--all``: 4.2 s with replacements built beside it, 2.7 s without, one
  pair at load ~1.5; docs/benchmarks.md, "fleet branch");
* it ends with the VM (``vmctl stop``, a guest shutdown, a failed worker, a
  changed configuration or ``standby = false`` after a reload): killed,
  confirmed dead by its pidfd, reaped, its broker token revoked; a standby that
  dies by itself is reaped and its token revoked too, and the next one is
  prepared after a back-off;
* after a supervisor restart it is killed, not adopted: each standby is
  recorded (``DIR/var/lib/baton/standby/NAME.json``: pid, start time, the
  token's sha256, never the token),
  and the next supervisor kills whichever of those still live (after
  ``Supervisor.sweep_orphans``, which would kill them anyway: they log to the
  VM's worker log) and revokes their tokens; then it prepares fresh ones.
  Adopting would save one prepare per VM after a restart, at the price of a
  second adoption path for processes that never ran the guest; killing is the
  simplest safe choice.

Why a standby per VM on top of a zygote per worker version
(``supervisor.zygote``): the zygote (one process per worker command that has
imported everything and forks a worker per request) removes the interpreter,
the imports and the jail launcher from every start and shares their pages
among all workers, but the child must still fetch the VM's fds, map RAM,
create the KVM VM, its irqchip, memory slots, vCPUs and devices, and rehearse:
a KVM VM belongs to the mm of the process that created it, so none of that can
be made before the fork. Measured on this host (docs/benchmarks.md): a forked
cold prepare still takes tens of ms, most of it the machine's build, where a
standby leaves a few ms. Standbys are forked by the zygote too, so each costs
less memory than an exec'd one. The price of a standby is memory: its RSS is about 25-30 MB per
VM (mostly the interpreter's private heap; see docs/benchmarks.md for RSS and
PSS measured), so it is a setting: ``[upgrade] standby`` in baton.toml,
``standby`` in a VM file (which overrides). The default is off: a standby's
memory is held all the time for a gain that exists only during an upgrade,
and that gain is total and prepare time, not the guest's pause (the blackout
is the same with or without one). Turn it on where rollouts must be quick (a
fleet's ``vmctl upgrade --all``), or per VM.

Only baton-vmm workers have standbys: a QEMU incoming must be started with the
old QEMU's exact machine type and with ``-incoming defer`` against it, and its
total is dominated by other things (see ``supervisor/kinds/qemu.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton import codestamp, durable, wire
from baton.wire import Code, RemoteError
from supervisor.lifecycle import VmRuntime, VmState
from supervisor.service import Supervisor
from supervisor.vmconfig import VmConfig
from supervisor.workers import Watcher, WorkerGone, WorkerHandle

log = logging.getLogger("supervisor.standby")
S = VmState
KINDS = ("baton",)  # worker kinds that have standbys
RECONCILE_S = 1.0  # how often every VM is checked for a missing or unwanted standby
BACKOFF_S = (1.0, 60.0)  # after a failed prepare or a standby's death: first, cap
MAX_PREPARING = max(1, (os.cpu_count() or 2) // 2)  # standbys built at once
#: no standby is prepared until no upgrade has been in flight for this long (a
#: rollout's gaps between one VM's report and the next request are milliseconds)
QUIET_S = 0.5


@dataclass
class Standby:
    handle: WorkerHandle
    command: tuple[str, ...]
    config: VmConfig  # the configuration it was built for
    ready_at: float  # time.time()
    prepare_ms: float


@dataclass
class _Slot:
    """One VM's place in the pool."""

    standby: Standby | None = None
    preparing: tuple[str, ...] | None = None  # the command being prepared, if any
    gen: int = 0  # bumped by discard: a prepare started before it is not kept
    failures: int = 0
    retry_at: float = 0.0  # time.monotonic()
    last_error: str = ""
    prepared: int = 0  # standbys made ready so far
    taken: int = 0  # ... and consumed by upgrades


@dataclass
class _Counters:
    preparing: int = 0
    threads: list[threading.Thread] = field(default_factory=list)
    upgrades: int = 0  # in flight now (``StandbyPool.upgrading``)
    quiet_at: float = 0.0  # time.monotonic() from which none has been for QUIET_S


def _stale(handle: WorkerHandle) -> str | None:
    """Why this standby's code is not what is installed now (a file it loaded was
    replaced since it started: an in-place install of a new baton-vmm), or None.
    The files are looked at here, on the host, not through the worker's jail. A
    worker too old to say (no ``code`` operation) is taken as it is."""
    try:
        stamp = handle.call("code", timeout=5.0)["stamp"]
    except RemoteError as e:
        return None if e.code == Code.UNKNOWN_OP else f"no answer: {e}"
    if not codestamp.well_formed(stamp):  # a worker's word: checked before use
        return "its code stamp is malformed"
    return codestamp.changed(stamp)


class StandbyPool:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.dir = sup.paths.lib / "standby"
        self._cond = threading.Condition()
        self._slots: dict[str, _Slot] = {}
        self._n = _Counters()
        self._closed = False
        self.watcher = Watcher(self._exited)
        self.thread = threading.Thread(target=self._run, name="standby", daemon=True)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Kill a previous supervisor's standbys (revoking their tokens), then keep
        one ready for every running VM that wants one."""
        self.recover()
        self.watcher.thread.start()
        self.thread.start()

    def close(self) -> None:
        """At supervisor shutdown: stop preparing and end every standby (the next
        supervisor would kill them anyway)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.thread.join(5)
        for t in list(self._n.threads):
            t.join(35)
        for name in list(self._slots):
            rt = self.sup.vms.get(name)
            if rt is not None:
                self.discard(rt)
        self.watcher.close()

    def enabled(self, rt: VmRuntime) -> bool:
        if rt.config.vmm not in KINDS:
            return False
        own = rt.config.standby
        return self.sup.settings.upgrade.standby if own is None else own

    @contextlib.contextmanager
    def upgrading(self) -> Iterator[None]:
        """An upgrade is in flight: no standby is prepared from now until ``QUIET_S``
        after the last one ends (one already being prepared goes on)."""
        with self._cond:
            self._n.upgrades += 1
        try:
            yield
        finally:
            with self._cond:
                self._n.upgrades -= 1
                if self._n.upgrades == 0:
                    self._n.quiet_at = time.monotonic() + QUIET_S
                    self._cond.notify_all()  # the pool's thread waits until then

    def _quiet_in(self) -> float | None:
        """Seconds until standbys may be prepared (0: now), None while an upgrade
        is in flight. Under ``_cond``."""
        if self._n.upgrades:
            return None
        return max(0.0, self._n.quiet_at - time.monotonic())

    # ------------------------------------------------------- what others call
    def take(self, rt: VmRuntime, command: list[str] | None, timeout: float) -> WorkerHandle | None:
        """The VM's standby for ``command`` (None: the VM's configured worker), now
        the caller's, or None (then prepare cold). Waits up to ``timeout`` for one
        that is being prepared for that command. The caller holds ``rt.lock``."""
        want = tuple(command) if command else rt.config.worker
        deadline = time.monotonic() + timeout
        with self._cond:
            slot = self._slots.setdefault(rt.name, _Slot())
            while (
                slot.standby is None
                and slot.preparing == want
                and not self._closed
                and (left := deadline - time.monotonic()) > 0
            ):
                self._cond.wait(left)
            sb = slot.standby
            if sb is None or sb.command != want:
                return None  # another command's upgrade: this one stays for the next
            slot.standby = None
            usable = sb.config == rt.config  # else built for a configuration now changed
            if usable:
                slot.taken += 1
        self.watcher.remove(sb.handle)
        self._forget(rt.name)
        why = "not usable for this upgrade"
        if usable and sb.handle.alive():
            stale = _stale(sb.handle)
            if stale is None:
                log.info("vm %s: upgrade takes standby pid %d", rt.name, sb.handle.pid)
                return sb.handle
            why = f"its code is stale: {stale}"
        self._end(rt, sb.handle, why)
        return None

    def discard(self, rt: VmRuntime) -> None:
        """End the VM's standby (its VM stops); a prepare in flight is not kept."""
        with self._cond:
            slot = self._slots.setdefault(rt.name, _Slot())
            slot.gen += 1
            sb, slot.standby = slot.standby, None
            slot.retry_at = 0.0
            slot.failures = 0
        if sb is not None:
            self.watcher.remove(sb.handle)
            self._forget(rt.name)
            self._end(rt, sb.handle, "its VM stopped")

    def token_hashes(self, vm: str) -> set[str]:
        """The tokens (by sha256) this pool's standby of ``vm`` holds."""
        with self._cond:
            slot = self._slots.get(vm)
            sb = slot.standby if slot else None
            h = sb.handle.token_sha256 if sb else None
            return {h} if h else set()

    def describe(self, rt: VmRuntime) -> dict[str, Any]:
        with self._cond:
            slot = self._slots.get(rt.name) or _Slot()
            sb = slot.standby
            return {
                "enabled": self.enabled(rt),
                "ready": sb is not None,
                "pid": sb.handle.pid if sb else None,
                "command": list(sb.command) if sb else None,
                "prepare_ms": sb.prepare_ms if sb else None,
                "ready_since": sb.ready_at if sb else None,
                "preparing": slot.preparing is not None,
                "prepared": slot.prepared,
                "taken": slot.taken,
                "last_error": slot.last_error or None,
            }

    # ---------------------------------------------------------------- inside
    def _end(self, rt: VmRuntime, handle: WorkerHandle, why: str) -> None:
        if self.sup.kill_confirmed(rt, handle):  # reaped, token revoked
            log.info("vm %s: standby pid %d ended (%s)", rt.name, handle.pid, why)
        else:
            log.error("vm %s: standby pid %d would not die (%s)", rt.name, handle.pid, why)

    def _record_path(self, vm: str) -> Path:
        return self.dir / f"{vm}.json"

    def _record(self, vm: str, handle: WorkerHandle) -> None:
        try:
            durable.write_atomic(self._record_path(vm), json.dumps(handle.record()).encode())
        except OSError as e:
            log.warning("vm %s: cannot record standby pid %d: %s", vm, handle.pid, e)

    def _forget(self, vm: str) -> None:
        with contextlib.suppress(OSError):
            self._record_path(vm).unlink()

    def recover(self) -> list[int]:
        """Kill the standbys a previous supervisor recorded and revoke their tokens.
        A recorded worker that is now the VM's own (an upgrade took it, then the
        supervisor died before forgetting the record) is left alone. Off the start's
        path: each is SIGKILLed at once and its record goes (a fresh standby may take
        its name now); ``Supervisor.reaper`` reaps it as it dies, and then its token
        is revoked (one that never dies keeps it: ``sweep_tokens`` revokes it later).
        Returns the pids killed."""
        killed: list[int] = []
        dead: list[tuple[str, str]] = []  # (vm, token hash) of standbys already gone
        if not self.dir.is_dir():
            return killed
        for path in sorted(self.dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                vm, instance = rec["vm"], rec.get("instance")
                token_hash = WorkerHandle.recorded_token_hash(rec)
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            rt = self.sup.vms.get(vm)
            if rt is not None and rt.worker is not None and rt.worker.instance == instance:
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            then = self._predecessor_dead(token_hash)
            if isinstance(rec.get("pid"), int) and self.sup.reaper.after(rec["pid"], then):
                killed.append(rec["pid"])  # the orphan sweep killed it already: a standby
                with contextlib.suppress(OSError):  # logs to its VM's log
                    path.unlink()
                continue
            try:
                handle: WorkerHandle | None = WorkerHandle.adopt(rec)
            except (WorkerGone, KeyError, TypeError, ValueError):
                handle = None
            if handle is not None:
                self.sup.reaper.kill(handle, then=then)
                killed.append(handle.pid)
            elif token_hash:
                dead.append((vm, token_hash))
            with contextlib.suppress(OSError):
                path.unlink()
        if dead:
            threading.Thread(
                target=lambda: all(self._revoke(vm, h) for vm, h in dead),
                name="standby-revoke",
                daemon=True,
            ).start()
        return killed

    def _predecessor_dead(self, token_hash: str | None) -> Callable[[WorkerHandle], None]:
        def then(h: WorkerHandle) -> None:
            log.info("vm %s: killed a previous supervisor's standby pid %d", h.vm, h.pid)
            if token_hash:
                self._revoke(h.vm, token_hash)

        return then

    def _revoke(self, vm: str, token_hash: str) -> bool:
        with contextlib.suppress(RemoteError, wire.WireError):
            self.sup.broker.call("token.revoke", {"vm": vm, "sha256": token_hash})
        return True

    def _exited(self, handle: WorkerHandle) -> None:
        """The watcher saw a standby die by itself: reap it, revoke its token."""
        rt = self.sup.vms.get(handle.vm)
        with self._cond:
            slot = self._slots.get(handle.vm)
            if slot is None or slot.standby is None or slot.standby.handle is not handle:
                return  # taken or discarded meanwhile: its new owner deals with it
            slot.standby = None
            slot.failures += 1
            slot.retry_at = time.monotonic() + self._backoff(slot.failures)
            status = handle.reap()
            slot.last_error = f"standby pid {handle.pid} {status}"
        log.warning("vm %s: standby pid %d %s", handle.vm, handle.pid, status)
        self._forget(handle.vm)
        handle.close()
        if rt is not None:
            self.sup.revoke(rt, handle)
        elif handle.token:
            with contextlib.suppress(RemoteError, wire.WireError):
                self.sup.broker.revoke_token(handle.vm, handle.token)

    @staticmethod
    def _backoff(failures: int) -> float:
        first, cap = BACKOFF_S
        return float(min(cap, first * 2 ** min(failures - 1, 10)))

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed:
                    quiet = self._quiet_in()
                    self._cond.wait(RECONCILE_S if not quiet else min(quiet, RECONCILE_S))
                if self._closed:
                    return
            try:
                self._reconcile()
            except Exception:
                log.exception("standby pool")

    def _reconcile(self) -> None:
        now = time.monotonic()
        for rt in list(self.sup.vms.values()):
            enabled = self.enabled(rt)
            with self._cond:
                quiet = self._quiet_in() == 0.0
                slot = self._slots.setdefault(rt.name, _Slot())
                sb = slot.standby
                stale = sb is not None and (
                    not enabled
                    or rt.state not in (S.RUNNING, S.UPGRADING)
                    or sb.config != rt.config
                )
                if stale:
                    slot.standby = None
                due = (
                    sb is None
                    and enabled
                    and quiet
                    and slot.preparing is None
                    and now >= slot.retry_at
                    and self._n.preparing < MAX_PREPARING
                )
            if stale and sb is not None:
                self.watcher.remove(sb.handle)
                self._forget(rt.name)
                self._end(rt, sb.handle, "no longer wanted")
                continue
            if not due or rt.state is not S.RUNNING or not rt.lock.acquire(blocking=False):
                continue
            try:  # under the VM's lock its state cannot change while we decide
                if rt.state is not S.RUNNING or rt.worker is None:
                    continue
                with self._cond:
                    if self._closed or slot.preparing is not None or slot.standby is not None:
                        continue
                    slot.preparing = rt.config.worker
                    self._n.preparing += 1
                    t = threading.Thread(
                        target=self._prepare,
                        args=(rt, slot, slot.gen, rt.config),
                        name=f"standby-{rt.name}",
                        daemon=True,
                    )
                    self._n.threads.append(t)
                t.start()
            finally:
                rt.lock.release()

    def _prepare(self, rt: VmRuntime, slot: _Slot, gen: int, cfg: VmConfig) -> None:
        """Build one standby, exactly as an upgrade's cold prepare would."""
        sup = self.sup
        handle: WorkerHandle | None = None
        err = ""
        t0 = time.monotonic_ns()
        try:
            handle = sup.start_incoming(rt, "worker (standby)", config=cfg)
        except (RemoteError, wire.WireError, OSError) as e:
            err = e.message if isinstance(e, RemoteError) else str(e)
        except Exception as e:  # never let a prepare kill the pool's thread quietly
            log.exception("vm %s: preparing a standby", rt.name)
            err = str(e)
        prepare_ms = round((time.monotonic_ns() - t0) / 1e6, 3)
        keep = False
        with self._cond:
            slot.preparing = None
            self._n.preparing -= 1
            with contextlib.suppress(ValueError):
                self._n.threads.remove(threading.current_thread())
            if handle is not None and slot.gen == gen and not self._closed:
                keep = True
                slot.standby = Standby(handle, cfg.worker, cfg, time.time(), prepare_ms)
                slot.failures, slot.last_error = 0, ""
                slot.prepared += 1
                self._record(rt.name, handle)
                self.watcher.add(handle)
            elif handle is None:
                slot.failures += 1
                slot.retry_at = time.monotonic() + self._backoff(slot.failures)
                slot.last_error = err
            self._cond.notify_all()
        if handle is None:
            log.warning("vm %s: standby prepare failed: %s", rt.name, err)
        elif keep:
            log.info("vm %s: standby pid %d ready (%.1f ms)", rt.name, handle.pid, prepare_ms)
        else:
            self._end(rt, handle, "its VM stopped while it was prepared")
