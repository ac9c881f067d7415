"""A standby's own memory, offered to the kernel's same-page merging (KSM) while it idles.

A standby (``supervisor.standby``) is an incoming worker that may wait for hours:
its interpreter, imports and built VM are private pages, most of them byte for
byte the same in every standby of the same worker version (``bench/cowpages.py``
measured 1.2 MiB of distinct content in 6 MiB of private pages). With
``[upgrade] standby_merge`` the supervisor starts standbys with
``contract.IDLE_MERGE_ENV``; just before its ready word (so before any
request can come), the standby marks all its private memory mergeable
(``PR_SET_MEMORY_MERGE``, Linux 6.4), and ``ksmd`` may then share those
pages between standbys. Guest RAM is a shared memfd mapping, which
KSM never merges: only the VMM's own heap is offered.

A merged page costs a copy-on-write fault at its next write. So the standby
takes every page back (``leave``: the same prctl with 0 unmerges them all)
first thing when a handoff or a load comes, before it says it is warm: the
faults are paid before the old worker pauses, never inside the guest's pause
(the upgrade report's ``new_side_us.unmerge_us``).

Merging only happens where the host runs ``ksmd`` (``/sys/kernel/mm/ksm/run``,
the operator's choice); elsewhere the prctl marks pages nobody scans.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time

from baton.contract import IDLE_MERGE_ENV

log = logging.getLogger("vmm.idle_merge")

PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68

_libc = ctypes.CDLL(None, use_errno=True)


def wanted() -> bool:
    """Whether this worker was started as a standby that should offer its memory."""
    return os.environ.get(IDLE_MERGE_ENV) == "1"


def _prctl(on: int) -> None:
    if _libc.prctl(PR_SET_MEMORY_MERGE, on, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_MEMORY_MERGE, {on}): {os.strerror(err)}")


def offer() -> bool:
    """Mark this process's private memory mergeable; False (logged) where the kernel
    cannot (no KSM, or older than 6.4): the standby works the same, unmerged."""
    try:
        _prctl(1)
    except OSError as e:
        log.info("memory not offered for merging: %s", e)
        return False
    return True


def leave() -> float:
    """Unmerge every page and stop offering them (a no-op unless ``offer`` did: the
    kernel's own flag says); returns the microseconds it took. Raises OSError if the
    kernel could not unmerge (out of memory): the caller must then not start a pause."""
    if not merging():
        return 0.0
    t0 = time.monotonic_ns()
    _prctl(0)
    us = (time.monotonic_ns() - t0) / 1000
    log.info("merged memory taken back in %.0f us", us)
    return us


def merging() -> bool:
    """Whether this process's memory is offered (``PR_GET_MEMORY_MERGE``)."""
    return _libc.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) == 1
