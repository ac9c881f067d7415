"""The worker's control socket: hello, status, pause, resume, save, load, quit,
and the two halves of a live handoff. Every failure is an error reply; the
worker keeps running."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from baton import __version__, codestamp, contract, wire
from baton.rpc import Request, Result, handles
from baton.schema import AnyMap, Bool, Bytes, Int, optional
from baton.wire import Code, RemoteError
from vmm import awake, faults, idle_merge, state, state_shm
from vmm.machine import Machine, MachineError

WORKER_KIND = "baton-vmm"


@dataclass
class WorkerInfo:
    vm: str
    instance: str
    started_at: float = field(default_factory=time.time)


def _channel(req: Request) -> socket.socket:
    """The socket-pair end the supervisor handed us for the state transfer."""
    fds = req.take_fds()
    if len(fds) != 1:
        wire.close_fds(fds)
        raise RemoteError(Code.FD_MISMATCH, "a handoff takes exactly one fd: the state channel")
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError:
        os.close(fds[0])
        raise RemoteError(Code.BAD_REQUEST, "the state channel is not a socket") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.close()
        raise RemoteError(Code.BAD_REQUEST, "the state channel must be an AF_UNIX SOCK_SEQPACKET")
    return sock


def _machine_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Machine and state failures become error replies with stable codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MachineError as e:
            raise RemoteError(Code.INVALID_STATE, str(e)) from None
        except state.IncompatibleState as e:
            raise RemoteError(Code.INCOMPATIBLE, str(e)) from None
        except state.StateError as e:
            raise RemoteError(Code.BAD_REQUEST, f"state refused: {e}") from None

    return wrapper


def _take_memory_back() -> float:
    """A standby's merged pages, private again before it loads anything (``vmm.idle_merge``):
    their copy-on-write faults would otherwise come inside the guest's pause."""
    try:
        return idle_merge.leave()
    except OSError as e:
        raise RemoteError(Code.UNAVAILABLE, f"cannot take merged memory back: {e}") from None


class Control:
    def __init__(self, machine: Machine, info: WorkerInfo, on_quit: Callable[[], None]) -> None:
        self.machine = machine
        self.info = info
        self.on_quit = on_quit

    @handles("hello")
    def hello(self, req: Request) -> dict[str, Any]:
        return self.hello_info()

    def hello_info(self) -> dict[str, Any]:
        """The hello, also said on the ready pipe (``contract.READY_HELLO_ENV``)."""
        return {
            "service": "vmm",
            "kind": WORKER_KIND,
            "version": __version__,
            "pid": os.getpid(),
            "vm": self.info.vm,
            "instance": self.info.instance,
            "started_at": self.info.started_at,
            "state": self.machine.state,
            "state_versions": state.versions(self.machine.device_parts()),
            contract.HANDOFF_FEATURES: _features(),
        }

    @handles("code")
    def code(self, req: Request) -> dict[str, Any]:
        """The files this worker's code came from, as they were when it loaded them
        (``baton.codestamp``): the supervisor compares them with the disk before an
        upgrade takes this worker as its standby."""
        return {"stamp": codestamp.remember()}

    @handles("status")
    def status(self, req: Request) -> dict[str, Any]:
        return {
            **self.machine.status(),
            "pid": os.getpid(),
            "version": __version__,
            "instance": self.info.instance,
            "uptime_s": round(time.time() - self.info.started_at, 3),
        }

    @handles("pause")
    @_machine_errors
    def pause(self, req: Request) -> dict[str, Any]:
        return self.machine.pause()

    @handles("resume")
    @_machine_errors
    def resume(self, req: Request) -> dict[str, Any]:
        return self.machine.resume()

    @handles("save", versions=optional(AnyMap(16)))
    @_machine_errors
    def save(self, req: Request, versions: dict[str, Any] | None) -> dict[str, Any]:
        t0 = time.monotonic_ns()
        blob = self.machine.save(_versions(versions))
        return {"state": blob, "size": len(blob), "save_us": (time.monotonic_ns() - t0) / 1000}

    @handles("load", state=Bytes(1, state.MAX_STATE), from_image=optional(Bool(), False))
    @_machine_errors
    def load(self, req: Request, state: bytes, from_image: bool) -> dict[str, Any]:
        """``from_image``: a suspend image's state (``Machine.load``)."""
        _take_memory_back()
        return self.machine.load(state, from_image)

    @handles("quit")
    def quit(self, req: Request) -> Result:
        return Result({"pid": os.getpid()}, after=self.on_quit)

    @handles(
        "handoff.send",
        versions=optional(AnyMap(16)),
        prewake=optional(Bool(), False),
        frame=optional(Bool(), False),
    )
    @_machine_errors
    def handoff_send(
        self, req: Request, versions: dict[str, Any] | None, prewake: bool, frame: bool
    ) -> dict[str, Any]:
        """Pause, save at the negotiated versions and send the state to the new worker.
        ``prewake`` (``contract.PREWAKE``, only where both hellos list it): pause
        only once the new worker says on the channel that it waits awake.
        ``frame`` (``contract.STATE_FRAME``, likewise): the state as a frame, in
        one raw datagram when it fits (``state.FRAME_RAW_MAX``), or through the
        memory the new worker offered with its pre-wake (``vmm.state_shm``)."""
        outbox: list[state_shm.Outbox] = []  # the new worker's memfd, if it offered a good one
        sent = [0]  # sections sent so far, either way (the receiver counts them too)
        with _channel(req) as ch:
            if frame:  # room for the frame in one datagram (capped by the host's wmem_max)
                ch.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * state.FRAME_RAW_MAX)

            def send(pieces: list[Any]) -> None:
                """One datagram of ``pieces`` (gathered by the kernel, not joined here),
                or one publication in the shared memory."""
                sent[0] += 1
                first = bytes(pieces[0][:8])
                raw = first.startswith((state.FRAME_MAGIC, state.VCPUS_MAGIC))
                if raw and outbox:
                    ring = outbox[0].put(sent[0], pieces)
                    if ring:  # the receiver sleeps in poll: a doorbell
                        _send(ch, state_shm.RING_OP, {}, "the new worker")
                    if ring is not None:
                        return
                if raw and sum(len(p) for p in pieces) <= state.FRAME_RAW_MAX:
                    try:
                        ch.sendmsg(pieces)
                        return
                    except OSError as e:
                        if e.errno != errno.EMSGSIZE:
                            raise RemoteError(
                                Code.UNAVAILABLE, f"the new worker is gone: {e}"
                            ) from None
                # too large for one datagram here: a message carries it (a sealed memfd)
                _send(ch, "state", {"state": b"".join(pieces)}, "the new worker")

            def await_ready() -> None:
                deadline_ns = time.monotonic_ns() + awake.READY_TIMEOUT_MS * 1_000_000
                fds: list[int] = []
                what = "its word that it is ready"
                msg = _recv(ch, deadline_ns, 0, "the new worker", what, fds_out=fds)
                if msg.get("op") != contract.PREWAKE:
                    wire.close_fds(fds)
                    raise RemoteError(
                        Code.BAD_REQUEST, f"expected {contract.PREWAKE!r}, found {msg.get('op')!r}"
                    )
                if not (state_shm.ENABLED and frame):
                    wire.close_fds(fds)
                elif box := state_shm.Outbox.adopt(fds):  # which closes every fd
                    box.rehearse()  # the pause comes next
                    outbox.append(box)

            try:
                out = self.machine.handoff_out(
                    send,
                    _versions(versions),
                    before_pause=await_ready if prewake else None,
                    frame=frame,
                )
            finally:
                for box in outbox:
                    box.close()  # refuses any later put (a pause that timed out)
            out["shm_sections"] = outbox[0].published if outbox else 0
            return out

    @handles(
        "handoff.receive",
        timeout_ms=optional(Int(1, 600_000), 10_000),
        commit_by_ns=optional(Int(1, 2**63 - 1)),
        prewake=optional(Bool(), False),
    )
    @_machine_errors
    def handoff_receive(
        self, req: Request, timeout_ms: int, commit_by_ns: int | None, prewake: bool
    ) -> dict[str, Any] | Result:
        """Wait for the old worker's state on the channel and load it.

        With ``commit_by_ns`` (CLOCK_MONOTONIC) the supervisor delegates the
        commit: if the load succeeded before that instant, resume at once (the
        run flag is written first); if not, refuse and stay paused. This saves
        the supervisor round trip inside the guest's pause.

        ``prewake`` (``contract.PREWAKE``): once warm, say so on the channel and
        wait for the state awake (``vmm.awake``): the old worker pauses only then.
        The word carries a sealed memfd for the state (``vmm.state_shm``); the
        state comes there or, from a sender that does not use it, on the channel."""
        unmerge_us = _take_memory_back()
        marks: dict[str, int] = {}  # when vCPU 0's thread began waiting, when the state came
        with _channel(req) as ch, _inbox(prewake and state_shm.ENABLED) as inbox:
            # the state's arrival allocates nothing; room for a raw frame
            buf = wire.recv_buffer(state.FRAME_RAW_MAX + 1) if state.FRAME_ENABLED else None
            buf = buf or wire.recv_buffer()

            def receive() -> bytes:
                """The state, or (a frame's second section) what follows it."""
                if "readable_at_ns" in marks:
                    return receive_more()
                waiting_ns = time.monotonic_ns()
                marks["waiting_at_ns"] = waiting_ns
                spin_ns = 0
                if prewake:
                    _send(ch, contract.PREWAKE, {}, "the old worker", [inbox.fd] if inbox else [])
                    if inbox is not None:
                        inbox.offered()
                        inbox.rehearse()
                    marks["ready_at_ns"] = time.monotonic_ns()
                    spin_ns = awake.STATE_SPIN_NS
                deadline_ns = waiting_ns + timeout_ms * 1_000_000
                warm = self.machine.keep_warm if spin_ns and REWARM else None
                blob, marks["readable_at_ns"] = _next_state(
                    ch, inbox, 1, deadline_ns, spin_ns, warm, buf, state.FRAME_MAGIC, "the state"
                )
                if faults.any_armed():
                    faults.hang("hang")
                    faults.crash("load")
                    faults.delay("slow-load", 0.05)  # inside the pause: the guest waits
                return blob

            def receive_more() -> bytes:
                deadline_ns = time.monotonic_ns() + timeout_ms * 1_000_000
                spin_ns = awake.STATE_SPIN_NS if prewake else 0
                blob, marks["vcpus_readable_at_ns"] = _next_state(
                    ch, inbox, 2, deadline_ns, spin_ns, None, buf, state.VCPUS_MAGIC, "the vCPUs"
                )
                return blob

            result = self.machine.handoff_in(
                receive, commit_by_ns, before_commit=lambda: faults.crash("loaded")
            )
            result.update(marks)
            result["shm_sections"] = inbox.taken if inbox else 0
            result["unmerge_us"] = unmerge_us
        if commit_by_ns is None and faults.armed("loaded"):
            return Result(result, after=lambda: faults.crash("loaded"))
        return result

    # -- the preflight (vmctl upgrade --check): the guest never pauses
    @handles("state.preview", versions=optional(AnyMap(16)))
    @_machine_errors
    def state_preview(self, req: Request, versions: dict[str, Any] | None) -> dict[str, Any]:
        """The running worker's side: the state it would send at ``versions``,
        built without pausing the guest (``Machine.preview`` says what is live)."""
        blob, info = self.machine.preview(_versions(versions))
        return {"state": blob, "size": len(blob), **info}

    @handles("state.validate", state=Bytes(1, state.MAX_STATE))
    @_machine_errors
    def state_validate(self, req: Request, state: bytes) -> dict[str, Any]:
        """The incoming worker's side: decode and cross-check, apply nothing."""
        return self.machine.validate(state)


#: ``BATON_VMM_REWARM=0``: wait for the state in one spin, as before (the A/B switch).
REWARM = os.environ.get("BATON_VMM_REWARM", "1") != "0"
#: Each spin between two warm-ups (``Machine.keep_warm``, ~50 us warm here).
REWARM_SPIN_NS = 150_000


@contextlib.contextmanager
def _inbox(wanted: bool) -> Iterator[state_shm.Inbox | None]:
    """The memfd to offer with the pre-wake, closed after; none (the state by
    datagram) if not ``wanted`` or if it cannot be made."""
    try:
        inbox = state_shm.Inbox() if wanted else None
    except OSError:
        inbox = None
    try:
        yield inbox
    finally:
        if inbox is not None:
            inbox.close()


def _next_state(
    ch: socket.socket,
    inbox: state_shm.Inbox | None,
    k: int,
    deadline_ns: int,
    spin_ns: int,
    warm: Callable[[], object] | None,
    buf: bytearray,
    raw_prefix: bytes,
    what: str,
) -> tuple[bytes, int]:
    """The old worker's ``k``-th state section (1: the state or a frame's head; 2:
    the vCPUs) and when it was seen: published in ``inbox``, or the next state
    datagram on ``ch`` (doorbells passed over). As ``_wait`` waits."""
    while True:
        length, seen = _wait(ch, inbox, k, deadline_ns, spin_ns, warm, what)
        if length is not None:
            assert inbox is not None
            try:
                return inbox.take(length), seen
            except ValueError as e:
                raise RemoteError(Code.BAD_REQUEST, f"bad state from the old worker: {e}") from None
        msg = _recv(ch, deadline_ns, 0, "the old worker", what, buf, raw_prefix, seen)
        if msg.get("op") != state_shm.RING_OP:
            return _state_of(msg), seen
        spin_ns, warm = 0, None  # a doorbell: it rings only for a receiver that slept


def _wait(
    ch: socket.socket,
    inbox: state_shm.Inbox | None,
    k: int,
    deadline_ns: int,
    spin_ns: int,
    warm: Callable[[], object] | None,
    what: str,
) -> tuple[int | None, int]:
    """Wait by ``deadline_ns`` for section ``k`` in ``inbox`` (its length) or ``ch``
    readable (None), the first ``spin_ns`` awake (``vmm.awake``), in short spins
    with ``warm`` run between them if given. Returns (that, when it was seen)."""
    fd = ch.fileno()

    def once(spin: int, timeout_ms: int) -> tuple[bool, int | None]:
        if inbox is None:
            return awake.wait_readable(fd, timeout_ms, spin), None
        try:
            return True, inbox.wait(k, fd, spin if awake.ENABLED else 0, timeout_ms)
        except TimeoutError:
            return False, None

    if warm is not None:
        end = time.monotonic_ns() + spin_ns
        while not (got := once(REWARM_SPIN_NS, 0))[0]:
            spin_ns = end - time.monotonic_ns()
            if spin_ns <= 0:
                spin_ns = 0
                break
            warm()
        else:
            return got[1], time.monotonic_ns()
    left_ms = max(0, (deadline_ns - time.monotonic_ns()) // 1_000_000)
    came, length = once(spin_ns, left_ms)
    if not came:
        raise RemoteError(Code.TIMEOUT, f"{what} did not come from the old worker in time")
    return length, time.monotonic_ns()


def _send(
    ch: socket.socket, op: str, args: dict[str, Any], peer: str, fds: Sequence[int] = ()
) -> None:
    """One message (and ``fds``) to the other worker on the state channel."""
    try:
        wire.send_message(ch, {"id": 0, "op": op, "args": args}, fds)
    except OSError as e:
        raise RemoteError(Code.UNAVAILABLE, f"{peer} is gone: {e}") from None


def _recv(
    ch: socket.socket,
    deadline_ns: int,
    spin_ns: int,
    peer: str,
    what: str,
    buf: bytearray | None = None,
    raw_prefix: bytes | None = None,
    readable_at_ns: int = 0,
    fds_out: list[int] | None = None,
) -> dict[str, Any]:
    """The other worker's next message on the state channel by ``deadline_ns``,
    the first ``spin_ns`` awake (``vmm.awake``); ``_readable_at_ns`` added.
    ``buf``: received into (``wire.recv_buffer``, made before the pause).
    ``raw_prefix``: a raw datagram starting with it comes as ``{"_raw": bytes}``.
    ``readable_at_ns``: when the caller saw ``ch`` readable already (no wait).
    ``fds_out``: the message's fds go there (else they are closed)."""
    readable = readable_at_ns
    if not readable:
        left_ms = max(0, (deadline_ns - time.monotonic_ns()) // 1_000_000)
        if not awake.wait_readable(ch.fileno(), left_ms, spin_ns):
            raise RemoteError(Code.TIMEOUT, f"{what} did not come from {peer} in time")
        readable = time.monotonic_ns()
    try:
        got, fds = wire.recv_message_or_raw(ch, raw_prefix, buf=buf)
    except wire.ConnectionClosed:
        raise RemoteError(Code.UNAVAILABLE, f"{peer} closed the channel") from None
    except wire.FrameError as e:
        raise RemoteError(Code.BAD_REQUEST, f"bad message from {peer}: {e.message}") from None
    if fds_out is None:
        wire.close_fds(fds)
    else:
        fds_out.extend(fds)
    msg: dict[str, Any] = {"_raw": got} if isinstance(got, bytes) else got
    msg["_readable_at_ns"] = readable
    return msg


def _state_of(msg: dict[str, Any]) -> bytes:
    """What a state message carries: a raw datagram (a frame's section), or the
    ``state`` argument of a message (format 1, or a section too large for a datagram)."""
    if "_raw" in msg:
        raw: bytes = msg["_raw"]
        return raw
    args = msg.get("args")
    blob = args.get("state") if isinstance(args, dict) else None
    if not isinstance(blob, bytes):
        raise RemoteError(Code.BAD_REQUEST, "the state message carries no state")
    return blob


def _features() -> list[str]:
    """What this worker's hello offers (``contract.HANDOFF_FEATURES``); each can be
    switched off for an A/B (``BATON_VMM_AWAKE=0``, ``BATON_VMM_FRAME=0``)."""
    return [
        *([contract.PREWAKE] if awake.ENABLED else []),
        *([contract.STATE_FRAME] if state.FRAME_ENABLED else []),
    ]


def _versions(raw: dict[str, Any] | None) -> dict[str, int] | None:
    if raw is None:
        return None
    known = state.components()
    out = {}
    for name, v in raw.items():
        if name not in known or not isinstance(v, int) or isinstance(v, bool):
            raise RemoteError(Code.BAD_REQUEST, f"versions: bad entry {name!r}: {v!r:.20}")
        out[name] = v
    return out
