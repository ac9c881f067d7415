"""What every kind of worker must provide, and the typed results of a handoff.

The supervisor's lifecycle and the upgrade transaction never look at what a
worker is; a kind says how to provision its fds, how to start it, and how to
move a running guest from one instance to the next:

    check(old, new)          can ``old`` hand its guest to ``new``? (before any pause)
    preflight(old, new, pf)  vmctl upgrade --check: as far as a handoff can be tried
                             without pausing the guest or starting a transfer
    begin_transfer(t, ...)   pause the old worker, stream its state to the new one
    wait_loaded(t, ...)      until the new worker holds the state -> Loaded
    resume_new(t, ...)       commit: the new worker runs the guest -> Resumed
    resume_old(h, ...)       roll back: the old worker runs the guest again
    finish_transfer(t, ...)  the old side's figures (pause time, state size) -> Sent

Whatever a kind needs between those calls it keeps in its own ``InFlight``
object on the ``Transfer``; whatever it keeps about a worker, in its own
``KindData`` on the handle. Neither is a shared dict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from baton.contract import ExitMeaning, Hello
from baton.paths import Paths
from baton.wire import Code, RemoteError
from broker.client import BrokerClient
from supervisor.aside import Aside
from supervisor.vmconfig import VmConfig
from supervisor.workers import WorkerHandle


class InFlight:
    """A kind's own record of one transfer in progress (request ids, sockets)."""

    def close(self) -> None:
        """Release whatever the transfer still holds."""


@dataclass
class Transfer:
    """One handoff between two workers of the same kind."""

    old: WorkerHandle
    new: WorkerHandle
    versions: dict[str, int]
    inflight: InFlight | None = None
    prewake: bool = False  # the old worker pre-wakes the new one (contract.PREWAKE)
    frame: bool = False  # the old worker sends the state frame (contract.STATE_FRAME)


@dataclass(frozen=True)
class StartRequest:
    """What a worker is started for: boot ``vm``, or take it over from ``source``."""

    vm: VmConfig
    incoming: bool
    token: str | None  # its broker token, for kinds that use one
    timeout: float  # until it must say it is ready
    command: list[str] | None = None  # another worker version (vmctl upgrade --worker)
    source: WorkerHandle | None = None  # the worker it will take the guest from
    machine: str | None = None  # QEMU: the machine type (a resume's, from the image)
    #: the token still being minted (instead of ``token``), while the jail is prepared
    minting: Aside[str] | None = None
    #: a standby that offers its memory for merging while idle (``[upgrade] standby_merge``)
    merge_idle: bool = False

    def the_token(self) -> str | None:
        """The worker's token, once minted."""
        return self.minting.result() if self.minting is not None else self.token


@dataclass(frozen=True)
class Compatibility:
    """What ``check`` found: the state versions the old worker will write."""

    versions: dict[str, int]
    old_version: str
    new_version: str
    prewake: bool = False  # both workers know contract.PREWAKE
    frame: bool = False  # both workers know contract.STATE_FRAME


@dataclass
class Preflight:
    """What ``preflight`` found (``vmctl upgrade --check``), filled in as it goes,
    so a refusal half-way still reports what was learnt before it."""

    old_version: str = ""
    new_version: str = ""
    versions: dict[str, int] | None = None  # old -> new: what the upgrade would write
    rollback_versions: dict[str, int] | None = None  # new -> old: an upgrade back
    rollback_reason: str = ""  # why there is no way back, if there is none
    state_bytes: int | None = None
    preview_us: float | None = None
    validate_us: float | None = None
    refused: str = ""  # why the upgrade would not go through ("" if it would)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Resumed:
    """The new (or old) worker runs the guest again; stamps on ``clock``."""

    resumed_at_ns: int
    resume_started_ns: int | None = None
    resume_us: float | None = None
    lease_us: float | None = None  # taking the run lease, just before the vCPUs ran
    clock: str = "monotonic"  # "realtime" for QMP event stamps

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> Resumed:
        return cls(
            resumed_at_ns=int(r["resumed_at_ns"]),
            resume_started_ns=r.get("resume_started_ns"),
            resume_us=r.get("resume_us"),
            lease_us=r.get("lease_us"),
            clock=str(r.get("clock", "monotonic")),
        )


@dataclass(frozen=True)
class Loaded:
    """The new worker holds the state. ``resumed`` is set when it also committed
    by itself (worker-commit mode: it resumed before the deadline)."""

    state_size: int | None = None
    waiting_at_ns: int | None = None  # the new worker's vCPU 0 began waiting for the state
    readable_at_ns: int | None = None  # the state's arrival woke the new worker's vCPU 0
    received_at_ns: int | None = None  # ... and it had read and unpacked the message
    loaded_at_ns: int | None = None
    validate_us: float | None = None
    apply_us: float | None = None
    resumed: Resumed | None = None
    #: a standby's merged pages taken back before its pre-wake (``[upgrade] standby_merge``)
    unmerge_us: float | None = None

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> Loaded:
        return cls(
            state_size=r.get("state_size"),
            waiting_at_ns=r.get("waiting_at_ns"),
            readable_at_ns=r.get("readable_at_ns"),
            received_at_ns=r.get("received_at_ns"),
            loaded_at_ns=r.get("loaded_at_ns"),
            validate_us=r.get("validate_us"),
            apply_us=r.get("apply_us"),
            resumed=Resumed.from_reply(r) if r.get("committed") else None,
            unmerge_us=r.get("unmerge_us"),
        )


@dataclass(frozen=True)
class Sent:
    """The old worker's side: when its guest stopped, what it sent, how long each part took."""

    paused_at_ns: int | None = None  # when it was asked to pause
    stopped_at_ns: int | None = None  # when its first vCPU left KVM_RUN
    parked_at_ns: int | None = None
    sent_at_ns: int | None = None
    state_size: int | None = None
    clock: str = "monotonic"
    phases_us: dict[str, float] | None = None  # pause, collect, save, send

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> Sent:
        return cls(
            paused_at_ns=r.get("paused_at_ns"),
            stopped_at_ns=r.get("stopped_at_ns") or r.get("paused_at_ns"),
            parked_at_ns=r.get("parked_at_ns"),
            sent_at_ns=r.get("sent_at_ns"),
            state_size=r.get("state_size"),
            clock=str(r.get("clock", "monotonic")),
            phases_us={k: r[k] for k in ("pause_us", "collect_us", "save_us", "send_us") if k in r},
        )


@dataclass(frozen=True)
class Saved:
    """A paused worker's complete device state, for a suspend image."""

    state: bytes
    versions: dict[str, int]  # the version each component was written at
    worker_kind: str
    worker_version: str
    machine: str = ""  # QEMU: the machine type a resuming QEMU must be started as


class WorkerKind(ABC):
    name: str
    uses_token = True  # does the worker talk to the broker itself?
    #: Can its new worker commit by itself before a deadline (``[upgrade] commit =
    #: "worker"``)? If not, the supervisor commits, whatever the setting.
    commits_itself = False

    def __init__(self, paths: Paths, broker: BrokerClient) -> None:
        self.paths = paths
        self.broker = broker

    @abstractmethod
    def exit_meaning(self, code: int | None) -> ExitMeaning:
        """What a worker's exit status means: reset, shutdown, clean or failure."""

    @abstractmethod
    def provision(self, vm: VmConfig) -> None:
        """Create in the broker every fd the VM needs that it does not hold yet."""

    @abstractmethod
    def start(self, req: StartRequest) -> WorkerHandle:
        """A worker that is up and has said hello (``req.incoming``: waiting for a
        state from ``req.source``). Raises RemoteError, with nothing left running,
        if not."""

    def adopt(self, handle: WorkerHandle) -> None:  # noqa: B027 - most kinds keep nothing
        """Re-attach what the kind keeps about a worker a previous supervisor started
        (``handle.recorded_kind_data``)."""

    @abstractmethod
    def describe(self, handle: WorkerHandle, timeout: float = 10.0) -> Hello:
        """hello-level facts: identity, version, guest state, state versions."""

    @abstractmethod
    def control_path(self, vm: VmConfig, instance: str) -> str:
        """Where worker ``instance`` of ``vm`` listens (derivable, so that a worker
        found only through the run lease can still be reached)."""

    @abstractmethod
    def status(self, handle: WorkerHandle) -> dict[str, Any]:
        """The worker's own view; ``state`` and a one-line ``detail`` for vmctl."""

    @abstractmethod
    def quit(self, handle: WorkerHandle, timeout: float) -> None: ...

    # -- live upgrade
    @abstractmethod
    def check(self, old: WorkerHandle, new: WorkerHandle) -> Compatibility:
        """Raises RemoteError (INCOMPATIBLE, INVALID_STATE) if ``old`` cannot hand off."""

    def preflight(self, old: WorkerHandle, new: WorkerHandle, pf: Preflight) -> None:
        """Everything about a handoff from ``old`` to the incoming ``new`` that can be
        learnt while the guest runs on, without a transfer and without the run lease.
        A refusal goes into ``pf.refused``; RemoteError if a worker failed to answer."""
        raise RemoteError(Code.BAD_REQUEST, f"{self.name} workers have no upgrade preflight")

    def ready_receiver(self, t: Transfer, timeout_ms: int, commit_by_ns: int | None) -> None:
        """Before the transfer is journaled: the new worker may begin to get ready to
        receive (no state can reach it before ``begin_transfer`` asks the old worker
        to send), so that its warm-up overlaps the journal's fsync. ``commit_by_ns``
        is the one then journaled. By default nothing; ``begin_transfer`` does all."""
        return None

    @abstractmethod
    def begin_transfer(self, t: Transfer, timeout_ms: int, commit_by_ns: int | None) -> None:
        """Start the handoff. With ``commit_by_ns`` the new worker resumes the guest
        itself if it has loaded the state by then (``Loaded.resumed`` is then set)."""

    @abstractmethod
    def wait_loaded(self, t: Transfer, timeout_ms: int) -> Loaded: ...

    @abstractmethod
    def resume_new(self, t: Transfer, timeout_ms: int) -> Resumed: ...

    @abstractmethod
    def finish_transfer(self, t: Transfer, timeout_ms: int) -> Sent: ...

    @abstractmethod
    def resume_old(self, handle: WorkerHandle, timeout_ms: int) -> None: ...

    # -- suspend to disk (supervisor/suspend.py)
    def save_paused(self, handle: WorkerHandle) -> Saved:
        """Pause the guest and save its whole device state; it stays paused
        (``resume_old`` lets it run on if the suspend is aborted)."""
        raise RemoteError(Code.BAD_REQUEST, f"{self.name} workers cannot be suspended yet")

    def load_saved(self, handle: WorkerHandle, state: bytes) -> dict[str, Any]:
        """Load a saved state into the incoming worker ``handle``; nothing runs yet.
        Returns what the worker reported of the load."""
        raise RemoteError(Code.BAD_REQUEST, f"{self.name} workers cannot be resumed yet")

    def run_loaded(self, handle: WorkerHandle, timeout_ms: int) -> Resumed:
        """The worker takes the run lease and its guest runs."""
        raise RemoteError(Code.BAD_REQUEST, f"{self.name} workers cannot be resumed yet")
