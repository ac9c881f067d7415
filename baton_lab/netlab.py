"""Networks for tests and benchmarks that touch nothing but themselves.

``in_new_netns(fn)`` runs ``fn`` in a forked child that did
``unshare(CLONE_NEWNET)``: only ``lo`` (up) is there, IPv6 is off on every
new interface (no router solicitations or MLD reports on the taps), and
every daemon the child starts (the broker, which creates the taps; the
supervisor, which configures them) inherits that namespace. Nothing can
reach any other network from it.

``Traffic`` drives a VM's tap from the host side: a raw AF_PACKET socket
bound to the tap sends numbered frames into it (they reach the tap's
reader, the VMM, so the guest) at a fixed rate, and receives what the guest
sends back.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing in the namespace answers it
HOST_MAC = "02:00:00:00:00:01"  # locally administered: the test's side of the wire
FRAME = struct.Struct("!6s6sHQ")
MIN_FRAME = 60


class IsolatedFailure(AssertionError):
    """What went wrong in the child: its traceback."""


def unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
        f.write("1")
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def in_new_netns(fn: Callable[[], Any], timeout: float = 300.0) -> Any:
    """``fn()`` in a forked child in a new network namespace; its result (pickled
    back), or IsolatedFailure with the child's traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            os.close(r)
            unshare_net()
            out = pickle.dumps(("ok", fn()))
            status = 0
        except BaseException:
            out = pickle.dumps(("error", traceback.format_exc()[-60000:]))
        finally:
            with contextlib.suppress(OSError):
                view = memoryview(out)
                while view:
                    view = view[os.write(w, view) :]
            os._exit(status)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise IsolatedFailure(f"timed out after {timeout}s in its network namespace")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if not data:
        raise IsolatedFailure(f"the child exited with status {status:#x} and said nothing")
    kind, value = pickle.loads(data)
    if kind != "ok":
        raise IsolatedFailure(value)
    return value


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def frame(dst: str, src: str, seq: int) -> bytes:
    """A numbered test frame, padded to the Ethernet minimum."""
    return FRAME.pack(mac_bytes(dst), mac_bytes(src), ETHERTYPE, seq).ljust(MIN_FRAME, b"\0")


def packet_socket(ifname: str) -> socket.socket:
    """A raw socket on ``ifname``: what it sends goes into the tap's reader (the
    VMM), and it receives what the guest sends."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    s.bind((ifname, 0))
    return s


@dataclass
class Echo:
    seq: int
    at: float  # time.monotonic() when it came back
    dst: bytes
    src: bytes
    intact: bool  # the rest of the frame is exactly what was sent


@dataclass
class Traffic:
    """Numbered frames at ``rate`` per second to ``guest_mac`` through ``tap``, and
    the echoes that come back. ``start``, then ``stop`` (sending), then ``drain``."""

    tap: str
    guest_mac: str
    rate: float = 1000.0
    sent: int = 0
    sent_at: list[float] = field(default_factory=list)
    echoes: list[Echo] = field(default_factory=list)
    others: int = 0  # frames seen that are not echoes of ours
    send_errors: int = 0

    def __post_init__(self) -> None:
        self.sock = packet_socket(self.tap)
        self._stop_send = threading.Event()
        self._stop_recv = threading.Event()
        self._sender = threading.Thread(target=self._send, name="traffic-send", daemon=True)
        self._receiver = threading.Thread(target=self._recv, name="traffic-recv", daemon=True)

    def start(self) -> Traffic:
        self._receiver.start()
        self._sender.start()
        return self

    def _send(self) -> None:
        t0 = time.monotonic()
        while not self._stop_send.is_set():
            due = int((time.monotonic() - t0) * self.rate) + 1
            while self.sent < due:
                at = time.monotonic()  # before: the echo may be back before send returns
                try:
                    self.sock.send(frame(self.guest_mac, HOST_MAC, self.sent))
                except OSError:
                    self.send_errors += 1
                    time.sleep(0.001)
                    continue  # the same number again: a frame never sent is not lost
                self.sent_at.append(at)
                self.sent += 1
            time.sleep(0.0005)

    def _recv(self) -> None:
        self.sock.settimeout(0.1)
        want_dst, want_src = mac_bytes(HOST_MAC), mac_bytes(self.guest_mac)
        while not self._stop_recv.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            if addr[2] == PACKET_OUTGOING or len(data) < FRAME.size:
                continue
            dst, src, ethertype, seq = FRAME.unpack_from(data)
            if ethertype != ETHERTYPE or src == mac_bytes(HOST_MAC):
                self.others += 1
                continue
            intact = data[FRAME.size :] == bytes(MIN_FRAME - FRAME.size)
            self.echoes.append(Echo(seq, now, dst, src, intact and dst == want_dst))
            _ = want_src

    def stop(self) -> None:
        self._stop_send.set()
        self._sender.join(5)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every frame sent came back (or ``timeout``), then stop receiving."""
        deadline = time.monotonic() + timeout
        while len(self.echoes) < self.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a duplicate would show up now
        self._stop_recv.set()
        self._receiver.join(5)
        self.sock.close()

    # -- what the tests and the benchmark ask
    def problems(self) -> list[str]:
        """Everything wrong: lost, duplicated, reordered, altered frames."""
        seqs = [e.seq for e in self.echoes]
        out = []
        missing = sorted(set(range(self.sent)) - set(seqs))
        if missing:
            out.append(f"{len(missing)} of {self.sent} frames never came back: {missing[:10]}")
        if len(seqs) != len(set(seqs)):
            out.append(f"{len(seqs) - len(set(seqs))} frames came back twice")
        if seqs != sorted(seqs):
            bad = next(i for i in range(1, len(seqs)) if seqs[i] < seqs[i - 1])
            out.append(f"out of order: {seqs[bad - 1]} then {seqs[bad]}")
        want = mac_bytes(self.guest_mac)
        altered = [e.seq for e in self.echoes if not e.intact or e.src != want]
        if altered:
            out.append(f"{len(altered)} frames came back altered: {altered[:10]}")
        return out

    def longest_gap(self) -> float:
        """The longest time between two consecutive echoes, in seconds."""
        times = [e.at for e in self.echoes]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def latencies(self) -> list[float]:
        return [e.at - self.sent_at[e.seq] for e in self.echoes if e.seq < len(self.sent_at)]
