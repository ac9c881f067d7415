"""The broker's table: VMs, their named fds and their tokens.

Only metadata is ever written to disk (``DIR/var/lib/baton/broker/table.json``):
VM names, sha256 hashes of tokens, what each VM may open (``vm.allow``) and,
per fd, its kind and (dev, inode). A broker that restarts after a crash
reloads it, so workers' tokens still work and every fd the table expects
shows as ``missing`` until a holder hands it back; a re-registered fd must
have the recorded inode.

The file is replaced atomically (fsync of the file, rename, fsync of the
directory) and only when its content changes. A file that cannot be used
(empty, torn, not JSON, another version) is moved aside, never deleted, and
the broker starts empty: holders re-register (the supervisor re-creates its
VMs). Entries of the wrong type are skipped one by one, with a log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton import fdinfo
from baton.schema import NAME_PATTERN

log = logging.getLogger("broker.table")

TABLE_VERSION = 1
FETCH_HISTORY = 8
OPEN_MODES = ("ro", "rw", "append")


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


@dataclass(frozen=True)
class Allowed:
    """A file a VM's token may open: the highest mode and whether it may create it."""

    mode: str  # ro, rw (implies ro), append
    create: bool

    def permits(self, mode: str, create: bool) -> bool:
        if create and not self.create:
            return False
        return mode == self.mode or (self.mode == "rw" and mode == "ro")


@dataclass
class VmEntry:
    name: str
    created_at: float
    fds: dict[str, HeldFd] = field(default_factory=dict)
    tokens: dict[str, TokenInfo] = field(default_factory=dict)  # sha256 -> info
    # What the administrator lets this VM's tokens open (``vm.allow``).
    allow_files: dict[str, Allowed] = field(default_factory=dict)
    allow_taps: list[str] = field(default_factory=list)
    # The only uid this VM's tokens work from (SO_PEERCRED), for a jailed worker;
    # None: any uid (the administrator's requests are never bound by it).
    token_uid: int | None = None

    def label_bytes(self, skip: str | None = None) -> int:
        """UTF-8 bytes of every label key and value (the per-VM label quota)."""
        return sum(label_size(h.labels) for n, h in self.fds.items() if n != skip)

    def allow_to_wire(self) -> dict[str, Any]:
        return {
            "files": [
                {"path": p, "mode": a.mode, "create": a.create}
                for p, a in sorted(self.allow_files.items())
            ],
            "taps": list(self.allow_taps),
            "uid": self.token_uid,
        }


def label_size(labels: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())


class Table:
    """VMs by name, with a token-hash index. Owns every fd it holds."""

    def __init__(self) -> None:
        self.vms: dict[str, VmEntry] = {}
        self._token_index: dict[str, str] = {}
        self._saved: bytes | None = None  # what the file holds, as far as we wrote it
        self._fragments: dict[str, str] = {}  # vm -> its JSON, as last saved

    # -- tokens
    def vm_for_token(self, token: str) -> str | None:
        return self._token_index.get(token_hash(token))

    def add_token(self, vm: str, token: str, label: str) -> None:
        h = token_hash(token)
        self.vms[vm].tokens[h] = TokenInfo(label, time.time())
        self._token_index[h] = vm

    def revoke_token(self, vm: str, token: str) -> bool:
        return self.revoke_hash(vm, token_hash(token))

    def revoke_hash(self, vm: str, h: str) -> bool:
        """Revoke by the token's sha256 (what a holder may keep on disk instead)."""
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
    def vm_to_disk(self, vm: VmEntry) -> dict[str, Any]:
        return {
            "created_at": vm.created_at,
            "tokens": {h: [t.label, t.created_at] for h, t in vm.tokens.items()},
            "fds": {n: h.to_disk() for n, h in vm.fds.items()},
            "allow": vm.allow_to_wire(),
        }

    def to_disk(self, generation: int) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "generation": generation,
            "vms": {vm.name: self.vm_to_disk(vm) for vm in self.vms.values()},
        }

    def save(self, path: Path, generation: int, changed: list[str] | None = None) -> bool:
        """Replace the file atomically and durably, if its content changed.

        Returns whether it wrote. Durable (fsync of the file and of its
        directory) so that a power cut leaves the old or the new file, never
        an empty one; skipped when nothing changed (most ``fd.put`` calls are
        re-registrations of what the broker already holds). Each VM's part is
        encoded once and kept: ``changed`` names the VMs to encode again
        (None: all), so a request costs the encoding of its own VM only."""
        if changed is None:
            self._fragments.clear()
        for name in changed or ():
            self._fragments.pop(name, None)
        parts = []
        for vm in self.vms.values():
            frag = self._fragments.get(vm.name)
            if frag is None:
                frag = self._fragments[vm.name] = json.dumps(
                    self.vm_to_disk(vm), separators=(",", ":")
                )
            parts.append(f"{json.dumps(vm.name)}:{frag}")
        for gone in set(self._fragments) - set(self.vms):
            del self._fragments[gone]
        head = f'{{"version":{TABLE_VERSION},"generation":{int(generation)},"vms":{{'
        data = (head + ",".join(parts) + "}}").encode()
        if data == self._saved and path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._saved = data
        return True

    @classmethod
    def from_disk(
        cls,
        doc: Any,
        fds: dict[tuple[str, str], int] | None = None,
        problems: list[str] | None = None,
    ) -> Table:
        """Rebuild from metadata. ``fds`` maps (vm, name) to live fds (handover);
        entries without one are ``missing``.

        Every value is type-checked; a bad VM, token, fd or allowance entry is
        skipped (and described in ``problems``, and logged), never trusted.
        Raises ``ValueError`` only if the document as a whole is unusable."""
        if not isinstance(doc, dict):
            raise ValueError(f"table is {type(doc).__name__}, not a JSON object")
        if doc.get("version") != TABLE_VERSION:
            raise ValueError(f"table version {doc.get('version')!r}, expected {TABLE_VERSION}")
        vms = doc.get("vms")
        if not isinstance(vms, dict):
            raise ValueError(f"table 'vms' is {type(vms).__name__}, not an object")
        table = cls()
        fds = fds or {}
        found: list[str] = [] if problems is None else problems

        def bad(what: str) -> None:
            log.error("table: skipping %s", what)
            found.append(what)

        for vm_name, v in vms.items():
            if not (_is_name(vm_name) and isinstance(v, dict) and _is_time(v.get("created_at"))):
                bad(f"VM {vm_name!r}: not a valid VM entry")
                continue
            entry = VmEntry(vm_name, float(v["created_at"]))
            table.vms[vm_name] = entry
            tokens = v.get("tokens", {})
            if not isinstance(tokens, dict):
                bad(f"VM {vm_name}: tokens are {type(tokens).__name__}")
                tokens = {}
            for h, t in tokens.items():
                if not (
                    isinstance(h, str)
                    and len(h) == 64
                    and isinstance(t, list)
                    and len(t) == 2
                    and isinstance(t[0], str)
                    and _is_time(t[1])
                ):
                    bad(f"VM {vm_name}: a token entry that is not [label, time]")
                    continue
                entry.tokens[h] = TokenInfo(t[0], float(t[1]))
                table._token_index[h] = vm_name
            _load_allow(entry, v.get("allow", {}), bad)
            held = v.get("fds", {})
            if not isinstance(held, dict):
                bad(f"VM {vm_name}: fds are {type(held).__name__}")
                held = {}
            for name, f in held.items():
                problem = _fd_problem(name, f)
                if problem is not None:
                    bad(f"fd {vm_name}/{name!r}: {problem}")
                    continue
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
        """The saved table and the generation that wrote it (empty, 0 if none).

        A file that cannot be used is moved aside (``table.json.corrupt-<time>``)
        and the broker starts empty; one with bad entries loses only those
        entries, and a copy of it is kept the same way."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return cls(), 0
        problems: list[str] = []
        try:
            doc = json.loads(raw)
            table = cls.from_disk(doc, problems=problems)
            generation = doc.get("generation", 0)
            if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
                problems.append(f"generation {generation!r} is not a count")
                generation = 0
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            what = "empty" if not raw.strip() else f"unusable ({e})"
            aside = _move_aside(path)
            log.error(
                "%s is %s: moved it to %s and starting with an empty table; "
                "holders re-register their fds",
                path,
                what,
                aside,
            )
            return cls(), 0
        if problems:
            aside = _move_aside(path)
            log.error(
                "%s had %d bad entries (skipped); the original is kept as %s",
                path,
                len(problems),
                aside,
            )
        return table, generation


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    os.rename(path, aside)
    return aside


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(NAME_PATTERN, value) is not None


def _is_int(value: Any, lo: int = 0, hi: int = 2**64 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_time(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _fd_problem(name: Any, f: Any) -> str | None:
    if not _is_name(name):
        return "not a valid fd name"
    if not isinstance(f, dict):
        return f"entry is {type(f).__name__}, not an object"
    for key in ("kind", "target", "detail"):
        if not isinstance(f.get(key), str):
            return f"{key} is not a string"
    for key in ("size", "seals", "dev", "ino"):
        if not _is_int(f.get(key)):
            return f"{key} is not a non-negative integer"
    if not _is_time(f.get("created_at")):
        return "created_at is not a time"
    labels = f.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        return "labels are not a map of strings"
    return None


def _load_allow(entry: VmEntry, allow: Any, bad: Any) -> None:
    if not isinstance(allow, dict):
        bad(f"VM {entry.name}: allow is {type(allow).__name__}")
        return
    files = allow.get("files", [])
    taps = allow.get("taps", [])
    if not isinstance(files, list) or not isinstance(taps, list):
        bad(f"VM {entry.name}: allow.files or allow.taps is not a list")
        return
    for item in files:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("path"), str)
            and item.get("mode") in OPEN_MODES
            and isinstance(item.get("create"), bool)
        ):
            bad(f"VM {entry.name}: an allowed file that is not {{path, mode, create}}")
            continue
        entry.allow_files[item["path"]] = Allowed(item["mode"], item["create"])
    uid = allow.get("uid")
    if uid is not None and not _is_int(uid):
        bad(f"VM {entry.name}: allow.uid is not a uid")
    elif uid is not None:
        entry.token_uid = uid
    for tap in taps:
        if not isinstance(tap, str) or not 0 < len(tap) <= 15:
            bad(f"VM {entry.name}: an allowed tap that is not an interface name")
            continue
        entry.allow_taps.append(tap)
