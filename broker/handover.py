"""Broker self-upgrade without losing a single fd.

The running broker starts its successor (the newly installed code, or a
given command) as a child that inherits every held fd, the listening
socket, the pid-file lock and every idle client connection, together with
a sealed memfd describing which fd is which. The successor checks each fd
against the recorded (dev, inode), says ``ready`` on a pipe, and serves.
Only then does the old broker reply and exit; if the successor fails or
is too slow, the old one kills it and carries on as if nothing happened.
Clients keep their connections: nobody reconnects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from baton import wire
from baton.daemonize import PidLock, start_with_ready_pipe
from baton.paths import Paths
from baton.rpc import EventLoopServer
from baton.wire import Code, RemoteError
from broker.table import Table

log = logging.getLogger("broker.handover")

HANDOVER_VERSION = 1
READY_TIMEOUT = 20.0


@dataclass
class Inherited:
    """What a successor receives from its predecessor."""

    table: Table
    generation: int
    listener: socket.socket
    pidlock: PidLock
    conns: list[socket.socket]


def spawn_successor(
    paths: Paths,
    table: Table,
    generation: int,
    server: EventLoopServer,
    pidlock: PidLock,
    command: list[str] | None,
    timeout: float = READY_TIMEOUT,
) -> int:
    """Start the successor and wait until it serves; returns its pid."""
    # Tuples, not lists, so that each (vm, name, fd) keeps its element types;
    # msgpack writes both as arrays.
    held = [
        (vm.name, h.name, h.fd)
        for vm in table.vms.values()
        for h in vm.fds.values()
        if h.fd is not None
    ]
    conns = [fd for fd, c in server.conns.items() if not c.outbox]
    doc = {
        "version": HANDOVER_VERSION,
        "generation": generation + 1,
        "table": table.to_disk(generation + 1),
        "fds": held,
        "listener": server.listener.fileno(),
        "pidlock": pidlock.fd,
        "conns": conns,
    }
    memfd = wire.sealed_memfd(wire.pack(doc), "baton-broker-handover")
    argv = [*(command or [sys.executable, "-m", "broker"])]
    argv += ["--root", str(paths.root), "--foreground", "--takeover", str(memfd)]
    pass_fds = [memfd, server.listener.fileno(), pidlock.fd, *conns]
    pass_fds += [fd for _, _, fd in held]
    try:
        proc, text = start_with_ready_pipe(
            lambda fd: [*argv, "--takeover-ready", str(fd)],
            deadline=time.monotonic() + timeout,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
        )
    except OSError as e:
        raise RemoteError(
            Code.NOT_FOUND, f"cannot start successor {argv[0]}: {e.strerror}"
        ) from None
    finally:
        os.close(memfd)
    if text.strip() == "ready":
        log.info("successor pid %d serves generation %d", proc.pid, generation + 1)
        return proc.pid
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    reason = text.strip() or f"exited with status {proc.returncode} before it was ready"
    raise RemoteError(Code.UNAVAILABLE, f"successor failed, this broker keeps serving: {reason}")


def take_over(memfd: int, paths: Paths) -> Inherited:
    """In the successor: rebuild the table from inherited fds, checking every inode."""
    # Written by our predecessor, not by a client, and as large as the table
    # (many VMs at their quotas): no 16 MiB message limit here.
    try:
        size = os.fstat(memfd).st_size
        data = wire.read_sealed_memfd(memfd, size, wire.TRUSTED_LIMITS.max_message)
        doc: dict[str, Any] = wire.unpack(data, wire.TRUSTED_LIMITS)
    finally:
        os.close(memfd)
    if doc.get("version") != HANDOVER_VERSION:
        raise RuntimeError(f"handover version {doc.get('version')!r} is not {HANDOVER_VERSION}")
    live: dict[tuple[str, str], int] = {}
    recorded = doc["table"]["vms"]
    for vm, name, fd in doc["fds"]:
        os.set_inheritable(fd, False)
        st = os.fstat(fd)
        want = recorded[vm]["fds"][name]
        if (st.st_dev, st.st_ino) != (want["dev"], want["ino"]):
            raise RuntimeError(f"inherited fd {fd} for {vm}/{name} is not inode {want['ino']}")
        live[(vm, name)] = fd
    table = Table.from_disk(doc["table"], live)
    for (vm, name), fd in live.items():  # an entry from_disk refused: not ours to keep
        entry = table.vms.get(vm)
        if entry is None or name not in entry.fds:
            log.error("inherited fd %d for %s/%s has no valid entry; closing it", fd, vm, name)
            os.close(fd)
    for fd in (doc["listener"], doc["pidlock"], *doc["conns"]):
        os.set_inheritable(fd, False)
    listener = socket.socket(fileno=doc["listener"])
    conns = [socket.socket(fileno=fd) for fd in doc["conns"]]
    pidlock = PidLock(paths.broker_pidfile, doc["pidlock"])
    return Inherited(table, int(doc["generation"]), listener, pidlock, conns)
