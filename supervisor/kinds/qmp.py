"""A small synchronous QMP client for driving stock QEMU workers (stdlib only).

Why our own: the supervisor is synchronous and single-threaded, needs exact control over
timeouts, and must be able to tell "QEMU refused" (QmpError) from "QEMU is gone" (QmpClosed)
from "QEMU is slow" (QmpTimeout) during a live upgrade. Asynchronous events are kept with
QEMU's own timestamps, so pause times (old STOP -> new RESUME) are measured by QEMU's clock
rather than by when we happened to read the socket.

One JSON object per line in both directions; every command carries an "id" that QEMU echoes,
so a reply that arrives after its command timed out is recognised and dropped.
"""

from __future__ import annotations

import collections
import itertools
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 10.0
_MAX_LINE = 16 * 1024 * 1024  # a QMP reply bigger than this means something is badly wrong


class QmpError(Exception):
    """QEMU answered a command with an error reply (the command did not take effect)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpClosed(ConnectionError):
    """The QMP connection hit EOF or broke: QEMU exited, crashed or closed the monitor."""


class QmpTimeout(TimeoutError):
    """No reply or event in time; the connection is still usable (late replies are dropped)."""


class QmpProtocolError(Exception):
    """QEMU sent something that is not QMP (wrong greeting, malformed JSON)."""


@dataclass(frozen=True)
class QmpEvent:
    """An asynchronous event; ``timestamp`` is QEMU's wall clock (seconds since the epoch)."""

    name: str
    data: dict[str, Any]
    timestamp: float
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> QmpEvent:
        ts = msg.get("timestamp") or {}
        seconds = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        return cls(name=msg["event"], data=msg.get("data") or {}, timestamp=seconds, raw=msg)


class QmpClient:
    """One QMP session. Not thread-safe: use it from one thread, like the rest of the supervisor.

    Build it with :meth:`connect` (a unix socket path) or directly from an already connected
    stream socket (e.g. our end of a socketpair whose other end QEMU got via
    ``-chardev socket,id=mon,fd=N``). Either way the greeting is read and capabilities are
    negotiated before the constructor returns."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._events: collections.deque[QmpEvent] = collections.deque()
        self._closed = False
        self._gone: str | None = None  # why the connection is dead, once we know it is
        try:
            greeting = self._read_message(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise QmpProtocolError(f"expected a QMP greeting, got {greeting!r}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path: str | Path, timeout: float = DEFAULT_TIMEOUT) -> QmpClient:
        """Connect to QEMU's ``-qmp unix:PATH,server=on,wait=off`` (or -chardev) socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout=timeout)

    # -- public API

    @property
    def version(self) -> str:
        """QEMU's version as "major.minor.micro", from the greeting."""
        v = self.greeting.get("version", {}).get("qemu", {})
        return f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}"

    def fileno(self) -> int:
        """The socket's fd, so a caller can select()/poll() for readability (events, EOF)."""
        return self._sock.fileno()

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        fds: Sequence[int] = (),
    ) -> Any:
        """Run one command and return its "return" value; events read meanwhile are queued.

        ``fds`` go along with the command as SCM_RIGHTS (for ``getfd``/``add-fd``): that is how
        a running QEMU gets e.g. its end of a migration socketpair without any socket path.
        Raises QmpError on an error reply, QmpTimeout, or QmpClosed if QEMU went away."""
        request_id = f"baton-{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments is not None:
            request["arguments"] = arguments
        deadline = time.monotonic() + timeout
        self._send(request, fds)
        while True:
            msg = self._read_message(deadline, what=command)
            if "event" in msg:
                self._events.append(QmpEvent.from_message(msg))
                continue
            reply_id = msg.get("id")
            if reply_id is None and "error" in msg:
                # QEMU could not even parse the request far enough to echo the id.
                raise self._error(command, msg["error"])
            if reply_id != request_id:
                continue  # the late reply to an earlier command that timed out
            if "error" in msg:
                raise self._error(command, msg["error"])
            return msg.get("return")

    def wait_event(
        self,
        name: str,
        timeout: float = DEFAULT_TIMEOUT,
        match: Callable[[QmpEvent], bool] | None = None,
    ) -> QmpEvent:
        """Remove and return the first queued or future event called ``name`` (and matching).

        Other events stay queued in order, so waiting for RESUME does not lose a STOP. Queued
        means *stale* too: a QEMU that was a migration destination still holds its own
        MIGRATION "completed"; call clear_events() before starting a step you wait on."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self._events:
                if event.name == name and (match is None or match(event)):
                    self._events.remove(event)
                    return event
            msg = self._read_message(deadline, what=f"event {name}")
            if "event" in msg:
                self._events.append(QmpEvent.from_message(msg))
            # a stray reply (to a command that timed out earlier) is dropped

    def poll_events(self) -> list[QmpEvent]:
        """Read whatever is already on the socket without blocking; return all queued events."""
        while True:
            try:
                msg = self._read_message(time.monotonic(), what="events")
            except QmpTimeout:
                break
            if "event" in msg:
                self._events.append(QmpEvent.from_message(msg))
        events = list(self._events)
        self._events.clear()
        return events

    def events(self) -> list[QmpEvent]:
        """The events queued so far (without reading the socket); leaves them queued."""
        return list(self._events)

    def clear_events(self) -> None:
        """Forget every event so far, also those still unread on the socket: call it before a
        step whose events you wait on, so that an old event cannot be taken for a new one."""
        self.poll_events()

    def close(self) -> None:
        """Close our end; QEMU keeps running (closing QMP does not stop or kill it)."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    @staticmethod
    def _error(command: str, error: dict[str, Any]) -> QmpError:
        return QmpError(command, str(error.get("class", "?")), str(error.get("desc", error)))

    def _dead(self, reason: str) -> QmpClosed:
        """Remember that the connection is gone, so later calls fail fast with the first reason."""
        if self._gone is None:
            self._gone = reason
        return QmpClosed(reason)

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self._closed:
            raise QmpClosed("QMP client is closed")
        if self._gone is not None:
            raise QmpClosed(self._gone)
        data = json.dumps(message).encode() + b"\n"
        try:
            self._sock.settimeout(None)
            if fds:
                # SCM_RIGHTS rides on the first chunk; whatever the kernel did not take of
                # the command goes after it with sendall.
                sent = socket.send_fds(self._sock, [data], list(fds))
                data = data[sent:]
            self._sock.sendall(data)
        except OSError as e:  # EPIPE/ECONNRESET: QEMU is gone
            raise self._dead(f"QMP send failed, QEMU gone? ({e})") from e

    def _read_message(self, deadline: float, what: str = "greeting") -> dict[str, Any]:
        """The next JSON object from QEMU, waiting until ``deadline`` (time.monotonic())."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    raise QmpProtocolError(f"malformed QMP message {line[:200]!r}") from e
                if not isinstance(msg, dict):
                    raise QmpProtocolError(f"QMP message is not an object: {line[:200]!r}")
                return msg
            if self._closed:
                raise QmpClosed("QMP client is closed")
            if self._gone is not None:
                raise QmpClosed(self._gone)
            if len(self._buf) > _MAX_LINE:
                raise QmpProtocolError("QMP message too long")
            remaining = deadline - time.monotonic()
            try:
                # settimeout(0) makes recv non-blocking: poll_events() relies on that.
                self._sock.settimeout(max(remaining, 0.0))
                chunk = self._sock.recv(65536)
            except (TimeoutError, BlockingIOError) as e:
                raise QmpTimeout(f"QMP: timed out waiting for {what}") from e
            except OSError as e:
                raise self._dead(f"QMP connection broke waiting for {what}: {e}") from e
            if not chunk:
                raise self._dead(f"QMP connection closed by QEMU waiting for {what} (QEMU exited?)")
            self._buf += chunk
