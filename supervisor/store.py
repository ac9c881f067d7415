"""What the supervisor must remember across its own restarts, one file per VM.

``DIR/var/lib/baton/supervisor/NAME.json``: the VM's state, its config as
written, and its worker's identity (pid, start time, instance, control
socket). Written atomically on every transition; no fsync, because it only
has to survive a supervisor crash, not the host's.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from baton.paths import Paths


class Store:
    def __init__(self, paths: Paths) -> None:
        self.dir = paths.lib / "supervisor"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, vm: str) -> Path:
        return self.dir / f"{vm}.json"

    def save(self, vm: str, record: dict[str, Any]) -> None:
        path = self._path(vm)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def delete(self, vm: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(vm).unlink()

    def load_all(self) -> dict[str, dict[str, Any]]:
        out = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                out[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a torn file cannot happen (atomic replace); skip anything odd
        return out
