"""The broker's table: VMs, their named fds and their tokens.

Only metadata is ever written to disk (``DIR/var/lib/baton/broker/table.json``):
VM names, sha256 hashes of tokens and, per fd, its kind and (dev, inode). A
broker that restarts after a crash reloads it, so workers' tokens still work
and every fd the table expects shows as ``missing`` until a holder hands it
back; a re-registered fd must have the recorded inode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton import fdinfo

TABLE_VERSION = 1
FETCH_HISTORY = 8


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Fetch:
    pid: int
    uid: int
    at: float

    def to_wire(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "at": self.at}


@dataclass
class HeldFd:
    """One named fd. ``fd is None`` means expected but not (yet) handed back."""

    name: str
    fd: int | None
    info: fdinfo.FdInfo
    source: str  # created, put, opened, reregistered, handover
    created_at: float
    labels: dict[str, str] = field(default_factory=dict)
    fetches: deque[Fetch] = field(default_factory=lambda: deque(maxlen=FETCH_HISTORY))
    fetch_count: int = 0

    @property
    def state(self) -> str:
        return "held" if self.fd is not None else "missing"

    def refresh(self) -> None:
        """Size and seals change under us (a client may seal or grow a file)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.info = fdinfo.describe(self.fd)

    def to_wire(self) -> dict[str, Any]:
        self.refresh()
        d = self.info.to_wire()
        d.update(
            name=self.name,
            state=self.state,
            source=self.source,
            created_at=self.created_at,
            labels=self.labels,
            fetch_count=self.fetch_count,
            fetched_by=[f.to_wire() for f in self.fetches],
        )
        return d

    def to_disk(self) -> dict[str, Any]:
        i = self.info
        return {
            "kind": i.kind,
            "size": i.size,
            "seals": i.seals,
            "dev": i.dev,
            "ino": i.ino,
            "target": i.target,
            "detail": i.detail,
            "created_at": self.created_at,
            "labels": self.labels,
        }


@dataclass
class TokenInfo:
    label: str
    created_at: float


@dataclass
class VmEntry:
    name: str
    created_at: float
    fds: dict[str, HeldFd] = field(default_factory=dict)
    tokens: dict[str, TokenInfo] = field(default_factory=dict)  # sha256 -> info


class Table:
    """VMs by name, with a token-hash index. Owns every fd it holds."""

    def __init__(self) -> None:
        self.vms: dict[str, VmEntry] = {}
        self._token_index: dict[str, str] = {}

    # -- tokens
    def vm_for_token(self, token: str) -> str | None:
        return self._token_index.get(token_hash(token))

    def add_token(self, vm: str, token: str, label: str) -> None:
        h = token_hash(token)
        self.vms[vm].tokens[h] = TokenInfo(label, time.time())
        self._token_index[h] = vm

    def revoke_token(self, vm: str, token: str) -> bool:
        h = token_hash(token)
        if self._token_index.get(h) != vm:
            return False
        del self._token_index[h]
        del self.vms[vm].tokens[h]
        return True

    def revoke_all(self, vm: str) -> int:
        entry = self.vms[vm]
        for h in entry.tokens:
            self._token_index.pop(h, None)
        n = len(entry.tokens)
        entry.tokens.clear()
        return n

    # -- VMs and fds
    def add_vm(self, name: str) -> VmEntry:
        entry = VmEntry(name, time.time())
        self.vms[name] = entry
        return entry

    def drop_vm(self, name: str) -> list[int]:
        """Remove a VM; returns the fds it held (the caller closes them)."""
        self.revoke_all(name)
        entry = self.vms.pop(name)
        return [h.fd for h in entry.fds.values() if h.fd is not None]

    def held_fds(self) -> list[int]:
        return [h.fd for vm in self.vms.values() for h in vm.fds.values() if h.fd is not None]

    # -- persistence (metadata only)
    def to_disk(self, generation: int) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "generation": generation,
            "vms": {
                vm.name: {
                    "created_at": vm.created_at,
                    "tokens": {h: [t.label, t.created_at] for h, t in vm.tokens.items()},
                    "fds": {n: h.to_disk() for n, h in vm.fds.items()},
                }
                for vm in self.vms.values()
            },
        }

    def save(self, path: Path, generation: int) -> None:
        """Atomic replace. No fsync: the fds die with the host anyway, so the
        file only needs to survive a broker crash, which the page cache does."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_disk(generation), f, separators=(",", ":"))
        os.replace(tmp, path)

    @classmethod
    def from_disk(cls, doc: dict[str, Any], fds: dict[tuple[str, str], int] | None = None) -> Table:
        """Rebuild from metadata. ``fds`` maps (vm, name) to live fds (handover);
        entries without one are ``missing``."""
        if doc.get("version") != TABLE_VERSION:
            raise ValueError(f"table version {doc.get('version')!r}, expected {TABLE_VERSION}")
        table = cls()
        fds = fds or {}
        for vm_name, v in doc["vms"].items():
            entry = VmEntry(vm_name, float(v["created_at"]))
            table.vms[vm_name] = entry
            for h, (label, created) in v["tokens"].items():
                entry.tokens[h] = TokenInfo(str(label), float(created))
                table._token_index[h] = vm_name
            for name, f in v["fds"].items():
                live = fds.get((vm_name, name))
                info = fdinfo.FdInfo(
                    f["kind"], f["size"], f["seals"], f["dev"], f["ino"], f["target"], f["detail"]
                )
                if live is not None:
                    info = fdinfo.describe(live)
                entry.fds[name] = HeldFd(
                    name,
                    live,
                    info,
                    "handover" if live is not None else "missing",
                    float(f["created_at"]),
                    dict(f.get("labels", {})),
                )
        return table

    @classmethod
    def load(cls, path: Path) -> tuple[Table, int]:
        """The saved table and the generation that wrote it (empty, 0 if none)."""
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return cls(), 0
        return cls.from_disk(doc), int(doc.get("generation", 0))
