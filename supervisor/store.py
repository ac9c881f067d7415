"""What the supervisor must remember across its own restarts, one file per VM.

``DIR/var/lib/baton/supervisor/NAME.json``: the VM's state, its config as
written, and its worker's identity (pid, start time, instance, control
socket; its broker token only as a sha256, never the token). Written with
``baton.durable.write_atomic`` on every transition (fsynced, file and
directory), so after a crash of the host as of the supervisor it is the old
record or the new one, whole. A record the file already holds word for word
(read at the start, or written last) is not written again: a restarted
supervisor that adopts every VM as it was recorded writes nothing.

A record that cannot be read anyway (a disk that lied, a hand edit, a bug)
never stops the supervisor: it is logged, kept aside as
``NAME.json.corrupt``, and the VM is recovered from what is live (its
worker is found again through the broker's run lease).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from baton.durable import write_atomic
from baton.paths import Paths

log = logging.getLogger("supervisor.store")

NUMBER = (int, float)
OPTIONAL_STR = (str, type(None))
#: the type each field of a record must have when present
RECORD_TYPES: dict[str, Any] = {
    "name": str,
    "state": str,
    "reason": str,
    "config": dict,
    "config_source": str,
    "worker": (dict, type(None)),
    "last_exit": OPTIONAL_STR,
    "last_upgrade": (dict, type(None)),
    "upgrades": int,
}
WORKER_TYPES: dict[str, Any] = {
    "vm": str,
    "kind": str,
    "pid": int,
    "create_time": NUMBER,
    "instance": str,
    "control": str,
    "started_at": NUMBER,
    "version": str,
    "token_sha256": OPTIONAL_STR,
    "kind_data": (dict, type(None)),
}


class CorruptRecord(ValueError):
    pass


def check_record(rec: Any) -> dict[str, Any]:
    """``rec`` if every field has its type; CorruptRecord (saying which) if not."""

    def check(d: Any, types: dict[str, Any], where: str) -> None:
        if not isinstance(d, dict):
            raise CorruptRecord(f"{where or 'the record'} is a {type(d).__name__}, not a map")
        for key, want in types.items():
            if key in d and (
                not isinstance(d[key], want) or (want is int and isinstance(d[key], bool))
            ):
                raise CorruptRecord(f"{where}{key} is {d[key]!r:.40}")

    check(rec, RECORD_TYPES, "")
    if rec.get("worker") is not None:
        check(rec["worker"], WORKER_TYPES, "worker.")
        for key in ("pid", "create_time", "instance"):
            if key not in rec["worker"]:
                raise CorruptRecord(f"worker.{key} is missing")
    return dict(rec)


class Store:
    def __init__(self, paths: Paths) -> None:
        self.dir = paths.lib / "supervisor"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._on_disk: dict[str, bytes] = {}  # vm -> what its file holds, as we know it

    def _path(self, vm: str) -> Path:
        return self.dir / f"{vm}.json"

    def save(self, vm: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        if self._on_disk.get(vm) == data:
            return
        self._on_disk.pop(vm, None)  # a write that fails leaves it unknown
        write_atomic(self._path(vm), data)
        self._on_disk[vm] = data

    def delete(self, vm: str) -> None:
        self._on_disk.pop(vm, None)
        with contextlib.suppress(FileNotFoundError):
            self._path(vm).unlink()

    def load_all(self) -> dict[str, dict[str, Any]]:
        out = {}
        for path in sorted(self.dir.glob("*.json")):
            try:
                data = path.read_bytes()
                out[path.stem] = check_record(json.loads(data))
                self._on_disk[path.stem] = data
            except OSError as e:
                log.error("vm %s: cannot read its record %s: %s", path.stem, path, e)
            except (ValueError, UnicodeDecodeError) as e:
                aside = path.with_name(path.name + ".corrupt")
                with contextlib.suppress(OSError):
                    os.replace(path, aside)
                log.error(
                    "vm %s: its record %s is unusable (%s); kept as %s; recovering from "
                    "what is live",
                    path.stem,
                    path,
                    e,
                    aside.name,
                )
        return out
