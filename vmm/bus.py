"""The buses the vCPU exit handlers dispatch through (Firecracker's ``Bus``).

A device registers the ranges it decodes; an access is routed to the device
with its offset inside the device. The port I/O bus is a dict by port (one
lookup per exit, on the vCPU thread); the MMIO bus holds sorted address
ranges. Unclaimed reads return all ones and unclaimed writes are dropped,
as on real hardware with nothing at that address.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol

PORT_SPACE = 1 << 16


class PioDevice(Protocol):
    def pio_read(self, offset: int, size: int) -> int: ...
    def pio_write(self, offset: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    def mmio_read(self, offset: int, length: int) -> bytes: ...
    def mmio_write(self, offset: int, data: bytes) -> None: ...


class BusError(ValueError):
    """A registration that overlaps another device or falls outside the bus."""


class PioBus:
    def __init__(self) -> None:
        # port -> (the device's read, its write, the port's offset in the device)
        self._ports: dict[
            int, tuple[Callable[[int, int], int], Callable[[int, int, int], None], int]
        ] = {}

    def register(self, device: PioDevice, base: int, length: int, offset: int = 0) -> None:
        """Ports [base, base + length) go to ``device``; ``offset`` is the
        device-relative offset of ``base`` (for a device that decodes ports
        that are not contiguous, registered one range at a time)."""
        if length < 1 or base < 0 or base + length > PORT_SPACE:
            raise BusError(f"ports {base:#x}+{length} do not fit the port space")
        for port in range(base, base + length):
            if port in self._ports:
                raise BusError(f"port {port:#x} is already taken")
        for i in range(length):
            self._ports[base + i] = (device.pio_read, device.pio_write, offset + i)

    def read(self, port: int, size: int) -> int:
        entry = self._ports.get(port)
        if entry is None:
            return (1 << (8 * size)) - 1
        return entry[0](entry[2], size)

    def write(self, port: int, size: int, value: int) -> None:
        entry = self._ports.get(port)
        if entry is not None:
            entry[1](entry[2], size, value)


class MmioBus:
    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, MmioDevice]] = []  # (base, length, device), sorted

    def register(self, device: MmioDevice, base: int, length: int) -> None:
        if length < 1 or base < 0:
            raise BusError(f"MMIO range {base:#x}+{length:#x} is empty or negative")
        i = bisect.bisect_right(self._bases, base)
        before = self._ranges[i - 1] if i > 0 else None
        after = self._ranges[i] if i < len(self._ranges) else None
        if (before and before[0] + before[1] > base) or (after and base + length > after[0]):
            raise BusError(f"MMIO range {base:#x}+{length:#x} overlaps another device")
        self._bases.insert(i, base)
        self._ranges.insert(i, (base, length, device))

    def _find(self, addr: int, length: int) -> tuple[MmioDevice, int] | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        base, size, device = self._ranges[i]
        if addr + length > base + size:
            return None
        return device, addr - base

    def read(self, addr: int, length: int) -> bytes:
        hit = self._find(addr, length)
        if hit is None:
            return b"\xff" * length
        return hit[0].mmio_read(hit[1], length)

    def write(self, addr: int, data: bytes) -> None:
        hit = self._find(addr, len(data))
        if hit is not None:
            hit[0].mmio_write(hit[1], data)
