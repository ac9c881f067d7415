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
import struct
import time
from collections.abc import Callable
from typing import Any

from baton import __version__, fdinfo, wire
from baton.config import BrokerConfig
from baton.paths import Paths
from baton.rpc import Peer, Request, Result, handles
from baton.schema import Bool, Field, Int, ListOf, Name, OneOf, Str, optional, record
from baton.wire import Code, RemoteError
from broker import safeopen
from broker.table import Allowed, Fetch, HeldFd, Table, VmEntry, label_size

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
IfName = Str(15, pattern=r"[A-Za-z0-9_.-]*")
Path = Str(4096)
MAX_ALLOWED_FILES = 64
MAX_ALLOWED_TAPS = 16
AllowedFile = record(
    path=Path,
    mode=optional(OneOf(("ro", "rw", "append")), "rw"),
    create=optional(Bool(), False),
)
# A page of broker.status stops growing once its encoding passes this; each
# VM's part is bounded by the per-VM quotas, so every page fits a message.
STATUS_PAGE_BYTES = 1 << 20
GLOB_CHARS = frozenset("*?[")

# What decoding one request may cost, sized to the request schemas (the
# largest admin request, broker.upgrade or vm.allow, is about 256 KiB of
# strings and a few hundred objects; a token holder's, fd.put, a few hundred
# objects in well under 64 KiB). Checked before anything is built and before
# any authorisation, so no peer can make the broker's only thread build more.
ADMIN_LIMITS = wire.DecodeLimits(
    max_message=1 << 20, max_objects=16384, max_depth=8, max_str=65536, max_bin=65536
)
PEER_LIMITS = wire.DecodeLimits(
    max_message=wire.MAX_INLINE, max_objects=2048, max_depth=6, max_str=16384, max_bin=4096
)


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
    def save(self, vm: str | None = None) -> None:
        """Persist the table; ``vm`` names the only VM that changed (None: any)."""
        try:
            self.table.save(self.paths.broker_state, self.generation, None if vm is None else [vm])
        except OSError as e:  # never fail a request because the disk is full
            log.error("cannot write %s: %s", self.paths.broker_state, e)

    def is_admin(self, req: Request) -> bool:
        return req.peer.uid in self.config.admin_uids

    def limits_for(self, peer: Peer) -> wire.DecodeLimits:
        """Decoding limits per message: the administrator's, or a small one
        for everybody else (token holders and strangers alike)."""
        return ADMIN_LIMITS if peer.uid in self.config.admin_uids else PEER_LIMITS

    def uid_limit(self, peer: Peer) -> int | None:
        """Connections one uid may hold; administrators only the global cap."""
        if peer.uid in self.config.admin_uids:
            return None
        return self.config.max_connections_per_uid

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
        if not self.is_admin(req) and entry.token_uid not in (None, req.peer.uid):
            # A jailed VM's tokens work only from its own uid: a token that leaked
            # to another VM's worker (or anyone else) is worth nothing there.
            raise RemoteError(Code.DENIED, f"token is not valid for VM {vm!r} from this uid")
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
                self.save(vm)

        self._watch_hangup(fd, hung_up)

    def _release(self, fds: list[int]) -> None:
        for fd in fds:
            if self._unwatch is not None:
                self._unwatch(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _check_room(
        self, entry: VmEntry, adding: int, labels: dict[str, dict[str, str]] | None = None
    ) -> None:
        """Per-VM quotas: fd count and label bytes (``labels``: name -> its new labels)."""
        if len(entry.fds) + adding > self.config.max_fds_per_vm:
            raise RemoteError(
                Code.QUOTA,
                f"VM {entry.name} would hold more than {self.config.max_fds_per_vm} fds "
                "(broker.max_fds_per_vm)",
            )
        if labels:
            total = sum(
                label_size(h.labels) for n, h in entry.fds.items() if n not in labels
            ) + sum(label_size(v) for v in labels.values())
            limit = self.config.max_label_bytes_per_vm
            if total > limit and total > entry.label_bytes():
                raise RemoteError(
                    Code.QUOTA,
                    f"VM {entry.name} would hold {total} bytes of labels, more than {limit} "
                    "(broker.max_label_bytes_per_vm)",
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
        self.save(vm)
        log.info("vm %s created by pid %d", vm, req.peer.pid)
        return {"vm": vm, "created": True}

    @handles("vm.drop", vm=Name)
    def vm_drop(self, req: Request, vm: str) -> dict[str, Any]:
        self.vm_entry(req, vm, admin="drop VMs")
        fds = self.table.drop_vm(vm)
        self._release(fds)
        self.save(vm)
        for hook in self.on_drop:
            hook(vm)
        log.info("vm %s dropped (%d fds closed)", vm, len(fds))
        return {"vm": vm, "closed": len(fds)}

    @handles("vm.list")
    def vm_list(self, req: Request) -> list[str]:
        self.require_admin(req, "list VMs")
        return sorted(self.table.vms)

    @handles(
        "vm.allow",
        vm=Name,
        files=optional(ListOf(AllowedFile, MAX_ALLOWED_FILES), None),
        taps=optional(ListOf(IfName, MAX_ALLOWED_TAPS), None),
        uid=optional(Int(-1, 2**32 - 2), None),
    )
    def vm_allow(
        self,
        req: Request,
        vm: str,
        files: list[dict[str, Any]] | None,
        taps: list[str] | None,
        uid: int | None,
    ) -> dict[str, Any]:
        """Set exactly what VM ``vm``'s tokens may open (``files``, ``taps``)
        and the one uid they work from (``uid``; -1: any); what is left out
        keeps its previous value. Returns the whole allowance."""
        entry = self.vm_entry(req, vm, admin="set what a VM may open")
        if files is not None:
            allow: dict[str, Allowed] = {}
            for f in files:
                p = f["path"]
                if not os.path.isabs(p) or "\0" in p:
                    raise RemoteError(Code.BAD_REQUEST, f"allowed paths must be absolute: {p!r}")
                allow[os.path.normpath(p)] = Allowed(f["mode"], f["create"])
            entry.allow_files = allow
        if taps is not None:
            if any(not t for t in taps):
                raise RemoteError(Code.BAD_REQUEST, "tap names must not be empty")
            entry.allow_taps = sorted(set(taps))
        if uid is not None:
            entry.token_uid = None if uid < 0 else uid
        self.save(vm)
        return {"vm": vm, **entry.allow_to_wire()}

    @handles("token.mint", vm=Name, label=optional(Str(128), ""))
    def token_mint(self, req: Request, vm: str, label: str) -> dict[str, Any]:
        self.vm_entry(req, vm, admin="mint tokens")
        token = secrets.token_urlsafe(32)
        self.table.add_token(vm, token, label)
        self.save(vm)
        return {"vm": vm, "token": token}

    @handles(
        "token.revoke",
        vm=Name,
        token=optional(Str(256)),
        sha256=optional(Str(64, pattern=r"[0-9a-f]{64}")),
        all=optional(Bool(), False),
    )
    def token_revoke(
        self, req: Request, vm: str, token: str | None, sha256: str | None, all: bool
    ) -> dict[str, Any]:
        self.vm_entry(req, vm, admin="revoke tokens")
        if all:
            n = self.table.revoke_all(vm)
        elif sha256 is not None:
            n = 1 if self.table.revoke_hash(vm, sha256) else 0
            if n == 0:
                raise RemoteError(Code.NOT_FOUND, f"no such token for VM {vm!r}")
        elif token is None:
            raise RemoteError(Code.BAD_REQUEST, "give a token, its sha256 or all=true")
        else:
            n = 1 if self.table.revoke_token(vm, token) else 0
            if n == 0:
                raise RemoteError(Code.NOT_FOUND, f"no such token for VM {vm!r}")
        self.save(vm)
        return {"vm": vm, "revoked": n}

    @handles("token.list", vm=Name)
    def token_list(self, req: Request, vm: str) -> list[dict[str, Any]]:
        """The VM's live tokens, by sha256 (never the tokens): what the supervisor
        compares with the workers it knows, to revoke tokens nobody holds."""
        entry = self.vm_entry(req, vm, admin="list tokens")
        return [
            {"sha256": h, "label": t.label, "created_at": t.created_at}
            for h, t in sorted(entry.tokens.items())
        ]

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
        extra = _labels(labels)
        new_labels = {
            name: {**(entry.fds[name].labels if name in entry.fds else {}), **extra}
            for name, action in zip(names, plan, strict=True)
            if action != "same"
        }
        self._check_room(entry, plan.count("new"), new_labels)
        fds = req.take_fds()
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
        self.save(vm)
        return out

    @handles("fd.get", vm=Name, names=optional(ListOf(Name, wire.MAX_FDS, 1), None))
    def fd_get(self, req: Request, vm: str, names: list[str] | None) -> Result:
        """The fds ``names``, in that order; without ``names`` every fd held now (one
        round trip where ``fd.list`` and then ``fd.get`` took two: a restarted
        supervisor takes a copy of every VM's fds)."""
        entry = self.vm_entry(req, vm)
        if names is None:
            names = [n for n, h in entry.fds.items() if h.fd is not None][: wire.MAX_FDS]
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
        self.save(vm)
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
        """A memfd (guest RAM, in practice): created here, sized once, sealed so nobody
        can shrink or grow it. Its labels are the caller's (the supervisor marks RAM
        ``role=ram``); the broker adds none of its own."""
        entry = self.vm_entry(req, vm, admin="create guest RAM")
        if name in entry.fds:
            raise RemoteError(Code.EXISTS, f"{vm}/{name} already exists")
        self._check_room(entry, 1, {name: _labels(labels)})
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
        held = self._add(entry, name, fd, "created", _labels(labels))
        self.save(vm)
        return held.to_wire()

    @handles(
        "fd.open",
        vm=Name,
        name=Name,
        path=Path,
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
        """Open a disk image or log on a worker's behalf, where the config allows.

        A token holder may open only the files its VM's ``vm.allow`` names, in
        at most the mode named there, creating one only where that says so,
        and only under ``broker.open_allow``. Every open (the administrator's
        too) goes through ``broker.safeopen``: no FIFO, device or socket, and
        for token holders no symlink and no ``..``."""
        entry = self.vm_entry(req, vm)
        if not os.path.isabs(path):
            raise RemoteError(Code.BAD_REQUEST, f"path must be absolute, found {path!r}")
        if "\0" in path:
            raise RemoteError(Code.BAD_REQUEST, "path contains a NUL byte")
        if self.is_admin(req):
            target = safeopen.Target("/", path.lstrip("/"), safeopen.ADMIN)
        else:
            parts = path.split("/")
            if ".." in parts or "." in parts:
                raise RemoteError(Code.DENIED, f"{path!r}: '.' and '..' are not allowed in paths")
            path = os.path.normpath(path)  # only collapses repeated slashes now
            allowed = entry.allow_files.get(path)
            if allowed is None:
                raise RemoteError(
                    Code.DENIED, f"the configuration of VM {vm!r} does not name {path}"
                )
            if not allowed.permits(mode, create):
                how = f"mode {mode!r}" + (" with create" if create else "")
                raise RemoteError(
                    Code.DENIED,
                    f"VM {vm!r} may open {path} as {allowed.mode!r}"
                    f"{' (creating it)' if allowed.create else ''}, not {how}",
                )
            target = self._beneath_allowlist(path)
        if name in entry.fds:
            raise RemoteError(Code.EXISTS, f"{vm}/{name} already exists")
        self._check_room(entry, 1, {name: _labels(labels)})
        fd = safeopen.open_file(target, mode, create, path)
        held = self._add(entry, name, fd, "opened", _labels(labels))
        self.save(vm)
        return held.to_wire()

    def _beneath_allowlist(self, path: str) -> safeopen.Target:
        """The allowlist directory ``path`` lies in, and the rest of it."""
        for pattern in self.config.open_allow:
            if not fnmatch.fnmatchcase(path, pattern):
                continue
            fixed: list[str] = []
            for part in pattern.split("/"):
                if GLOB_CHARS & set(part):
                    break
                fixed.append(part)
            directory = "/".join(fixed) or "/"
            prefix = directory.rstrip("/") + "/"
            if path.startswith(prefix) and len(path) > len(prefix):
                return safeopen.Target(directory, path[len(prefix) :], safeopen.STRICT)
        raise RemoteError(Code.DENIED, f"{path} is not under broker.open_allow")

    @handles(
        "tun.open",
        vm=Name,
        name=Name,
        ifname=IfName,
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
        if not self.is_admin(req) and (not ifname or ifname not in entry.allow_taps):
            raise RemoteError(
                Code.DENIED, f"the configuration of VM {vm!r} does not name tap {ifname!r}"
            )
        if name in entry.fds:
            raise RemoteError(Code.EXISTS, f"{vm}/{name} already exists")
        self._check_room(entry, 1, {name: _labels(labels)})
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            ifr = struct.pack("16sH22x", ifname.encode(), flags)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError:
            os.close(fd)
            raise
        held = self._add(entry, name, fd, "opened", _labels(labels))
        self.save(vm)
        return held.to_wire()

    @handles("broker.status", after=optional(Name), fds=optional(Bool(), True))
    def status(self, req: Request, after: str | None, fds: bool) -> dict[str, Any]:
        """The broker and its VMs, one page at a time: VMs sorted by name,
        starting after ``after``, until the page passes ``STATUS_PAGE_BYTES``
        (at least one VM). ``next`` names where the next page starts, or is
        None on the last one."""
        self.require_admin(req, "read the broker status")
        names = sorted(self.table.vms)
        if after is not None:
            names = [n for n in names if n > after]
        page: list[dict[str, Any]] = []
        used = 0
        for name in names:
            if page and used >= STATUS_PAGE_BYTES:
                break
            vm = self.table.vms[name]
            item = {
                "name": vm.name,
                "created_at": vm.created_at,
                "tokens": len(vm.tokens),
                "fd_count": len(vm.fds),
                "label_bytes": vm.label_bytes(),
                "allow": vm.allow_to_wire(),
            }
            if fds:
                item["fds"] = [h.to_wire() for h in vm.fds.values()]
            used += len(wire.pack(item))
            page.append(item)
        more = len(page) < len(names)
        return {
            "pid": os.getpid(),
            "version": __version__,
            "generation": self.generation,
            "started_at": self.started_at,
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "open_fds": fdinfo.open_fd_count(),
            "connections": self.connection_count(),
            "vm_count": len(self.table.vms),
            "fd_count": sum(len(v.fds) for v in self.table.vms.values()),
            "quotas": {
                "max_fds_per_vm": self.config.max_fds_per_vm,
                "max_label_bytes_per_vm": self.config.max_label_bytes_per_vm,
            },
            "vms": page,
            "next": page[-1]["name"] if more and page else None,
        }

    @handles("broker.upgrade", command=optional(ListOf(Str(4096), 64, 1)))
    def upgrade(self, req: Request, command: list[str] | None) -> Result:
        self.require_admin(req, "upgrade the broker")
        if self.upgrade_hook is None:
            raise RemoteError(Code.UNAVAILABLE, "self-upgrade is not available here")
        return self.upgrade_hook(req, command)
