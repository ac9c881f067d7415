"""The contract between the supervisor and its workers, and the only copy of it.

Everything both sides must agree on lives here, below every process, so
that neither side copies a literal from the other and the supervisor never
imports ``vmm``: the names of a VM's fds in the broker, a worker's exit
statuses, its command line, what ``hello`` carries,
and how two workers' state versions are negotiated (a pure function over
what each advertises, so the supervisor's own installed copy of ``vmm``
never decides whether two workers are compatible).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --------------------------------------------------------------- fd names
RAM = "ram"  # memfd, sealed against shrink and grow
CONSOLE_LOG = "console-log"  # DIR/var/log/baton/NAME.console.log, O_APPEND
CONSOLE_IN = "console-in"  # read end of the console input pipe (the UART reads it)
CONSOLE_IN_WRITER = "console-in-w"  # write end (vmctl console writes keystrokes into it)
#: fds a baton-vmm worker takes when the broker holds them (RAM it always needs)
WORKER_OPTIONAL_FDS = (CONSOLE_LOG, CONSOLE_IN)


def tap_fd(nic: str) -> str:
    """The broker's name for NIC ``nic``'s tap fd (``net0`` -> ``tap-net0``); disks go
    by their own names (``disk0``)."""
    return f"tap-{nic}"


# Who may run the guest is not an fd: it is the VM's run lease, which the broker
# grants to one live process at a time (broker/lease.py, vmm/lease.py).


# ------------------------------------------------------------ exit status
class WorkerExit(enum.IntEnum):
    """baton-vmm's exit statuses."""

    OK = 0  # asked to quit
    ERROR = 1  # could not build or run the VM
    USAGE = 2
    GUEST_RESET = 3  # the guest asked for a reset
    GUEST_FAILED = 4  # a vCPU hit an error
    NO_KVM = 5
    GUEST_SHUTDOWN = 6  # the guest powered off
    INJECTED = 70  # a test's fault hook


class ExitMeaning(enum.StrEnum):
    """What a worker's exit means to the supervisor's restart policy."""

    CLEAN = "clean"
    RESET = "reset"
    SHUTDOWN = "shutdown"
    FAILURE = "failure"


def baton_exit_meaning(code: int | None) -> ExitMeaning:
    return {
        WorkerExit.OK: ExitMeaning.CLEAN,
        WorkerExit.GUEST_RESET: ExitMeaning.RESET,
        WorkerExit.GUEST_SHUTDOWN: ExitMeaning.SHUTDOWN,
    }.get(code, ExitMeaning.FAILURE)  # type: ignore[call-overload]


# ------------------------------------------------------------ guest state
class GuestState(enum.StrEnum):
    """What a worker's ``hello`` says of its guest."""

    CREATED = "created"  # built, neither booted nor incoming yet
    INCOMING = "incoming"  # built, waiting for a state to load
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"  # the guest asked for a reset or shutdown
    FAILED = "failed"  # a vCPU hit an error


# ---------------------------------------------------------- command line
@dataclass(frozen=True)
class DiskArg:
    name: str
    read_only: bool = False

    def arg(self) -> str:
        return f"{self.name}:{'ro' if self.read_only else 'rw'}"

    @classmethod
    def parse(cls, text: str) -> DiskArg:
        name, _, mode = text.partition(":")
        if mode not in ("", "ro", "rw"):
            raise ValueError(f"disk mode must be ro or rw, found {mode!r}")
        return cls(name, mode == "ro")


@dataclass(frozen=True)
class NicArg:
    """``--net NAME=MAC``: a NIC, whose tap the worker takes from the broker as
    ``tap_fd(NAME)``."""

    name: str
    mac: str

    def arg(self) -> str:
        return f"{self.name}={self.mac}"

    @classmethod
    def parse(cls, text: str) -> NicArg:
        name, sep, mac = text.partition("=")
        if not sep or not name or len(mac) != 17:
            raise ValueError(f"a NIC is NAME=MAC (net0=52:54:00:12:34:56), found {text!r}")
        return cls(name, mac.lower())


@dataclass(frozen=True)
class WorkerArgs:
    """baton-vmm's command line, built by whoever starts one."""

    root: Path
    vm: str
    incoming: bool = False
    vcpus: int = 1
    tick_ms: float = 50.0
    instance: str | None = None
    control: str | None = None
    guest: Path | None = None
    disks: Sequence[DiskArg] = ()
    nets: Sequence[NicArg] = ()
    ready_fd: int | None = None
    token_fd: int | None = None
    #: /dev/kvm, opened by the supervisor (a jailed worker has no /dev/kvm node)
    kvm_fd: int | None = None

    def argv(self, command: Sequence[str]) -> list[str]:
        argv = [*command, "--root", str(self.root), "--vm", self.vm]
        argv += ["--incoming" if self.incoming else "--boot", "--vcpus", str(self.vcpus)]
        argv += ["--tick-ms", str(self.tick_ms)]
        if self.instance is not None:
            argv += ["--instance", self.instance]
        if self.control is not None:
            argv += ["--control", self.control]
        if self.guest is not None:
            argv += ["--guest", str(self.guest)]
        for d in self.disks:
            argv += ["--disk", d.arg()]
        for n in self.nets:
            argv += ["--net", n.arg()]
        if self.ready_fd is not None:
            argv += ["--ready-fd", str(self.ready_fd)]
        if self.token_fd is not None:
            argv += ["--token-fd", str(self.token_fd)]
        if self.kvm_fd is not None:
            argv += ["--kvm-fd", str(self.kvm_fd)]
        return argv


# ------------------------------------------------------------------ hello
class ContractError(ValueError):
    """A worker's answer that breaks the contract (malformed hello, bad versions)."""


@dataclass(frozen=True)
class Hello:
    """What every worker says first: who it is, its guest's state, its state versions,
    and the optional parts of the handoff it knows (``HANDOFF_FEATURES``)."""

    vm: str
    instance: str
    state: str
    version: str
    state_versions: Mapping[str, tuple[int, int]]
    raw: Mapping[str, Any]
    features: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, raw: Any) -> Hello:
        if not isinstance(raw, Mapping):
            raise ContractError(f"hello is not a map: {type(raw).__name__}")
        fields: dict[str, str] = {}
        for key in ("vm", "instance", "state"):
            value = raw.get(key)
            if not isinstance(value, str):
                raise ContractError(f"hello: {key!r} must be a string, found {value!r:.40}")
            fields[key] = value
        return cls(
            vm=fields["vm"],
            instance=fields["instance"],
            state=fields["state"],
            version=str(raw.get("version", "")),
            state_versions=parse_versions(raw.get("state_versions", {})),
            raw=raw,
            features=_parse_features(raw.get(HANDOFF_FEATURES, [])),
        )


# ------------------------------------------------------------- ready word
#: "1" in a worker's environment: its ready word carries its hello
#: (``ready {JSON}``, ``baton.daemonize.Readiness``), which its starter reads
#: instead of asking for it over the control socket (a round trip and the
#: worker's first connection thread, on every start's path). An environment
#: variable, not an argument: a worker from before it ignores it and says
#: ``ready``, and a supervisor from before it never sets it.
READY_HELLO_ENV = "BATON_READY_HELLO"

#: "1" in a standby's environment (``[upgrade] standby_merge``): before its ready word, offer
#: its private memory to the kernel's page merging, and take it back before any
#: handoff (``vmm.idle_merge``). An environment variable for the same reason as
#: ``READY_HELLO_ENV``: a worker version from before it just ignores it.
IDLE_MERGE_ENV = "BATON_IDLE_MERGE"


def ready_detail(text: str) -> str | None:
    """What follows ``ready`` in a ready word (``""``: nothing); None: not ready."""
    if text == "ready":
        return ""
    return text[len("ready ") :] if text.startswith("ready ") else None


# --------------------------------------------------------- handoff features
#: The hello's list of optional handoff features. A worker from before a
#: feature does not list it, so each is used only when both workers list it.
HANDOFF_FEATURES = "handoff_features"
#: The pre-wake. With ``prewake: true`` in ``handoff.receive`` the new worker,
#: once warm, sends ``{"op": PREWAKE}`` on the state channel and waits for the
#: state awake (``vmm/awake.py``); with it in ``handoff.send`` the old worker
#: pauses only once that message has come (so nobody sleeps inside the pause).
#: Both requests carry it only where both hellos list the feature: a worker
#: from before it refuses the argument, and would never send or await the message.
PREWAKE = "prewake"


#: The state frame (``vmm.state``, format 2). With ``frame: true`` in
#: ``handoff.send`` the old worker sends the state as one raw frame on the state
#: channel instead of a message carrying format 1; a new worker reads either.
#: Only where both hellos list it: an older worker can read neither the frame
#: nor the raw datagram, and refuses the argument.
STATE_FRAME = "state_frame"


def _parse_features(raw: Any) -> frozenset[str]:
    if not isinstance(raw, list | tuple) or len(raw) > 64:
        raise ContractError(f"hello: {HANDOFF_FEATURES!r} must be a list of at most 64 names")
    if not all(isinstance(f, str) and len(f) <= 64 for f in raw):
        raise ContractError(f"hello: {HANDOFF_FEATURES!r} must hold names (strings)")
    return frozenset(raw)


def prewake_between(old: Hello, new: Hello) -> bool:
    """Whether the old worker should pre-wake the new one (both know the feature)."""
    return PREWAKE in old.features and PREWAKE in new.features


def frame_between(old: Hello, new: Hello) -> bool:
    """Whether the old worker should send the state frame (both know the feature)."""
    return STATE_FRAME in old.features and STATE_FRAME in new.features


def parse_versions(raw: Any) -> dict[str, tuple[int, int]]:
    """Per component, the (oldest, newest) state version a worker reads and writes."""
    if not isinstance(raw, Mapping) or len(raw) > 64:
        raise ContractError("state_versions must be a map of at most 64 components")
    out: dict[str, tuple[int, int]] = {}
    for name, pair in raw.items():
        ok = (
            isinstance(name, str)
            and isinstance(pair, list | tuple)
            and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            and 0 <= pair[0] <= pair[1]
        )
        if not ok:
            raise ContractError(f"state_versions: bad entry {name!r:.40}: {pair!r:.40}")
        out[name] = (pair[0], pair[1])
    return out


class IncompatibleVersions(ContractError):
    """The two workers share no state version for some component."""


def negotiate(
    writer: Mapping[str, tuple[int, int]],
    reader: Mapping[str, tuple[int, int]],
    names: tuple[str, str] = ("old", "new"),
) -> dict[str, int]:
    """The version of each component the writer should emit for the reader: the
    newest both understand. Both must advertise the same components (a reader
    needs every component it knows, a writer can emit only those it knows).
    ``names``: what the messages call the writer and the reader."""
    chosen: dict[str, int] = {}
    for name in sorted(set(writer) | set(reader)):
        w, r = writer.get(name), reader.get(name)
        if w is None or r is None:
            side = names[0] if w is None else names[1]
            raise IncompatibleVersions(f"{name}: the {side} worker does not know this component")
        lo, hi = max(w[0], r[0]), min(w[1], r[1])
        if lo > hi:
            raise IncompatibleVersions(
                f"{name}: the {names[0]} worker writes versions {w[0]}..{w[1]}, "
                f"the {names[1]} worker reads {r[0]}..{r[1]}"
            )
        chosen[name] = hi
    return chosen
