"""The i8042 keyboard controller, only as far as a guest uses it to reboot.

It decodes two ports, the data port (0x60, offset 0) and the command port
(0x64, offset 4), registered one at a time so that the ports between them
stay unclaimed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from baton.schema import U8, Bool
from vmm.state import Component, F

DATA = 0  # port 0x60
COMMAND = 4  # port 0x64
CMD_RESET = 0xFE

#: The controller's saved state: each field is the device attribute of the same name.
I8042_STATE = Component(
    "i8042",
    version=1,
    min_version=1,
    fields={"command": F(U8), "reset_requested": F(Bool())},
)


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.command = 0
        self.reset_requested = False

    def pio_read(self, offset: int, size: int) -> int:
        return 0  # no keyboard data, controller never busy

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == COMMAND:
            self.command = value & 0xFF
            if self.command == CMD_RESET:
                self.reset_requested = True
                self._on_reset()

    def save(self) -> dict[str, Any]:
        return I8042_STATE.save_from(self)

    def restore(self, s: dict[str, Any]) -> None:
        I8042_STATE.restore_into(self, s)
