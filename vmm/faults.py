"""Fault injection for tests: ``BATON_FAULT=<point>`` makes a worker fail on purpose.

It exists to prove the supervisor's rollback paths with a real process
failing at a real moment (e.g. ``vmctl upgrade vm1 --worker 'env
BATON_FAULT=load baton-vmm'``). Points: ``prepare`` (exit before ready),
``load`` (die with the state in hand, before loading it), ``loaded`` (die
right after reporting it loaded), ``committed`` (die right after writing the
run flag at the commit, before the vCPUs run), ``hang`` (never answer the handoff),
``slow-load`` (take 50 ms longer to load the state, inside the guest's pause:
an upgrade that commits with a long blackout).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from baton.contract import WorkerExit


def any_armed() -> bool:
    """Whether any point is armed: one look at the environment inside a pause, not one per point."""
    return "BATON_FAULT" in os.environ


def armed(point: str) -> bool:
    return os.environ.get("BATON_FAULT") == point


def crash(point: str) -> None:
    if armed(point):
        logging.getLogger("vmm.faults").warning("injected fault %r: exiting", point)
        os._exit(WorkerExit.INJECTED)


def hang(point: str) -> None:
    if armed(point):
        logging.getLogger("vmm.faults").warning("injected fault %r: hanging", point)
        threading.Event().wait()


def delay(point: str, seconds: float) -> None:
    if armed(point):
        log = logging.getLogger("vmm.faults")
        log.warning("injected fault %r: %.0f ms late", point, seconds * 1e3)
        time.sleep(seconds)
