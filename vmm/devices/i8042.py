"""The i8042 keyboard controller, only as far as a guest uses it to reboot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CMD_RESET = 0xFE


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.command = 0
        self.reset_requested = False

    def read(self, port: int) -> int:
        return 0  # no keyboard data, controller never busy

    def write(self, port: int, value: int) -> None:
        if port == 0x64:
            self.command = value
            if value == CMD_RESET:
                self.reset_requested = True
                self._on_reset()

    def save(self) -> dict[str, Any]:
        return {"command": self.command, "reset_requested": self.reset_requested}

    def restore(self, s: dict[str, Any]) -> None:
        self.command = s["command"]
        self.reset_requested = s["reset_requested"]
