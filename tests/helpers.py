"""Test-only helpers; the daemon harness itself lives in baton_lab.harness."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baton import wire
from baton_lab.harness import (  # noqa: F401 - re-exported for the tests
    BrokerProcess,
    fd_count,
    hand_off,
    live_processes_matching,
    short_root,
    wait_until,
)


def raw_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(path))
    return s


def reply_of(sock: socket.socket, timeout: float = 5.0) -> tuple[dict[str, Any], list[int]]:
    sock.settimeout(timeout)
    return wire.recv_message(sock)


NOBODY = 65534


def run_as(uid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child with ``uid`` (a real non-admin peer).

    Returns what ``fn`` returned, or ``("error", code)`` for a RemoteError."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out: Any = fn()
            except wire.RemoteError as e:
                out = ("error", str(e.code))
            except Exception as e:
                out = ("exception", repr(e))
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while data := os.read(r, 65536):
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(b"".join(chunks))


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
