"""Request dispatch and the two server loops built on ``baton.wire``.

``Dispatcher`` maps op names to handlers with typed argument specs and turns
every failure into exactly one error reply. Two servers drive it:

* ``EventLoopServer``: one thread, epoll, non-blocking sockets with a
  per-connection outbox. The broker uses it: no locks around its fd table, and
  a client that stops reading its replies is back-pressured, then dropped,
  without stalling anyone else.
* ``ThreadedServer``: one thread per connection, blocking calls. The
  supervisor and the workers use it: their handlers may take a while (an
  upgrade, a pause) and must not hold up other clients.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from baton import wire
from baton.schema import Record, SchemaError, record
from baton.wire import Code, RemoteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """Credentials of the process at the other end, from SO_PEERCRED."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return cls(*struct.unpack("3i", raw))


@dataclass
class Request:
    id: int
    op: str
    args: dict[str, Any]
    token: str | None
    peer: Peer
    fds: list[int]
    _owned: bool = False

    def take_fds(self) -> list[int]:
        """Claim the received fds; otherwise they are closed after the handler."""
        self._owned = True
        return self.fds


@dataclass
class Result:
    """A handler's reply with fds. ``owned`` fds are closed once sent;
    ``after`` runs once the reply has left (used to exit or hand over)."""

    value: Any = None
    fds: Sequence[int] = ()
    owned: bool = False
    after: Callable[[], None] | None = None


Handler = Callable[..., Any]


def _check_envelope(msg: dict[str, Any]) -> tuple[int, str, dict[str, Any], str | None]:
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= wire.MAX_ID:
        raise RemoteError(
            Code.BAD_FRAME, f"request id must be an integer in 0..2^63-1, found {rid!r:.40}"
        )
    op = msg.get("op")
    if not isinstance(op, str) or not 0 < len(op) <= wire.MAX_OP_LEN:
        raise RemoteError(Code.BAD_FRAME, f"op must be a non-empty string, found {op!r:.40}")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise RemoteError(Code.BAD_REQUEST, f"args must be a map, found {type(args).__name__}")
    token = msg.get("token")
    if token is not None and (not isinstance(token, str) or len(token) > wire.MAX_TOKEN_LEN):
        raise RemoteError(Code.BAD_REQUEST, "token must be a string")
    return rid, op, args, token


class Dispatcher:
    """Op name -> (handler, argument spec). Handlers get ``(req, **args)``."""

    def __init__(self) -> None:
        self._ops: dict[str, tuple[Handler, Record]] = {}

    def add(self, name: str, handler: Handler, spec: Record) -> None:
        if name in self._ops:
            raise ValueError(f"op {name} registered twice")
        self._ops[name] = (handler, spec)

    def bind(self, obj: object) -> None:
        """Register every method of ``obj`` marked with ``@handles``."""
        for attr in dir(obj):
            fn = getattr(obj, attr)
            meta = getattr(fn, "_baton_op", None)
            if meta is not None:
                self.add(meta[0], fn, meta[1])

    def dispatch(
        self, msg: dict[str, Any], fds: list[int], peer: Peer
    ) -> tuple[dict[str, Any], Result]:
        """Run one request; never raises. Returns the reply and what to send."""
        rid = wire.request_id_of(msg)
        req: Request | None = None
        try:
            rid, op, args, token = _check_envelope(msg)
            entry = self._ops.get(op)
            if entry is None:
                raise RemoteError(Code.UNKNOWN_OP, f"unknown op {op!r}")
            handler, spec = entry
            try:
                checked = spec.check(args, "args")
            except SchemaError as e:
                raise RemoteError(Code.BAD_REQUEST, str(e)) from None
            req = Request(rid, op, checked, token, peer, fds)
            out = handler(req, **checked)
            result = out if isinstance(out, Result) else Result(out)
            return {"id": rid, "ok": True, "result": result.value}, result
        except RemoteError as e:
            return _error(rid, e.code, e.message), Result()
        except SchemaError as e:
            return _error(rid, Code.BAD_REQUEST, str(e)), Result()
        except OSError as e:
            return _error(rid, wire.errno_code(e), f"{e.strerror or e}"), Result()
        except Exception as e:
            log.exception("handler for %r failed", msg.get("op"))
            return _error(rid, Code.INTERNAL, f"internal error: {type(e).__name__}: {e}"), Result()
        finally:
            if req is None or not req._owned:
                wire.close_fds(fds)


def handles(op: str, /, **fields: Any) -> Callable[[Handler], Handler]:
    """Mark a method as the handler of ``name`` (see ``Dispatcher.bind``)."""
    spec = record(**fields)

    def deco(fn: Handler) -> Handler:
        fn._baton_op = (op, spec)  # type: ignore[attr-defined]
        return fn

    return deco


def _error(rid: int, code: Code | str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": str(code), "message": message}}


def frame_error_reply(e: wire.FrameError) -> dict[str, Any]:
    return _error(e.request_id, e.code, e.message)


# --------------------------------------------------------------------------
# Event loop server (single thread, epoll)

MAX_OUTBOX = 256
MAX_BATCH = 32  # connections accepted, and messages served per uid, per poll round


@dataclass
class _Conn:
    sock: socket.socket
    peer: Peer
    outbox: deque[tuple[bytes, list[int]]] = field(default_factory=deque)


class EventLoopServer:
    """Serve a dispatcher on one thread. Also watches extra fds for hang-up.

    Untrusted peers are bounded three ways: ``limits_for(peer)`` gives the
    decoding limits of each message (checked before anything is built),
    ``uid_limit(peer)`` caps the connections one uid may hold (None: no cap
    but ``max_conns``), and service is shared round-robin per uid, one
    message at a time, at most ``MAX_BATCH`` per uid per poll round, so one
    uid's many busy connections cannot starve anyone else."""

    def __init__(
        self,
        listener: socket.socket,
        dispatcher: Dispatcher,
        *,
        max_conns: int = 1024,
        limits_for: Callable[[Peer], wire.DecodeLimits] | None = None,
        uid_limit: Callable[[Peer], int | None] | None = None,
    ) -> None:
        self.listener = listener
        self.dispatcher = dispatcher
        self.max_conns = max_conns
        self.limits_for = limits_for
        self.uid_limit = uid_limit
        self.conns: dict[int, _Conn] = {}
        self._per_uid: dict[int, int] = {}
        self._hup: dict[int, Callable[[int], None]] = {}
        self._ep = select.epoll()
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        listener.setblocking(False)
        self._ep.register(listener.fileno(), select.EPOLLIN)
        self._ep.register(self._wake_r, select.EPOLLIN)

    # -- lifecycle
    def install_signal_wakeup(self) -> None:
        """Make signal handlers (which only set flags) wake the loop."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def stop(self) -> None:
        self._stop = True
        self.wake()

    def close(self) -> None:
        for fd in list(self.conns):
            self._drop(fd)
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
        self._ep.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def run(
        self,
        tick: Callable[[], None] | None = None,
        tick_interval: float = 1.0,
        busy_poll_us: int = 0,
    ) -> None:
        """Serve until ``stop()``. With ``busy_poll_us``, keep polling without
        sleeping for that long after the last event (adaptive polling, as KVM
        halt-polling does): a client's next request is then picked up without
        the cost of waking an idle CPU."""
        busy_until = 0
        while not self._stop:
            try:
                if busy_poll_us and time.monotonic_ns() < busy_until:
                    events = self._ep.poll(0)
                    if not events:
                        os.sched_yield()  # a client on this CPU gets to run
                        continue
                else:
                    events = self._ep.poll(tick_interval)
            except InterruptedError:
                events = []
            if events and busy_poll_us:
                busy_until = time.monotonic_ns() + busy_poll_us * 1000
            ready: list[tuple[int, int]] = []
            for fd, ev in events:
                if self._stop:
                    break
                if fd == self.listener.fileno():
                    self._accept()
                elif fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_r, 512):
                            pass
                elif fd in self.conns:
                    ready.append((fd, ev))
                elif fd in self._hup:
                    self._hung_up(fd)
            if ready and not self._stop:
                self._serve_fairly(ready)
            if tick is not None:
                tick()

    # -- hang-up watches (systemd fd-store semantics)
    def watch_hangup(self, fd: int, callback: Callable[[int], None]) -> bool:
        """Call ``callback(fd)`` when ``fd`` reports EPOLLHUP/EPOLLERR.

        Returns False for fds epoll cannot watch (regular files, memfds)."""
        try:
            self._ep.register(fd, 0)
        except (PermissionError, FileExistsError, OSError):
            return False
        self._hup[fd] = callback
        return True

    def unwatch(self, fd: int) -> None:
        if self._hup.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def _hung_up(self, fd: int) -> None:
        cb = self._hup.pop(fd)
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(fd)
        cb(fd)

    # -- connections
    def adopt(self, sock: socket.socket, peer: Peer | None = None) -> None:
        """Serve an already-connected socket (accepted here or inherited)."""
        sock.setblocking(False)
        if peer is None:
            try:
                peer = Peer.of(sock)
            except OSError:
                sock.close()
                return
        self.conns[sock.fileno()] = _Conn(sock, peer)
        self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
        self._ep.register(sock.fileno(), select.EPOLLIN)

    def connections_of(self, uid: int) -> int:
        return self._per_uid.get(uid, 0)

    def _refuse(self, sock: socket.socket, code: Code, message: str) -> None:
        """Say why (an error with id 0, about the connection), then close.

        Shut down first and drain what the peer already sent: closing a unix
        socket with unread data makes the peer's next read fail with
        ECONNRESET before it could read our reason."""
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            wire.send_datagram(sock, wire.pack(_error(0, code, message)), [])
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
            for _ in range(wire.MAX_FDS):
                data, anc, _flags, _ = sock.recvmsg(1, socket.CMSG_SPACE(4 * (wire.MAX_FDS + 2)))
                wire.close_fds(wire.fds_from_ancillary(anc))
                if not data and not anc:
                    break
        sock.close()

    def _accept(self) -> None:
        for _ in range(MAX_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", e)
                return
            if len(self.conns) >= self.max_conns:
                log.warning("refusing connection: %d connections open", len(self.conns))
                self._refuse(sock, Code.BUSY, f"the server has {len(self.conns)} connections open")
                continue
            try:
                peer = Peer.of(sock)
            except OSError:
                sock.close()
                continue
            cap = self.uid_limit(peer) if self.uid_limit is not None else None
            if cap is not None and self.connections_of(peer.uid) >= cap:
                log.warning(
                    "refusing connection from pid %d: uid %d has %d connections open",
                    peer.pid,
                    peer.uid,
                    self.connections_of(peer.uid),
                )
                self._refuse(
                    sock,
                    Code.QUOTA,
                    f"uid {peer.uid} already has {cap} connections open "
                    "(broker.max_connections_per_uid)",
                )
                continue
            self.adopt(sock, peer)

    def _drop(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is None:
            return
        uid = conn.peer.uid
        left = self._per_uid.get(uid, 1) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(fd)
        for _, fds in conn.outbox:
            wire.close_fds(fds)
        conn.sock.close()

    def _serve_fairly(self, ready: list[tuple[int, int]]) -> None:
        """Serve ready connections round-robin by uid, one message per turn.

        Each uid gets at most ``MAX_BATCH`` messages this round, spread over
        its connections; epoll is level-triggered, so whatever is left is
        reported again by the next poll."""
        queues: dict[int, deque[tuple[int, int]]] = {}
        for fd, ev in ready:
            queues.setdefault(self.conns[fd].peer.uid, deque()).append((fd, ev))
        budget = dict.fromkeys(queues, MAX_BATCH)
        turns = deque(queues)
        while turns and not self._stop:
            uid = turns.popleft()
            queue = queues[uid]
            fd, ev = queue.popleft()
            if fd in self.conns and self._service(fd, ev):
                queue.append((fd, select.EPOLLIN))
            budget[uid] -= 1
            if queue and budget[uid] > 0:
                turns.append(uid)

    def _service(self, fd: int, ev: int) -> bool:
        """Flush, then read at most one message. True if it may have more."""
        conn = self.conns[fd]
        if ev & select.EPOLLOUT and not self._flush(conn):
            return False
        if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not conn.outbox:
            return self._read_one(conn)
        return False

    def _read_one(self, conn: _Conn) -> bool:
        fd = conn.sock.fileno()
        limits = self.limits_for(conn.peer) if self.limits_for is not None else wire.DEFAULT_LIMITS
        try:
            msg, fds = wire.recv_message(conn.sock, limits)
        except (BlockingIOError, InterruptedError):
            return False
        except (wire.ConnectionClosed, ConnectionResetError):
            self._drop(fd)
            return False
        except wire.FrameError as e:
            return self._reply(conn, frame_error_reply(e), Result()) and not conn.outbox
        except OSError as e:
            log.warning("receive from pid %d failed: %s", conn.peer.pid, e)
            self._drop(fd)
            return False
        reply, result = self.dispatcher.dispatch(msg, fds, conn.peer)
        sent = self._reply(conn, reply, result)
        if result.after is not None:
            result.after()
        return sent and not conn.outbox and fd in self.conns and not self._stop

    def _reply(self, conn: _Conn, msg: dict[str, Any], result: Result) -> bool:
        """Send (or queue) a reply. False if the connection was dropped."""
        fd = conn.sock.fileno()
        try:
            data, send_fds, blob = wire.encode(msg, result.fds)
        except (ValueError, TypeError) as e:
            data, send_fds, blob = wire.encode(_error(msg["id"], Code.INTERNAL, str(e)))
        try:
            if not conn.outbox:
                try:
                    wire.send_datagram(conn.sock, data, send_fds)
                    return True
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._drop(fd)
                    return False
            if len(conn.outbox) >= MAX_OUTBOX:
                log.warning("dropping pid %d: it does not read its replies", conn.peer.pid)
                self._drop(fd)
                return False
            # Queue private copies: the originals may be closed before we send.
            conn.outbox.append((data, [os.dup(f) for f in send_fds]))
            self._ep.modify(fd, select.EPOLLOUT)
            return True
        finally:
            if blob is not None:
                os.close(blob)
            if result.owned:
                wire.close_fds(result.fds)

    def _flush(self, conn: _Conn) -> bool:
        fd = conn.sock.fileno()
        while conn.outbox:
            data, fds = conn.outbox[0]
            try:
                wire.send_datagram(conn.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._drop(fd)
                return False
            conn.outbox.popleft()
            wire.close_fds(fds)
        self._ep.modify(fd, select.EPOLLIN)
        return True


# --------------------------------------------------------------------------
# Threaded server (one thread per connection)


class ThreadedServer:
    """Serve a dispatcher with one thread per connection (blocking I/O).

    Bounded like the broker's server: at most ``max_conns`` connections (one
    more is told why with an error of id 0, then closed), ``allow(peer)``
    refuses a peer before any thread is made for it, and a connection that
    sends nothing for ``idle_timeout`` seconds between requests is closed (a
    request that runs long, such as an upgrade, is never cut). The accept
    loop survives any exception: it logs, backs off briefly and goes on."""

    def __init__(
        self,
        listener: socket.socket,
        dispatcher: Dispatcher,
        name: str = "rpc",
        *,
        max_conns: int = 256,
        idle_timeout: float | None = None,
        allow: Callable[[Peer], str | None] | None = None,
    ) -> None:
        self.listener = listener
        self.dispatcher = dispatcher
        self.name = name
        self.max_conns = max_conns
        self.idle_timeout = idle_timeout
        #: None to serve the peer, or why not (the refusal's message)
        self.allow = allow
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._thread.start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self.listener.accept()
            except InterruptedError:
                continue
            except OSError as e:
                if self._closed:
                    return
                log.warning("%s: accept failed: %s", self.name, e)
                time.sleep(0.05)  # EMFILE: back off briefly, keep serving
                continue
            try:
                self._admit(sock)
            except Exception:  # never let one connection end the accept loop
                log.exception("%s: cannot serve a connection", self.name)
                with contextlib.suppress(OSError):
                    sock.close()
                time.sleep(0.05)

    def _admit(self, sock: socket.socket) -> None:
        peer = Peer.of(sock)
        why = self.allow(peer) if self.allow is not None else None
        if why is not None:
            log.warning("%s: refusing pid %d (uid %d): %s", self.name, peer.pid, peer.uid, why)
            _refuse(sock, Code.DENIED, why)
            return
        if self.connections >= self.max_conns:
            log.warning(
                "%s: refusing pid %d: %d connections open", self.name, peer.pid, self.max_conns
            )
            _refuse(sock, Code.BUSY, f"the server has {self.max_conns} connections open")
            return
        self.serve_connection(sock, peer)

    def serve_connection(self, sock: socket.socket, peer: Peer | None = None) -> threading.Thread:
        t = threading.Thread(
            target=self._serve, args=(sock, peer), name=f"{self.name}-conn", daemon=True
        )
        with self._lock:
            self._conns.add(sock)
        try:
            t.start()
        except BaseException:  # no thread (RuntimeError: can't start new thread)
            with self._lock:
                self._conns.discard(sock)
            _refuse(sock, Code.BUSY, "the server cannot start a thread for this connection")
            raise
        return t

    def _wait_request(self, sock: socket.socket) -> bool:
        """Until the next request arrives (True) or the connection is idle too long."""
        if self.idle_timeout is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        deadline = time.monotonic() + self.idle_timeout
        while not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(InterruptedError):
                if poller.poll(min(remaining, 1.0) * 1000):
                    return True
        return False

    def _serve(self, sock: socket.socket, peer: Peer | None) -> None:
        try:
            peer = peer or Peer.of(sock)
            while not self._closed:
                if not self._wait_request(sock):
                    log.debug("%s: closing pid %d's idle connection", self.name, peer.pid)
                    break
                try:
                    msg, fds = wire.recv_message(sock)
                except wire.FrameError as e:
                    wire.send_message(sock, frame_error_reply(e))
                    continue
                reply, result = self.dispatcher.dispatch(msg, fds, peer)
                try:
                    wire.send_message(sock, reply, result.fds)
                except (ValueError, TypeError) as e:
                    wire.send_message(sock, _error(reply["id"], Code.INTERNAL, str(e)))
                finally:
                    if result.owned:
                        wire.close_fds(result.fds)
                if result.after is not None:
                    result.after()
        except (wire.ConnectionClosed, ConnectionResetError, BrokenPipeError):
            pass
        except OSError as e:
            if not self._closed:
                log.debug("connection ended: %s", e)
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()


def _refuse(sock: socket.socket, code: Code, message: str) -> None:
    """Say why (an error with id 0, about the connection), then close."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        wire.send_datagram(sock, wire.pack(_error(0, code, message)), [])
        # Read what the peer already sent: closing on unread data would reset the
        # connection, and the peer might never see why.
        for _ in range(16):
            _, fds, _, _ = socket.recv_fds(sock, 1, 64)
            wire.close_fds(fds)
    sock.close()
