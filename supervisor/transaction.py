"""The live upgrade as a transaction: its steps, its outcomes, its one table of
allowed transitions, its journal and its report.

Both the live path (``supervisor.upgrade.Upgrader``) and journal recovery
after a supervisor crash go through ``Journal.append``, which refuses any
step the table does not allow after the last one, so the two can never
disagree about what may follow what.

Steps, and what each record means when a restarted supervisor reads it:

    begin      journal opened; the old worker runs the guest
    prepared   the new worker is built (RAM mapped, VM and vCPUs made), incoming
    transfer   about to ask the old worker to pause and send its state. In
               worker-commit mode this record also carries the delegated commit:
               the new worker resumes the guest by itself iff it has loaded the
               state by ``commit_by_ns`` (CLOCK_MONOTONIC)
    loaded     (supervisor-commit mode) the new worker holds the state; it has not run
    commit     (supervisor-commit mode) decided: the new worker resumes the guest
    resumed    the new worker runs the guest; the old one is reaped next
    done       outcome recorded: committed, rolled-back, aborted or failed

So the two commit modes journal:

    supervisor:  begin, prepared, transfer, loaded, commit, resumed, done
    worker:      begin, prepared, transfer(commit_by_ns), resumed, done

The commit decision is journaled before it is acted on in both modes. In
supervisor mode it is the ``commit`` record, written before ``resume`` is
sent. In worker mode the supervisor cannot journal it at the moment itself
(that round trip is what the mode saves from the pause), so it journals the
decision ahead, as the delegation in ``transfer``: "the new worker commits
iff it has loaded by commit_by_ns".

The point of no return is the first instant the new worker's vCPUs may run.
Before they do, whoever runs them (the new baton-vmm itself, or the
supervisor on a QEMU's behalf) takes the VM's run lease by writing the run
flag (a ``pwrite``, no round trip); the broker, which grants the lease to one
live process at a time, lets it pass from the old worker to the new one only
on the supervisor's offer, made just before the transfer and naming the new
worker's process, and settles it from the flag (``broker/lease.py``). So the
lease, not the journal, is the final word: a dead new worker that never held
it (never wrote the flag) provably never ran the guest, and
the old one may take the guest back even after ``commit`` (rolled-back); one
that held it may have moved the guest's memory on, and the old state is
never resumed over it (failed; the broker would refuse the old worker the
lease anyway).

The journal is ``DIR/var/lib/baton/upgrade/NAME.journal``, one JSON line per
record, appended before the step it records is acted on, and renamed to
``NAME.last`` once ``done``. What is fsynced: every record except ``loaded``
and ``commit``, the two written inside the guest's pause (supervisor-commit
mode), where an fsync (0.1-3 ms measured on this host's ext4) would cost
more than the whole pause, and ``prepared``, whose fsync the next record's
(``transfer``, before the guest pauses, or ``done``) makes for it: what it
guards (the read-only ``check``; the lease offer, moot once recovery has killed
the new worker, which never wrote the run flag) needs it only across a
supervisor crash. Those three need only survive a
supervisor crash, which the page cache does: a host crash takes the guest with
it, and the next boot starts it afresh. Every record that guards a step that
pauses, moves or resumes the guest (``transfer``, and ``begin`` for the new
worker's start) is on disk before that step. The file's creation is fsynced
too (its directory), so a journal that says ``begin`` is never lost.

Recovery reads the records up to the first that is unreadable or breaks the
table (an empty file, garbage, a line torn by a crash): it logs where it
stopped, keeps the whole file aside as ``NAME.journal.corrupt``, and decides
from those records and from what is live (which workers run, who holds the
run lease); with no readable record at all the VM is simply what adoption
found.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from baton.durable import fsync_dir, write_atomic
from supervisor import faults


class Step(enum.StrEnum):
    BEGIN = "begin"
    PREPARED = "prepared"
    TRANSFER = "transfer"
    LOADED = "loaded"
    COMMIT = "commit"
    RESUMED = "resumed"
    DONE = "done"


class Outcome(enum.StrEnum):
    COMMITTED = "committed"  # the new worker runs the guest
    ROLLED_BACK = "rolled-back"  # the guest paused, and the old worker took it back
    ABORTED = "aborted"  # refused or failed before the guest ever paused
    FAILED = "failed"  # neither worker can run the guest; the VM is failed


#: The one table: which step may follow which. ``done`` may end the
#: transaction from any step (with the outcome the step allows: see OUTCOMES).
ALLOWED: dict[Step | None, frozenset[Step]] = {
    None: frozenset({Step.BEGIN}),
    Step.BEGIN: frozenset({Step.PREPARED, Step.DONE}),
    Step.PREPARED: frozenset({Step.TRANSFER, Step.DONE}),
    Step.TRANSFER: frozenset({Step.LOADED, Step.RESUMED, Step.DONE}),
    Step.LOADED: frozenset({Step.COMMIT, Step.DONE}),
    Step.COMMIT: frozenset({Step.RESUMED, Step.DONE}),
    Step.RESUMED: frozenset({Step.DONE}),
    Step.DONE: frozenset(),
}

#: The outcomes each last step can end in. Before ``transfer`` the guest has
#: not paused (aborted). After ``commit`` the old worker gets the guest back
#: only if the new one died and the run lease proves it never ran the guest
#: (rolled-back); after ``resumed`` never.
OUTCOMES: dict[Step, frozenset[Outcome]] = {
    Step.BEGIN: frozenset({Outcome.ABORTED, Outcome.FAILED}),
    Step.PREPARED: frozenset({Outcome.ABORTED, Outcome.FAILED}),
    Step.TRANSFER: frozenset({Outcome.ROLLED_BACK, Outcome.COMMITTED, Outcome.FAILED}),
    Step.LOADED: frozenset({Outcome.ROLLED_BACK, Outcome.COMMITTED, Outcome.FAILED}),
    Step.COMMIT: frozenset({Outcome.COMMITTED, Outcome.ROLLED_BACK, Outcome.FAILED}),
    Step.RESUMED: frozenset({Outcome.COMMITTED, Outcome.FAILED}),
}


#: Not fsynced on their own: two written inside the guest's pause (supervisor-commit
#: mode), and ``prepared``, which the next record's fsync (``transfer``) covers.
UNSYNCED = frozenset({Step.PREPARED, Step.LOADED, Step.COMMIT})


class TransitionError(RuntimeError):
    """A step the table does not allow after the last one: a bug, never input."""


def check_transition(last: Step | None, step: Step, data: dict[str, Any]) -> None:
    if step not in ALLOWED[last]:
        raise TransitionError(f"upgrade step {step} may not follow {last or 'nothing'}")
    if step is Step.DONE:
        assert last is not None
        outcome = Outcome(data["outcome"])
        if outcome not in OUTCOMES[last]:
            raise TransitionError(f"an upgrade cannot end {outcome} after {last}")


def passed_point_of_no_return(steps: list[Step]) -> bool:
    """Did the supervisor journal that the new worker takes the guest?"""
    return Step.COMMIT in steps or Step.RESUMED in steps


class Resolution(enum.Enum):
    """What a restarted supervisor does with an upgrade its predecessor left open."""

    FORWARD = "the new worker keeps (or takes) the guest"
    BACK = "the old worker takes the guest back"
    STALE = "the new worker ran the guest and is gone: the old state is stale"
    LOST = "both workers are gone"


def resolve(
    steps: list[Step],
    *,
    new_alive: bool,
    new_runs_guest: bool,
    old_alive: bool,
    new_ran: bool,
) -> Resolution:
    """Decide by what is true now (which workers live, whether the new one ever held
    the run lease) and
    by the journal, with the same rules as the live path: forward once the commit
    is journaled or the new worker already runs the guest (or holds the whole state
    and the old one is gone); otherwise never forward, and never back over memory
    the new worker may have run on."""
    if new_alive and (
        new_runs_guest
        or passed_point_of_no_return(steps)
        or (not old_alive and Step.LOADED in steps)
    ):
        return Resolution.FORWARD
    if new_ran:
        return Resolution.STALE
    if not old_alive:
        return Resolution.LOST
    return Resolution.BACK


class Journal:
    """Append-only JSON lines, one file per VM while an upgrade is open; every
    append is checked against ``ALLOWED``."""

    def __init__(self, directory: Path, vm: str) -> None:
        self.path = directory / f"{vm}.journal"
        self.vm = vm
        self._fd: int | None = None
        self.last: Step | None = None
        self.steps: list[Step] = []
        self.problem: str | None = None  # why ``read`` stopped early, if it did
        self._good: list[dict[str, Any]] = []

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        existed = self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if not existed:
            fsync_dir(self.path.parent)

    def append(self, step: Step, **data: Any) -> None:
        assert self._fd is not None, "journal not open"
        check_transition(self.last, step, data)
        line = json.dumps({"step": str(step), "t": time.time(), **data}, separators=(",", ":"))
        os.write(self._fd, line.encode() + b"\n")
        if step not in UNSYNCED:
            os.fsync(self._fd)
        self.last = step
        self.steps.append(step)
        faults.crash_after(step)

    def close(self, keep_as_last: bool = True) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if keep_as_last:
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, self.path.with_suffix(".last"))

    def read(self) -> list[dict[str, Any]]:
        """The records a previous supervisor wrote, up to the first that breaks the
        table (a torn last line, say); ``last`` and ``steps`` follow them."""
        records: list[dict[str, Any]] = []
        self.last, self.steps = None, []
        self.problem = None
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        for n, raw in enumerate(lines, 1):
            if n == len(lines) and not raw:
                break  # the end of the last whole line
            try:
                rec = json.loads(raw.decode())
                if not isinstance(rec, dict):
                    raise TypeError(f"a {type(rec).__name__}, not a map")
                step = Step(rec["step"])
                check_transition(self.last, step, rec)
            except (ValueError, KeyError, TypeError, TransitionError) as e:
                self.problem = f"record {n} is unreadable ({type(e).__name__}: {e})"
                break
            records.append(rec)
            self.last = step
            self.steps.append(step)
        if not data:
            self.problem = "the file is empty"
        self._good = records
        return records

    def set_aside(self) -> Path:
        """Keep the file as it is, for inspection, as ``NAME.journal.corrupt``; the
        journal continues (if it does) with a copy of its readable records only."""
        aside = self.path.with_name(self.path.name + ".corrupt")
        os.replace(self.path, aside)
        good = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in self._good)
        if good:
            write_atomic(self.path, good)
        return aside


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


@dataclass
class Report:
    """What ``vmctl upgrade`` prints and the VM's record keeps: one upgrade, typed."""

    vm: str
    txid: str
    old_pid: int
    old_version: str
    outcome: Outcome | None = None
    reason: str = ""
    new_pid: int | None = None
    new_version: str | None = None
    blackout_ms: float | None = None
    #: begin to the guest running in the new worker with the old one confirmed
    #: parked (its send answered); the old worker's KVM teardown is ``reap_ms``
    total_ms: float | None = None
    reap_ms: float | None = None
    standby: bool | None = None  # the new worker was the VM's standby (supervisor.standby)
    state_bytes: int | None = None
    state_versions: dict[str, int] | None = None
    load_ms: float | None = None
    commit_by: str | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    timeline_us: dict[str, float] | None = None
    old_side_us: dict[str, float] | None = None
    new_side_us: dict[str, float | None] | None = None
    old_exit: str | None = None

    def phase(self, name: str, since_ns: int) -> None:
        self.phases_ms[name] = _ms(time.monotonic_ns() - since_ns)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["outcome"] = str(self.outcome) if self.outcome else None
        return {k: v for k, v in out.items() if v is not None or k in _ALWAYS}


_ALWAYS = {"outcome", "new_pid", "new_version", "blackout_ms", "state_bytes"}
