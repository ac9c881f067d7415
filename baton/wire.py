"""The one wire protocol every Baton process speaks.

Transport: ``AF_UNIX`` + ``SOCK_SEQPACKET``. One ``sendmsg`` is one message
and one ``recvmsg`` returns exactly that message, together with the fds that
travelled with it as ``SCM_RIGHTS``. There is no framing to get wrong, a bad
message never desynchronises the stream, and an fd can never arrive attached
to the wrong message (with ``SOCK_STREAM`` the kernel ties fds to a byte
position, so a short read can split a message from its fds).

Payload: one msgpack map per datagram. Requests are
``{"id": int, "op": str, "args": map, "token": str?, "nfds": int?}``; each
request gets exactly one reply, ``{"id", "ok": true, "result", "nfds"?}`` or
``{"id", "ok": false, "error": {"code", "message"}}``. ``nfds`` says how many
fds ride with the message; a mismatch is an error and the fds are closed.

Messages larger than ``MAX_INLINE`` travel in a sealed memfd: the datagram
is ``{"blob": size}`` and the memfd is the first fd. That keeps every datagram
below the default socket buffer (no ``SO_SNDBUFFORCE`` needed) while state
blobs of many vCPUs still fit under ``MAX_MESSAGE``.

Received fds are always close-on-exec (``MSG_CMSG_CLOEXEC``), and every fd
that arrives with a message that is rejected is closed before the error is
raised. See docs/protocol.md.
"""

from __future__ import annotations

import _thread
import array
import contextlib
import errno
import fcntl
import itertools
import os
import select
import socket
import time
from enum import StrEnum

import msgpack

# Every vmctl command imports this module, so it imports neither typing (~5 ms of
# a start here), threading nor pathlib: their names are for the type checker only
# (mypy and ruff read any name TYPE_CHECKING as typing.TYPE_CHECKING).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any

PROTOCOL_VERSION = 1
MAX_INLINE = 64 * 1024
MAX_MESSAGE = 16 * 1024 * 1024
MAX_FDS = 128
# Ancillary space for more fds than we accept, so a sender that exceeds the
# limit is seen (and its fds closed) rather than silently truncated.
_CMSG_FDS = MAX_FDS + 2
_CMSG_SPACE = socket.CMSG_SPACE(_CMSG_FDS * 4)
MAX_ID = 2**63 - 1
MAX_OP_LEN = 64
MAX_TOKEN_LEN = 256

_SEALS_REQUIRED = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class Code(StrEnum):
    """Stable error codes; clients branch on these, never on messages."""

    BAD_FRAME = "bad-frame"
    TOO_LARGE = "too-large"
    TOO_MANY_FDS = "too-many-fds"
    FD_MISMATCH = "fd-mismatch"
    BAD_REQUEST = "bad-request"
    UNKNOWN_OP = "unknown-op"
    NOT_FOUND = "not-found"
    EXISTS = "exists"
    DENIED = "denied"
    CONFLICT = "conflict"
    BUSY = "busy"
    STALE = "stale"  # a run lease asked for by an instance whose state is out of date
    INVALID_STATE = "invalid-state"
    INCOMPATIBLE = "incompatible"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    IO_ERROR = "io-error"
    QUOTA = "quota"
    INTERNAL = "internal"


class WireError(Exception):
    """Base of every protocol-level failure."""


class ConnectionClosed(WireError):
    """The peer closed the connection (or died)."""


class WireTimeout(WireError):
    """No reply arrived before the deadline."""


class FrameError(WireError):
    """A message that cannot be accepted; its fds are already closed."""

    def __init__(self, code: Code, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class RemoteError(WireError):
    """An error reply: raised by handlers to produce one, by clients on receipt."""

    def __init__(self, code: Code | str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        try:
            self.code: Code | str = Code(code)
        except ValueError:
            self.code = code
        self.message = message


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


class DecodeLimits:
    """What decoding one message may cost, checked before any object is built.

    The defaults are the protocol's limits. A server facing untrusted peers
    (the broker) passes tighter ones sized to its request schemas: a message
    of 16 MiB of empty maps would otherwise become a gigabyte of Python
    objects before any authorisation could refuse it.

    A plain class with slots rather than a typing.NamedTuple (the reason is at
    the imports above); treat one as immutable: limits are shared constants."""

    __slots__ = ("max_bin", "max_depth", "max_message", "max_objects", "max_str")

    def __init__(
        self,
        max_message: int = MAX_MESSAGE,
        max_objects: int | None = None,
        max_depth: int = 32,
        max_str: int | None = None,
        max_bin: int | None = None,
    ) -> None:
        self.max_message = max_message  # bytes, blob included; <= MAX_INLINE: no blobs
        self.max_objects = max_objects  # msgpack objects per message (None: unchecked)
        self.max_depth = max_depth  # container nesting, with max_objects
        self.max_str = max_str  # bytes per string (None: the message size)
        self.max_bin = max_bin  # bytes per binary (None: the message size)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"DecodeLimits({fields})"


DEFAULT_LIMITS = DecodeLimits()
# For a document this process wrote itself (the broker's hand-over memfd).
TRUSTED_LIMITS = DecodeLimits(max_message=1 << 40)


def _fixed_len(data: bytes | memoryview, pos: int, size: int) -> int:
    if pos + size > len(data):
        raise ValueError("truncated msgpack header")
    return int.from_bytes(data[pos : pos + size], "big")


# First byte -> (header bytes to read as a length, what the length counts):
# "skip" a payload of that many bytes, "items" array items, "pairs" map pairs.
_VARIABLE = {
    0xC4: (1, "skip"),
    0xC5: (2, "skip"),
    0xC6: (4, "skip"),
    0xD9: (1, "skip"),
    0xDA: (2, "skip"),
    0xDB: (4, "skip"),
    0xDC: (2, "items"),
    0xDD: (4, "items"),
    0xDE: (2, "pairs"),
    0xDF: (4, "pairs"),
}
_FIXED_PAYLOAD = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED_PAYLOAD.update({0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})


def check_budget(data: bytes | memoryview, max_objects: int, max_depth: int) -> None:
    """Walk the msgpack headers of ``data`` without building anything; raise
    ``ValueError`` past ``max_objects`` objects or ``max_depth`` nesting.

    Its cost is bounded by ``max_objects``, whatever the input."""
    pos = 0
    count = 0
    stack = [1]  # items still to read at each open level; every level is an ancestor
    while stack:
        if stack[-1] == 0:
            stack.pop()
            continue
        stack[-1] -= 1
        count += 1
        if count > max_objects:
            raise ValueError(f"more than {max_objects} msgpack objects in one message")
        if pos >= len(data):
            raise ValueError("truncated msgpack data")
        b = data[pos]
        pos += 1
        children = 0
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            pass
        elif b <= 0x8F:
            children = 2 * (b & 0x0F)
        elif b <= 0x9F:
            children = b & 0x0F
        elif b <= 0xBF:
            pos += b & 0x1F
        elif b in _FIXED_PAYLOAD:
            pos += _FIXED_PAYLOAD[b]
        elif b in _VARIABLE:
            size, what = _VARIABLE[b]
            n = _fixed_len(data, pos, size)
            pos += size
            if what == "skip":
                pos += n
            else:
                children = n if what == "items" else 2 * n
        else:  # 0xc1 (never used) and every extension type
            raise ValueError(f"msgpack type byte 0x{b:02x} is not part of the protocol")
        if children:
            if children > max_objects:
                raise ValueError(f"more than {max_objects} msgpack objects in one message")
            if len(stack) >= max_depth:
                raise ValueError(f"msgpack nesting deeper than {max_depth}")
            stack.append(children)
    if pos > len(data):
        raise ValueError("truncated msgpack data")


def unpack(data: bytes | memoryview, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """Decode untrusted msgpack with explicit limits on every container."""
    limit = len(data)
    if limits.max_objects is not None:
        check_budget(data, limits.max_objects, limits.max_depth)
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        use_list=True,
        timestamp=0,
        ext_hook=_refuse_ext,
        max_str_len=limit if limits.max_str is None else min(limit, limits.max_str),
        max_bin_len=limit if limits.max_bin is None else min(limit, limits.max_bin),
        max_array_len=min(limit, 1 << 20, limits.max_objects or limit),
        max_map_len=min(limit, 1 << 18, limits.max_objects or limit),
        max_ext_len=0,
    )


def sealed_memfd(data: bytes, name: str = "baton-msg") -> int:
    """A memfd holding ``data``, sealed so that nobody can change it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS_REQUIRED | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_sealed_memfd(fd: int, size: Any, max_size: int = MAX_MESSAGE) -> bytes:
    """Read a peer's sealed memfd, refusing unsealed or wrongly sized ones."""
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= max_size:
        raise FrameError(Code.TOO_LARGE, f"blob size {size!r} outside 1..{max_size}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise FrameError(Code.BAD_FRAME, "blob fd is not a sealable memfd") from e
    if seals & _SEALS_REQUIRED != _SEALS_REQUIRED:
        raise FrameError(Code.BAD_FRAME, "blob memfd is not sealed against writes")
    if os.fstat(fd).st_size != size:
        raise FrameError(Code.BAD_FRAME, "blob memfd size does not match the envelope")
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            raise FrameError(Code.BAD_FRAME, "blob memfd shorter than announced")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def encode(msg: dict[str, Any], fds: Sequence[int] = ()) -> tuple[bytes, list[int], int | None]:
    """Pack ``msg`` for one datagram: (payload, fds to send, blob fd to close)."""
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} fds exceed the limit of {MAX_FDS} per message")
    if fds:
        msg = {**msg, "nfds": len(fds)}
    data = pack(msg)
    if len(data) <= MAX_INLINE:
        return data, list(fds), None
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    blob = sealed_memfd(data)
    return pack({"blob": len(data)}), [blob, *fds], blob


def send_message(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message with its fds (the caller keeps its copies of them)."""
    data, send_fds, blob = encode(msg, fds)
    try:
        send_datagram(sock, data, send_fds)
    finally:
        if blob is not None:
            os.close(blob)


def send_datagram(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent != len(data):  # cannot happen on SOCK_SEQPACKET, but never assume
        raise WireError(f"short send: {sent} of {len(data)} bytes")


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def request_id_of(obj: Any) -> int:
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID:
            return rid
    return 0


def recv_buffer(size: int = MAX_INLINE + 1) -> bytearray:
    """A buffer for ``recv_message(buf=...)``: by default the largest inline
    datagram and one byte."""
    return bytearray(size)  # zero-filled: its pages are faulted in now


def recv_message(
    sock: socket.socket, limits: DecodeLimits = DEFAULT_LIMITS, buf: bytearray | None = None
) -> tuple[dict[str, Any], list[int]]:
    """Receive one message and its fds, decoded within ``limits``.

    ``buf`` (``recv_buffer``): receive into it rather than into a new 64 KiB
    byte string (allocated and faulted in on each call: tens of microseconds
    inside a guest's pause on a nested host); the message must then be
    decoded before ``buf`` is used again, as it is here.

    Raises ``ConnectionClosed`` at EOF, ``BlockingIOError`` on a non-blocking
    socket with nothing to read, and ``FrameError`` (after closing every fd
    that came with it) for anything malformed or over a limit.
    """
    msg, fds = recv_message_or_raw(sock, None, limits, buf)
    assert isinstance(msg, dict)
    return msg, fds


def recv_message_or_raw(
    sock: socket.socket,
    raw_prefix: bytes | None,
    limits: DecodeLimits = DEFAULT_LIMITS,
    buf: bytearray | None = None,
) -> tuple[dict[str, Any] | bytes, list[int]]:
    """``recv_message``, except that a datagram that starts with ``raw_prefix``
    and carries no fds is not a message but a peer's raw payload (the
    handoff's state frame, which its receiver validates itself), returned as
    bytes. ``buf`` may then be larger than a message can be: it bounds the
    payload (a longer one is refused); messages keep their own limit."""
    data: bytes | memoryview
    if buf is None:
        data, ancdata, flags, _ = sock.recvmsg(MAX_INLINE + 1, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    else:
        n, ancdata, flags, _ = sock.recvmsg_into([buf], _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        data = memoryview(buf)[:n]
    fds = fds_from_ancillary(ancdata)
    if not data and not fds and not flags & socket.MSG_TRUNC:
        raise ConnectionClosed("peer closed the connection")
    if raw_prefix and not fds and data[: len(raw_prefix)] == raw_prefix:
        if flags & socket.MSG_TRUNC:
            raise FrameError(Code.TOO_LARGE, f"raw datagram larger than {len(data)} bytes")
        return bytes(data), fds
    try:
        return _decode(data, fds, flags, limits)
    except BaseException:
        close_fds(fds)
        raise


def _decode(
    data: bytes | memoryview, fds: list[int], flags: int, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], list[int]]:
    if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS + 1:
        raise FrameError(Code.TOO_MANY_FDS, f"more than {MAX_FDS} fds in one message")
    if flags & socket.MSG_TRUNC or len(data) > min(MAX_INLINE, limits.max_message):
        raise FrameError(
            Code.TOO_LARGE, f"datagram larger than {min(MAX_INLINE, limits.max_message)} bytes"
        )
    try:
        msg = unpack(data, limits)
    except Exception as e:
        raise FrameError(Code.BAD_FRAME, f"undecodable message: {e}") from None
    if not isinstance(msg, dict):
        raise FrameError(Code.BAD_FRAME, f"message must be a map, found {type(msg).__name__}")
    if "blob" in msg:
        if not fds:
            raise FrameError(Code.FD_MISMATCH, "blob envelope without its memfd")
        blob_fd = fds.pop(0)
        try:
            if limits.max_message <= MAX_INLINE:
                raise FrameError(
                    Code.TOO_LARGE,
                    f"this peer may send messages of at most {limits.max_message} bytes (no blobs)",
                )
            inner = read_sealed_memfd(blob_fd, msg["blob"], limits.max_message)
        finally:
            os.close(blob_fd)
        try:
            msg = unpack(inner, limits)
        except Exception as e:
            raise FrameError(Code.BAD_FRAME, f"undecodable blob message: {e}") from None
        if not isinstance(msg, dict) or "blob" in msg:
            raise FrameError(Code.BAD_FRAME, "blob must hold one message map")
    nfds = msg.get("nfds", 0)
    if not isinstance(nfds, int) or isinstance(nfds, bool) or nfds != len(fds):
        raise FrameError(
            Code.TOO_MANY_FDS if len(fds) > MAX_FDS else Code.FD_MISMATCH,
            f"message announces {nfds!r} fds but {len(fds)} arrived",
            request_id_of(msg),
        )
    if len(fds) > MAX_FDS:
        raise FrameError(Code.TOO_MANY_FDS, f"{len(fds)} fds exceed the limit of {MAX_FDS}")
    return msg, fds


def wait_readable(fd: int, timeout_ms: int, spin_us: int = 0) -> bool:
    """Is ``fd`` readable within ``timeout_ms``? The first ``spin_us`` are spent
    polling awake (yielding the CPU to anyone else runnable on it) rather than
    asleep: on hosts where waking a thread on an idle CPU costs 50-1000 us
    (nested virtualisation, a loaded host) a message expected any moment is
    cheaper to wait for awake."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    end = time.monotonic_ns() + spin_us * 1000
    while spin_us and time.monotonic_ns() < end:
        if poller.poll(0):
            return True
        os.sched_yield()
    remaining = timeout_ms - spin_us // 1000
    return bool(poller.poll(max(0, remaining)))


def make_seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def listen(path: Path, mode: int = 0o600, backlog: int = 128, gid: int = -1) -> socket.socket:
    """Bind a SEQPACKET listener at ``path`` with ``mode`` (and group ``gid``, -1: ours),
    replacing a stale one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(tmp))
        if gid >= 0:
            try:
                os.chown(tmp, -1, gid)
            except PermissionError:  # not ours to give (no root): no group gets it
                mode &= ~0o070
        os.chmod(tmp, mode)
        sock.listen(backlog)
        # rename is atomic: clients never see a socket with the wrong mode.
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sock


class Reply:
    """A successful reply: its result and the fds that came with it (caller owns them).

    A plain class, not a dataclass: ``dataclasses`` (with ``inspect``) is a tenth
    of vmctl's start-up, and every vmctl command imports this module."""

    __slots__ = ("fds", "result")

    def __init__(self, result: Any, fds: list[int] | None = None) -> None:
        self.result = result
        self.fds: list[int] = [] if fds is None else fds

    def __repr__(self) -> str:
        return f"Reply(result={self.result!r}, fds={self.fds!r})"

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds = []


class Connection:
    """A blocking client connection: one request, one reply.

    Thread-safe; concurrent callers are serialised. ``token`` is attached to
    every request (the broker authorises per request, so a revoked token stops
    working at once).
    """

    def __init__(
        self, sock: socket.socket, *, token: str | None = None, timeout: float | None = 30.0
    ) -> None:
        self.sock = sock
        self.token = token
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lock = _thread.allocate_lock()  # threading.Lock, without importing threading
        # Poll this long for the reply before sleeping. On hosts where waking a
        # thread on an idle CPU costs 50-100 us (nested virtualisation) a reply
        # expected within tens of microseconds is cheaper to wait for awake.
        self.spin_us = 0

    @classmethod
    def connect(
        cls, path: Path | str, *, token: str | None = None, timeout: float | None = 30.0
    ) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            sock.close()
            raise
        return cls(sock, token=token, timeout=timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_request(
        self, op: str, args: dict[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> int:
        """Send a request without waiting; pair with ``wait_reply``."""
        rid = next(self._ids)
        msg: dict[str, Any] = {"id": rid, "op": op, "args": args or {}}
        if self.token is not None:
            msg["token"] = self.token
        try:
            send_message(self.sock, msg, fds)
        except (BrokenPipeError, ConnectionResetError) as e:
            self._raise_refusal()
            raise ConnectionClosed(f"peer closed the connection: {e}") from None
        return rid

    def _raise_refusal(self) -> None:
        """If the server said why it closed (an error with id 0), raise that."""
        err = None
        with contextlib.suppress(OSError, WireError):  # (not the RemoteError below)
            self.sock.setblocking(False)
            try:
                msg, fds = recv_message(self.sock)
            finally:
                self.sock.setblocking(True)
            close_fds(fds)
            err = msg.get("error") if msg.get("id") == 0 else None
        if isinstance(err, dict):
            raise RemoteError(str(err.get("code", Code.INTERNAL)), str(err.get("message", "")))

    def wait_reply(self, rid: int, timeout: float | None = None) -> Reply:
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.spin_us:
            wait_readable(self.sock.fileno(), 0, self.spin_us)
        while True:
            if deadline is None:
                self.sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WireTimeout("no reply before the deadline")
                self.sock.settimeout(remaining)
            try:
                msg, fds = recv_message(self.sock)
            except TimeoutError:
                raise WireTimeout("no reply before the deadline") from None
            except FrameError as e:
                raise WireError(f"malformed reply: {e.message}") from None
            except (ConnectionResetError, BrokenPipeError) as e:
                raise ConnectionClosed(f"peer closed the connection: {e}") from None
            if msg.get("id") == 0 and msg.get("ok") is False and isinstance(msg.get("error"), dict):
                # Our ids start at 1: an error with id 0 is about the connection
                # (e.g. refused by a per-uid connection limit), not a late reply.
                close_fds(fds)
                err = msg["error"]
                raise RemoteError(str(err.get("code", Code.INTERNAL)), str(err.get("message", "")))
            if msg.get("id") != rid:
                close_fds(fds)  # a late reply to a request that timed out
                continue
            if msg.get("ok") is True:
                return Reply(msg.get("result"), fds)
            close_fds(fds)
            err = msg.get("error")
            if isinstance(err, dict):
                raise RemoteError(str(err.get("code", Code.INTERNAL)), str(err.get("message", "")))
            raise WireError(f"malformed reply: {msg!r:.200}")

    def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        fds: Sequence[int] = (),
        timeout: float | None = None,
    ) -> Reply:
        with self._lock:
            rid = self.send_request(op, args, fds)
            return self.wait_reply(rid, timeout)


def errno_code(e: OSError) -> Code:
    """Map an OSError from a handler to the closest stable code."""
    if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return Code.NOT_FOUND
    if e.errno in (errno.EACCES, errno.EPERM):
        return Code.DENIED
    if e.errno == errno.EEXIST:
        return Code.EXISTS
    if e.errno in (errno.EBUSY, errno.EAGAIN):
        return Code.BUSY
    if e.errno in (errno.EINVAL, errno.E2BIG, errno.EFBIG, errno.ENAMETOOLONG):
        return Code.BAD_REQUEST
    return Code.IO_ERROR
