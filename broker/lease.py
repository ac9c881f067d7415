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
    offer(vm, frm, to)       administrator: the holder ``frm`` may pass the lease to
                             ``to`` (``to`` = None withdraws it)
    release(vm, instance)    the holder lets go (it quit cleanly)
    status(vm)               holder, whether it lives, epoch, offer, past holders

An upgrade's new worker acquires on the offer once it has received the old
worker's state (which the old one sends only after its vCPUs are parked):
from that instant the old worker holds nothing, and resuming it (a rollback)
needs the lease back, which it gets only if the new one never took it. So
the lease also does the run flag's old job: whether a dead new worker ever
ran the guest is whether it ever held the lease.

Leases are persisted (``DIR/var/lib/baton/broker/leases.json``, fsynced) so a
restarted broker knows its holders: it re-opens a pidfd for each recorded pid
and keeps the holder only if the process's start time is the recorded one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from baton.durable import write_atomic
from baton.rpc import Request, handles
from baton.schema import Float, Int, Name, Str, optional
from baton.wire import Code, RemoteError

if TYPE_CHECKING:
    from broker.service import Broker

log = logging.getLogger("broker.lease")
PAST_KEPT = 32  # past holders remembered per VM (instance ids are random 128-bit)
START_TIME_SLACK = 0.01  # psutil's start time has 10 ms resolution


def process_start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
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
    def open(cls, instance: str, pid: int, start_time: float) -> Holder:
        """The live process ``pid`` if it is the one that started at ``start_time``."""
        h = cls(instance, pid, start_time)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return h
        now = process_start_time(pid)  # checked after the pidfd: a recycled pid shows here
        if now is None or abs(now - start_time) > START_TIME_SLACK:
            os.close(pidfd)
            return h
        h.pidfd = pidfd
        return h


@dataclass
class Lease:
    vm: str
    epoch: int = 0
    holder: Holder | None = None
    offer: tuple[str, str] | None = None  # (from instance, to instance)
    past: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        h = self.holder
        return {
            "vm": self.vm,
            "epoch": self.epoch,
            "holder": None if h is None else {**h.record(), "alive": h.alive()},
            "offer": list(self.offer) if self.offer else None,
            "past": list(self.past),
        }

    def record(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "holder": self.holder.record() if self.holder else None,
            "offer": list(self.offer) if self.offer else None,
            "past": self.past,
        }

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
    """Every VM's lease, persisted on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.leases: dict[str, Lease] = {}

    # -- persistence
    @classmethod
    def load(cls, path: Path) -> Leases:
        """What a previous broker recorded; an unreadable file is logged and kept
        aside, never a reason not to start (holders re-acquire)."""
        self = cls(path)
        try:
            doc = json.loads(path.read_text())
            entries = doc["leases"]
            if not isinstance(entries, dict):
                raise TypeError("leases is not a map")
        except FileNotFoundError:
            return self
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = path.with_name(path.name + ".corrupt")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.error("%s is unreadable (%s); kept as %s, starting with no leases", path, e, aside)
            return self
        for vm, rec in entries.items():
            try:
                lease = Lease(
                    str(vm),
                    epoch=int(rec["epoch"]),
                    past=[str(i) for i in rec.get("past", [])][-PAST_KEPT:],
                )
                offer = rec.get("offer")
                if offer:
                    lease.offer = (str(offer[0]), str(offer[1]))
                h = rec.get("holder")
                if h:
                    lease.holder = Holder.open(
                        str(h["instance"]), int(h["pid"]), float(h["start_time"])
                    )
            except (KeyError, TypeError, ValueError, IndexError) as e:
                log.error("lease of VM %s unreadable (%s): skipped", vm, e)
                continue
            self.leases[lease.vm] = lease
        return self

    def save(self) -> None:
        doc = {"leases": {vm: lease.record() for vm, lease in self.leases.items()}}
        try:
            write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())
        except OSError as e:
            # The lease in memory is still right; a restart would re-learn holders.
            log.error("cannot write %s: %s", self.path, e)

    # -- operations
    def get(self, vm: str) -> Lease:
        lease = self.leases.get(vm)
        if lease is None:
            lease = self.leases[vm] = Lease(vm)
        return lease

    def acquire(self, vm: str, instance: str, pid: int, start_time: float | None) -> Lease:
        lease = self.get(vm)
        h = lease.holder
        if start_time is None:
            raise RemoteError(Code.NOT_FOUND, f"pid {pid} is gone")
        if h is not None and h.instance == instance:
            if h.pid == pid and abs(h.start_time - start_time) <= START_TIME_SLACK:
                return lease  # already ours (a worker resuming after a rolled-back handoff)
            raise RemoteError(Code.CONFLICT, f"instance {instance} is held by another process")
        if instance in lease.past:
            raise RemoteError(
                Code.STALE,
                f"VM {vm}: instance {instance} ran this guest before epoch {lease.epoch}; "
                "its state is older than the guest's memory",
            )
        if h is not None and h.alive() and lease.offer != (h.instance, instance):
            raise RemoteError(
                Code.BUSY,
                f"VM {vm}: the run lease is held by pid {h.pid} (instance {h.instance}), "
                "which is alive",
            )
        new = Holder.open(instance, pid, start_time)
        if new.pidfd is None:
            raise RemoteError(Code.NOT_FOUND, f"pid {pid} is not a live process")
        lease._retire_holder()
        lease.holder = new
        lease.epoch += 1
        lease.offer = None
        self.save()
        log.info("vm %s: run lease epoch %d to pid %d (%s)", vm, lease.epoch, pid, instance)
        return lease

    def offer(self, vm: str, frm: str, to: str | None) -> Lease:
        lease = self.get(vm)
        if to is None:
            if lease.offer is not None:
                lease.offer = None
                self.save()
            return lease
        if lease.holder is None or lease.holder.instance != frm:
            holder = lease.holder.instance if lease.holder else "nobody"
            raise RemoteError(Code.CONFLICT, f"VM {vm}: the lease is held by {holder}, not {frm}")
        if lease.held_by(to):
            raise RemoteError(Code.STALE, f"VM {vm}: instance {to} held this lease before")
        lease.offer = (frm, to)
        self.save()
        return lease

    def release(self, vm: str, instance: str) -> Lease:
        lease = self.get(vm)
        if lease.holder is not None and lease.holder.instance == instance:
            lease._retire_holder()
            lease.offer = None
            self.save()
        return lease

    def drop(self, vm: str) -> None:
        lease = self.leases.pop(vm, None)
        if lease is not None:
            lease._retire_holder()
            self.save()

    def close(self) -> None:
        for lease in self.leases.values():
            if lease.holder is not None:
                lease.holder.close()


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
            now = process_start_time(pid)
            if start_time is not None and (now is None or abs(now - start_time) > 0.01):
                raise RemoteError(Code.NOT_FOUND, f"pid {pid} is not the process that started then")
        else:
            pid = req.peer.pid
            now = process_start_time(pid)
        return self.leases.acquire(vm, instance, pid, now).view()

    @handles("lease.offer", vm=Name, frm=Str(64), to=optional(Str(64)))
    def offer(self, req: Request, vm: str, frm: str, to: str | None) -> dict[str, Any]:
        self.broker.vm_entry(req, vm, admin="offer a run lease")
        return self.leases.offer(vm, frm, to).view()

    @handles("lease.release", vm=Name, instance=Str(64))
    def release(self, req: Request, vm: str, instance: str) -> dict[str, Any]:
        self.broker.vm_entry(req, vm)
        lease = self.leases.get(vm)
        h = lease.holder
        theirs = h is not None and h.instance == instance and h.pid != req.peer.pid
        if theirs and not self.broker.is_admin(req):
            raise RemoteError(Code.DENIED, "only the holder may release its run lease")
        return self.leases.release(vm, instance).view()

    @handles("lease.status", vm=Name)
    def status(self, req: Request, vm: str) -> dict[str, Any]:
        self.broker.vm_entry(req, vm)
        return self.leases.get(vm).view()
