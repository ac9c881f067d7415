"""Fault injection for tests: ``BATON_FAULT_SUPERVISOR=<point>`` makes the supervisor
fail on purpose at a real moment, to prove recovery with real processes.

Points: ``crash-after-<step>`` (SIGKILL itself right after journaling that
upgrade step, as a kill -9 would), ``kill-new-qemu-mid-migration`` (slow the
QEMU migration stream and SIGKILL the new QEMU inside it). The worker's own
hooks are in ``vmm/faults.py``. ``fail-<point>`` raises an exception no code
path expects (``fail``), to prove that every operation ends consistent.
``fill-disk-<point>`` fills the file system of a directory (``fill_disk``), as
another tenant of that disk would, to prove a write that hits ENOSPC.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

VARIABLE = "BATON_FAULT_SUPERVISOR"


def armed(point: str) -> bool:
    return os.environ.get(VARIABLE) == point


def crash_after(step: str) -> None:
    """Die exactly here, as a kill -9 would."""
    if armed(f"crash-after-{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def fail(point: str) -> None:
    """Raise an exception nothing expects, here (``fail-<point>``)."""
    if armed(f"fail-{point}"):
        raise RuntimeError(f"fault injected: fail-{point}")


def fill_disk(point: str, directory: Path) -> None:
    """Write ``directory/.fill`` until its file system is full (``fill-disk-<point>``)."""
    if not armed(f"fill-disk-{point}"):
        return
    directory.mkdir(parents=True, exist_ok=True)
    block = b"\xff" * (1 << 20)
    with open(directory / ".fill", "ab") as f, contextlib.suppress(OSError):
        while True:
            f.write(block)
            f.flush()
