"""What an fd is, found by fstat, readlink and /proc fdinfo (never trusted from a client)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any

SEAL_NAMES = {
    fcntl.F_SEAL_SEAL: "seal",
    fcntl.F_SEAL_SHRINK: "shrink",
    fcntl.F_SEAL_GROW: "grow",
    fcntl.F_SEAL_WRITE: "write",
}


@dataclass(frozen=True)
class FdInfo:
    kind: str  # memfd, file, socket, pipe, eventfd, tun, chardev, anon, other
    size: int
    seals: int
    dev: int
    ino: int
    target: str  # readlink of /proc/self/fd/N
    detail: str  # kind-specific: tap interface name, socket type, ...

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["seal_names"] = seal_names(self.seals)
        return d


def seal_names(seals: int) -> list[str]:
    return [name for bit, name in SEAL_NAMES.items() if seals & bit]


def _fdinfo(fd: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


def describe(fd: int) -> FdInfo:
    st = os.fstat(fd)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    seals = 0
    with contextlib.suppress(OSError):
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    detail = ""
    mode = st.st_mode
    if target.startswith("/memfd:"):
        kind = "memfd"
        detail = target[len("/memfd:") :].removesuffix(" (deleted)")
    elif stat.S_ISREG(mode):
        kind = "file"
        detail = target
    elif stat.S_ISSOCK(mode):
        kind = "socket"
    elif stat.S_ISFIFO(mode):
        kind = "pipe"
        flags = int(_fdinfo(fd).get("flags", "0"), 8)
        detail = "write" if flags & os.O_ACCMODE == os.O_WRONLY else "read"
    elif target == "anon_inode:[eventfd]":
        kind = "eventfd"
    elif target == "/dev/net/tun":
        kind = "tun"
        detail = _fdinfo(fd).get("iff", "")
    elif stat.S_ISCHR(mode):
        kind = "chardev"
        detail = target
    elif target.startswith("anon_inode:"):
        kind = "anon"
        detail = target[len("anon_inode:") :]
    else:
        kind = "other"
        detail = target
    return FdInfo(kind, st.st_size, seals, st.st_dev, st.st_ino, target, detail)


def open_fd_count(pid: int | str = "self") -> int:
    """Open fds of a process (``self`` by default), not counting the listing itself."""
    names = os.listdir(f"/proc/{pid}/fd")
    return len(names) - 1 if pid == "self" else len(names)
