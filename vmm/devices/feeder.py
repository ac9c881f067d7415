"""A device fed from a host fd by a thread of its own: the serial console's input
pipe, a NIC's tap.

The thread takes input only while the device is not quiesced and has room
for it, so at a pause (``quiesce``, before a save) nothing read from the fd is
in flight: what the guest has not got is still in the fd's own queue, where
the next worker finds it. The device defines what room means (``_has_room``)
and how input is taken (``_take``), both called with ``_lock`` held.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading


class FdFeeder:
    #: poll events that, without POLLIN, mean nothing more will come from the fd
    gone_events = select.POLLHUP | select.POLLERR

    def __init__(self, fd: int | None, thread_name: str) -> None:
        self._feed_fd = fd
        self._thread_name = thread_name
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._quiesced = True
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None

    def _has_room(self) -> bool:  # pragma: no cover - each device says
        raise NotImplementedError

    def _take(self) -> None:  # pragma: no cover - each device says
        raise NotImplementedError

    def start(self) -> None:
        if self._feed_fd is None or self._thread is not None:
            return
        os.set_blocking(self._feed_fd, False)
        self._thread = threading.Thread(target=self._feed, name=self._thread_name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _feed(self) -> None:
        assert self._feed_fd is not None
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self._feed_fd, select.POLLIN)
        while True:
            with self._lock:
                while not self._closed and (self._quiesced or not self._has_room()):
                    self._room.wait()
                if self._closed:
                    return
            for fd, ev in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                    continue
                if ev & self.gone_events and not ev & select.POLLIN:
                    poller.unregister(fd)
                    continue
                with self._lock:
                    if not (self._quiesced or self._closed):
                        self._take()

    def quiesce(self) -> None:
        """Stop taking input from the fd (before a save): none is then in flight.
        The thread is not woken: under the lock it takes nothing once this is set,
        and a wake-up inside the guest's pause would compete for a CPU with the
        save; it parks on its own the next time it looks."""
        with self._lock:
            self._quiesced = True

    def unquiesce(self) -> None:
        with self._lock:
            self._quiesced = False
            self._room.notify_all()
        self._wake()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._room.notify_all()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)
