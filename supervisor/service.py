"""The supervisor's VM table: start, stop, watch, restart, adopt, reload.

Each VM has a lock held for the whole of a lifecycle transition, so two
operations on one VM never interleave, while other VMs carry on. Worker
exits arrive from the watcher thread (pidfds in an epoll set). States and
their transitions: ``supervisor.lifecycle``. What the upgrader may call is
the public part of ``Supervisor`` (``watch``, ``revoke``, ``kill_confirmed``,
``retire_worker``, ``schedule_restart``, ``persist``); the suspender
(``supervisor.suspend``) also ``start_incoming``, ``hold_fds``, ``release_vm``
and ``check_memory``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

from baton import fdinfo, wire
from baton.config import ConfigError, Settings, load_settings
from baton.contract import RAM, ExitMeaning, GuestState
from baton.paths import Paths
from baton.trace import mark
from baton.wire import Code, RemoteError
from broker.client import BrokerClient
from supervisor import faults, jail, netdev, ramimage
from supervisor.aside import Aside
from supervisor.consolelog import rotate_if_needed
from supervisor.events import Events
from supervisor.kinds.base import StartRequest, WorkerKind
from supervisor.lifecycle import VmRuntime, VmState
from supervisor.priority import EXCLUSION, realtime, set_slice
from supervisor.store import Store
from supervisor.vmconfig import VmConfig, build, load_vms
from supervisor.workers import (
    Reaper,
    Watcher,
    WorkerGone,
    WorkerHandle,
    processes_logging_to_each,
    start_time,
)

log = logging.getLogger("supervisor")
S = VmState
TOKEN_GRACE_S = 120.0  # a token this young may be on its way to a starting worker
TOKEN_SWEEP_S = 60.0  # how often housekeeping looks for tokens nobody holds
ADOPT_HELLO_TIMEOUT_S = 3.0  # a worker that cannot say hello this fast is unresponsive
PROBE_INTERVAL_S = 2.0  # how often an unresponsive worker is asked again
PROBE_TIMEOUT_S = 0.5  # asked from the main loop: keep it short


def _said(what: str) -> Callable[[WorkerHandle], None]:
    """A ``Reaper.kill`` ``then`` that logs ``what`` (vm, pid) once the worker is dead."""
    return lambda h: log.warning(what, h.vm, h.pid)


def host_mem_available_mib() -> int | None:
    """MemAvailable from /proc/meminfo, in MiB (None if it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError, IndexError):
        pass
    return None


#: VM starts at a time at the supervisor's start (and after a reload)
AUTOSTART_PARALLEL = 4
#: VMs adopted at a time by a restarted supervisor (mostly waiting: hellos, the broker)
ADOPT_PARALLEL = 16


class Supervisor:
    def __init__(
        self,
        paths: Paths,
        settings: Settings,
        broker: BrokerClient,
        kinds: Mapping[str, WorkerKind],
    ) -> None:
        self.paths = paths
        self.settings = settings
        EXCLUSION.enabled = settings.upgrade.exclusive_teardown
        self.broker = broker
        self.kinds = dict(kinds)
        self.store = Store(paths)
        self.vms: dict[str, VmRuntime] = {}
        self.config_errors: dict[str, str] = {}
        self._table_lock = threading.Lock()
        self.watcher = Watcher(self._worker_exited)
        #: workers killed off the caller's path (a predecessor's orphans and standbys)
        self.reaper = Reaper()
        self.started_at = time.time()
        self.start_ms: dict[str, float] = {}  # each step of the start (daemon.StartClock)
        self.events = Events()  # the daemon puts the metrics here (supervisor.metrics)
        self._restart_cause: dict[str, str] = {}  # vm -> why its pending restart is due
        self._next_token_sweep = 0.0  # monotonic
        #: the standby pool (``supervisor.standby.StandbyPool``), set by the daemon;
        #: None: no standbys. Told when a VM stops, asked what to show in status.
        self.standby: Any = None
        #: the zygote pool (``supervisor.zygote.ZygotePool``), set by the daemon;
        #: None: none. Asked what to show in ``supervisor.status``.
        self.zygotes: Any = None
        self._restarting: set[str] = set()  # VMs whose restart thread runs
        self._restart_lock = threading.Lock()

    # ------------------------------------------------------------------ config
    def load_config(self) -> dict[str, Any]:
        """(Re)read vms.d. New VMs appear, changed ones take effect at their next
        start or upgrade, removed ones are reported; nothing running is stopped."""
        result = load_vms(self.paths, self.settings.supervisor)
        report: dict[str, Any] = {
            "added": [],
            "changed": [],
            "removed": [],
            "errors": result.errors,
        }
        with self._table_lock:
            for name, cfg in result.vms.items():
                rt = self.vms.get(name)
                if rt is None:
                    self.vms[name] = VmRuntime(cfg)
                    report["added"].append(name)
                elif rt.config != cfg:
                    rt.config = cfg
                    rt.removed = False
                    report["changed"].append(name)
                else:
                    rt.removed = False
            broken = {os.path.basename(f).removesuffix(".toml") for f in result.errors}
            gone = []
            for name, rt in list(self.vms.items()):
                if name in result.vms or name in broken:
                    continue
                if rt.state is S.STOPPED and rt.worker is None:
                    del self.vms[name]
                    gone.append(name)
                else:
                    rt.removed = True
                report["removed"].append(name)
        self.config_errors = result.errors
        for name in gone:
            jail.release_uid(self.paths, name)
        for _f, msg in result.errors.items():
            log.error("config: %s", msg)
        return report

    def reload(self) -> dict[str, Any]:
        try:
            self.settings = load_settings(self.paths)
            EXCLUSION.enabled = self.settings.upgrade.exclusive_teardown
        except ConfigError as e:
            log.error("baton.toml: %s (keeping the previous settings)", e)
            return {"error": str(e)}
        report = self.load_config()
        report["started"] = self.autostart(only=report["added"])
        log.info("configuration reloaded: %s", report)
        return report

    # ------------------------------------------------------------- persistence
    def persist(self, rt: VmRuntime) -> None:
        if rt.state is S.STOPPED and rt.worker is None and not rt.held:
            self.store.delete(rt.name)
            return
        self.store.save(
            rt.name,
            {
                "name": rt.name,
                "state": str(rt.state),
                "reason": rt.reason,
                "config": rt.config.raw,
                "config_source": rt.config.source,
                "worker": rt.worker.record() if rt.worker else None,
                "last_exit": rt.last_exit,
                "last_upgrade": rt.last_upgrade,
                "upgrades": rt.upgrades,
                "image": rt.image,
            },
        )

    def adopt_all(self) -> dict[str, str]:
        """After a (re)start: take back the workers a previous supervisor ran.

        A worker is found by its record or, if the record is gone or stale, by
        the VM's run lease in the broker (whoever holds it and lives). A live
        worker is never replaced: if it does not answer it is ``unresponsive``.
        VMs are adopted ``ADOPT_PARALLEL`` at a time, each under its own lock as
        any operation: the hellos (a wake-up of each worker) and the broker's
        answers overlap, and one worker that does not answer holds up no other."""
        outcome: dict[str, str] = {}
        records = self.store.load_all()
        with ThreadPoolExecutor(ADOPT_PARALLEL, thread_name_prefix="adopt") as pool:
            adopted = pool.map(self._adopt_recorded, records, records.values())
            for name, said in zip(records, adopted, strict=True):
                if said is not None:
                    outcome[name] = said
        # VMs whose record is gone altogether: the broker's leases still know.
        for name in self._broker_vms():
            rt = self.vms.get(name)
            if rt is None or rt.worker is not None or name in outcome:
                continue
            with rt.lock:
                handle = self._handle_from_lease(rt)
                if handle is not None:
                    outcome[name] = self._attach(rt, handle)
                    self.persist(rt)
        return outcome

    def _adopt_recorded(self, name: str, rec: dict[str, Any]) -> str | None:
        """One VM of ``adopt_all``, by its record: what became of it (None: nothing
        to say, such as a stopped VM)."""
        rt = self.vms.get(name)
        if rt is None:
            try:
                cfg = build(
                    name,
                    rec.get("config") or {},
                    self.paths,
                    self.settings.supervisor,
                    rec.get("config_source", "recorded"),
                )
            except Exception as e:
                log.error("vm %s: recorded config unusable (%s); leaving it alone", name, e)
                return None
            with self._table_lock:
                rt = self.vms.setdefault(name, VmRuntime(cfg, removed=True))
        with rt.lock:
            rt.reason = rec.get("reason", "")
            rt.last_exit = rec.get("last_exit")
            rt.last_upgrade = rec.get("last_upgrade")
            rt.upgrades = int(rec.get("upgrades", 0))
            rt.image = rec.get("image")  # a suspend in flight: Suspender.recover settles it
            wrec = rec.get("worker")
            handle = None
            gone = ""
            if wrec:
                try:
                    handle = WorkerHandle.adopt(wrec)
                except (WorkerGone, KeyError, TypeError, ValueError) as e:
                    gone = str(e)
            if handle is None:
                handle = self._handle_from_lease(rt)
            if handle is not None:
                said = self._attach(rt, handle)
            elif wrec:
                self.revoke_hash(rt, WorkerHandle.recorded_token_hash(wrec))
                rt.adopted(S.FAILED, f"worker gone while the supervisor was down: {gone}")
                rt.last_exit = rt.reason
                said = rt.reason
                self.hold_fds(rt)
                self.schedule_restart(rt, "lost")
            elif rec.get("state") == S.SUSPENDED and rt.image:
                rt.adopted(S.SUSPENDED)
                return f"suspended ({rt.image})"
            elif rec.get("state") == S.FAILED:
                rt.adopted(S.FAILED)
                self.hold_fds(rt)
                return "failed (kept for inspection)"
            else:
                return None
            self.persist(rt)
            return said

    def release_gone_uids(self) -> list[int]:
        """After adoption and the orphan sweep: the jail uids of VMs that left the
        config while no supervisor ran (a broken VM file still counts as there)."""
        broken = {os.path.basename(f).removesuffix(".toml") for f in self.config_errors}
        return jail.release_gone(self.paths, keep=set(self.vms) | broken)

    def sweep_orphans(self, keep: Collection[int] = ()) -> list[int]:
        """Kill workers nothing owns: started by a supervisor that died before it
        journaled them (mid-prepare, say), or its standbys. Each never ran the guest
        or no longer may: a worker that holds the run lease is the VM's worker, found
        by adoption. Returns the pids killed.

        First every VM with a suspect asks the broker who holds its lease
        (``ADOPT_PARALLEL`` VMs at a time, as they are adopted), then every orphan
        is SIGKILLed at once and ``self.reaper`` reaps each as it dies: their KVM
        teardowns (~20 ms of CPU each) are not waited for one by one before the
        supervisor serves, and no broker question waits behind the broker's work on
        a hundred of them hanging up. Processes ``self.reaper`` is killing already
        (a predecessor's standbys that failed their checks) and those in ``keep`` (its
        standbys the pool adopts, ``StandbyPool.recover``) are passed over."""
        vms = list(self.vms.values())
        logs = [self.paths.worker_log(rt.name) for rt in vms]  # each once: pathlib's joins
        logging_to = processes_logging_to_each(logs)
        dying = {*self.reaper.pending(), *keep}  # killed already, or adopted standbys
        swept = [
            (rt, [p for p in logging_to[log_path] if p not in dying])
            for rt, log_path in zip(vms, logs, strict=True)
        ]
        swept = [(rt, pids) for rt, pids in swept if pids]
        with ThreadPoolExecutor(ADOPT_PARALLEL, thread_name_prefix="sweep") as pool:
            orphans = [h for hs in pool.map(lambda one: self._orphans_of(*one), swept) for h in hs]
        for handle in orphans:
            self.reaper.kill(handle, then=_said("vm %s: killed orphan worker pid %d"))
        return [h.pid for h in orphans]

    def _orphans_of(self, rt: VmRuntime, logging: list[int]) -> list[WorkerHandle]:
        """One VM of ``sweep_orphans``: handles on the processes logging to its log that
        are neither its worker nor its lease's holder."""
        found: list[WorkerHandle] = []
        with rt.lock:
            ours = rt.worker.pid if rt.worker else None
            suspects = [pid for pid in logging if pid not in (ours, os.getpid())]
            if not suspects:
                return found  # only its own worker: the broker need not be asked
            try:
                holder = self.live_holder(rt)
            except RemoteError:
                return found  # the broker cannot say who runs the guest: touch nothing
            for pid in suspects:
                if holder and pid == holder["pid"]:
                    continue
                try:
                    found.append(
                        WorkerHandle.adopt(
                            {
                                "vm": rt.name,
                                "kind": rt.config.vmm,
                                "pid": pid,
                                "create_time": start_time(pid),
                                "instance": "",
                                "control": "",
                                "started_at": 0.0,
                            }
                        )
                    )
                except (WorkerGone, OSError):
                    continue
        return found

    def sweep_tokens(self, grace_s: float = TOKEN_GRACE_S) -> int:
        """Revoke every token of a VM that none of its live workers holds: minted for
        a worker a supervisor or broker crash left behind (killed by
        ``sweep_orphans``, or never started), whose hash nobody recorded. Tokens
        younger than ``grace_s`` are left alone (a start or a standby may be about
        to hand one to its worker); a VM in the middle of an operation is skipped."""
        revoked = 0
        now = time.time()
        for rt in list(self.vms.values()):
            if not rt.lock.acquire(blocking=False):
                continue
            try:
                tokens = self.broker.list_tokens(rt.name)
            except RemoteError:
                rt.lock.release()
                continue  # a VM the broker does not hold
            except wire.WireError:
                rt.lock.release()
                return revoked
            try:
                held = {rt.worker.token_sha256} if rt.worker else set()
                if self.standby is not None:
                    held |= self.standby.token_hashes(rt.name)
                for t in tokens:
                    if t["sha256"] in held or now - float(t["created_at"]) < grace_s:
                        continue
                    self.revoke_hash(rt, t["sha256"])
                    revoked += 1
                    log.info(
                        "vm %s: revoked a token no live worker holds (%s)", rt.name, t["label"]
                    )
            finally:
                rt.lock.release()
        return revoked

    def _broker_vms(self) -> list[str]:
        try:
            return list(self.broker.list_vms())
        except (RemoteError, wire.WireError) as e:
            log.warning("cannot list the broker's VMs: %s", e)
            return []

    def live_holder(self, rt: VmRuntime) -> dict[str, Any] | None:
        """The process holding the VM's run lease, if it is alive.

        Raises RemoteError(UNAVAILABLE) if the broker cannot say: then nothing
        may start a worker for this VM."""
        try:
            st = self.broker.lease_status(rt.name)
        except RemoteError as e:
            if e.code == Code.NOT_FOUND:
                return None  # the broker holds nothing for this VM
            raise
        except wire.WireError as e:
            raise RemoteError(Code.UNAVAILABLE, f"the broker cannot say who runs it: {e}") from None
        holder = st.get("holder")
        return holder if holder and holder.get("alive") else None

    def _handle_from_lease(self, rt: VmRuntime) -> WorkerHandle | None:
        """A handle on the live process that holds the VM's run lease, if any."""
        try:
            holder = self.live_holder(rt)
        except RemoteError as e:
            log.warning("vm %s: %s", rt.name, e.message)
            return None
        if holder is None:
            return None
        kind = self.kind(rt)
        rec = {
            "vm": rt.name,
            "kind": kind.name,
            "pid": holder["pid"],
            "create_time": holder["start_time"],
            "instance": holder["instance"],
            "control": kind.control_path(rt.config, holder["instance"]),
            "started_at": holder["start_time"],
        }
        try:
            handle = WorkerHandle.adopt(rec)
        except WorkerGone:
            return None
        log.warning(
            "vm %s: pid %d holds the run lease without a record here; taking it back",
            rt.name,
            handle.pid,
        )
        return handle

    def _attach(self, rt: VmRuntime, handle: WorkerHandle) -> str:
        """A live worker was found: adopt it if it answers as ours; otherwise keep it
        as ``unresponsive`` and watched. Either way nothing else runs the guest."""
        kind = self.kinds.get(handle.kind, self.kind(rt))
        rt.worker = handle
        if realtime(handle.pid):  # a supervisor died inside its pause (priority.realtime_block)
            set_slice(handle.pid, 0)
        self.hold_fds(rt)
        self.watch(handle)
        try:
            kind.adopt(handle)
            hello = kind.describe(handle, timeout=ADOPT_HELLO_TIMEOUT_S)
            if hello.instance != handle.instance or hello.vm != rt.name:
                raise RemoteError(Code.CONFLICT, f"it answers as {hello.vm}/{hello.instance}")
        except RemoteError as e:
            self._unresponsive(
                rt, f"worker pid {handle.pid} lives but does not answer: {e.message}"
            )
            return rt.reason
        handle.version = hello.version or handle.version
        # "paused" here means an upgrade was cut short: resolve_journals settles it.
        rt.adopted(S.RUNNING if hello.state == GuestState.RUNNING else S.PAUSED, "")
        log.info("vm %s: adopted worker pid %d (%s)", rt.name, handle.pid, hello.state)
        return f"adopted pid {handle.pid}"

    def _unresponsive(self, rt: VmRuntime, reason: str) -> None:
        rt.adopted(S.UNRESPONSIVE, reason)
        rt.restart_at = None
        now = time.monotonic()
        rt.unresponsive_since = rt.unresponsive_since or now
        rt.next_probe = now + PROBE_INTERVAL_S
        log.warning(
            "vm %s: %s; not starting another (vmctl stop --force kills it)", rt.name, reason
        )

    def _probe(self, rt: VmRuntime, now: float) -> None:
        """Ask an unresponsive worker again; apply ``unresponsive_kill_s`` if set."""
        handle = rt.worker
        if handle is None:
            return
        try:
            hello = self.kind(rt).describe(handle, timeout=PROBE_TIMEOUT_S)
        except RemoteError:
            rt.next_probe = now + PROBE_INTERVAL_S
            limit = self.settings.supervisor.unresponsive_kill_s
            since = rt.unresponsive_since or now
            if limit and now - since >= limit:
                log.warning(
                    "vm %s: unresponsive for %.0fs; killing pid %d",
                    rt.name,
                    now - since,
                    handle.pid,
                )
                if self.kill_confirmed(rt, handle):
                    rt.worker = None
                    rt.change_state(
                        S.FAILED, f"worker pid {handle.pid} unresponsive for {limit}s: killed"
                    )
                    self.schedule_restart(rt, "unresponsive")
                    self.persist(rt)
            return
        if hello.instance != handle.instance:
            return
        rt.unresponsive_since = None
        handle.version = hello.version or handle.version
        rt.change_state(S.RUNNING if hello.state == GuestState.RUNNING else S.PAUSED, "")
        log.info("vm %s: worker pid %d answers again", rt.name, handle.pid)
        self.persist(rt)

    def autostart(self, only: list[str] | None = None) -> list[str]:
        """Start every autostart VM, ``AUTOSTART_PARALLEL`` at a time: one start is
        mostly waiting for its worker to build its VM, so the supervisor provisions
        the next VMs meanwhile (each start holds only its own VM's lock)."""
        names = [
            name
            for name, rt in list(self.vms.items())
            if (only is None or name in only)
            and rt.config.autostart
            and rt.state is S.STOPPED
            and rt.worker is None
        ]

        def one(name: str) -> bool:
            try:
                self.start(name)
                return True
            except RemoteError as e:
                log.error("vm %s: autostart failed: %s", name, e.message)
                return False

        with ThreadPoolExecutor(AUTOSTART_PARALLEL, thread_name_prefix="autostart") as pool:
            done = list(pool.map(one, names))
        return [name for name, ok in zip(names, done, strict=True) if ok]

    # ------------------------------------------------------------------ helpers
    def get(self, name: str) -> VmRuntime:
        rt = self.vms.get(name)
        if rt is None:
            raise RemoteError(Code.NOT_FOUND, f"no VM named {name!r} (see vmctl list)")
        return rt

    def kind(self, rt: VmRuntime) -> WorkerKind:
        return self.kinds[rt.config.vmm]

    def hold_fds(self, rt: VmRuntime) -> None:
        """Keep our own copy of every fd the broker holds for this VM, so that a
        broker crash never loses them (we hand them back to the next broker)."""
        try:
            if not rt.held:  # (a restarted supervisor's adoption: one round trip)
                got = self.broker.get_held(rt.name)
            else:
                names = [f["name"] for f in self.broker.list_fds(rt.name) if f["state"] == "held"]
                missing = [n for n in names if n not in rt.held]
                got = self.broker.get(rt.name, missing) if missing else {}
            if got:
                rt.held.update(got)
                self.broker.remember(rt.name, got)
        except RemoteError as e:
            log.warning("vm %s: cannot copy its fds from the broker: %s", rt.name, e.message)

    def release_vm(self, rt: VmRuntime) -> None:
        """A VM whose workers are confirmed dead: close our copies of its fds and have
        the broker drop it (its RAM, taps and console pipe go once the last holder
        closes them), and its jail's cgroup goes (one some process still uses stays)."""
        wire.close_fds(list(rt.held.values()))
        rt.held.clear()
        self.broker.forget(rt.name)
        with contextlib.suppress(RemoteError):
            self.broker.drop_vm(rt.name)
        jail.remove_cgroup(self.paths, rt.name)

    # ------------------------------------------------ what the upgrader uses
    def watch(self, handle: WorkerHandle) -> None:
        """Tell us when this worker exits (``_worker_exited``)."""
        self.watcher.add(handle)

    def revoke(self, rt: VmRuntime, handle: WorkerHandle | None) -> None:
        """The worker's broker token stops working (it is dead or no longer ours).
        An adopted worker's token is known only by its hash (records keep no token)."""
        if handle is not None and handle.token:
            self.revoke_token(rt, handle.token)
        elif handle is not None:
            self.revoke_hash(rt, handle.token_sha256)

    def revoke_token(self, rt: VmRuntime, token: str) -> None:
        with contextlib.suppress(RemoteError, wire.WireError):
            self.broker.revoke_token(rt.name, token)

    def revoke_hash(self, rt: VmRuntime, sha256: Any) -> None:
        """Revoke a token by the hash a record kept (nothing if there is none)."""
        if isinstance(sha256, str) and sha256:
            with contextlib.suppress(RemoteError, wire.WireError):
                self.broker.call("token.revoke", {"vm": rt.name, "sha256": sha256})

    def kill_confirmed(self, rt: VmRuntime, handle: WorkerHandle) -> bool:
        """SIGKILL a worker, confirmed dead by its pidfd, reaped, its token revoked.
        False if the kernel did not confirm it (then nothing new may run the guest)."""
        self.watcher.remove(handle)
        if not handle.kill_and_reap():
            return False
        self.revoke(rt, handle)
        return True

    def start_incoming(
        self,
        rt: VmRuntime,
        label: str,
        *,
        command: list[str] | None = None,
        source: WorkerHandle | None = None,
        config: VmConfig | None = None,
        machine: str | None = None,
        merge_idle: bool = False,
    ) -> WorkerHandle:
        """An incoming worker for ``rt`` (an upgrade's, a preflight's or a standby's)
        with a broker token of its own, minted here; if it does not come up, the
        token is revoked before the error goes on."""
        kind = self.kind(rt)
        # Its token is minted (a broker round trip and an fsync) while its jail is
        # prepared; the kind waits for it before the worker starts.
        minting = Aside(lambda: self.broker.mint_token(rt.name, label)) if kind.uses_token else None
        request = StartRequest(
            config or rt.config,
            incoming=True,
            token=None,
            minting=minting,
            timeout=self.settings.upgrade.prepare_timeout_s,
            command=command,
            source=source,
            machine=machine,
            merge_idle=merge_idle,
        )
        try:
            return kind.start(request)
        except BaseException:
            if minting is not None:
                minting.join()
                if minting.error is None:
                    self.revoke_token(rt, minting.result())
            raise

    def retire_worker(self, rt: VmRuntime, handle: WorkerHandle, *, force: bool) -> str:
        """End one worker for good: ``quit`` (unless ``force``), SIGKILL after the stop
        timeout, reap, revoke its token. Returns how it exited."""
        handle.expected_exit = True
        self.watcher.remove(handle)
        timeout = self.settings.supervisor.stop_timeout_s
        # Its exit (KVM teardown, exit_mmap: long in-kernel work) never overlaps
        # another VM's pause (supervisor.priority.Exclusion).
        with EXCLUSION.apart():
            mark(f"S.teardown_begin {handle.pid}")
            if not force and handle.alive():
                with contextlib.suppress(RemoteError):
                    self.kind(rt).quit(handle, timeout)
                handle.wait_exit(timeout)
            handle.kill_and_reap()
            mark(f"S.teardown_end {handle.pid}")
        self.revoke(rt, handle)
        return handle.exit_status or "unknown"

    def schedule_restart(self, rt: VmRuntime, cause: str = "failure") -> None:
        """Apply the VM's restart policy to a worker that failed (``cause``: see
        ``Events.worker_restarting``)."""
        pol = rt.config.restart
        if pol.policy != "on-failure":
            return
        now = time.monotonic()
        recent = [t for t in rt.restarts if now - t < pol.window_s]
        if len(recent) >= pol.max_restarts:
            rt.reason += f"; restart limit reached ({pol.max_restarts} in {pol.window_s}s)"
            rt.restart_at = None
            return
        delay = pol.backoff_ms / 1000 * (2 ** min(len(recent), 10))
        rt.restart_at = now + delay
        self._restart_cause[rt.name] = cause
        log.info("vm %s: restarting in %.2fs (%d recent restarts)", rt.name, delay, len(recent))

    # --------------------------------------------------------------- lifecycle
    def start(self, name: str) -> dict[str, Any]:
        rt = self.get(name)
        with rt.operation("a start", wait_s=None):
            if rt.state is S.SUSPENDED:  # booting it afresh would throw the guest away
                raise RemoteError(
                    Code.INVALID_STATE,
                    f"VM {name} is suspended ({rt.image}): vmctl resume it, or vmctl stop it "
                    "to discard the image",
                )
            if rt.worker is not None:  # whatever its state, that process may run the guest
                raise RemoteError(
                    Code.INVALID_STATE, f"VM {name} is already {rt.state} (pid {rt.worker.pid})"
                )
            return self._start_locked(rt)

    def _start_locked(self, rt: VmRuntime) -> dict[str, Any]:
        cfg = rt.config
        kind = self.kind(rt)
        if rt.worker is None:
            # Never two VMMs on one guest: a live process that holds the run lease
            # (a worker we lost track of) is taken back, not doubled.
            handle = self._handle_from_lease(rt)
            if handle is not None:
                self._attach(rt, handle)
                self.persist(rt)
                raise RemoteError(
                    Code.BUSY,
                    f"VM {cfg.name} is already run by pid {handle.pid} ({rt.state}); "
                    "not starting another",
                )
        self.check_memory(rt)
        rt.change_state(S.STARTING)
        rt.restart_at = None
        token = None
        handle = None
        try:
            kind.provision(cfg)
            self.hold_fds(rt)
            token = self.broker.mint_token(cfg.name, "worker") if kind.uses_token else None
            handle = kind.start(
                StartRequest(
                    cfg,
                    incoming=False,
                    token=token,
                    timeout=self.settings.supervisor.start_timeout_s,
                )
            )
            faults.fail("started")
            rt.worker = handle
            rt.change_state(S.RUNNING, "")
            self.watch(handle)
            self.persist(rt)
        except Exception as e:  # any failure: nothing this start made is left behind
            self._start_failed(rt, handle, token, e)
        log.info("vm %s: worker pid %d running (%s)", cfg.name, handle.pid, handle.version)
        return self.describe(rt)

    def check_memory(self, rt: VmRuntime) -> None:
        """Refuse a VM whose RAM the host cannot give, unless it may overcommit. A
        policy, not a guarantee (memfds are allocated as the guest touches them):
        the RAM the broker already holds for this VM counts as available to it."""
        cfg = rt.config
        if cfg.overcommit:
            return
        available = host_mem_available_mib()
        if available is None:
            return
        ram = rt.held.get(RAM)
        if ram is not None:
            with contextlib.suppress(OSError):
                available += os.fstat(ram).st_size >> 20
        if cfg.memory_mib > available:
            raise RemoteError(
                Code.QUOTA,
                f"VM {cfg.name} needs {cfg.memory_mib} MiB, the host has {available} MiB "
                "available (overcommit = true in its file or in [supervisor] allows it)",
            )

    def _start_failed(
        self, rt: VmRuntime, handle: WorkerHandle | None, token: str | None, e: Exception
    ) -> NoReturn:
        """End a failed start consistent: the worker it started (if any) confirmed
        dead and reaped, its token revoked, the VM failed. Raises the reason."""
        if isinstance(e, RemoteError):
            code, msg = e.code, e.message
        elif isinstance(e, OSError):
            code, msg = Code.IO_ERROR, str(e)
        else:
            log.error("vm %s: start failed unexpectedly", rt.name, exc_info=e)
            code, msg = Code.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        if handle is not None:
            if rt.worker is handle:
                rt.worker = None
            if not self.kill_confirmed(rt, handle):
                # Not confirmed dead: it stays ours and watched, so nothing else starts.
                rt.worker = handle
                self.watch(handle)
                self._unresponsive(rt, f"start failed ({msg}) and pid {handle.pid} would not die")
                with contextlib.suppress(Exception):
                    self.persist(rt)
                raise RemoteError(code, f"VM {rt.name}: {msg}") from None
        if token is not None:
            self.revoke_token(rt, token)
        rt.change_state(S.FAILED, f"start failed: {msg}")
        try:
            self.persist(rt)
        except Exception:
            log.exception("vm %s: cannot record the failed start", rt.name)
        raise RemoteError(code, f"VM {rt.name}: {msg}") from None

    def stop(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """Stop the guest and release its fds in the broker (its RAM is gone)."""
        rt = self.get(name)
        with rt.operation("a stop", wait_s=None):
            if rt.state is S.STOPPED and rt.worker is None and not rt.held:
                raise RemoteError(Code.INVALID_STATE, f"VM {name} is not running")
            if rt.state is S.UNRESPONSIVE and not force:
                raise RemoteError(
                    Code.INVALID_STATE,
                    f"VM {name}: worker pid {rt.worker.pid if rt.worker else '?'} does not "
                    "answer; vmctl stop --force kills it (the guest is lost)",
                )
            if rt.state is not S.STOPPED:
                rt.change_state(S.STOPPING)
            status = None
            if rt.worker is not None:
                status = self.retire_worker(rt, rt.worker, force=force)
                rt.worker = None
            if self.standby is not None:
                self.standby.discard(rt)  # killed, confirmed dead, its token revoked
            self.release_vm(rt)
            if rt.image is not None:  # a suspended VM: stopping it discards its image
                ramimage.remove(Path(rt.image))
                rt.image = None
            rt.change_state(S.STOPPED, "stopped by request" + (" (forced)" if force else ""))
            rt.restart_at = None
            rt.last_exit = status
            self.persist(rt)
            if rt.removed:  # out of the config, its worker confirmed dead: gone for good
                with self._table_lock:
                    self.vms.pop(name, None)
                jail.release_uid(self.paths, name)
            log.info("vm %s: stopped (%s)", name, status)
            return {"name": name, "state": "stopped", "worker_exit": status}

    def restart(self, name: str) -> dict[str, Any]:
        rt = self.get(name)
        with rt.lock:
            if rt.state is not S.STOPPED or rt.worker is not None or rt.held:
                self.stop(name)
            return self.start(name)

    def _worker_exited(self, handle: WorkerHandle) -> None:
        """From the watcher thread, which never waits for a VM's lock: an operation
        holding it (a start that hangs, an upgrade) must not delay other VMs' exits."""
        rt = self.vms.get(handle.vm)
        if rt is None:
            handle.reap()
            handle.close()
            return
        if rt.lock.acquire(blocking=False):
            try:
                self._handle_exit(rt, handle)
            finally:
                rt.lock.release()
            return
        threading.Thread(
            target=self._handle_exit_later, args=(rt, handle), name=f"exit-{rt.name}", daemon=True
        ).start()

    def _handle_exit_later(self, rt: VmRuntime, handle: WorkerHandle) -> None:
        try:
            with rt.lock:
                self._handle_exit(rt, handle)
        except Exception:
            log.exception("vm %s: handling the exit of pid %d", rt.name, handle.pid)

    def _handle_exit(self, rt: VmRuntime, handle: WorkerHandle) -> None:
        """The exit of a watched worker, with the VM's lock held."""
        if rt.worker is not handle or handle.expected_exit:
            return  # a stop or an upgrade is dealing with it
        status = handle.reap()
        code = handle.exit_code
        handle.close()
        self.revoke(rt, handle)
        rt.worker = None
        rt.last_exit = status
        what = self.kind(rt).exit_meaning(code)
        if what is ExitMeaning.RESET and rt.config.on_reboot == "restart":
            log.info("vm %s: guest reset; booting it again", rt.name)
            rt.change_state(S.FAILED, "guest reset")
            rt.restart_at = time.monotonic()
            self._restart_cause[rt.name] = "reset"
        elif what in (ExitMeaning.SHUTDOWN, ExitMeaning.RESET):
            log.info("vm %s: guest stopped itself (%s)", rt.name, status)
            self.release_vm(rt)
            rt.change_state(S.STOPPED, "the guest shut down")
        else:
            rt.change_state(S.FAILED, f"worker pid {handle.pid} {status}")
            log.warning("vm %s: %s", rt.name, rt.reason)
            if what is ExitMeaning.FAILURE:
                self.schedule_restart(rt)
        self.persist(rt)

    def housekeeping(self) -> None:
        """Run due restarts; notice a broker restart and hand our fds back."""
        if self.broker.broker_gone():
            try:
                self.broker.reconnect(time.monotonic() + 5)
                log.info("broker reconnected; our fds re-registered")
            except (wire.WireError, OSError) as e:
                log.warning("broker unavailable: %s", e)
                return
        now = time.monotonic()
        if now >= self._next_token_sweep:
            self._next_token_sweep = now + TOKEN_SWEEP_S
            self.sweep_tokens()
        for rt in list(self.vms.values()):
            self._bound_console_log(rt)
            if rt.state is S.UNRESPONSIVE and now >= rt.next_probe and rt.lock.acquire(False):
                try:
                    if rt.state is S.UNRESPONSIVE:
                        self._probe(rt, now)
                finally:
                    rt.lock.release()
            if rt.restart_at is not None and rt.restart_at <= now and rt.worker is None:
                self._restart_soon(rt)

    def _bound_console_log(self, rt: VmRuntime) -> None:
        """Copy-truncate the guest's console log once it passes its cap
        (``supervisor.consolelog``: why, and what it may lose)."""
        cfg = self.settings.supervisor
        try:
            rotate_if_needed(
                self.paths.console_log(rt.name), cfg.console_log_max_bytes, cfg.console_log_keep
            )
        except OSError as e:
            log.warning("vm %s: cannot rotate the console log: %s", rt.name, e)

    def _restart_soon(self, rt: VmRuntime) -> None:
        """Run a due restart on a thread of its own, one per VM at a time: a start
        may take up to ``start_timeout_s`` and the main loop must go on (watchdog
        pings, other VMs' restarts)."""
        with self._restart_lock:
            if rt.name in self._restarting:
                return
            self._restarting.add(rt.name)
        try:
            threading.Thread(
                target=self._restart, args=(rt,), name=f"restart-{rt.name}", daemon=True
            ).start()
        except RuntimeError as e:  # no thread now: the next round tries again
            log.warning("vm %s: cannot start the restart thread: %s", rt.name, e)
            with self._restart_lock:
                self._restarting.discard(rt.name)

    def _restart(self, rt: VmRuntime) -> None:
        try:
            with rt.operation("a restart", wait_s=None):
                now = time.monotonic()
                if rt.restart_at is None or rt.restart_at > now or rt.worker is not None:
                    return
                rt.restarts.append(now)
                cause = self._restart_cause.pop(rt.name, "failure")
                self.events.worker_restarting(rt.name, cause)
                try:
                    self._start_locked(rt)
                    log.info("vm %s: restarted", rt.name)
                except RemoteError as e:
                    log.error("vm %s: restart failed: %s", rt.name, e.message)
                    self.schedule_restart(rt, cause)
        except Exception:
            log.exception("vm %s: restart failed", rt.name)
        finally:
            with self._restart_lock:
                self._restarting.discard(rt.name)

    # ------------------------------------------------------------------ views
    def describe(self, rt: VmRuntime) -> dict[str, Any]:
        w = rt.worker
        return {
            "name": rt.name,
            "state": str(rt.state),
            "reason": rt.reason,
            "kind": rt.config.vmm,
            "pid": w.pid if w else None,
            "worker_version": w.version if w else None,
            "uptime_s": round(time.time() - w.started_at, 1) if w else None,
            "memory_mib": rt.config.memory_mib,
            "vcpus": rt.config.vcpus,
            "autostart": rt.config.autostart,
            "restart": rt.config.restart.policy,
            "restart_pending_s": round(rt.restart_at - time.monotonic(), 2)
            if rt.restart_at
            else None,
            "config": rt.config.source,
            "removed_from_config": rt.removed,
            "upgrades": rt.upgrades,
            "image": rt.image,
        }

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(rt) for rt in sorted(self.vms.values(), key=lambda r: r.name)]

    def status(self, name: str) -> dict[str, Any]:
        rt = self.get(name)
        out = self.describe(rt)
        out["last_exit"] = rt.last_exit
        out["last_upgrade"] = rt.last_upgrade
        out["disks"] = [
            {"name": d.name, "path": str(d.path), "size_mib": d.size_mib} for d in rt.config.disks
        ]
        out["console_log"] = str(self.paths.console_log(rt.name))
        if self.standby is not None:
            out["standby"] = self.standby.describe(rt)
        w = rt.worker
        out["jail"] = jail.status(self.paths, rt.config.raw, w.pid if w else None)
        if w is not None:
            out["usage"] = w.usage()
            if rt.state is S.UNRESPONSIVE:
                out["worker"] = {"error": rt.reason}  # asking again would only wait
            else:
                try:
                    out["worker"] = self.kind(rt).status(w)
                except RemoteError as e:
                    out["worker"] = {"error": e.message}
        out["nets"] = netdev.nic_status(rt.config.nets, out.get("worker"))
        return out

    def overview(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for rt in self.vms.values():
            states[str(rt.state)] = states.get(str(rt.state), 0) + 1
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "start_ms": self.start_ms,
            "open_fds": fdinfo.open_fd_count(),
            "vms": states,
            "config_errors": self.config_errors,
            "zygotes": self.zygotes.describe() if self.zygotes is not None else [],
        }
