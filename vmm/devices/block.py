"""Baton's paravirtual block device, backed by a disk image fd the broker holds.

Guest interface: write the guest-physical address of a 40-byte request to
I/O port 0x6000 with a 32-bit OUT. Request layout (little-endian):

    0   u32 op        1 read, 2 write, 3 flush, 4 identify
    4   u32 status    written by the device: 0 ok, 1 I/O error, 2 bad request, 3 read-only
    8   u64 sector    512-byte sectors
    16  u32 count     sectors, at most 256
    20  u32 reserved
    24  u64 buffer    guest-physical address of the data
    32  u64 capacity  written by identify, in sectors

The request completes before the OUT instruction does (the vCPU thread does
the pread/pwrite), so no I/O is ever in flight once the vCPUs are paused:
draining before a save is inherent. Writes land in the image's page cache
through the shared open file, so the next worker sees them at once; flush
is fdatasync.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from baton.schema import U64, Bool, Name
from vmm.memory import GuestMemory
from vmm.state import Component, F

SECTOR = 512
MAX_SECTORS = 256
REQ = struct.Struct("<IIQIIQQ")
OK, IO_ERROR, BAD_REQUEST, READ_ONLY = 0, 1, 2, 3
OP_READ, OP_WRITE, OP_FLUSH, OP_IDENTIFY = 1, 2, 3, 4

#: One disk's saved state: each field is the device attribute of the same name.
#: The first three describe the disk as this worker opened it: saved, checked
#: or shown, never restored over it.
BLOCK_STATE = Component(
    "block",
    version=1,
    min_version=1,
    many=True,
    max_items=8,
    fields={
        "name": F(Name, restored=False),
        "capacity_sectors": F(U64, restored=False),
        "read_only": F(Bool(), restored=False),
        "reads": F(U64),
        "writes": F(U64),
        "flushes": F(U64),
        "errors": F(U64),
    },
)


class Block:
    def __init__(self, name: str, fd: int, memory: GuestMemory, read_only: bool = False) -> None:
        self.name = name
        self.fd = fd
        self.memory = memory
        self.read_only = read_only
        self.capacity_sectors = os.fstat(fd).st_size // SECTOR
        self.reads = self.writes = self.flushes = self.errors = 0

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        """A request: only a 32-bit OUT of its guest-physical address starts one."""
        if size == 4:
            self._request(value)

    def _request(self, value: int) -> None:
        try:
            raw = self.memory.read(value, REQ.size)
        except ValueError:
            self.errors += 1
            return  # no request there: nothing to report back to
        op, _, sector, count, _, buffer, _ = REQ.unpack(raw)
        status, capacity = self._execute(op, sector, count, buffer)
        if status != OK:
            self.errors += 1
        self.memory.write(value + 4, struct.pack("<I", status))
        if op == OP_IDENTIFY:
            self.memory.write(value + 32, struct.pack("<Q", capacity))

    def _execute(self, op: int, sector: int, count: int, buffer: int) -> tuple[int, int]:
        if op == OP_IDENTIFY:
            return OK, self.capacity_sectors
        if op == OP_FLUSH:
            self.flushes += 1
            try:
                os.fdatasync(self.fd)
            except OSError:
                return IO_ERROR, 0
            return OK, 0
        if op not in (OP_READ, OP_WRITE):
            return BAD_REQUEST, 0
        if not 0 < count <= MAX_SECTORS or sector + count > self.capacity_sectors:
            return BAD_REQUEST, 0
        length = count * SECTOR
        try:
            if op == OP_READ:
                data = os.pread(self.fd, length, sector * SECTOR)
                self.memory.write(buffer, data.ljust(length, b"\0"))
                self.reads += 1
            else:
                if self.read_only:
                    return READ_ONLY, 0
                data = self.memory.read(buffer, length)
                written = os.pwrite(self.fd, data, sector * SECTOR)
                if written != length:
                    return IO_ERROR, 0
                self.writes += 1
        except ValueError:
            return BAD_REQUEST, 0
        except OSError:
            return IO_ERROR, 0
        return OK, 0

    def save(self) -> dict[str, Any]:
        return BLOCK_STATE.save_from(self)

    def restore(self, s: dict[str, Any]) -> None:
        if s["name"] != self.name:
            raise ValueError(f"block state for {s['name']!r} given to disk {self.name!r}")
        BLOCK_STATE.restore_into(self, s)
