"""A suspended VM's image on disk: its RAM, its device state, and a manifest.

``DIR/NAME/`` holds three files:

    ram.img        the RAM memfd's populated pages at their own offsets, the
                   rest holes (a sparse file as large as the guest's RAM)
    state.bin      the worker's versioned device state (what an upgrade sends)
    manifest.json  versions, sizes, disks, NICs and a sha256 per piece of RAM
                   (a populated stretch, cut at 16 MiB)

The manifest is written last, atomically (temporary file, fsync, rename,
directory fsync), after both other files are fsynced: an image without one
is a torn suspend and is never resumed. Populated pages are found with
SEEK_DATA/SEEK_HOLE on the memfd, so RAM the guest never touched costs no
read, no write and no disk block.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from baton.durable import fsync_dir, write_atomic
from baton.wire import MAX_MESSAGE, Code

FORMAT = 1
MANIFEST = "manifest.json"
RAM_FILE = "ram.img"
STATE_FILE = "state.bin"
PIECE = 16 << 20  # the most bytes one checksum covers
MAX_THREADS = 4  # hashing and copying pieces in parallel
SPACE_MARGIN = 4 << 20  # state, manifest and metadata blocks, beyond the RAM itself
MAX_FILE = MAX_MESSAGE  # the manifest or the state: the state must fit one message anyway


class ImageError(Exception):
    """An image that cannot be written or must not be resumed; the message says why."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Region:
    """A piece of populated RAM (at most PIECE bytes): offset, length, its sha256."""

    offset: int
    length: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    vm: str
    baton_version: str
    worker_kind: str
    worker_version: str
    state_versions: dict[str, int]  # the version each component was written at
    ram_size: int
    state_size: int
    state_sha256: str
    regions: list[Region]
    disks: list[dict[str, Any]] = field(default_factory=list)  # name, path, read_only
    nets: list[dict[str, Any]] = field(default_factory=list)  # name, mac
    suspended_at: float = 0.0  # CLOCK_REALTIME
    machine: str = ""  # QEMU: the machine type the device state belongs to
    format: int = FORMAT

    @property
    def populated_bytes(self) -> int:
        return sum(r.length for r in self.regions)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes, where: Path) -> Manifest:
        try:
            d = json.loads(raw)
            if d.get("format") != FORMAT:
                raise ImageError(
                    Code.INCOMPATIBLE,
                    f"{where}: image format {d.get('format')!r}, this Baton reads {FORMAT}",
                )
            regions = [
                Region(int(r["offset"]), int(r["length"]), str(r["sha256"])) for r in d["regions"]
            ]
            return cls(
                vm=str(d["vm"]),
                baton_version=str(d["baton_version"]),
                worker_kind=str(d["worker_kind"]),
                worker_version=str(d["worker_version"]),
                state_versions={str(k): int(v) for k, v in d["state_versions"].items()},
                ram_size=int(d["ram_size"]),
                state_size=int(d["state_size"]),
                state_sha256=str(d["state_sha256"]),
                regions=regions,
                disks=list(d.get("disks", [])),
                nets=list(d.get("nets", [])),
                suspended_at=float(d.get("suspended_at", 0.0)),
                machine=str(d.get("machine", "")),
            )
        except ImageError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ImageError(Code.BAD_REQUEST, f"{where}: unreadable manifest: {e!r}") from None


# ------------------------------------------------------------------ RAM


def populated(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every populated stretch of ``fd`` (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == 6:  # ENXIO: no data after pos
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def populated_bytes(fd: int) -> int:
    return sum(length for _, length in populated(fd, os.fstat(fd).st_size))


def check_space(directory: Path, need: int) -> None:
    """Refuse before anything is stopped if ``directory``'s file system cannot take
    ``need`` bytes plus the margin."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    free = st.f_bavail * st.f_frsize
    if free < need + SPACE_MARGIN:
        raise ImageError(
            Code.QUOTA,
            f"{directory}: {free >> 20} MiB free, the image needs {(need + SPACE_MARGIN) >> 20} "
            f"MiB ({need >> 20} MiB of populated RAM); nothing was stopped",
        )


def pieces(memfd: int, size: int) -> list[tuple[int, int]]:
    """The populated stretches cut into pieces of at most PIECE bytes: each piece
    gets its own checksum, so pieces hash and copy on several threads (hashlib
    and pwrite/preadv release the GIL) and a bad one is named precisely."""
    out = []
    for off, length in populated(memfd, size):
        out += [(p, min(PIECE, off + length - p)) for p in range(off, off + length, PIECE)]
    return out


def _threads() -> int:
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def write_ram(memfd: int, path: Path) -> list[Region]:
    """Copy the memfd's populated pages to ``path`` at the same offsets (a sparse
    file), hashing each piece on the way; fsynced before it returns."""
    size = os.fstat(memfd).st_size
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(out, size)
        with mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:

            def copy(piece: tuple[int, int]) -> Region:
                off, length = piece
                with memoryview(mm) as view, view[off : off + length] as chunk:
                    digest = hashlib.sha256(chunk).hexdigest()
                    done = 0
                    while done < length:
                        done += os.pwrite(out, chunk[done:], off + done)
                return Region(off, length, digest)

            with ThreadPoolExecutor(_threads(), thread_name_prefix="ram-write") as pool:
                regions = list(pool.map(copy, pieces(memfd, size)))
        os.fsync(out)
    finally:
        os.close(out)
    return regions


def read_ram(path: Path, memfd: int, m: Manifest) -> None:
    """Fill a fresh memfd from ``path``, checking every piece's sha256. Raises
    ImageError naming the first piece or size that is wrong."""
    size = os.fstat(memfd).st_size
    if size != m.ram_size:
        raise ImageError(
            Code.INCOMPATIBLE, f"the image holds {m.ram_size} bytes of RAM, the VM has {size}"
        )
    for r in m.regions:
        if r.offset < 0 or r.length <= 0 or r.offset + r.length > size:
            raise ImageError(
                Code.BAD_REQUEST, f"manifest region {r.offset:#x}+{r.length:#x} is outside RAM"
            )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise ImageError(Code.IO_ERROR, f"{path}: {e.strerror}") from None
    try:
        have = os.fstat(fd).st_size
        if have != m.ram_size:
            raise ImageError(
                Code.IO_ERROR,
                f"{path} is {have} bytes, the manifest says {m.ram_size}: truncated or not "
                "this image",
            )
        with mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:

            def fill(r: Region) -> None:
                with memoryview(mm) as view, view[r.offset : r.offset + r.length] as chunk:
                    done = 0
                    while done < r.length:
                        n = os.preadv(fd, [chunk[done:]], r.offset + done)
                        if n <= 0:
                            raise ImageError(
                                Code.IO_ERROR, f"{path}: short read at {r.offset + done:#x}"
                            )
                        done += n
                    if hashlib.sha256(chunk).hexdigest() != r.sha256:
                        raise ImageError(
                            Code.IO_ERROR,
                            f"{path}: RAM region {r.offset:#x}+{r.length:#x} fails its checksum",
                        )

            with ThreadPoolExecutor(_threads(), thread_name_prefix="ram-read") as pool:
                for _ in pool.map(fill, m.regions):  # the first failure raises here
                    pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------ images


def write_image(directory: Path, memfd: int, state: bytes, meta: dict[str, Any]) -> Manifest:
    """RAM, then state, then (last, atomically) the manifest; all fsynced. On any
    failure the partial image is removed and the error goes on."""
    if (directory / MANIFEST).exists():
        raise ImageError(Code.EXISTS, f"{directory} already holds a suspended image")
    remove(directory)  # a torn earlier attempt: nothing in it is worth keeping
    directory.mkdir(parents=True, mode=0o700)
    try:
        fsync_dir(directory.parent)
        regions = write_ram(memfd, directory / RAM_FILE)
        write_atomic(directory / STATE_FILE, state)
        m = Manifest(
            **meta,
            ram_size=os.fstat(memfd).st_size,
            state_size=len(state),
            state_sha256=hashlib.sha256(state).hexdigest(),
            regions=regions,
        )
        write_atomic(directory / MANIFEST, m.to_json())
        return m
    except BaseException:
        remove(directory)
        raise


def read_image(directory: Path) -> tuple[Manifest, bytes]:
    """The manifest and the state, both checked; the RAM is checked by ``read_ram``."""
    mpath = directory / MANIFEST
    try:
        m = Manifest.parse(_read_file(mpath), mpath)
        state = _read_file(directory / STATE_FILE)
    except FileNotFoundError as e:
        raise ImageError(
            Code.NOT_FOUND, f"{e.filename}: missing (a torn or removed image)"
        ) from None
    except OSError as e:
        raise ImageError(Code.IO_ERROR, f"{directory}: {e}") from None
    if len(state) != m.state_size or hashlib.sha256(state).hexdigest() != m.state_sha256:
        raise ImageError(Code.IO_ERROR, f"{directory / STATE_FILE}: fails its checksum")
    return m, state


def _read_file(path: Path, limit: int = MAX_FILE) -> bytes:
    """A regular file's bytes, at most ``limit``: a symlink, a FIFO (which would
    block this thread) or a device where the image's file belongs is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(Code.BAD_REQUEST, f"{path} is a symlink, not an image file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(Code.BAD_REQUEST, f"{path} is not a regular file")
        if st.st_size > limit:
            raise ImageError(
                Code.BAD_REQUEST, f"{path} is {st.st_size} bytes, more than an image's {limit}"
            )
        data = os.pread(fd, limit + 1, 0)
        if len(data) > limit:
            raise ImageError(Code.BAD_REQUEST, f"{path} grew past {limit} bytes while read")
        return data
    finally:
        os.close(fd)


def remove(directory: Path) -> None:
    """Delete an image (or what a failed suspend left of one)."""
    for name in (MANIFEST, STATE_FILE, RAM_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    with contextlib.suppress(OSError):
        for leftover in directory.glob(".*.tmp"):
            leftover.unlink()
        directory.rmdir()
