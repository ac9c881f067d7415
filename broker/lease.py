"""The run lease: who may run a guest's vCPUs, one live process at a time.

"Never two VMMs on one guest" is a fact the broker keeps, not one the
supervisor infers. A worker (or the supervisor on a stock QEMU's behalf)
takes its VM's lease before its vCPUs run; the broker grants it to one live
process, identified by a pidfd and its start time (never by pid alone), and
refuses anyone else while that process lives, however unresponsive it is.

    acquire(vm, instance)    granted if the lease is free, held by a dead process,
                             or held by the caller; or if the holder lives and the
                             administrator offered the lease to this instance (the
                             commit point of a live upgrade). Refused (BUSY) while
                             another holder lives, and for ever (STALE) to an
                             instance that held it before someone else did: its
                             state is older than the guest's memory.
    offer(vm, frm, to, pid)  administrator: the holder ``frm`` may pass the lease to
                             instance ``to``, process ``pid`` (that started at
                             ``start_time``); ``to`` = None withdraws it
    flag(vm)                 the VM's run flag (``baton.runflag``): an fd of a
                             one-page file the broker keeps
    release(vm, instance)    the holder lets go (it quit cleanly)
    status(vm)               holder, whether it lives, epoch, offer, past holders,
                             what the run flag names

The commit of an upgrade takes no round trip. Once the new worker has
received the old one's state (sent only after its vCPUs are parked) it
writes its instance id into the run flag and runs: a ``pwrite``, inside the
pause. The broker settles the lease from the flag lazily, before it answers
any lease request for that VM and at each turn of its loop: if the flag
names the instance the outstanding offer names, that offer was taken, and the
lease passes to the offered process (pidfd and start time, opened when the
offer was made, before the pause), alive or dead. So everyone who asks the
broker sees what the flag says: the supervisor adopting workers, recovery,
and the old worker asking to resume (refused, STALE, once the flag names the
new one). The offer is withdrawn only once the new worker is confirmed dead,
so the flag is final by then: a dead new worker that never wrote it provably
never ran the guest, and the old one may take the guest back; one that wrote
it may have, and the old state is never resumed over it. A worker that
predates the flag still takes the lease on the offer with ``acquire``.

Leases are persisted (``DIR/var/lib/baton/broker/leases.json``, fsynced) so a
restarted broker knows its holders: it re-opens a pidfd for each recorded pid
and keeps the holder only if the process's start time is the recorded one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baton import runflag
from baton.durable import write_atomic
from baton.rpc import Request, Result, handles
from baton.schema import Float, Int, Name, Str, optional
from baton.wire import Code, RemoteError

if TYPE_CHECKING:
    from broker.service import Broker

log = logging.getLogger("broker.lease")
PAST_KEPT = 32  # past holders remembered per VM (instance ids are random 128-bit)
START_TIME_SLACK = 0.01  # psutil's start time has 10 ms resolution


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_boot_time: float | None = None


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch: the same figure as psutil's
    ``create_time`` (boot time plus /proc/PID/stat's starttime), read directly,
    because a grant happens inside a guest's pause and psutil takes ~200 us here."""
    global _boot_time
    try:
        if _boot_time is None:
            with open("/proc/stat", "rb") as f:
                _boot_time = next(
                    float(line.split()[1]) for line in f if line.startswith(b"btime ")
                )
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # the command name may hold spaces and parentheses: fields follow the last ')'
        fields = stat[stat.rindex(b")") + 2 :].split()
        return int(fields[19]) / _CLOCK_TICKS + _boot_time
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@dataclass
class Holder:
    instance: str
    pid: int
    start_time: float
    pidfd: int | None = None  # None: not (or no longer) a live process we could open

    def alive(self) -> bool:
        if self.pidfd is None:
            return False
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return not p.poll(0)

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None

    def record(self) -> dict[str, Any]:
        return {"instance": self.instance, "pid": self.pid, "start_time": self.start_time}

    @classmethod
    def open(cls, instance: str, pid: int, start_time: float | None) -> Holder:
        """The live process ``pid`` if it is the one that started at ``start_time``
        (None: whichever process has that pid now, as for a connected peer)."""
        h = cls(instance, pid, start_time or 0.0)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return h
        now = process_start_time(pid)  # read after the pidfd: a recycled pid shows here
        if now is None or (start_time is not None and abs(now - start_time) > START_TIME_SLACK):
            os.close(pidfd)
            return h
        h.start_time = now
        h.pidfd = pidfd
        return h


@dataclass
class Lease:
    vm: str
    epoch: int = 0
    holder: Holder | None = None
    offer: tuple[str, str] | None = None  # (from instance, to instance)
    offered: Holder | None = None  # the process the offer names (opened at the offer)
    past: list[str] = field(default_factory=list)

    def view(self, flag: str) -> dict[str, Any]:
        h = self.holder
        return {
            "vm": self.vm,
            "epoch": self.epoch,
            "holder": None if h is None else {**h.record(), "alive": h.alive()},
            "offer": list(self.offer) if self.offer else None,
            "offer_pid": self.offered.pid if self.offered else None,
            "past": list(self.past),
            "flag": flag or None,
        }

    def record(self) -> dict[str, Any]:
        o = self.offered
        return {
            "epoch": self.epoch,
            "holder": self.holder.record() if self.holder else None,
            "offer": list(self.offer) if self.offer else None,
            "offer_pid": o.pid if o else None,
            "offer_start_time": o.start_time if o else None,
            "past": self.past,
        }

    def withdraw_offer(self) -> None:
        self.offer = None
        if self.offered is not None:
            self.offered.close()
            self.offered = None

    def held_by(self, instance: str) -> bool:
        """Has ``instance`` ever held this lease (now or before)?"""
        return (self.holder is not None and self.holder.instance == instance) or (
            instance in self.past
        )

    def _retire_holder(self) -> None:
        if self.holder is not None:
            self.past = [*self.past, self.holder.instance][-PAST_KEPT:]
            self.holder.close()
            self.holder = None


class Leases:
    """Every VM's lease, persisted on every change.

    The file is a log: one JSON line per change (``{"vm": ..., "lease": ...}``,
    ``null`` for a dropped VM), appended with one ``write`` before the change
    is answered, so a broker that crashes after a grant comes back knowing it
    (else it could let an old worker resume over memory the new one ran on).
    A grant happens inside a guest's pause: an append costs microseconds where
    a rename (hundreds of microseconds on some filesystems, 0.5 ms here) or an
    fsync (0.1-3 ms) would be most of the blackout. Appends are not fsynced:
    what the leases protect lives in memfds, which a host crash takes too. The
    log is compacted (rewritten whole, durably) when the broker starts."""

    def __init__(self, path: Path, flags: Path | None = None) -> None:
        self.path = path
        self.flags = flags if flags is not None else path.parent / "flags"
        self.leases: dict[str, Lease] = {}
        self._fd: int | None = None

    # -- persistence
    @classmethod
    def load(cls, path: Path, flags: Path | None = None) -> Leases:
        """What a previous broker recorded, then compacted; an unreadable line is
        logged and skipped, an unreadable file kept aside, never a reason not to
        start (a holder that is not known is no holder: nothing is granted on it)."""
        self = cls(path, flags)
        records: dict[str, Any] = {}
        try:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    try:
                        entry = json.loads(line)
                        records[str(entry["vm"])] = entry["lease"]
                    except (ValueError, KeyError, TypeError) as e:
                        log.error("%s line %d unreadable (%s): skipped", path, n, e)
        except FileNotFoundError:
            pass
        except OSError as e:
            aside = path.with_name(path.name + ".corrupt")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.error("%s is unreadable (%s); kept as %s, starting with no leases", path, e, aside)
        for vm, rec in records.items():
            if rec is None:
                continue
            try:
                lease = Lease(
                    vm,
                    epoch=int(rec["epoch"]),
                    past=[str(i) for i in rec.get("past", [])][-PAST_KEPT:],
                )
                offer = rec.get("offer")
                if offer:
                    lease.offer = (str(offer[0]), str(offer[1]))
                    if rec.get("offer_pid"):
                        lease.offered = Holder.open(
                            lease.offer[1], int(rec["offer_pid"]), float(rec["offer_start_time"])
                        )
                h = rec.get("holder")
                if h:
                    lease.holder = Holder.open(
                        str(h["instance"]), int(h["pid"]), float(h["start_time"])
                    )
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                log.error("lease of VM %s unreadable (%s): skipped", vm, e)
                continue
            self.leases[lease.vm] = lease
        for lease in self.leases.values():
            self._settle(lease, save=False)  # a flag written while no broker ran
        self._compact()
        return self

    def _compact(self) -> None:
        lines = b"".join(self._line(vm, lease) for vm, lease in self.leases.items())
        try:
            write_atomic(self.path, lines)
        except OSError as e:
            log.error("cannot write %s: %s", self.path, e)

    @staticmethod
    def _line(vm: str, lease: Lease | None) -> bytes:
        rec = lease.record() if lease is not None else None
        return json.dumps({"vm": vm, "lease": rec}, sort_keys=True).encode() + b"\n"

    def save(self, vm: str) -> None:
        """Append VM ``vm``'s lease as it is now (raises OSError if it cannot)."""
        if self._fd is None:
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        line = self._line(vm, self.leases.get(vm))
        if os.write(self._fd, line) != len(line):
            raise OSError(errno.ENOSPC, "short write")

    def _commit(self, lease: Lease, before: dict[str, Any], retired: Holder | None) -> None:
        """Persist ``lease``'s change, or undo it and refuse: never a grant that a
        restarted broker would not know of."""
        try:
            self.save(lease.vm)
        except OSError as e:
            lease.epoch, lease.offer, lease.past = before["epoch"], before["offer"], before["past"]
            if lease.holder is not None and lease.holder is not retired:
                lease.holder.close()
            lease.holder = retired
            log.error("cannot write %s: %s", self.path, e)
            raise RemoteError(Code.IO_ERROR, f"the run lease cannot be recorded: {e}") from None

    # -- the run flag (baton.runflag)
    def open_flag(self, vm: str, create: bool = True) -> int | None:
        """A new fd of VM ``vm``'s run flag, created (one zeroed page) if ``create``;
        None if there is none. The broker keeps no fd of its own: each look opens
        the file (a few microseconds, never inside a pause)."""
        path = self.flags / f"{vm}.flag"
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        if create:
            self.flags.mkdir(parents=True, exist_ok=True, mode=0o700)
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size < runflag.SIZE:
                os.ftruncate(fd, runflag.SIZE)
        except OSError:
            os.close(fd)
            raise
        return fd

    def read_flag(self, vm: str) -> str:
        """The instance VM ``vm``'s run flag names ('' if none, or no flag yet)."""
        try:
            fd = self.open_flag(vm, create=False)
            if fd is None:
                return ""
            try:
                return runflag.read(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.error("vm %s: cannot read the run flag: %s", vm, e)
            return ""

    def _clear_flag(self, vm: str) -> None:
        """After a grant by ``acquire`` the flag's word is recorded in the lease:
        cleared, so that an instance long gone from ``past`` never reads as unoffered."""
        try:
            fd = self.open_flag(vm, create=False)
            if fd is not None:
                try:
                    runflag.write(fd, runflag.CLEAR)
                finally:
                    os.close(fd)
        except OSError as e:
            log.error("vm %s: cannot clear the run flag: %s", vm, e)

    def _settle(self, lease: Lease, save: bool = True) -> None:
        """If the run flag names the instance the outstanding offer names, that
        worker took the offer (and may have run the guest from that instant): the
        lease is its process's, alive or not. Recorded best effort: the flag file
        itself is what a restarted broker settles from again."""
        if lease.offer is None or lease.offered is None:
            return
        if self.read_flag(lease.vm) != lease.offer[1]:
            return
        new = lease.offered
        lease.offered = None
        lease._retire_holder()
        lease.holder = new
        lease.epoch += 1
        lease.offer = None
        log.info(
            "vm %s: run lease epoch %d to pid %d (%s), from the run flag",
            lease.vm,
            lease.epoch,
            new.pid,
            new.instance,
        )
        if save:
            self._save_or_log(lease.vm)

    def settle_all(self) -> None:
        """The broker loop's turn: settle every lease with an offer outstanding."""
        for lease in self.leases.values():
            if lease.offer is not None:
                self._settle(lease)

    # -- operations
    def get(self, vm: str) -> Lease:
        """VM ``vm``'s lease, settled from its run flag first: every answer the broker
        gives agrees with the flag."""
        lease = self.leases.get(vm)
        if lease is None:
            lease = self.leases[vm] = Lease(vm)
        self._settle(lease)
        return lease

    def view(self, lease: Lease) -> dict[str, Any]:
        return lease.view(self.read_flag(lease.vm))

    def acquire(self, vm: str, instance: str, pid: int, start_time: float | None) -> Lease:
        """Grant VM ``vm``'s lease to process ``pid`` (that started at ``start_time``;
        None: the connected peer itself, which lives while it asks)."""
        lease = self.get(vm)
        flag = self.read_flag(vm)
        if flag and flag != instance and not lease.held_by(flag):
            # Someone wrote the flag without an offer (by hand, not through the
            # supervisor): it may be running the guest, and we cannot say which
            # process it is. Nobody else runs it until the VM is dropped.
            raise RemoteError(
                Code.CONFLICT,
                f"VM {vm}: the run flag names instance {flag}, which was never offered the "
                "run lease and may be running the guest",
            )
        o = lease.offered
        if o is not None and o.alive() and lease.offer is not None and lease.offer[1] != instance:
            # The offered worker may write the flag at any moment, and nothing can
            # refuse that: nobody else (the holder resuming included) runs meanwhile.
            raise RemoteError(
                Code.BUSY,
                f"VM {vm}: the run lease is offered to pid {o.pid} (instance {o.instance}), "
                "which is alive",
            )
        h = lease.holder
        if h is not None and h.instance == instance:
            same = h.pid == pid and h.alive()  # a live pidfd: that pid is still that process
            if same and (start_time is None or abs(h.start_time - start_time) <= START_TIME_SLACK):
                return lease  # already ours (a worker resuming after a rolled-back handoff)
            raise RemoteError(Code.CONFLICT, f"instance {instance} is held by another process")
        if instance in lease.past:
            raise RemoteError(
                Code.STALE,
                f"VM {vm}: instance {instance} ran this guest before epoch {lease.epoch}; "
                "its state is older than the guest's memory",
            )
        if h is not None and h.alive():
            if lease.offer != (h.instance, instance):
                raise RemoteError(
                    Code.BUSY,
                    f"VM {vm}: the run lease is held by pid {h.pid} (instance {h.instance}), "
                    "which is alive",
                )
            if lease.offered is not None and lease.offered.pid != pid:
                raise RemoteError(
                    Code.CONFLICT, f"VM {vm}: the offer names pid {lease.offered.pid}, not {pid}"
                )
        new = Holder.open(instance, pid, start_time)
        if new.pidfd is None:
            raise RemoteError(Code.NOT_FOUND, f"pid {pid} is not a live process")
        before = {"epoch": lease.epoch, "offer": lease.offer, "past": list(lease.past)}
        retired = lease.holder
        if retired is not None:
            lease.past = [*lease.past, retired.instance][-PAST_KEPT:]
        lease.holder = new
        lease.epoch += 1
        lease.offer = None
        self._commit(lease, before, retired)
        if lease.offered is not None:
            lease.offered.close()
            lease.offered = None
        if flag:
            self._clear_flag(vm)
        if retired is not None:
            retired.close()
        log.info("vm %s: run lease epoch %d to pid %d (%s)", vm, lease.epoch, pid, instance)
        return lease

    def offer(
        self, vm: str, frm: str, to: str | None, pid: int = 0, start_time: float = 0.0
    ) -> Lease:
        """``to`` (process ``pid``, started at ``start_time``) may take the lease from
        ``frm``, by ``acquire`` or by writing the run flag; ``to`` None withdraws.
        The supervisor withdraws only once the offered worker is confirmed dead:
        a live one may write the flag at any moment, and the flag then counts."""
        lease = self.get(vm)
        if to is None:
            if lease.offer is not None:
                lease.withdraw_offer()
                self._save_or_log(vm)
            return lease
        if lease.holder is None or lease.holder.instance != frm:
            holder = lease.holder.instance if lease.holder else "nobody"
            raise RemoteError(Code.CONFLICT, f"VM {vm}: the lease is held by {holder}, not {frm}")
        if lease.held_by(to):
            raise RemoteError(Code.STALE, f"VM {vm}: instance {to} held this lease before")
        if self.read_flag(vm) == to:
            raise RemoteError(
                Code.CONFLICT, f"VM {vm}: instance {to} wrote the run flag before it was offered"
            )
        offered = Holder.open(to, pid, start_time)
        if offered.pidfd is None:
            raise RemoteError(
                Code.NOT_FOUND, f"pid {pid} is not a live process that started at {start_time}"
            )
        lease.withdraw_offer()
        lease.offer, lease.offered = (frm, to), offered
        self._save_or_log(vm)
        return lease

    def release(self, vm: str, instance: str) -> Lease:
        lease = self.get(vm)
        if lease.holder is not None and lease.holder.instance == instance:
            lease._retire_holder()
            lease.withdraw_offer()
            self._save_or_log(vm)
        return lease

    def drop(self, vm: str) -> None:
        lease = self.leases.pop(vm, None)
        if lease is not None:
            lease._retire_holder()
            lease.withdraw_offer()
            self._save_or_log(vm)
        with contextlib.suppress(OSError):
            (self.flags / f"{vm}.flag").unlink()

    def _save_or_log(self, vm: str) -> None:
        """For changes that only withdraw (an offer, a holder): a lost record of one
        errs on the safe side (a restarted broker sees a holder or an offer that
        is gone, and lets nobody new in on it until the holder is found dead)."""
        try:
            self.save(vm)
        except OSError as e:
            log.error("cannot write %s: %s", self.path, e)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for lease in self.leases.values():
            if lease.holder is not None:
                lease.holder.close()
            lease.withdraw_offer()


class LeaseService:
    """The lease operations on the broker's socket (bound beside ``Broker``).

    Authorisation is the broker's own: the administrator, or a token for the
    VM. A token holder acquires for itself (SO_PEERCRED's pid); the
    administrator may acquire for a process it names (the supervisor runs
    stock QEMU, which never talks to the broker), and alone may offer."""

    def __init__(self, broker: Broker, leases: Leases) -> None:
        self.broker = broker
        self.leases = leases
        broker.on_drop.append(leases.drop)

    @handles(
        "lease.acquire",
        vm=Name,
        instance=Str(64),
        pid=optional(Int(1, 2**22)),
        start_time=optional(Float(0, 2**40)),
    )
    def acquire(
        self, req: Request, vm: str, instance: str, pid: int | None, start_time: float | None
    ) -> dict[str, Any]:
        self.broker.vm_entry(req, vm)
        if pid is not None:
            self.broker.require_admin(req, "take a run lease for another process")
            if start_time is None:
                raise RemoteError(
                    Code.BAD_REQUEST, "a lease for another process needs its start_time"
                )
        else:
            pid, start_time = req.peer.pid, None
        return self.leases.view(self.leases.acquire(vm, instance, pid, start_time))

    @handles(
        "lease.offer",
        vm=Name,
        frm=Str(64),
        to=optional(Str(64)),
        pid=optional(Int(1, 2**22)),
        start_time=optional(Float(0, 2**40)),
    )
    def offer(
        self,
        req: Request,
        vm: str,
        frm: str,
        to: str | None,
        pid: int | None,
        start_time: float | None,
    ) -> dict[str, Any]:
        self.broker.vm_entry(req, vm, admin="offer a run lease")
        if to is not None and (pid is None or start_time is None):
            raise RemoteError(
                Code.BAD_REQUEST, "an offer names the new worker's process: pid and start_time"
            )
        return self.leases.view(self.leases.offer(vm, frm, to, pid or 0, start_time or 0.0))

    @handles("lease.flag", vm=Name)
    def flag(self, req: Request, vm: str) -> Result:
        """The VM's run flag, for its workers (and the supervisor, for QEMU)."""
        self.broker.vm_entry(req, vm)
        try:
            fd = self.leases.open_flag(vm)
        except OSError as e:
            raise RemoteError(Code.IO_ERROR, f"VM {vm}: cannot open the run flag: {e}") from None
        assert fd is not None
        return Result({"size": runflag.SIZE, "record": runflag.RECORD}, [fd], owned=True)

    @handles("lease.release", vm=Name, instance=Str(64))
    def release(self, req: Request, vm: str, instance: str) -> dict[str, Any]:
        self.broker.vm_entry(req, vm)
        lease = self.leases.get(vm)
        h = lease.holder
        theirs = h is not None and h.instance == instance and h.pid != req.peer.pid
        if theirs and not self.broker.is_admin(req):
            raise RemoteError(Code.DENIED, "only the holder may release its run lease")
        return self.leases.view(self.leases.release(vm, instance))

    @handles("lease.status", vm=Name)
    def status(self, req: Request, vm: str) -> dict[str, Any]:
        self.broker.vm_entry(req, vm)
        return self.leases.view(self.leases.get(vm))
