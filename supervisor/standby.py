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
* after a supervisor restart (a ``kill -9`` too) it is adopted, as running
  workers are: each standby is recorded
  (``DIR/var/lib/baton/standby/NAME.json``: pid, start time, instance, control
  socket, the token's sha256, never the token, and a digest of the configuration
  it was built for). The next supervisor's ``recover`` (before the orphan sweep,
  which passes over what it keeps) checks each by what the start knows already:
  a regular file of sane size (never a symlink's or a FIFO's target),
  well-formed, for a VM that runs and wants a standby of this kind, built for
  the VM's configuration as it is now, the process the record names (pidfd,
  start time), logging to the VM's log (else it is not ours: left alone), its
  control socket where this VM's would be. Then, once the server runs (the
  pool's thread, ``ADOPT_PARALLEL`` at a time), the rest: not stopped and of the
  VM's worker's uids (/proc), its token still valid (the broker's
  ``token.list``), a hello over its control socket from the listener itself
  (SO_PEERCRED) naming this VM and instance, ``incoming``, of the recorded
  version, and code still what is installed (``_stale``). Meanwhile an upgrade
  waits for it as for a standby being prepared. What fails a check is killed
  (``Supervisor.reaper``) and its token revoked once it is dead; a fresh one is
  prepared. A standby waits for its consumer on its control socket alone (its
  ready pipe and token pipe are spent; its broker connection is the broker's):
  nothing of the dead supervisor's has to be handed over.

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
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton import codestamp, durable, wire
from baton.contract import GuestState
from baton.rpc import Peer
from baton.wire import Code, RemoteError
from supervisor.lifecycle import VmRuntime, VmState
from supervisor.service import ADOPT_HELLO_TIMEOUT_S, ADOPT_PARALLEL, Supervisor
from supervisor.vmconfig import VmConfig
from supervisor.workers import Watcher, WorkerGone, WorkerHandle, logs_to

log = logging.getLogger("supervisor.standby")
S = VmState
KINDS = ("baton",)  # worker kinds that have standbys
RECONCILE_S = 1.0  # how often every VM is checked for a missing or unwanted standby
BACKOFF_S = (1.0, 60.0)  # after a failed prepare or a standby's death: first, cap
MAX_PREPARING = max(1, (os.cpu_count() or 2) // 2)  # standbys built at once
#: no standby is prepared until no upgrade has been in flight for this long (a
#: rollout's gaps between one VM's report and the next request are milliseconds)
QUIET_S = 0.5
MAX_RECORD_BYTES = 64 * 1024  # a standby's record is a few hundred bytes
_HEX32, _HEX64 = re.compile("[0-9a-f]{32}"), re.compile("[0-9a-f]{64}")  # instance, sha256


@dataclass
class Standby:
    handle: WorkerHandle
    command: tuple[str, ...]
    config: VmConfig  # the configuration it was built for
    ready_at: float  # time.time()
    prepare_ms: float
    adopted: bool = False  # a previous supervisor's, kept after its checks


def config_digest(cfg: VmConfig) -> str:
    """What a standby's record keeps of the configuration it was built for: equal
    digests, equal configurations (every field, the worker command included). Of
    its repr (the dataclass's, every field's): 27 us here, where a JSON of
    ``dataclasses.asdict`` took 560 us, a hundred times in a restart's path."""
    return hashlib.sha256(repr(cfg).encode()).hexdigest()


def merging_pages(pid: int) -> int | None:
    """Its pages that ksmd shares (``/proc/PID/ksm_stat``, a counter: no page walk);
    None where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "ksm_merging_pages":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def read_record(path: Path) -> dict[str, Any]:
    """A standby record's JSON, read only from a regular file of sane size: never
    through a symlink (O_NOFOLLOW), never blocking on a FIFO (O_NONBLOCK). ValueError
    (or OSError) for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{st.st_size} bytes")
        rec = json.loads(os.read(fd, MAX_RECORD_BYTES + 1))
    finally:
        os.close(fd)
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    return rec


def _status_of(pid: int) -> tuple[str, tuple[int, ...]]:
    """A live process's state letter and its uids (real, effective, saved, fs), from
    one read of /proc/PID/status; OSError if it is gone."""
    with open(f"/proc/{pid}/status", "rb") as f:
        text = f.read().decode(errors="replace")
    state: str = "?"
    uids: tuple[int, ...] = ()
    for line in text.splitlines():
        if line.startswith("State:"):
            state = line.split()[1] if len(line.split()) > 1 else "?"
        elif line.startswith("Uid:"):
            uids = tuple(int(x) for x in line.split()[1:])
    return state, uids


@dataclass
class _Slot:
    """One VM's place in the pool."""

    standby: Standby | None = None
    preparing: tuple[str, ...] | None = None  # the command being prepared (or adopted)
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
        #: a predecessor's standbys that passed ``recover``'s checks, awaiting the rest
        self._adopting: list[tuple[VmRuntime, _Slot, int, Standby]] = []
        self.watcher = Watcher(self._exited)
        self.thread = threading.Thread(target=self._run, name="standby", daemon=True)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Keep one standby ready for every running VM that wants one: first finish
        adopting a previous supervisor's (``recover``, called before), then prepare."""
        self.watcher.thread.start()
        self.thread.start()

    def close(self) -> None:
        """At a clean supervisor shutdown: stop preparing and end every standby (only
        a supervisor that dies leaves them, for the next one to adopt)."""
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
        """The tokens (by sha256) this pool's standby of ``vm`` holds (one being
        adopted included)."""
        with self._cond:
            slot = self._slots.get(vm)
            handles = [slot.standby.handle] if slot and slot.standby else []
            handles += [sb.handle for rt, _, _, sb in self._adopting if rt.name == vm]
            return {h for x in handles if (h := x.token_sha256)}

    def adopted_pids(self) -> set[int]:
        """The predecessor's standbys this pool keeps (the orphan sweep passes over them)."""
        with self._cond:
            return {sb.handle.pid for _, _, _, sb in self._adopting}

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
                "adopted": sb.adopted if sb else False,
                "preparing": slot.preparing is not None,
                "prepared": slot.prepared,
                "taken": slot.taken,
                "last_error": slot.last_error or None,
                # [upgrade] standby_merge: how many of its pages ksmd shares now
                "merging_pages": (
                    merging_pages(sb.handle.pid)
                    if sb and self.sup.settings.upgrade.standby_merge
                    else None
                ),
            }

    # ---------------------------------------------------------------- inside
    def _end(self, rt: VmRuntime, handle: WorkerHandle, why: str) -> None:
        if self.sup.kill_confirmed(rt, handle):  # reaped, token revoked
            log.info("vm %s: standby pid %d ended (%s)", rt.name, handle.pid, why)
        else:
            log.error("vm %s: standby pid %d would not die (%s)", rt.name, handle.pid, why)

    def _record_path(self, vm: str) -> Path:
        return self.dir / f"{vm}.json"

    def _record(self, vm: str, sb: Standby) -> None:
        rec = {
            **sb.handle.record(),
            "config_sha256": config_digest(sb.config),
            "ready_at": sb.ready_at,
            "prepare_ms": sb.prepare_ms,
        }
        handle = sb.handle
        try:
            durable.write_atomic(self._record_path(vm), json.dumps(rec).encode())
        except OSError as e:
            log.warning("vm %s: cannot record standby pid %d: %s", vm, handle.pid, e)

    def _forget(self, vm: str) -> None:
        with contextlib.suppress(OSError):
            self._record_path(vm).unlink()

    def recover(self) -> list[int]:
        """At start, before the orphan sweep: take back the standbys a previous
        supervisor recorded, as far as checks on this host go (``_unfit``); those
        that pass wait in ``_adopting`` for the checks that need a round trip (the
        pool's thread, ``_verify_adopted``). Whatever fails is SIGKILLed at once and
        its record goes; ``Supervisor.reaper`` reaps it as it dies and then its token
        is revoked (one that never dies keeps it: ``sweep_tokens`` revokes it later).
        A recorded worker that is now the VM's own (an upgrade took it, then the
        supervisor died before forgetting the record) is left alone. Returns the
        pids killed."""
        killed: list[int] = []
        dead: list[tuple[str, str]] = []  # (vm, token hash) of standbys already gone
        if not self.dir.is_dir():
            return killed
        for path in sorted(self.dir.glob("*.json")):
            try:
                rec = read_record(path)
                vm, instance = rec["vm"], rec["instance"]
                if not isinstance(vm, str) or not isinstance(instance, str):
                    raise TypeError("vm and instance must be strings")
                if path.name != self._record_path(vm).name:  # one record per VM, its own
                    raise ValueError(f"it names VM {vm!r}")
                token_hash = WorkerHandle.recorded_token_hash(rec)
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("standby record %s unusable (%s): removed", path.name, e)
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
                killed.append(rec["pid"])  # being killed already
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            try:
                handle: WorkerHandle | None = WorkerHandle.adopt(rec)
            except (WorkerGone, KeyError, TypeError, ValueError):
                handle = None
            if handle is None:
                if token_hash:
                    dead.append((vm, token_hash))
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if not logs_to(handle.pid, self.sup.paths.worker_log(vm)):
                log.warning(  # a pid reused by then, or a hostile record: not ours to kill
                    "standby record %s names pid %d, not a worker of VM %s: removed, the "
                    "process left alone",
                    path.name,
                    handle.pid,
                    vm,
                )
                handle.close()
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            why = self._unfit(rt, handle, rec) if rt is not None else "its VM is not configured"
            if why is None and rt is not None:
                self._keep_for_checks(rt, handle, rec)
                continue
            log.info("vm %s: a previous supervisor's standby pid %d: %s", vm, handle.pid, why)
            self.sup.reaper.kill(handle, then=then)
            killed.append(handle.pid)
            with contextlib.suppress(OSError):
                path.unlink()
        if dead:
            threading.Thread(
                target=lambda: all(self._revoke(vm, h) for vm, h in dead),
                name="standby-revoke",
                daemon=True,
            ).start()
        return killed

    def _unfit(self, rt: VmRuntime, h: WorkerHandle, rec: dict[str, Any]) -> str | None:
        """Why a predecessor's live standby may not be kept, by what the start knows
        already (its record, the VM); None: it may, once ``_verify`` agrees. Only what
        costs no read of /proc is checked here: this runs before the server does."""
        if h.kind not in KINDS or h.kind != rt.config.vmm:
            return f"a {h.kind!r} worker, not a standby of this VM's kind"
        if not self.enabled(rt) or rt.state is not S.RUNNING or rt.worker is None:
            return "its VM does not run with a standby now"
        if rec.get("config_sha256") != config_digest(rt.config):
            return "built for another configuration of its VM (or another worker command)"
        if not _HEX32.fullmatch(h.instance):
            return "its instance is not a worker's"
        if not (h.token_hash and _HEX64.fullmatch(h.token_hash)):
            return "its record names no token"
        if h.control != self.sup.kind(rt).control_path(rt.config, h.instance):
            return f"its control socket {h.control!r} is not where this VM's would be"
        return None

    @staticmethod
    def _unlike(rt: VmRuntime, h: WorkerHandle) -> str | None:
        """Why a kept standby's process is not as the VM's worker is (stopped, or of
        other uids), or None: read from /proc, after the start (two reads each)."""
        worker = rt.worker
        if worker is None:
            return "its VM has no worker now"
        try:
            state, uids = _status_of(h.pid)
            _, worker_uids = _status_of(worker.pid)
        except OSError as e:
            return f"cannot read its status: {e}"
        if state in ("T", "t", "Z", "X"):
            return f"its state is {state!r} (stopped or dead)"
        if not uids or uids != worker_uids:
            return f"it runs as uids {uids}, the VM's worker as {worker_uids}"
        return None

    def _keep_for_checks(self, rt: VmRuntime, h: WorkerHandle, rec: dict[str, Any]) -> None:
        """A standby ``recover`` keeps: an upgrade waits for it (as for one being
        prepared) until ``_verify_adopted`` decides."""
        ready_at, prepare_ms = rec.get("ready_at"), rec.get("prepare_ms")
        sb = Standby(
            h,
            rt.config.worker,
            rt.config,
            float(ready_at) if isinstance(ready_at, int | float) else time.time(),
            float(prepare_ms) if isinstance(prepare_ms, int | float) else 0.0,
            adopted=True,
        )
        with self._cond:
            slot = self._slots.setdefault(rt.name, _Slot())
            slot.preparing = sb.command
            self._n.preparing += 1
            self._adopting.append((rt, slot, slot.gen, sb))
        self.watcher.add(h)

    def _verify_adopted(self) -> None:
        """The checks of a predecessor's standbys that need a round trip, ``ADOPT_PARALLEL``
        at a time: each passes into its slot, or is killed and a fresh one prepared."""
        with self._cond:
            todo = list(self._adopting)
        if not todo:
            return
        stamps: dict[str, str | None] = {}  # one code stamp's verdict, for every standby
        t0 = time.monotonic()
        with ThreadPoolExecutor(ADOPT_PARALLEL, thread_name_prefix="standby-adopt") as pool:
            verdicts = list(pool.map(lambda one: self._verify(one[0], one[3], stamps), todo))
        kept = 0
        for (rt, slot, gen, sb), why in zip(todo, verdicts, strict=True):
            with self._cond:
                self._adopting.remove((rt, slot, gen, sb))
                slot.preparing = None
                self._n.preparing -= 1
                keep = why is None and slot.gen == gen and not self._closed
                if keep:
                    slot.standby = sb
                    slot.failures, slot.last_error = 0, ""
                self._cond.notify_all()
            if keep:
                kept += 1
                log.info(
                    "vm %s: adopted a previous supervisor's standby pid %d", rt.name, sb.handle.pid
                )
                continue
            why = why or "its VM stopped meanwhile"
            self.watcher.remove(sb.handle)
            with self._cond:
                current = slot.standby
            if current is None:  # a standby prepared since has its own record
                self._forget(rt.name)
            log.info(
                "vm %s: a previous supervisor's standby pid %d: %s", rt.name, sb.handle.pid, why
            )
            self.sup.reaper.kill(sb.handle, then=self._predecessor_dead(sb.handle.token_hash))
        log.info(
            "adopted %d of %d standbys in %.0f ms", kept, len(todo), (time.monotonic() - t0) * 1000
        )

    def _verify(self, rt: VmRuntime, sb: Standby, stamps: dict[str, str | None]) -> str | None:
        """Why ``sb`` may not be kept after a look at its process and asking the broker
        and the standby itself, or None."""
        h = sb.handle
        unlike = self._unlike(rt, h)
        if unlike is not None:
            return unlike
        try:
            live = {t.get("sha256") for t in self.sup.broker.list_tokens(rt.name)}
        except (RemoteError, wire.WireError) as e:
            return f"the broker cannot say whether its token is valid: {e}"
        if h.token_hash not in live:
            return "its broker token is no longer valid"
        try:
            hello = self.sup.kind(rt).describe(h, timeout=ADOPT_HELLO_TIMEOUT_S)
            peer = Peer.of(h.conn.sock)
        except (RemoteError, OSError) as e:
            return f"no hello: {e.message if isinstance(e, RemoteError) else e}"
        if peer.pid != h.pid:
            return f"its control socket is pid {peer.pid}'s"
        if hello.vm != rt.name or hello.instance != h.instance:
            return f"it answers as {hello.vm}/{hello.instance}"
        if hello.state != GuestState.INCOMING:
            return f"it is {hello.state}, not incoming"
        if h.version and hello.version != h.version:
            return f"it says version {hello.version!r}, its record {h.version!r}"
        h.version = hello.version
        try:
            stamp = h.call("code", timeout=ADOPT_HELLO_TIMEOUT_S)["stamp"]
        except RemoteError as e:
            return None if e.code == Code.UNKNOWN_OP else f"no code stamp: {e.message}"
        except (KeyError, TypeError):
            return "its code stamp is malformed"
        if not codestamp.well_formed(stamp):
            return "its code stamp is malformed"
        key = json.dumps(stamp, sort_keys=True)
        if key not in stamps:
            stamps[key] = codestamp.changed(stamp)
        stale = stamps[key]
        return None if stale is None else f"its code is stale: {stale}"

    def _predecessor_dead(self, token_hash: str | None) -> Callable[[WorkerHandle], None]:
        def then(h: WorkerHandle) -> None:
            log.info("vm %s: killed a previous supervisor's standby pid %d", h.vm, h.pid)
            if token_hash:
                self._revoke(h.vm, token_hash)

        return then

    def _revoke(self, vm: str, token_hash: str) -> bool:
        rt = self.sup.vms.get(vm)
        if rt is not None and rt.worker is not None and rt.worker.token_sha256 == token_hash:
            log.warning("vm %s: a standby record named its worker's token: not revoked", vm)
            return True  # (a record cannot take the running worker's broker access away)
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
        try:
            self._verify_adopted()
        except Exception:
            log.exception("standby pool: adopting a previous supervisor's standbys")
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
            merge = sup.settings.upgrade.standby_merge
            handle = sup.start_incoming(rt, "worker (standby)", config=cfg, merge_idle=merge)
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
                self._record(rt.name, slot.standby)
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
