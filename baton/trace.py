"""Timeline marks across processes, for ``bench/coldstart.py``: off unless
``BATON_TRACE`` names a file.

Why: a cold start crosses the supervisor, the zygote, the zygote's fork and the
jailed worker, and no one process can time it. Each mark is one line,
``TRACE <CLOCK_MONOTONIC ns> <pid> <name>``, appended to that file, or written to
stderr (a worker's log) where the file cannot be opened (a jailed worker, once its
root has changed). CLOCK_MONOTONIC is one clock for every process on the host, so
the marks of all of them line up. ``BATON_*`` variables reach jailed workers'
environments, so one variable in the supervisor's turns every mark on.
"""

from __future__ import annotations

import contextlib
import os
import time

ENV = "BATON_TRACE"


def mark(name: str) -> None:
    """One mark now; nothing at all (one dict lookup) unless tracing is on."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = f"TRACE {time.monotonic_ns()} {os.getpid()} {name}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except OSError:
        with contextlib.suppress(OSError):
            os.write(2, line)
        return
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
