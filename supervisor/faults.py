"""Fault injection for tests: ``BATON_FAULT_SUPERVISOR=<point>`` makes the supervisor
fail on purpose at a real moment, to prove recovery with real processes.

Points: ``crash-after-<step>`` (SIGKILL itself right after journaling that
upgrade step, as a kill -9 would), ``kill-new-qemu-mid-migration`` (slow the
QEMU migration stream and SIGKILL the new QEMU inside it). The worker's own
hooks are in ``vmm/faults.py``. ``fail-<point>`` raises an exception no code
path expects (``fail``), to prove that every operation ends consistent.
"""

from __future__ import annotations

import os
import signal

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
