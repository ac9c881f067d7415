"""What code a long-lived process runs, so that it can tell when the files on
disk have moved on.

Why: a zygote (``vmm.zygote``) and a standby worker (``supervisor.standby``)
imported their modules when they started, possibly hours before the upgrade
that uses them. An operator who installs a new baton-vmm in place (the same
command, new files) expects the next ``vmctl upgrade`` to run the new code; a
fork of the old zygote, or the old standby, would run the old one and report
success. So each takes a stamp of every file it loaded (each module's file and
the interpreter) once it has imported everything, and whoever is about to use
it compares the stamp with the files as they are now: any file replaced,
changed or gone means the process is stale, and a fresh one is started instead.

A stamp is (device, inode, size, mtime in ns) per path: a reinstall writes new
files (new inodes), an edit in place changes size or mtime. Modules with no
file (built in, frozen) have nothing on disk to go stale.
"""

from __future__ import annotations

import os
import sys

#: path -> [st_dev, st_ino, st_size, st_mtime_ns]
Stamp = dict[str, list[int]]

#: the stamp a process took of itself (``remember``), inherited by its forks
_taken: Stamp | None = None


def _of(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def take() -> Stamp:
    """The stamp of every file this process has loaded code from, as they are now."""
    paths = {os.path.realpath(sys.executable)}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            paths.add(path)
    return {p: s for p in sorted(paths) if (s := _of(p)) is not None}


def remember() -> Stamp:
    """Take this process's stamp once, after its imports; a fork (a zygote's
    worker) keeps its parent's, which describes the code it really runs."""
    global _taken
    if _taken is None:
        _taken = take()
    return _taken


#: files one stamp may name (a worker loads a few hundred)
MAX_FILES = 10_000


def well_formed(stamp: object) -> bool:
    """Whether ``stamp``, as another process sent it, is a stamp ``changed`` can read."""
    return (
        isinstance(stamp, dict)
        and len(stamp) <= MAX_FILES
        and all(
            isinstance(p, str)
            and isinstance(s, list)
            and len(s) == 4
            and all(isinstance(x, int) for x in s)
            for p, s in stamp.items()
        )
    )


def changed(stamp: Stamp) -> str | None:
    """The first file of ``stamp`` that is not the one loaded (replaced, edited or
    gone), said for a log line; None if every file is as it was."""
    for path, was in stamp.items():
        now = _of(path)
        if now is None:
            return f"{path} is gone"
        if now != list(was):
            return f"{path} has changed"
    return None
