"""Create a VM's fds in the broker: guest RAM, console log, console input, disks.

Their names (what workers ask the broker for) are part of the worker
contract, ``baton.contract``; disks go by their configured names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from baton.contract import (
    CONSOLE_IN,
    CONSOLE_IN_WRITER,
    CONSOLE_LOG,
    RAM,
)
from baton.paths import Paths
from baton.wire import Code, RemoteError
from broker.client import BrokerClient

__all__ = ["CONSOLE_IN", "CONSOLE_IN_WRITER", "CONSOLE_LOG", "DiskImage", "provision"]


@dataclass(frozen=True)
class DiskImage:
    name: str
    path: Path
    size: int
    read_only: bool = False


def ensure_image(disk: DiskImage) -> None:
    """Create a sparse image of the configured size if it does not exist yet."""
    disk.path.parent.mkdir(parents=True, exist_ok=True)
    if not disk.path.exists():
        fd = os.open(disk.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, disk.size)
        finally:
            os.close(fd)


def allow_disks(
    broker: BrokerClient, vm: str, disks: list[DiskImage], taps: list[str] | None = None
) -> None:
    """Register the VM's own files (and taps) with the broker (``vm.allow``)."""
    files = [
        {"path": os.path.abspath(d.path), "mode": "ro" if d.read_only else "rw", "create": False}
        for d in disks
    ]
    try:
        broker.allow(vm, files=files, taps=taps if taps is not None else [])
    except RemoteError as e:
        if e.code != Code.UNKNOWN_OP:  # an older broker, which restricts nothing
            raise


def provision(
    broker: BrokerClient, paths: Paths, vm: str, ram_bytes: int, disks: list[DiskImage]
) -> list[str]:
    """Create every fd VM ``vm`` needs that the broker does not hold yet.

    Idempotent: after a supervisor restart, or for a VM whose worker crashed,
    what exists (above all the RAM) is kept as it is. Returns the names created.

    Also tells the broker exactly which files (the VM's disks, in their
    configured modes) its workers' tokens may open, and no taps: a token
    reaches nothing else."""
    broker.create_vm(vm, exist_ok=True)
    allow_disks(broker, vm, disks)
    held = {f["name"] for f in broker.list_fds(vm)}
    created = []
    if RAM not in held:
        broker.create_memfd(vm, RAM, ram_bytes)
        created.append(RAM)
    if CONSOLE_LOG not in held:
        paths.log.mkdir(parents=True, exist_ok=True, mode=0o700)
        broker.open_file(vm, CONSOLE_LOG, paths.console_log(vm), mode="append", create=True)
        created.append(CONSOLE_LOG)
    if CONSOLE_IN not in held or CONSOLE_IN_WRITER not in held:
        for name in (CONSOLE_IN, CONSOLE_IN_WRITER):
            if name in held:
                broker.drop_fd(vm, name)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            broker.put(vm, {CONSOLE_IN: r, CONSOLE_IN_WRITER: w})
        finally:
            os.close(r)
            os.close(w)
        created += [CONSOLE_IN, CONSOLE_IN_WRITER]
    for disk in disks:
        if disk.name not in held:
            ensure_image(disk)
            mode = "ro" if disk.read_only else "rw"
            broker.open_file(vm, disk.name, disk.path, mode=mode)
            created.append(disk.name)
    return created
