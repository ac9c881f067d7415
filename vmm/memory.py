"""Guest RAM: the broker's memfd, mapped MAP_SHARED, never copied."""

from __future__ import annotations

import os

from vmm import layout
from vmm._kvm import ffi, lib


class GuestMemory:
    """One shared mapping of the whole memfd, addressed by guest-physical address."""

    def __init__(self, fd: int) -> None:
        self.size = os.fstat(fd).st_size
        if self.size < layout.MIN_RAM:
            raise ValueError(f"guest RAM of {self.size} bytes is below {layout.MIN_RAM}")
        err = ffi.new("int *")
        ptr = lib.baton_map_shared(fd, self.size, 0, err)
        if ptr == ffi.NULL:
            raise OSError(err[0], f"cannot map guest RAM: {os.strerror(err[0])}")
        self.ptr = ptr
        self.host_addr = int(ffi.cast("uintptr_t", ptr))
        self.buf = ffi.buffer(ptr, self.size)
        self.regions = layout.ram_regions(self.size)

    def offset(self, gpa: int, length: int) -> int:
        """Offset in the memfd of [gpa, gpa + length), which must lie in one region."""
        for base, off, size in self.regions:
            if base <= gpa and gpa + length <= base + size:
                return off + (gpa - base)
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not RAM")

    def read(self, gpa: int, length: int) -> bytes:
        off = self.offset(gpa, length)
        data: bytes = self.buf[off : off + length]
        return data

    def write(self, gpa: int, data: bytes) -> None:
        off = self.offset(gpa, len(data))
        self.buf[off : off + len(data)] = data

    def zero(self, gpa: int, length: int) -> None:
        off = self.offset(gpa, length)
        ffi.memmove(self.ptr + off, bytes(length), length)

    def close(self) -> None:
        if self.ptr is not None:
            self.buf = None
            lib.baton_unmap(self.ptr, self.size)
            self.ptr = None
