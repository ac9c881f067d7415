"""Baton's paravirtual NIC, backed by a tap fd the broker holds (``tap-netN``).

Why not virtio-net over virtio-mmio: on the nested KVM this runs on, every
guest instruction is emulated (about a million a second) and every exit to
the VMM costs tens of microseconds, so what matters is guest work and exits
per frame. virtio needs feature negotiation, descriptor tables, available
and used rings and a header per frame; this device needs, per echoed frame,
about twenty guest instructions and no exit of its own: one doorbell OUT
sends a whole batch. Its rings live in guest RAM, indices included, so they
cross a live upgrade with the RAM, and the device's own state is a few
registers and counters. (Stock QEMU VMs get virtio-net from QEMU.)

Guest interface. Ports ``base + 0/4/8/12``, 32-bit OUTs:

    +0  AREA  guest-physical address of the ring area (0: off; RX stops);
              bit 0 set chooses ring layout 2 (below), clear layout 1
    +4  TX    guest-physical address of a frame to send (the slot layout);
              sent before the OUT completes, status written back
    +8  ACK   lowers the interrupt line and tells the device the guest moved
              rx_tail (room in the ring)
    +12 BELL  layout 2's doorbell, value = the guest's new rx_tail: send every
              posted TX descriptor, then set rx_tail (the slots are free
              again), then ACK. One exit per batch, received and sent.

32-bit INs: +0 reads layout 1's slot count (16), +12 the newest layout this
device drives (2).

Ring area (little-endian):

    0x0000  u32 rx_head   written by the device: frames delivered (free-running)
    0x0004  u32 rx_tail   written by the guest (layout 2: by BELL): frames consumed
    0x0008  u8[6] mac     written by the device when AREA is set
    0x0010  u32 tx_head   layout 2, written by the guest: descriptors posted
    0x0014  u32 tx_tail   layout 2, written by the device: descriptors sent
    0x0018  u32 tx_ok     layout 2, written by the device: frames sent (free-running)
    0x0100  u32 tx_desc[TX_SLOTS]  layout 2: the address of a buffer in the slot
            layout, at (tx_head % TX_SLOTS)
    0x1000  RX slot i at 0x1000 + (i % slots) * SLOT_SIZE: u32 length,
            u32 status (TX: 0 sent, 1 bad length, 2 dropped), then the frame
            (at most MAX_FRAME bytes). Layout 1 has 16 slots, layout 2 has 64.

Layout 1 is what the built-in guest drove before layout 2 (one OUT per
echoed frame: that exit was the ceiling, about 4,000-7,000 frames/s here).
In layout 2 a pause can fall between the guest posting descriptors and
ringing BELL: those, and the RX slots BELL has not freed, are in RAM, and
the guest rings BELL on the next worker. A guest's code lives in its RAM
and keeps running across upgrades, so a newer worker keeps serving layout 1
for as long as that guest runs; the layout is part of the device's state
(version 2; a version-1 state means layout 1).

RX: a host thread reads frames from the tap while the ring has room, writes
each into slot ``rx_head`` (read straight into guest RAM), advances
``rx_head``, and raises the interrupt line if it is low. It reads from the
tap only while holding the device's lock and only when not quiesced (as the
UART does with its input), so at a pause no frame is in flight: what the
guest has not received is either in a slot (in RAM) or still in the tap's
queue, which the next worker drains. TX completes inside the OUT that asks
for it, so no frame the guest sent is in flight at a pause either. While the
ring is full nothing is read: the tap's queue holds the frames (the kernel
drops past its txqueuelen, set at provisioning, and counts it on the tap).
Frames longer than a slot are read and counted as ``rx_dropped``.

The built-in guest (vmm/guest/guest.S) uses layout 2: for every slot from
``rx_tail`` to ``rx_head`` it swaps the MACs and posts the slot as a TX
descriptor, then rings BELL with the new tail, and looks again. A frame that
arrives after BELL lowered the line raises the (edge-triggered) line again,
so none waits for the next one.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from typing import Any

from baton.schema import U64, Bool, Int, Name, Str
from vmm.devices.feeder import FdFeeder
from vmm.memory import GuestMemory
from vmm.state import Component, F

SLOT_SIZE = 2048
SLOT_BASE = 0x1000
HEADER = 8
MAX_FRAME = SLOT_SIZE - HEADER
MIN_FRAME = 14
#: RX slots per ring layout
LAYOUT_SLOTS = {1: 16, 2: 64}
TX_SLOTS = 64
TX_HEAD, TX_DESC = 0x10, 0x100
AREA_SIZE = SLOT_BASE + max(LAYOUT_SLOTS.values()) * SLOT_SIZE
PORTS = 16
REG_AREA, REG_TX, REG_ACK, REG_BELL = 0, 4, 8, 12
AREA_LAYOUT2 = 1
TX_OK, TX_BAD, TX_DROPPED = 0, 1, 2
MASK = 0xFFFFFFFF
_U32 = struct.Struct("<I")
_INDICES = struct.Struct("<II")
_SLOT_HEADER = struct.Struct("<II")
_TX_DESCS = struct.Struct(f"<{TX_SLOTS}I")

#: One NIC's saved state: each field is the device attribute of the same name.
#: Its rings and indices are in guest RAM; this is what is not.
NET_STATE = Component(
    "net",
    version=2,
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
        # the ring layout the guest chose (version 1 knew only layout 1)
        "layout": F(Int(1, 2), since=2, default=1),
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
        self.layout = 1
        self.irq_level = False
        self.rx_frames = self.tx_frames = 0
        self.rx_dropped = self.tx_dropped = self.tx_errors = 0
        self._spill = bytearray(65536)  # where a frame too long for a slot goes

    @property
    def slots(self) -> int:
        return LAYOUT_SLOTS[self.layout]

    # -- guest side (vCPU threads, through the port I/O bus)
    def pio_read(self, offset: int, size: int) -> int:
        if offset == REG_AREA:
            return LAYOUT_SLOTS[1]
        if offset == REG_BELL:
            return max(LAYOUT_SLOTS.keys())  # the newest layout this device drives
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        if offset == REG_BELL:
            self._ring_bell(value)
        elif offset == REG_TX:
            self._transmit(value)
        elif offset == REG_ACK:
            with self._lock:
                self._ack()
        elif offset == REG_AREA:
            self._set_area(value)

    def _ack(self) -> None:
        """Lower the line; the guest made room (lock held)."""
        if self.irq_level:
            self.irq_level = False
            self._irq(0)
        self._room.notify_all()

    def _set_area(self, value: int) -> None:
        layout = 2 if value & AREA_LAYOUT2 else 1
        gpa = value & ~AREA_LAYOUT2
        with self._lock:
            if gpa:
                try:
                    self.memory.offset(gpa, SLOT_BASE + LAYOUT_SLOTS[layout] * SLOT_SIZE)
                except ValueError:
                    gpa = 0  # not RAM: the NIC stays off
            self.area = gpa
            self.layout = layout
            if gpa:
                self.memory.write(gpa + 8, bytes.fromhex(self.mac.replace(":", "")))
            self._room.notify_all()
        self._wake()

    def _ring_bell(self, rx_tail: int) -> None:
        """Layout 2: send the posted descriptors, free the RX slots up to ``rx_tail``, ack."""
        area = self.area
        if not area or self.layout != 2:
            return
        head, tail = _INDICES.unpack(self.memory.read(area + TX_HEAD, 8))
        posted = (head - tail) & MASK
        if posted > TX_SLOTS:  # a confused guest: skip what it posted, count it
            self.tx_errors += 1
        elif posted:
            descs = _TX_DESCS.unpack(self.memory.read(area + TX_DESC, _TX_DESCS.size))
            for i in range(posted):
                self._transmit(descs[(tail + i) % TX_SLOTS])
        self.memory.write(
            area + TX_HEAD + 4, _INDICES.pack(head, self.tx_frames & MASK)
        )  # tx_tail, tx_ok
        with self._lock:
            self.memory.write(area + 4, _U32.pack(rx_tail & MASK))
            self._ack()

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
        used = (head - tail) & MASK
        return self.slots - used if used <= self.slots else 0  # a confused guest stalls itself

    def _deliver(self) -> None:
        """Frames from the tap into free slots; the interrupt with the first (lock held)."""
        area, slots = self.area, self.slots
        area_off = self.memory.offset(area, 4)
        head = _U32.unpack(self.memory.read(area, 4))[0]
        ram = memoryview(self.memory.buf)
        raise_line = not self.irq_level
        for _ in range(self._room_left()):
            off = self.memory.offset(area + SLOT_BASE + (head % slots) * SLOT_SIZE, SLOT_SIZE)
            try:
                n = os.readv(self.fd, [ram[off + HEADER : off + SLOT_SIZE], self._spill])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the tap is gone (the VM is being stopped)
            if n > MAX_FRAME:
                self.rx_dropped += 1
                continue
            ram[off : off + HEADER] = _SLOT_HEADER.pack(n, 0)
            head = (head + 1) & MASK
            ram[area_off : area_off + 4] = _U32.pack(head)
            self.rx_frames += 1
            if raise_line:  # at the first frame: the guest starts while more are read
                raise_line = False
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
