"""Each VM's console log is bounded: rotated by copy and truncate, as logrotate's
``copytruncate`` does.

The log (``DIR/var/log/baton/NAME.console.log``) is one open file shared by
many writers for its whole life: the broker holds it ``O_APPEND`` and hands
it to every worker of the VM (baton-vmm's UART, QEMU's ``-chardev
file,append=on``), across upgrades. Renaming it would leave them all writing
to the renamed file, and replacing the fd in every running worker is
intrusive. So the supervisor, in its housekeeping, copies a log that passed
``[supervisor] console_log_max_bytes`` to ``NAME.console.log.1`` (shifting
older copies up to ``console_log_keep``), then truncates the original to
zero: ``O_APPEND`` writers simply go on at the new end.

The cost of this design: bytes the guest writes between the end of the copy
and the truncate are lost (the copy reads until it catches up, so the window
is one ``read`` plus one ``ftruncate`` long: microseconds), and a reader
following the file sees it shrink (``vmctl logs -f`` starts again at 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("supervisor.consolelog")
CHUNK = 1 << 20


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_if_needed(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` if it is over ``max_bytes``; True if it was."""
    try:
        if os.stat(path).st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(keep - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(rotated(path, i), rotated(path, i + 1))
    tmp = path.with_name(f".{path.name}.1.tmp")
    src = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            copied, limit = 0, os.fstat(src).st_size * 2 + CHUNK  # a fast guest cannot keep us
            while copied < limit and (data := os.read(src, CHUNK)):
                os.write(dst, data)
                copied += len(data)
            os.ftruncate(src, 0)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    os.replace(tmp, rotated(path, 1))
    log.info("%s: rotated (%d bytes kept as %s)", path.name, copied, rotated(path, 1).name)
    return True
