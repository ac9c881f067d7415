"""The wire module over real SOCK_SEQPACKET socket pairs and real SCM_RIGHTS."""

from __future__ import annotations

import array
import fcntl
import os
import socket

import msgpack
import pytest

from baton import wire
from baton.wire import Code


def own_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def pair():
    a, b = wire.make_seqpacket_pair()
    yield a, b
    a.close()
    b.close()


def raw_send(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def test_roundtrip_with_fds_is_cloexec(pair):
    a, b = pair
    r, w = os.pipe()
    os.set_inheritable(r, True)
    wire.send_message(a, {"id": 1, "op": "x", "args": {"k": b"\x00\x01"}}, [r, w])
    msg, fds = wire.recv_message(b)
    assert msg["args"]["k"] == b"\x00\x01" and msg["nfds"] == 2
    assert len(fds) == 2
    for fd in fds:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "received fd must be cloexec"
    os.write(w, b"ping")
    assert os.read(fds[0], 4) == b"ping"
    wire.close_fds([r, w, *fds])


def test_large_message_travels_in_a_sealed_memfd(pair):
    a, b = pair
    payload = os.urandom(3 * wire.MAX_INLINE)
    before = own_fds()
    wire.send_message(a, {"id": 7, "op": "save", "args": {"state": payload}})
    msg, fds = wire.recv_message(b)
    assert msg["args"]["state"] == payload and fds == []
    assert own_fds() == before, "blob memfds must be closed on both sides"


def test_message_over_limit_is_refused_by_sender(pair):
    a, _ = pair
    with pytest.raises(ValueError):
        wire.send_message(a, {"id": 1, "op": "x", "args": {"b": b"x" * (wire.MAX_MESSAGE + 1)}})


def test_oversized_datagram_is_too_large(pair):
    a, b = pair
    raw_send(a, b"\x00" * (wire.MAX_INLINE + 100))
    with pytest.raises(wire.FrameError) as e:
        wire.recv_message(b)
    assert e.value.code == Code.TOO_LARGE


def test_receive_into_a_reused_buffer(pair):
    """``recv_message(buf=...)`` decodes what arrived in that buffer, not what an
    earlier, longer message left behind, and still refuses a datagram too large
    for it."""
    a, b = pair
    buf = wire.recv_buffer()
    wire.send_message(a, {"id": 1, "op": "state", "args": {"state": b"x" * 5000}})
    msg, _ = wire.recv_message(b, buf=buf)
    assert msg["args"]["state"] == b"x" * 5000
    wire.send_message(a, {"id": 2, "op": "state", "args": {"state": b"yz"}})
    msg, _ = wire.recv_message(b, buf=buf)
    assert msg == {"id": 2, "op": "state", "args": {"state": b"yz"}}
    raw_send(a, b"\x00" * (wire.MAX_INLINE + 100))
    with pytest.raises(wire.FrameError) as e:
        wire.recv_message(b, buf=buf)
    assert e.value.code == Code.TOO_LARGE


def test_surplus_fds_are_closed(pair):
    a, b = pair
    before = own_fds()
    r, w = os.pipe()
    fds = [os.dup(r) for _ in range(wire.MAX_FDS + 5)]
    raw_send(a, wire.pack({"id": 3, "op": "x", "nfds": len(fds)}), fds)
    wire.close_fds([r, w, *fds])
    with pytest.raises(wire.FrameError) as e:
        wire.recv_message(b)
    assert e.value.code == Code.TOO_MANY_FDS
    assert own_fds() == before, "every received fd must be closed"


def test_nfds_mismatch_closes_fds(pair):
    a, b = pair
    r, w = os.pipe()
    before = own_fds()
    raw_send(a, wire.pack({"id": 4, "op": "x", "nfds": 1}), [r, w])
    with pytest.raises(wire.FrameError) as e:
        wire.recv_message(b)
    assert e.value.code == Code.FD_MISMATCH and e.value.request_id == 4
    assert own_fds() == before
    wire.close_fds([r, w])


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb({"id": 1, "op": "x"})[:-2],  # truncated
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({1: 2}),  # int map key (strict_map_key)
        b"\xd4\x05\x00",  # ext type
        b"\xdd\xff\xff\xff\xff",  # array claiming 4G items
    ],
)
def test_bad_frames_are_frame_errors(pair, data):
    a, b = pair
    r, w = os.pipe()
    before = own_fds()
    raw_send(a, data, [r])
    with pytest.raises(wire.FrameError):
        wire.recv_message(b)
    assert own_fds() == before
    wire.close_fds([r, w])


def test_unsealed_blob_is_refused(pair):
    a, b = pair
    fd = os.memfd_create("x", os.MFD_CLOEXEC)
    os.write(fd, wire.pack({"id": 1, "op": "x"}))
    raw_send(a, wire.pack({"blob": os.fstat(fd).st_size}), [fd])
    with pytest.raises(wire.FrameError) as e:
        wire.recv_message(b)
    assert "sealed" in e.value.message
    os.close(fd)


def test_eof_is_connection_closed(pair):
    a, b = pair
    a.close()
    with pytest.raises(wire.ConnectionClosed):
        wire.recv_message(b)


def test_connection_call_and_remote_error(pair):
    a, b = pair
    conn = wire.Connection(a, timeout=5)
    rid = conn.send_request("ping", {"n": 1})
    msg, _ = wire.recv_message(b)
    assert msg == {"id": rid, "op": "ping", "args": {"n": 1}}
    wire.send_message(b, {"id": rid, "ok": False, "error": {"code": "denied", "message": "no"}})
    with pytest.raises(wire.RemoteError) as e:
        conn.wait_reply(rid)
    assert e.value.code == Code.DENIED


def test_connection_timeout(pair):
    a, _ = pair
    conn = wire.Connection(a, timeout=0.05)
    with pytest.raises(wire.WireTimeout):
        conn.call("ping")


def test_raw_datagram_with_its_prefix_is_returned_as_bytes(pair):
    """``recv_message_or_raw``: a datagram that starts with the prefix (and carries no
    fds) comes back as its bytes, even past a message's size limit; a message still
    decodes; a raw datagram longer than the buffer, or a message over the inline
    limit in a large buffer, is refused; one with fds is decoded as a message."""
    a, b = pair
    buf = wire.recv_buffer(4 * wire.MAX_INLINE)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    raw = b"PFX!" + os.urandom(2 * wire.MAX_INLINE)
    raw_send(a, raw)
    got, fds = wire.recv_message_or_raw(b, b"PFX!", buf=buf)
    assert got == raw and fds == []
    wire.send_message(a, {"id": 2, "op": "state", "args": {"state": b"y" * 10}})
    got, _ = wire.recv_message_or_raw(b, b"PFX!", buf=buf)
    assert isinstance(got, dict) and got["args"]["state"] == b"y" * 10
    raw_send(a, b"PFX!" + bytes(len(buf)))
    with pytest.raises(wire.FrameError) as e:
        wire.recv_message_or_raw(b, b"PFX!", buf=buf)
    assert e.value.code == Code.TOO_LARGE
    raw_send(a, b"\x00" * (wire.MAX_INLINE + 100))  # not the prefix: a message, too large
    with pytest.raises(wire.FrameError) as e:
        wire.recv_message_or_raw(b, b"PFX!", buf=buf)
    assert e.value.code == Code.TOO_LARGE
    r, w = os.pipe()
    raw_send(a, b"PFX!", [r])  # with fds it is never raw: the fds are closed, a bad frame
    with pytest.raises(wire.FrameError):
        wire.recv_message_or_raw(b, b"PFX!", buf=buf)
    wire.close_fds([r, w])
