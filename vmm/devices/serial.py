"""A 16550A UART on COM1, IRQ 4.

Guest output goes byte by byte to the console log (an O_APPEND file the
broker holds, so the log simply continues in the next worker). Guest input
comes from the console-in pipe the broker holds: bytes are read from it only
when the receive FIFO has room and the device is not quiesced, so whatever
the guest has not yet received stays in the pipe (or in the saved FIFO) for
the next worker. Nothing is lost and nothing is delivered twice.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from baton.schema import U8, U64, Bool, Bytes
from vmm.devices.feeder import FdFeeder
from vmm.state import Component, F

FIFO_SIZE = 16

IER_RDI = 0x01
IER_THRI = 0x02
LCR_DLAB = 0x80
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
IIR_NONE = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO = 0xC0
MSR_IDLE = 0xB0  # DCD, DSR, CTS

#: The UART's saved state: each field is the device attribute of the same name.
SERIAL_STATE = Component(
    "serial",
    version=1,
    min_version=1,
    fields={
        "ier": F(U8),
        "lcr": F(U8),
        "mcr": F(U8),
        "scr": F(U8),
        "dll": F(U8),
        "dlm": F(U8),
        "fcr": F(U8),
        "thri_pending": F(Bool()),
        "overrun": F(Bool()),
        "irq_level": F(Bool()),
        "rx": F(Bytes(0, FIFO_SIZE), to_state=bytes, from_state=deque),
        "tx_bytes": F(U64),
        "rx_bytes": F(U64),
    },
)


class Serial(FdFeeder):
    PORTS = 8

    def __init__(
        self, irq: Callable[[int], None], log_fd: int | None, input_fd: int | None
    ) -> None:
        super().__init__(input_fd, "serial-in")
        self._irq = irq
        self.log_fd = log_fd
        self.input_fd = input_fd
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 12, 0  # 9600 baud, as firmware leaves it
        self.thri_pending = False
        self.overrun = False
        self.irq_level = False
        self.rx: deque[int] = deque()
        self.tx_bytes = 0
        self.rx_bytes = 0

    # -- guest side (vCPU threads, through the port I/O bus)
    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0:
                if self.lcr & LCR_DLAB:
                    return self.dll
                value = self.rx.popleft() if self.rx else 0
                self._room.notify_all()
                self._wake()
                self._update_irq()
                return value
            if offset == 1:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if offset == 2:
                iir = self._iir()
                if iir & 0x0F == IIR_THRI:
                    self.thri_pending = False
                    self._update_irq()
                return iir | (IIR_FIFO if self.fcr & 1 else 0)
            if offset == 3:
                return self.lcr
            if offset == 4:
                return self.mcr
            if offset == 5:
                lsr = LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
                if self.overrun:
                    lsr |= LSR_OE
                    self.overrun = False
                return lsr
            if offset == 6:
                if self.mcr & MCR_LOOP:
                    m = self.mcr
                    return (
                        ((m & 0x02) << 3)
                        | ((m & 0x01) << 5)
                        | ((m & 0x04) << 4)
                        | ((m & 0x08) << 4)
                    )
                return MSR_IDLE
            return self.scr

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF  # 8-bit registers
        with self._lock:
            if offset == 0:
                if self.lcr & LCR_DLAB:
                    self.dll = value
                    return
                if self.mcr & MCR_LOOP:
                    self._push(bytes([value]))
                else:
                    self._emit(value)
                self.thri_pending = True  # the THR empties at once
            elif offset == 1:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                    return
                if value & IER_THRI and not self.ier & IER_THRI:
                    self.thri_pending = True
                self.ier = value & 0x0F
            elif offset == 2:
                self.fcr = value & 0xC9
                if value & 0x02:
                    self.rx.clear()
                    self._room.notify_all()
                    self._wake()
            elif offset == 3:
                self.lcr = value
            elif offset == 4:
                self.mcr = value & 0x1F
            elif offset == 7:
                self.scr = value
            self._update_irq()

    def _emit(self, value: int) -> None:
        self.tx_bytes += 1
        if self.log_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.log_fd, bytes([value]))

    def _iir(self) -> int:
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thri_pending:
            return IIR_THRI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = bool(self.mcr & MCR_OUT2) and self._iir() != IIR_NONE
        if level != self.irq_level:
            self.irq_level = level
            self._irq(int(level))

    def _push(self, data: bytes) -> None:
        for b in data:
            if len(self.rx) >= FIFO_SIZE:
                self.overrun = True
            else:
                self.rx.append(b)
                self.rx_bytes += 1

    # -- host side: the input thread (vmm.devices.feeder)
    def _has_room(self) -> bool:
        return len(self.rx) < FIFO_SIZE

    def _take(self) -> None:
        assert self.input_fd is not None
        room = FIFO_SIZE - len(self.rx)
        if room <= 0:
            return
        try:
            data = os.read(self.input_fd, room)
        except (BlockingIOError, InterruptedError):
            return
        self._push(data)
        self._update_irq()

    # -- state
    def save(self) -> dict[str, Any]:
        with self._lock:
            return SERIAL_STATE.save_from(self)

    def restore(self, s: dict[str, Any]) -> None:
        """The IRQ line level is part of the irqchip state, restored with it."""
        with self._lock:
            SERIAL_STATE.restore_into(self, s)
