"""The handoff's state through shared memory instead of socket datagrams.

On the nested hosts Baton runs on, a syscall that moves data is slow and
cold inside the pause: receiving the 11.5 KB frame costs the new worker
30-110 us of CPU (``recvmsg_into``, 3.7 us when hot), sending it the old one
~35 us. Copying through memory that both map needs no system call; it is
not free either (the old worker's copy costs about what its ``sendmsg`` did:
the lines come from the other CPU), so the gain is the receive's
(docs/benchmarks.md, "shm branch").

So the new worker, before the pause, makes a sealed memfd (``Inbox``: it can
neither shrink nor grow, no seal can be added, and its size is exactly
``SIZE``), maps it and passes it with its pre-wake word (``contract.PREWAKE``,
SCM_RIGHTS). The old worker checks what it got (``Outbox.adopt``: a memfd,
those seals, that size; anything else is closed and the socket used as
before), and inside the pause copies each raw frame section there and
publishes it: its number and length in one word after the bytes (release),
one C call (``baton_shm_put``). The new worker spins on that word in C and polls the
channel now and then (``baton_shm_wait``): a datagram still carries the
state from a sender that does not use the memory, and the channel's close
says the old worker is gone. After its spin it sleeps in poll, having asked
for a doorbell (a tiny ``RING_OP`` message the sender sends only then).

The receiver copies each published section out of the shared pages before
anything looks at it (the sender may still write there) and bounds its
length by what is left of the buffer; then it is checked exactly as a
datagram's bytes are. The bytes themselves are the frame's, unchanged.

Old and new workers mix either way: an older old worker closes the fd it did
not expect and sends datagrams, which the new one takes as before; an older
new worker sends no fd, so the state goes by datagram. ``BATON_VMM_SHM=0``
turns it off (no fd offered, none used): the A/B switch.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from collections.abc import Sequence
from typing import Any

from vmm import state
from vmm._kvm import ffi, lib

ENABLED = os.environ.get("BATON_VMM_SHM", "1") != "0"
#: The header (one cache line: ``struct baton_shm_head``), then room for one raw frame.
HEAD = int(lib.BATON_SHM_HEAD)
SIZE = HEAD + state.FRAME_RAW_MAX
#: Publications one handoff can make there (the head, the vCPUs).
SLOTS = int(lib.BATON_SHM_SLOTS)
#: What the sealed memfd must carry, and no more (writes stay allowed: that is its point).
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_WRITE_SEALS = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
#: The doorbell for a receiver asleep in poll: a message, never a state.
RING_OP = "state.ring"
#: The receiver's poll(0) of the channel while it spins on the word.
POLL_NS = 20_000
_MADV_POPULATE_WRITE = 23
#: What each side's rehearsal copies (about a 1-vCPU frame).
REHEARSE = 12 << 10
#: Faulted in on both sides before the pause: a frame of ~10 vCPUs (one is 11.5 KB).
#: Beyond, a larger frame's pages fault in the pause (the whole buffer costs ~0.2 ms more).
POPULATE = min(SIZE, 128 << 10)


class _Mapping:
    """``SIZE`` bytes of a memfd mapped shared, the first ``POPULATE`` faulted in now
    (not in the pause)."""

    def __init__(self, fd: int) -> None:
        err = ffi.new("int *")
        ptr = lib.baton_map_shared(fd, SIZE, 0, err)
        if ptr == ffi.NULL:
            raise OSError(err[0], f"mapping the state buffer: {os.strerror(err[0])}")
        self.ptr: Any = ptr
        if lib.baton_madvise(ptr, POPULATE, _MADV_POPULATE_WRITE) < 0:  # older kernels:
            ffi.buffer(ptr + HEAD, POPULATE - HEAD)[:] = bytes(POPULATE - HEAD)
        self.cursor = 0  # where the next publication's bytes go, after the header

    def close(self) -> None:
        if self.ptr is not None:
            lib.baton_unmap(self.ptr, SIZE)
            self.ptr = None


class Inbox(_Mapping):
    """The new worker's end: the memfd it offers, and the sections published there."""

    def __init__(self) -> None:
        fd = os.memfd_create("baton-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, SIZE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            super().__init__(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.taken = 0  # sections taken from here

    def offered(self) -> None:
        """The fd has gone with the pre-wake (the peer holds its own copy)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def wait(self, k: int, fd: int, spin_ns: int, timeout_ms: int) -> int | None:
        """Publication ``k``'s length once it is published, or None once ``fd`` is
        readable first; raises TimeoutError after ``timeout_ms``."""
        length = ffi.new("uint32_t *")
        r = lib.baton_shm_wait(self.ptr, k, fd, spin_ns, timeout_ms, POLL_NS, length)
        if r < 0:
            raise OSError(-r, f"waiting for the state: {os.strerror(-r)}")
        if r == 0:
            raise TimeoutError
        return int(length[0]) if r == 1 else None

    def take(self, length: int) -> bytes:
        """A published section, copied out of the shared pages (checked only then)."""
        room = SIZE - HEAD - self.cursor
        if not 0 < length <= room:
            raise ValueError(f"a section of {length} bytes published, {room} bytes left there")
        data = self._copy(length)
        self.cursor += length
        self.taken += 1
        return data

    def rehearse(self) -> None:
        """``take``'s copy, of whatever is where the next section goes, thrown away:
        its code and pages warm before the pause (cold, tens of us here)."""
        self._copy(min(REHEARSE, SIZE - HEAD - self.cursor))

    def _copy(self, length: int) -> bytes:
        return bytes(ffi.buffer(self.ptr + HEAD + self.cursor, length))

    def close(self) -> None:
        self.offered()
        super().close()


class Outbox(_Mapping):
    """The old worker's end: the peer's memfd, once it passed every check."""

    @classmethod
    def adopt(cls, fds: Sequence[int]) -> Outbox | None:
        """The one fd that came with the pre-wake as an ``Outbox``, or None (use the
        socket) for none, several or one that fails a check. Every fd is closed."""
        try:
            if len(fds) == 1 and _acceptable(fds[0]):
                return cls(fds[0])
        except OSError:
            pass
        finally:
            for fd in fds:
                os.close(fd)
        return None

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.published = 0
        self._lock = threading.Lock()  # no unmap under a put (a pause that timed out)

    def put(self, k: int, pieces: Sequence[Any]) -> bool | None:
        """Copy ``pieces`` there as publication ``k`` and publish it; None if it does
        not fit (send it on the socket), else whether the receiver asked for a ring."""
        size = sum(len(p) for p in pieces)
        with self._lock:
            if self.ptr is None or not 1 <= k <= SLOTS:
                return None
            if not 0 < size <= SIZE - HEAD - self.cursor:
                return None
            ring = self._copy(k, pieces)
            self.cursor += size
            self.published += 1
            return ring

    def rehearse(self) -> None:
        """``put`` of zeros where the first section goes, published as nothing (slot
        0 is none): its code and pages warm before the pause (cold, tens of us here).
        The receiver reads only what is published."""
        with self._lock:
            if self.ptr is not None:
                self._copy(0, [bytes(REHEARSE)])

    def _copy(self, k: int, pieces: Sequence[Any]) -> bool:
        """One C call (``baton_shm_put``): the copy, then publication ``k``."""
        src = [ffi.from_buffer(p) for p in pieces]
        lens = ffi.new("long[]", [len(p) for p in pieces])
        return bool(lib.baton_shm_put(self.ptr, k, self.cursor, src, lens, len(src)))

    def close(self) -> None:
        with self._lock:
            super().close()


def _acceptable(fd: int) -> bool:
    """A memfd with ``SEALS`` (nobody can shrink it under our stores), no seal
    against writes, and exactly ``SIZE`` bytes."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != SIZE:
        return False
    if not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
        return False
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return seals & SEALS == SEALS and not seals & _WRITE_SEALS
