"""The broker's operations: create, hand out, list and drop named fds per VM.

Authorisation happens on every request, from SO_PEERCRED and the request's
token: the administrator (a configured uid, root by default) may do
anything; a token holder may reach only its own VM's fds, and a revoked
token fails on its very next request.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import logging
import os
import secrets
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from baton import __version__, fdinfo, wire
from baton.config import BrokerConfig
from baton.paths import Paths
from baton.rpc import Request, Result, handles
from baton.schema import Bool, Field, Int, ListOf, Name, OneOf, Str, optional
from baton.wire import Code, RemoteError
from broker.table import Fetch, HeldFd, Table, VmEntry

log = logging.getLogger("broker")

MAX_MEMFD_SIZE = 1 << 46  # 64 TiB: far above any host, far below overflow
SEALS_RAM = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# Sockets and pipes can hang up; those we drop, as systemd's fd store does.
HANGUP_KINDS = ("socket", "pipe")

Labels = Field(ListOf(ListOf(Str(128), 2, 2), 32), factory=list)


def _labels(pairs: list[list[str]]) -> dict[str, str]:
    return {k: v for k, v in pairs}


class Broker:
    """Holds the table and serves its operations (bound to a ``Dispatcher``)."""

    def __init__(
        self,
        paths: Paths,
        config: BrokerConfig,
        table: Table,
        *,
        generation: int = 1,
        watch_hangup: Callable[[int, Callable[[int], None]], bool] | None = None,
        unwatch: Callable[[int], None] | None = None,
    ) -> None:
        self.paths = paths
        self.config = config
        self.table = table
        self.generation = generation
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._watch_hangup = watch_hangup
        self._unwatch = unwatch
        self.upgrade_hook: Callable[[Request, list[str] | None], Result] | None = None
        self.on_drop: list[Callable[[str], None]] = []  # called with a VM's name as it goes
        self.connection_count: Callable[[], int] = lambda: 0
        for vm in table.vms.values():
            for held in vm.fds.values():
                self._watch(vm.name, held)

    # -- helpers
    def save(self) -> None:
        try:
            self.table.save(self.paths.broker_state, self.generation)
        except OSError as e:  # never fail a request because the disk is full
            log.error("cannot write %s: %s", self.paths.broker_state, e)

    def is_admin(self, req: Request) -> bool:
        return req.peer.uid in self.config.admin_uids

    def require_admin(self, req: Request, what: str) -> None:
        if not self.is_admin(req):
            raise RemoteError(Code.DENIED, f"only the administrator may {what}")

    def vm_entry(self, req: Request, vm: str, *, admin: str | None = None) -> VmEntry:
        """The VM, if this peer may touch it. Never reveals other VMs to token holders."""
        if admin is not None:
            self.require_admin(req, admin)
        if not self.is_admin(req):
            if req.token is None:
                raise RemoteError(Code.DENIED, "a token or administrator credentials are required")
            if self.table.vm_for_token(req.token) != vm:
                raise RemoteError(Code.DENIED, f"token is not valid for VM {vm!r}")
        entry = self.table.vms.get(vm)
        if entry is None:
            raise RemoteError(Code.NOT_FOUND, f"no VM named {vm!r}")
        return entry

    def _watch(self, vm: str, held: HeldFd) -> None:
        if held.fd is None or held.info.kind not in HANGUP_KINDS or self._watch_hangup is None:
            return
        fd = held.fd

        def hung_up(_: int) -> None:
            entry = self.table.vms.get(vm)
            if entry is not None and entry.fds.get(held.name) is held:
                log.info("vm %s: fd %s hung up; dropping it", vm, held.name)
                del entry.fds[held.name]
                os.close(fd)
                self.save()

        self._watch_hangup(fd, hung_up)

    def _release(self, fds: list[int]) -> None:
        for fd in fds:
            if self._unwatch is not None:
                self._unwatch(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _check_room(self, entry: VmEntry, adding: int) -> None:
        if len(entry.fds) + adding > self.config.max_fds_per_vm:
            raise RemoteError(
                Code.TOO_MANY_FDS,
                f"VM {entry.name} would hold more than {self.config.max_fds_per_vm} fds",
            )

    def _add(
        self, entry: VmEntry, name: str, fd: int, source: str, labels: dict[str, str]
    ) -> HeldFd:
        held = HeldFd(name, fd, fdinfo.describe(fd), source, time.time(), labels)
        entry.fds[name] = held
        self._watch(entry.name, held)
        return held

    # -- ops
    @handles("hello")
    def hello(self, req: Request) -> dict[str, Any]:
        vm = self.table.vm_for_token(req.token) if req.token else None
        return {
            "service": "broker",
            "version": __version__,
            "protocol": wire.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "generation": self.generation,
            "started_at": self.started_at,
            "admin": self.is_admin(req),
            "vm": vm,
        }

    @handles("vm.create", vm=Name, exist_ok=optional(Bool(), False))
    def vm_create(self, req: Request, vm: str, exist_ok: bool) -> dict[str, Any]:
        self.require_admin(req, "create VMs")
        if vm in self.table.vms:
            if exist_ok:
                return {"vm": vm, "created": False}
            raise RemoteError(Code.EXISTS, f"VM {vm!r} already exists")
        self.table.add_vm(vm)
        self.save()
        log.info("vm %s created by pid %d", vm, req.peer.pid)
        return {"vm": vm, "created": True}

    @handles("vm.drop", vm=Name)
    def vm_drop(self, req: Request, vm: str) -> dict[str, Any]:
        self.vm_entry(req, vm, admin="drop VMs")
        fds = self.table.drop_vm(vm)
        self._release(fds)
        self.save()
        for hook in self.on_drop:
            hook(vm)
        log.info("vm %s dropped (%d fds closed)", vm, len(fds))
        return {"vm": vm, "closed": len(fds)}

    @handles("vm.list")
    def vm_list(self, req: Request) -> list[str]:
        self.require_admin(req, "list VMs")
        return sorted(self.table.vms)

    @handles("token.mint", vm=Name, label=optional(Str(128), ""))
    def token_mint(self, req: Request, vm: str, label: str) -> dict[str, Any]:
        self.vm_entry(req, vm, admin="mint tokens")
        token = secrets.token_urlsafe(32)
        self.table.add_token(vm, token, label)
        self.save()
        return {"vm": vm, "token": token}

    @handles(
        "token.revoke",
        vm=Name,
        token=optional(Str(256)),
        all=optional(Bool(), False),
    )
    def token_revoke(self, req: Request, vm: str, token: str | None, all: bool) -> dict[str, Any]:
        self.vm_entry(req, vm, admin="revoke tokens")
        if all:
            n = self.table.revoke_all(vm)
        elif token is None:
            raise RemoteError(Code.BAD_REQUEST, "give a token or all=true")
        else:
            n = 1 if self.table.revoke_token(vm, token) else 0
            if n == 0:
                raise RemoteError(Code.NOT_FOUND, f"no such token for VM {vm!r}")
        self.save()
        return {"vm": vm, "revoked": n}

    @handles(
        "fd.put",
        vm=Name,
        names=ListOf(Name, wire.MAX_FDS, 1),
        labels=Labels,
        replace=optional(Bool(), False),
    )
    def fd_put(
        self, req: Request, vm: str, names: list[str], labels: list[list[str]], replace: bool
    ) -> dict[str, Any]:
        """Hand fds to the broker. Re-handing an fd it already holds is a no-op;
        handing back a ``missing`` fd (after a broker restart) needs its inode."""
        entry = self.vm_entry(req, vm)
        if len(names) != len(req.fds):
            raise RemoteError(Code.FD_MISMATCH, f"{len(names)} names for {len(req.fds)} fds")
        if len(set(names)) != len(names):
            raise RemoteError(Code.BAD_REQUEST, "names must be unique")
        if replace:
            self.require_admin(req, "replace fds")
        infos = [fdinfo.describe(fd) for fd in req.fds]
        plan: list[str] = []
        for name, info in zip(names, infos, strict=True):
            held = entry.fds.get(name)
            same = held is not None and (held.info.dev, held.info.ino) == (info.dev, info.ino)
            if held is None:
                plan.append("new")
            elif same:
                plan.append("reregister" if held.fd is None else "same")
            elif held.fd is None:
                raise RemoteError(
                    Code.CONFLICT,
                    f"{vm}/{name} is awaiting re-registration of inode {held.info.ino}, "
                    f"not {info.ino}",
                )
            elif replace:
                plan.append("replace")
            else:
                raise RemoteError(Code.EXISTS, f"{vm}/{name} already holds another fd")
        self._check_room(entry, plan.count("new"))
        fds = req.take_fds()
        extra = _labels(labels)
        out: dict[str, list[str]] = {
            "added": [],
            "reregistered": [],
            "unchanged": [],
            "replaced": [],
        }
        for name, fd, action in zip(names, fds, plan, strict=True):
            if action == "same":
                os.close(fd)
                out["unchanged"].append(name)
                continue
            old = entry.fds.get(name)
            if old is not None and old.fd is not None:
                self._release([old.fd])
            source = {"new": "put", "reregister": "reregistered", "replace": "put"}[action]
            merged = {**(old.labels if old else {}), **extra}
            held = self._add(entry, name, fd, source, merged)
            if old is not None and action == "reregister":
                held.created_at = old.created_at
            key = {"new": "added", "reregister": "reregistered", "replace": "replaced"}[action]
            out[key].append(name)
        self.save()
        return out

    @handles("fd.get", vm=Name, names=ListOf(Name, wire.MAX_FDS, 1))
    def fd_get(self, req: Request, vm: str, names: list[str]) -> Result:
        entry = self.vm_entry(req, vm)
        chosen: list[HeldFd] = []
        for name in names:
            held = entry.fds.get(name)
            if held is None:
                raise RemoteError(Code.NOT_FOUND, f"VM {vm!r} has no fd named {name!r}")
            if held.fd is None:
                raise RemoteError(
                    Code.UNAVAILABLE, f"{vm}/{name} is missing: awaiting re-registration"
                )
            chosen.append(held)
        now = time.time()
        for held in chosen:
            held.fetch_count += 1
            held.fetches.append(Fetch(req.peer.pid, req.peer.uid, now))
        fds = [h.fd for h in chosen if h.fd is not None]
        return Result(
            {
                "names": names,
                "kinds": [h.info.kind for h in chosen],
                "sizes": [h.info.size for h in chosen],
            },
            fds,
        )

    @handles("fd.list", vm=Name)
    def fd_list(self, req: Request, vm: str) -> list[dict[str, Any]]:
        entry = self.vm_entry(req, vm)
        return [h.to_wire() for h in entry.fds.values()]

    @handles("fd.drop", vm=Name, name=Name)
    def fd_drop(self, req: Request, vm: str, name: str) -> dict[str, Any]:
        entry = self.vm_entry(req, vm, admin="drop fds")
        held = entry.fds.pop(name, None)
        if held is None:
            raise RemoteError(Code.NOT_FOUND, f"VM {vm!r} has no fd named {name!r}")
        if held.fd is not None:
            self._release([held.fd])
        self.save()
        return {"vm": vm, "dropped": name}

    @handles(
        "memfd.create",
        vm=Name,
        name=Name,
        size=Int(1, MAX_MEMFD_SIZE),
        hugetlb=optional(Bool(), False),
        labels=Labels,
    )
    def memfd_create(
        self, req: Request, vm: str, name: str, size: int, hugetlb: bool, labels: list[list[str]]
    ) -> dict[str, Any]:
        """Guest RAM: created here, sized once, sealed so nobody can shrink or grow it."""
        entry = self.vm_entry(req, vm, admin="create guest RAM")
        if name in entry.fds:
            raise RemoteError(Code.EXISTS, f"{vm}/{name} already exists")
        self._check_room(entry, 1)
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if hugetlb:
            flags |= os.MFD_HUGETLB
        fd = os.memfd_create(f"baton:{vm}:{name}", flags)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS_RAM)
        except OSError as e:
            os.close(fd)
            raise RemoteError(
                wire.errno_code(e), f"cannot size memfd to {size}: {e.strerror}"
            ) from None
        held = self._add(entry, name, fd, "created", {"role": "ram", **_labels(labels)})
        self.save()
        return held.to_wire()

    @handles(
        "fd.open",
        vm=Name,
        name=Name,
        path=Str(4096),
        mode=optional(OneOf(("ro", "rw", "append")), "rw"),
        create=optional(Bool(), False),
        labels=Labels,
    )
    def fd_open(
        self,
        req: Request,
        vm: str,
        name: str,
        path: str,
        mode: str,
        create: bool,
        labels: list[list[str]],
    ) -> dict[str, Any]:
        """Open a disk image or log on a worker's behalf, where the config allows."""
        entry = self.vm_entry(req, vm)
        if not os.path.isabs(path):
            raise RemoteError(Code.BAD_REQUEST, f"path must be absolute, found {path!r}")
        real = os.path.realpath(path)
        if not self.is_admin(req) and not any(
            fnmatch.fnmatchcase(real, pat) for pat in self.config.open_allow
        ):
            raise RemoteError(Code.DENIED, f"{real} is not under broker.open_allow")
        if name in entry.fds:
            raise RemoteError(Code.EXISTS, f"{vm}/{name} already exists")
        self._check_room(entry, 1)
        flags = {"ro": os.O_RDONLY, "rw": os.O_RDWR, "append": os.O_WRONLY | os.O_APPEND}[mode]
        flags |= os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW
        if create:
            flags |= os.O_CREAT
        fd = os.open(real, flags, 0o600)
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(fd)
            raise RemoteError(Code.BAD_REQUEST, f"{real} is not a regular file or block device")
        held = self._add(entry, name, fd, "opened", _labels(labels))
        self.save()
        return held.to_wire()

    @handles(
        "tun.open",
        vm=Name,
        name=Name,
        ifname=Str(15, pattern=r"[A-Za-z0-9_.-]*"),
        vnet_hdr=optional(Bool(), True),
        labels=Labels,
    )
    def tun_open(
        self, req: Request, vm: str, name: str, ifname: str, vnet_hdr: bool, labels: list[list[str]]
    ) -> dict[str, Any]:
        """A tap device, opened here so that workers never need CAP_NET_ADMIN."""
        entry = self.vm_entry(req, vm)
        if not self.config.allow_tun:
            raise RemoteError(Code.DENIED, "broker.allow_tun is false")
        if name in entry.fds:
            raise RemoteError(Code.EXISTS, f"{vm}/{name} already exists")
        self._check_room(entry, 1)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            ifr = struct.pack("16sH22x", ifname.encode(), flags)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError:
            os.close(fd)
            raise
        held = self._add(entry, name, fd, "opened", _labels(labels))
        self.save()
        return held.to_wire()

    @handles("broker.status")
    def status(self, req: Request) -> dict[str, Any]:
        self.require_admin(req, "read the broker status")
        return {
            "pid": os.getpid(),
            "version": __version__,
            "generation": self.generation,
            "started_at": self.started_at,
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "open_fds": fdinfo.open_fd_count(),
            "connections": self.connection_count(),
            "vms": [
                {
                    "name": vm.name,
                    "created_at": vm.created_at,
                    "tokens": len(vm.tokens),
                    "fds": [h.to_wire() for h in vm.fds.values()],
                }
                for vm in sorted(self.table.vms.values(), key=lambda v: v.name)
            ],
        }

    @handles("broker.upgrade", command=optional(ListOf(Str(4096), 64, 1)))
    def upgrade(self, req: Request, command: list[str] | None) -> Result:
        self.require_admin(req, "upgrade the broker")
        if self.upgrade_hook is None:
            raise RemoteError(Code.UNAVAILABLE, "self-upgrade is not available here")
        return self.upgrade_hook(req, command)
