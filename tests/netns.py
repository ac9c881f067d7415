"""Network tests run inside a network namespace of their own, and nowhere else.

``isolated`` wraps a test so that its whole body runs in a forked child that
did ``unshare(CLONE_NEWNET)``: only ``lo`` (brought up) exists there, IPv6 is
off for every new interface (no router solicitations or MLD reports on the
taps), and the daemons the body starts (the broker, which creates the taps;
the supervisor, which configures them) inherit the namespace. Nothing the
test does can reach any other network. Fixtures are made in the parent: use
only ones that start no process (``root``), and start the daemons in the body.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
        f.write("1")
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def isolated(timeout: float = 240.0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated test's body in a new network namespace (a forked child)."""

    def decorate(test: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(test)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: the whole test body
                status = 1
                try:
                    os.close(r)
                    unshare_net()
                    test(*args, **kwargs)
                    status = 0
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.write(w, traceback.format_exc().encode()[-60000:])
                finally:
                    os._exit(status)
            os.close(w)
            out = b""
            deadline = time.monotonic() + timeout
            try:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        pytest.fail(
                            f"timed out after {timeout}s in its network namespace\n{out.decode()}"
                        )
                    ready, _, _ = select.select([r], [], [], left)
                    if ready:
                        chunk = os.read(r, 65536)
                        if not chunk:
                            break
                        out += chunk
            finally:
                os.close(r)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                pytest.fail(out.decode(errors="replace") or f"child exited with {status:#x}", False)

        return wrapper

    return decorate


def packet_socket(ifname: str) -> socket.socket:
    """A raw AF_PACKET socket on ``ifname``: what it sends goes into the tap (to the
    VMM's reader, so to the guest), and it receives what the guest sends."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return s


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


ETHERTYPE = 0x88B5  # IEEE local experimental: nothing in the namespace answers it
FRAME = struct.Struct("!6s6sHQ")


def frame(dst: str, src: str, seq: int) -> bytes:
    """A numbered test frame (padded to the Ethernet minimum of 60 bytes)."""
    return FRAME.pack(mac_bytes(dst), mac_bytes(src), ETHERTYPE, seq).ljust(60, b"\0")
