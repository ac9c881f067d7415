"""Waiting awake inside a guest's pause: bounded spins in C instead of sleeps.

On the nested hosts Baton runs on, waking a thread that sleeps on an idle CPU
costs 200-1,100 us (the host has to wake the idle vCPU of our own VM; this
guest kernel's haltpoll is configured not to poll), more than the pause's own
work. So no thread the pause depends on sleeps inside it; each waits awake,
for a bounded time:

* the new worker's vCPU-0 thread, from the moment it is warm: it says so on
  the state channel (the pre-wake, ``baton.contract.PREWAKE``) and waits for
  the state awake; the old worker starts pausing only once that word has
  come, so its own wake-up for it is paid while the guest still runs;
* the old worker's vCPU-0 thread, for the other vCPUs to park;
* the new worker's other vCPU threads, from the state's arrival to their
  resume (told then, while vCPU 0 validates and applies, not after).

The waits are C loops in the cffi module (``baton_wait_readable``,
``baton_spin_until``, ``baton_park_wait``): cffi releases the GIL around
them, so a waiting thread holds no Python lock the working thread needs, a
parked vCPU says it is parked without then making anyone wait for its GIL,
and a resumed one enters KVM_RUN straight from C. Each spin iteration yields
the CPU to anything else runnable there, and after its bound every wait goes
on asleep, so a handoff that never comes costs no CPU.

``BATON_VMM_AWAKE=0`` in a worker's environment turns all of it off (no
pre-wake in the hello, no spins, the parked wait on the condition as before):
the A/B switch of ``bench.vmm --awake off|ab``.
"""

from __future__ import annotations

import os

from vmm._kvm import ffi, lib

#: The new worker, from saying it is ready to the state: the old worker's wake-up,
#: pause and save (1-2 ms; a few when the host is loaded).
STATE_SPIN_NS = 20_000_000
#: The old worker, for the new one to say it is ready (asleep: the guest still runs).
READY_TIMEOUT_MS = 10_000
#: vCPU 0 waiting for another vCPU to park after the kick.
PARK_SPIN_NS = 5_000_000
#: Another vCPU, from the state's arrival to its resume (validate and apply).
RESUME_SPIN_NS = 10_000_000

ENABLED = os.environ.get("BATON_VMM_AWAKE", "1") != "0"


def wait_readable(fd: int, timeout_ms: int, spin_ns: int) -> bool:
    """Is ``fd`` readable (or hung up) within ``timeout_ms``, the first ``spin_ns``
    awake? ``spin_ns`` is ignored when waiting awake is off."""
    r = lib.baton_wait_readable(fd, spin_ns if ENABLED else 0, timeout_ms)
    if r < 0:
        raise OSError(-r, f"waiting for the state channel: {os.strerror(-r)}")
    return bool(r)


def spin_until(word: object, want: int, spin_ns: int) -> bool:
    """Wait awake at most ``spin_ns`` until the ``uint32_t[1]`` ``word`` holds
    ``want``; False if the bound passed first (or waiting awake is off)."""
    if not ENABLED or spin_ns <= 0:
        return False
    return bool(lib.baton_spin_until(word, want, spin_ns) == 1)


class Flag:
    """A word one thread sets and another may wait on awake (``spin``), beside the
    condition variable that remains the sleeping way to wait for it."""

    def __init__(self) -> None:
        self.ptr = ffi.new("uint32_t[1]")  # for C code that sets or reads it

    def set(self, value: bool) -> None:
        self.ptr[0] = int(value)

    def __bool__(self) -> bool:
        return bool(self.ptr[0])

    def spin(self, spin_ns: int) -> bool:
        """Wait awake at most ``spin_ns`` until set; False if the bound passed first
        (or waiting awake is off)."""
        return spin_until(self.ptr, 1, spin_ns)
