"""The run flag: the one-page file through which an upgrade's new worker takes the
run lease without a round trip inside the guest's pause.

The broker gives each VM's workers an fd of ``DIR/var/lib/baton/broker/flags/
VM.flag`` (``lease.flag``). At the commit of an upgrade the new worker writes
its instance id there with one ``pwrite`` (a few microseconds) and its vCPUs
run; the broker reads the flag later and settles the lease from it
(``broker/lease.py``). The flag counts only for the instance the supervisor's
offer names, so writing it is the commit and nothing else is.

One definition of the format, for its writers (baton-vmm; the supervisor on a
stock QEMU's behalf) and its reader (the broker).
"""

from __future__ import annotations

import os

SIZE = 4096  # the file's size; only the first RECORD bytes mean anything
RECORD = 64  # the instance id, ASCII, NUL-padded, at offset 0
CLEAR = bytes(RECORD)  # names nobody


def encode(instance: str) -> bytes:
    """The record for ``instance``, ready to ``pwrite`` at offset 0 (made ahead of the
    pause, so the commit is one syscall)."""
    raw = instance.encode("ascii")
    if not 0 < len(raw) <= RECORD or b"\0" in raw:
        raise ValueError(f"an instance id is 1..{RECORD} ASCII characters, found {instance!r:.80}")
    return raw.ljust(RECORD, b"\0")


def write(fd: int, record: bytes) -> None:
    """Commit: one ``pwrite`` of a record made by ``encode`` (or ``CLEAR``)."""
    if os.pwrite(fd, record, 0) != RECORD:
        raise OSError("short write to the run flag")


def read(fd: int) -> str:
    """The instance id last written ('' if none, or if what is there is not one)."""
    raw = os.pread(fd, RECORD, 0).split(b"\0", 1)[0]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return ""
