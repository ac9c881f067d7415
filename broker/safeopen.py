"""Open a file for a client without following anything the client could plant.

``fd.open`` used to ``realpath`` a path and then open it: a directory swapped
for a symlink in between was followed, and the open happened before the type
check and without ``O_NONBLOCK`` (a FIFO blocked the broker's only thread; a
character device was opened, with whatever its driver does on open).

Here every open goes through ``openat2(2)``, relative to an ``O_PATH``
directory fd:

1. resolve the path with ``O_PATH`` (no driver is involved, nothing blocks)
   and ``fstat`` it: anything but a regular file or a block device is refused;
2. open it for real through the same resolution, always with ``O_NONBLOCK``
   (a FIFO swapped in meanwhile cannot block us), and refuse unless
   ``(st_dev, st_ino)`` equals what step 1 saw;
3. clear ``O_NONBLOCK`` again: the consumers do blocking I/O.

Resolution for token holders is ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS`` relative to the allowed directory, so no ``..``,
no absolute symlink and no ``/proc`` magic link can lead outside it. There
is no fallback: without ``openat2`` (Linux < 5.6) the broker refuses to open
files at all, with an error that says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from baton.wire import Code, RemoteError, errno_code

SYS_OPENAT2 = 437  # x86_64, aarch64 and every other arch with the generic table
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
O_PATH = getattr(os, "O_PATH", 0o10000000)

STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
# The administrator may name any absolute path, symlinks included; magic
# links (/proc/PID/fd/N) are still refused.
ADMIN = RESOLVE_NO_MAGICLINKS

MODE_FLAGS = {"ro": os.O_RDONLY, "rw": os.O_RDWR, "append": os.O_WRONLY | os.O_APPEND}


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """The raw system call; raises ``OSError`` (``ENOSYS`` on old kernels)."""
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, resolve)
    fd = _syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


@dataclass(frozen=True)
class Target:
    """Where to open: a directory (trusted, configured) and a path beneath it."""

    directory: str
    relative: str
    resolve: int


def _refusal(e: OSError, shown: str) -> RemoteError:
    if e.errno == errno.ENOSYS:
        return RemoteError(
            Code.UNAVAILABLE,
            "openat2(2) is not available (Linux >= 5.6 needed): the broker refuses to "
            "open files rather than resolve paths unsafely",
        )
    if e.errno == errno.ELOOP:
        return RemoteError(Code.DENIED, f"{shown}: the path contains a symlink (refused)")
    if e.errno == errno.EXDEV:
        return RemoteError(Code.DENIED, f"{shown}: the path leads outside its directory")
    if e.errno == errno.ENOENT:
        return RemoteError(Code.NOT_FOUND, f"{shown}: no such file")
    if e.errno in (errno.EACCES, errno.EPERM):
        return RemoteError(Code.DENIED, f"{shown}: {e.strerror}")
    if e.errno == errno.ENXIO:
        return RemoteError(Code.BAD_REQUEST, f"{shown}: not a regular file or block device")
    return RemoteError(Code.IO_ERROR, f"{shown}: {e.strerror}")


def _kind_ok(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)


def _kind_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_file(target: Target, mode: str, create: bool, shown: str) -> int:
    """Open ``target`` for ``mode``; only regular files and block devices.

    Raises ``RemoteError`` with a clear code and message for every refusal."""
    try:
        dirfd = os.open(target.directory, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise RemoteError(
            errno_code(e), f"cannot open directory {target.directory}: {e.strerror}"
        ) from None
    try:
        return _open_beneath(dirfd, target, mode, create, shown)
    finally:
        os.close(dirfd)


def _open_beneath(dirfd: int, target: Target, mode: str, create: bool, shown: str) -> int:
    real_flags = MODE_FLAGS[mode] | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    rel = target.relative
    try:
        probe = openat2(dirfd, rel, O_PATH | os.O_CLOEXEC, resolve=target.resolve)
    except OSError as e:
        if e.errno != errno.ENOENT or not create:
            raise _refusal(e, shown) from None
        # Create a fresh file: O_EXCL, so that whatever appears meanwhile is
        # never opened by this branch (and a FIFO or a device never created).
        try:
            fd = openat2(dirfd, rel, real_flags | os.O_CREAT | os.O_EXCL, 0o600, target.resolve)
        except OSError as e2:
            raise _refusal(e2, shown) from None
        return _finish(fd, None, shown)
    try:
        want = os.fstat(probe)
    finally:
        os.close(probe)
    if not _kind_ok(want):
        raise RemoteError(
            Code.BAD_REQUEST,
            f"{shown} is {_kind_name(want.st_mode)}: only regular files and block devices",
        )
    try:
        fd = openat2(dirfd, rel, real_flags, resolve=target.resolve)
    except OSError as e:
        raise _refusal(e, shown) from None
    return _finish(fd, want, shown)


def _finish(fd: int, want: os.stat_result | None, shown: str) -> int:
    try:
        got = os.fstat(fd)
        if not _kind_ok(got):
            raise RemoteError(
                Code.BAD_REQUEST,
                f"{shown} is {_kind_name(got.st_mode)}: only regular files and block devices",
            )
        if want is not None and (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
            raise RemoteError(Code.CONFLICT, f"{shown} was replaced while it was being opened")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd
