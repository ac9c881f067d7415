"""Baton's paravirtual NIC, backed by a tap fd the broker holds (``tap-netN``).

Why not virtio-net over virtio-mmio: on the nested KVM this runs on, every
guest instruction is emulated (about a million a second), so the cost that
matters is guest work and exits per frame. virtio needs feature
negotiation, descriptor tables, available and used rings and a header per
frame; this device needs, per received frame, 12 bytes moved in the guest
and one OUT to send it back, plus one OUT per batch. Its whole ring lives
in guest RAM, indices included, so it crosses a live upgrade with the RAM
and the device's own state is a few registers and counters. (Stock QEMU
VMs get virtio-net from QEMU.)

Guest interface. Ports ``base + 0/4/8``, 32-bit OUTs:

    +0  AREA  guest-physical address of the ring area (0: off; RX stops)
    +4  TX    guest-physical address of a frame to send (the slot layout);
              sent before the OUT completes, status written back
    +8  ACK   lowers the interrupt line and tells the device the guest moved
              rx_tail (room in the ring)

Ring area (little-endian), ``SLOTS`` slots of ``SLOT_SIZE`` bytes:

    0x0000  u32 rx_head   written by the device: frames delivered (free-running)
    0x0004  u32 rx_tail   written by the guest: frames consumed (free-running)
    0x0008  u8[6] mac     written by the device when AREA is set
    0x1000  slot i at 0x1000 + (i % SLOTS) * SLOT_SIZE:
            u32 length, u32 status (TX: 0 sent, 1 bad length, 2 dropped),
            then the frame (at most MAX_FRAME bytes)

RX: a host thread reads frames from the tap while the ring has room, writes
each into slot ``rx_head``, advances ``rx_head``, and raises the interrupt
line if it is low. It reads from the tap only while holding the device's
lock and only when not quiesced (as the UART does with its input), so at a
pause no frame is in flight: what the guest has not received is either in
a slot (in RAM) or still in the tap's queue, which the next worker drains.
While the ring is full nothing is read: the tap's queue holds the frames
(the kernel drops past its txqueuelen and counts it on the tap). Frames
longer than a slot are read and counted as ``rx_dropped``.

The guest's side (vmm/guest/guest.S): ACK, then for every slot from
``rx_tail`` to ``rx_head`` swap the MACs and OUT the slot's address to TX,
advance ``rx_tail``; ACK again. A frame that arrives after the first ACK
raises the (edge-triggered) line again, so none waits for the next one.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from typing import Any

from baton.schema import U64, Bool, Name, Str
from vmm.devices.feeder import FdFeeder
from vmm.memory import GuestMemory
from vmm.state import Component, F

SLOTS = 16
SLOT_SIZE = 2048
SLOT_BASE = 0x1000
HEADER = 8
MAX_FRAME = SLOT_SIZE - HEADER
MIN_FRAME = 14
AREA_SIZE = SLOT_BASE + SLOTS * SLOT_SIZE
PORTS = 12
REG_AREA, REG_TX, REG_ACK = 0, 4, 8
TX_OK, TX_BAD, TX_DROPPED = 0, 1, 2
_U32 = struct.Struct("<I")
_INDICES = struct.Struct("<II")
_SLOT_HEADER = struct.Struct("<II")

#: One NIC's saved state: each field is the device attribute of the same name.
#: Its ring and indices are in guest RAM; this is what is not.
NET_STATE = Component(
    "net",
    version=1,
    min_version=1,
    many=True,
    max_items=8,
    fields={
        "name": F(Name, restored=False),
        "mac": F(Str(17), restored=False),
        "area": F(U64),
        "irq_level": F(Bool()),
        "rx_frames": F(U64),
        "tx_frames": F(U64),
        "rx_dropped": F(U64),
        "tx_dropped": F(U64),
        "tx_errors": F(U64),
    },
)


class Net(FdFeeder):
    def __init__(
        self,
        name: str,
        mac: str,
        tap_fd: int,
        memory: GuestMemory,
        irq: Callable[[int], None],
    ) -> None:
        super().__init__(tap_fd, f"{name}-rx")
        self.name = name
        self.mac = mac
        self.fd = tap_fd
        self.memory = memory
        self._irq = irq
        self.area = 0
        self.irq_level = False
        self.rx_frames = self.tx_frames = 0
        self.rx_dropped = self.tx_dropped = self.tx_errors = 0

    # -- guest side (vCPU threads, through the port I/O bus)
    def pio_read(self, offset: int, size: int) -> int:
        if offset == REG_AREA:
            return SLOTS
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        if offset == REG_TX:
            self._transmit(value)
        elif offset == REG_ACK:
            with self._lock:
                if self.irq_level:
                    self.irq_level = False
                    self._irq(0)
                self._room.notify_all()
        elif offset == REG_AREA:
            self._set_area(value)

    def _set_area(self, gpa: int) -> None:
        with self._lock:
            if gpa:
                try:
                    self.memory.offset(gpa, AREA_SIZE)
                except ValueError:
                    gpa = 0  # not RAM: the NIC stays off
            self.area = gpa
            if gpa:
                self.memory.write(gpa + 8, bytes.fromhex(self.mac.replace(":", "")))
            self._room.notify_all()
        self._wake()

    def _transmit(self, gpa: int) -> None:
        """Send the frame at ``gpa`` (slot layout) before the OUT completes."""
        try:
            length, _ = _SLOT_HEADER.unpack(self.memory.read(gpa, HEADER))
            if not MIN_FRAME <= length <= MAX_FRAME:
                self.tx_errors += 1
                self.memory.write(gpa + 4, _U32.pack(TX_BAD))
                return
            data = self.memory.read(gpa + HEADER, length)
        except ValueError:
            self.tx_errors += 1
            return  # no request there: nothing to report back to
        try:
            os.write(self.fd, data)
        except OSError:  # the tap is down, or its queue full
            self.tx_dropped += 1
            self.memory.write(gpa + 4, _U32.pack(TX_DROPPED))
            return
        self.tx_frames += 1
        self.memory.write(gpa + 4, _U32.pack(TX_OK))

    # -- host side: the receive thread
    def _room_left(self) -> int:
        """Free slots, from the indices in guest RAM (lock held; area set)."""
        head, tail = _INDICES.unpack(self.memory.read(self.area, 8))
        used = (head - tail) & 0xFFFFFFFF
        return SLOTS - used if used <= SLOTS else 0  # a confused guest stalls only itself

    def _deliver(self) -> None:
        """Frames from the tap into free slots, then the interrupt (lock held)."""
        delivered = False
        area = self.area
        for _ in range(self._room_left()):
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the tap is gone (the VM is being stopped)
            if len(data) > MAX_FRAME:
                self.rx_dropped += 1
                continue
            head = _U32.unpack(self.memory.read(area, 4))[0]
            slot = area + SLOT_BASE + (head % SLOTS) * SLOT_SIZE
            self.memory.write(slot, _SLOT_HEADER.pack(len(data), 0) + data)
            self.memory.write(area, _U32.pack((head + 1) & 0xFFFFFFFF))
            self.rx_frames += 1
            delivered = True
        if delivered and not self.irq_level:
            self.irq_level = True
            self._irq(1)

    # -- host side: the receive thread (vmm.devices.feeder)
    gone_events = select.POLLERR | select.POLLNVAL

    def _has_room(self) -> bool:
        return bool(self.area) and self._room_left() > 0

    def _take(self) -> None:
        if self.area:
            self._deliver()

    # -- state and status
    def save(self) -> dict[str, Any]:
        with self._lock:
            return NET_STATE.save_from(self)

    def restore(self, s: dict[str, Any]) -> None:
        """The interrupt line's level is part of the irqchip state, restored with it."""
        if s["name"] != self.name:
            raise ValueError(f"net state for {s['name']!r} given to NIC {self.name!r}")
        with self._lock:
            NET_STATE.restore_into(self, s)
