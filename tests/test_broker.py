"""baton-brokerd as a real process: fds over real SCM_RIGHTS, tokens, bad input, restarts."""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
from helpers import (
    NOBODY,
    BrokerProcess,
    raw_socket,
    reply_of,
    run_as,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton import wire
from baton.wire import Code, RemoteError
from broker.client import BrokerClient

MiB = 1 << 20


def test_memfd_written_by_a_is_read_back_by_b(broker):
    with broker.client() as admin:
        admin.create_vm("a")
        info = admin.create_memfd("a", "ram", 4 * MiB)
        assert info["kind"] == "memfd" and info["size"] == 4 * MiB
        assert set(info["seal_names"]) >= {"shrink", "grow", "seal"}
        token = admin.mint_token("a")
    pattern = os.urandom(4 * MiB)
    with BrokerClient(broker.paths.broker_socket, token=token) as client_a:
        fd = client_a.get("a", ["ram"])["ram"]
        with mmap.mmap(fd, 4 * MiB) as m:
            m[:] = pattern
        for size in (MiB, 8 * MiB):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        os.close(fd)
    with BrokerClient(broker.paths.broker_socket, token=token) as client_b:
        fd = client_b.get("a", ["ram"])["ram"]
        with mmap.mmap(fd, 4 * MiB, prot=mmap.PROT_READ) as m:
            assert m[:] == pattern
        os.close(fd)
        listed = client_b.list_fds("a")[0]
        assert listed["fetch_count"] == 2 and len(listed["fetched_by"]) == 2


def test_put_get_several_and_drop(broker):
    r, w = os.pipe()
    efd = os.eventfd(0)
    with broker.client() as admin:
        admin.create_vm("v")
        res = admin.put("v", {"in": r, "out": w, "ev": efd})
        assert sorted(res["added"]) == ["ev", "in", "out"]
        # handing the same fd again is idempotent
        assert admin.put("v", {"in": r})["unchanged"] == ["in"]
        other_r, other_w = os.pipe()
        with pytest.raises(RemoteError) as e:
            admin.put("v", {"in": other_r})
        assert e.value.code == Code.EXISTS
        got = admin.get("v", ["out", "in"])
        kinds = {f["name"]: (f["kind"], f["detail"]) for f in admin.list_fds("v")}
        assert kinds == {"in": ("pipe", "read"), "out": ("pipe", "write"), "ev": ("eventfd", "")}
        os.write(got["out"], b"via broker")
        assert os.read(r, 64) == b"via broker"
        admin.drop_fd("v", "ev")
        assert {f["name"] for f in admin.list_fds("v")} == {"in", "out"}
        held = admin.get_held("v")  # without names: every fd held, in one round trip
        assert sorted(held) == ["in", "out"]
        os.write(held["out"], b"all held")
        assert os.read(r, 64) == b"all held"
        wire.close_fds(list(held.values()))
        with pytest.raises(RemoteError) as e:
            admin.get("v", ["ev"])
        assert e.value.code == Code.NOT_FOUND
        assert admin.drop_vm("v") == 2
    for fd in (r, w, efd, other_r, other_w, *got.values()):
        os.close(fd)


def test_token_isolation(shared_broker):
    sock = shared_broker.paths.broker_socket
    with shared_broker.client() as admin:
        for vm in ("a", "b"):
            admin.create_vm(vm)
            admin.create_memfd(vm, "ram", MiB)
        token_a = admin.mint_token("a")
        token_b = admin.mint_token("b")

    def as_a(op):
        def run():
            with BrokerClient(sock, token=token_a) as c:
                return op(c)

        return run

    # A's token reaches A ...
    assert run_as(NOBODY, as_a(lambda c: [f["name"] for f in c.list_fds("a")])) == ["ram"]
    assert run_as(NOBODY, as_a(lambda c: c.hello()["admin"])) is False
    got = run_as(NOBODY, as_a(lambda c: len(c.get("a", ["ram"]))))
    assert got == 1
    # ... and nothing of B's, nor admin operations.
    denied = ("error", "denied")
    assert run_as(NOBODY, as_a(lambda c: c.get("b", ["ram"]))) == denied
    assert run_as(NOBODY, as_a(lambda c: c.list_fds("b"))) == denied
    assert run_as(NOBODY, as_a(lambda c: c.drop_fd("b", "ram"))) == denied
    assert run_as(NOBODY, as_a(lambda c: c.drop_fd("a", "ram"))) == denied
    assert run_as(NOBODY, as_a(lambda c: c.create_vm("c"))) == denied
    assert run_as(NOBODY, as_a(lambda c: c.mint_token("a"))) == denied
    assert run_as(NOBODY, as_a(lambda c: c.status())) == denied
    # no token at all
    assert run_as(NOBODY, lambda: BrokerClient(sock).list_fds("a")) == denied
    # a VM that does not exist looks the same as one that is not yours
    assert run_as(NOBODY, as_a(lambda c: c.list_fds("nope"))) == denied
    # revocation takes effect on the very next request of an open connection
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()

    def across_revocation():
        with BrokerClient(sock, token=token_b) as c:
            first = [f["name"] for f in c.list_fds("b")]
            os.write(done_w, b"1")
            os.read(go_r, 1)
            try:
                c.list_fds("b")
                return first, "still allowed"
            except RemoteError as e:
                return first, str(e.code)

    result: list = []
    t = threading.Thread(target=lambda: result.append(run_as(NOBODY, across_revocation)))
    t.start()
    os.read(done_r, 1)
    with shared_broker.client() as admin:
        admin.revoke_token("b", token_b)
    os.write(go_w, b"1")
    t.join(30)
    assert result == [(["ram"], "denied")]
    with shared_broker.client() as admin:
        admin.revoke_token("a", token_a)
    assert run_as(NOBODY, as_a(lambda c: c.list_fds("a"))) == denied
    for fd in (go_r, go_w, done_r, done_w):
        os.close(fd)


def test_open_on_behalf_respects_allowlist(shared_broker):
    images = shared_broker.paths.lib / "images"
    images.mkdir(parents=True)
    os.chmod(shared_broker.paths.lib, 0o755)
    (images / "disk.img").write_bytes(b"\0" * 4096)
    outside = shared_broker.root / "secret.img"
    outside.write_bytes(b"secret")
    sock = shared_broker.paths.broker_socket
    with shared_broker.client() as admin:
        admin.create_vm("a")
        token = admin.mint_token("a")
        # A token opens only the files its VM names (the supervisor registers them);
        # naming one outside the allowed directories or behind a symlink is no way out.
        admin.allow(
            "a",
            files=[
                {"path": str(images / "disk.img"), "mode": "rw"},
                {"path": str(images / "link.img"), "mode": "rw"},
                {"path": str(outside), "mode": "rw"},
            ],
        )

    def open_as_a(path):
        def run():
            with BrokerClient(sock, token=token) as c:
                return c.open_file("a", "disk0", path)["kind"]

        return run

    assert run_as(NOBODY, open_as_a(str(outside))) == ("error", "denied")
    # a symlink into the allowed directory does not smuggle the secret out
    (images / "link.img").symlink_to(outside)
    assert run_as(NOBODY, open_as_a(str(images / "link.img"))) == ("error", "denied")
    assert run_as(NOBODY, open_as_a(str(images / "disk.img"))) == "file"


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")
def test_tap_opened_by_broker(broker):
    with broker.client() as admin:
        admin.create_vm("n")
        try:
            info = admin.open_tun("n", "tap0", "btap0")
        except RemoteError as e:
            pytest.skip(f"cannot create a tap device here: {e.message}")
        assert info["kind"] == "tun" and "btap0" in info["detail"]
        admin.drop_vm("n")


def test_socket_that_hangs_up_is_dropped(broker):
    a, b = socket.socketpair()
    with broker.client() as admin:
        admin.create_vm("h")
        admin.put("h", {"console": a.fileno()})
        a.close()
        assert [f["name"] for f in admin.list_fds("h")] == ["console"]
        b.close()  # the other end goes away: the held socket hangs up
        wait_until(lambda: admin.list_fds("h") == [], what="hung-up fd to be dropped")


# -- bad input -----------------------------------------------------------------


def _settled_fd_count(broker: BrokerProcess, c: BrokerClient) -> int:
    """The broker's open fds once it has reaped every client connection but ``c``.

    Counted while ``c`` is connected, so that a baseline and a later count see
    the same connections: what differs between them is a leak, whatever the
    machine's speed. Closing a connection is asynchronous for the broker (it
    reaps it when its event loop sees the hang-up), so wait for that, by what
    the broker itself reports, not for a while."""
    wait_until(
        lambda: c.status()["connections"] == 1, 60, 0.01, "every other client connection reaped"
    )
    return broker.fd_count()


def _baseline(broker: BrokerProcess) -> int:
    with broker.client() as c:
        return _settled_fd_count(broker, c)


def _assert_serving_and_no_leak(broker: BrokerProcess, baseline: int) -> None:
    with broker.client() as c:
        assert c.hello()["service"] == "broker"
        assert _settled_fd_count(broker, c) == baseline, "the broker holds more fds than before"


BAD_DATAGRAMS = [
    b"",
    os.urandom(1),
    os.urandom(4096),
    b"\xc1\xc1\xc1",
    msgpack.packb({"id": 1, "op": "fd.get", "args": {"vm": "x", "names": ["a"]}})[:-3],
    msgpack.packb([1, "fd.get", {}]),
    msgpack.packb({"id": "one", "op": "hello"}),
    msgpack.packb({"id": -1, "op": "hello"}),
    msgpack.packb({"id": 2**64 - 1, "op": "hello"}),
    msgpack.packb({"id": 1, "op": 7}),
    msgpack.packb({"id": 1, "op": "x" * 1000}),
    msgpack.packb({"id": 1, "op": "no.such.op"}),
    msgpack.packb({"id": 1, "op": "fd.get", "args": []}),
    msgpack.packb({"id": 1, "op": "fd.get", "args": {"vm": 1, "names": ["ram"]}}),
    msgpack.packb({"id": 1, "op": "fd.get", "args": {"vm": "v", "names": "ram"}}),
    msgpack.packb({"id": 1, "op": "fd.get", "args": {"vm": "v", "names": ["x"] * 100000}}),
    msgpack.packb({"id": 1, "op": "memfd.create", "args": {"vm": "v", "name": "r", "size": -1}}),
    msgpack.packb(
        {"id": 1, "op": "memfd.create", "args": {"vm": "v", "name": "r", "size": 2**64 - 1}}
    ),
    msgpack.packb({"id": 1, "op": "vm.create", "args": {"vm": "../etc"}}),
    msgpack.packb({"id": 1, "op": "vm.create", "args": {"vm": "ok", "extra": True}}),
    msgpack.packb({"id": 1, "op": "hello", "token": 5}),
    msgpack.packb({"id": 1, "op": "hello", "nfds": 3}),
    b"\x00" * (wire.MAX_INLINE + 1),
    b"\xdf\xff\xff\xff\xff",
]


def test_bad_datagrams_get_error_replies(broker):
    base = _baseline(broker)
    s = raw_socket(broker.paths.broker_socket)
    for data in BAD_DATAGRAMS:
        if not data:
            continue  # an empty datagram reads as EOF; covered below
        s.sendmsg([data])
        reply, fds = reply_of(s)
        assert reply["ok"] is False, data
        assert reply["error"]["code"] in {c.value for c in Code}, reply
        assert fds == []
    s.close()
    s = raw_socket(broker.paths.broker_socket)
    s.sendmsg([b""])
    s.close()
    _assert_serving_and_no_leak(broker, base)


def test_surplus_and_mismatched_fds_are_closed(broker):
    base = _baseline(broker)
    r, w = os.pipe()
    s = raw_socket(broker.paths.broker_socket)
    import array

    def send(msg: dict, fds: list[int]) -> dict:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        s.sendmsg([msgpack.packb(msg)], anc)
        return reply_of(s)[0]

    # fds on an op that takes none
    assert send({"id": 1, "op": "hello", "nfds": 2}, [r, w])["ok"] is True
    # more fds than announced
    rep = send({"id": 2, "op": "hello", "nfds": 1}, [r, w])
    assert rep["error"]["code"] == Code.FD_MISMATCH
    # more fds than the limit
    rep = send({"id": 3, "op": "hello", "nfds": 200}, [r] * 200)
    assert rep["error"]["code"] == Code.TOO_MANY_FDS
    # names and fds disagree on a put
    with broker.client() as admin:
        admin.create_vm("v")
    rep = send({"id": 4, "op": "fd.put", "args": {"vm": "v", "names": ["a", "b"]}, "nfds": 1}, [r])
    assert rep["error"]["code"] == Code.FD_MISMATCH
    s.close()
    os.close(r)
    os.close(w)
    with broker.client() as admin:
        admin.drop_vm("v")
    _assert_serving_and_no_leak(broker, base)


def test_clients_vanishing_mid_request(broker):
    with broker.client() as admin:
        admin.create_vm("v")
        admin.create_memfd("v", "ram", MiB)
    base = _baseline(broker)
    for _ in range(50):
        s = raw_socket(broker.paths.broker_socket)
        s.sendmsg([msgpack.packb({"id": 1, "op": "fd.get", "args": {"vm": "v", "names": ["ram"]}})])
        s.close()  # gone before the reply with its fd
    efd = os.eventfd(0)
    for _ in range(20):
        s = raw_socket(broker.paths.broker_socket)
        wire.send_message(s, {"id": 1, "op": "fd.put", "args": {"vm": "v", "names": ["p"]}}, [efd])
        s.close()
    os.close(efd)
    # a put from a vanished client still lands (the fd is now the broker's);
    # once every vanished connection is gone, all their requests were handled
    with broker.client() as admin:
        wait_until(lambda: admin.status()["connections"] == 1, what="vanished clients reaped")
        names = {f["name"] for f in admin.list_fds("v")}
        assert "ram" in names
        if "p" in names:
            admin.drop_fd("v", "p")
    _assert_serving_and_no_leak(broker, base)


def test_client_that_never_reads_is_dropped_and_others_served(broker):
    base = _baseline(broker)
    s = raw_socket(broker.paths.broker_socket)
    s.setblocking(False)
    req = msgpack.packb({"id": 1, "op": "broker.status"})
    sent = 0
    try:
        for _ in range(20000):
            s.send(req)
            sent += 1
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    assert sent > 0
    with broker.client() as c:
        assert c.hello()["service"] == "broker"
    s.close()
    _assert_serving_and_no_leak(broker, base)


request_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=40)
    | st.binary(max_size=64),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
ops = st.sampled_from(
    [
        "hello",
        "vm.create",
        "vm.drop",
        "fd.get",
        "fd.put",
        "fd.list",
        "fd.drop",
        "memfd.create",
        "fd.open",
        "token.mint",
        "token.revoke",
        "broker.status",
        "bogus",
    ]
)
messages = st.fixed_dictionaries(
    {"id": st.integers(0, 2**63 - 1), "op": ops},
    optional={
        "args": st.dictionaries(
            st.sampled_from(["vm", "name", "names", "size", "path", "mode", "token", "all", "x"]),
            request_values,
            max_size=6,
        ),
        "token": request_values,
    },
)


def test_hypothesis_messages_never_break_the_broker(broker):
    with broker.client() as admin:
        admin.create_vm("v")
        admin.create_memfd("v", "ram", MiB)
    base = _baseline(broker)
    s = raw_socket(broker.paths.broker_socket)
    seen = {"n": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages)
    def check(msg):
        if msg.get("op") in ("vm.drop", "broker.upgrade"):
            msg["op"] = "hello"
        s.sendmsg([msgpack.packb(msg)])
        reply, fds = reply_of(s)
        wire.close_fds(fds)
        assert reply["id"] == msg["id"]
        assert isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["error"]["code"] in {c.value for c in Code}
        seen["n"] += 1

    check()
    s.close()
    assert seen["n"] >= 100
    # clean up what random messages may have created, then compare
    with broker.client() as admin:
        for vm in admin.list_vms():
            if vm != "v":
                admin.drop_vm(vm)
        for f in admin.list_fds("v"):
            if f["name"] != "ram":
                admin.drop_fd("v", f["name"])
    _assert_serving_and_no_leak(broker, base)


# -- lifecycle -------------------------------------------------------------------


def test_daemon_mode_ready_notify_and_sigterm(root):
    """Without --foreground: the command returns once the broker serves; READY=1
    reaches NOTIFY_SOCKET; SIGTERM exits cleanly and removes the socket."""
    notify_path = root / "notify.sock"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(notify_path))
    ns.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    # With NOTIFY_SOCKET set we are "under systemd": it must not detach.
    proc = subprocess.Popen([sys.executable, "-m", "broker", "--root", str(root)], env=env)
    msg = ns.recv(4096).decode()
    assert "READY=1" in msg and f"MAINPID={proc.pid}" in msg
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not (root / "run" / "baton" / "broker.sock").exists()
    ns.close()
    # Plain daemon mode: detaches, returns 0 only once serving, refuses a second copy.
    out = subprocess.run([sys.executable, "-m", "broker", "--root", str(root)], timeout=30)
    assert out.returncode == 0
    b = BrokerProcess(root)
    with b.client() as c:
        assert c.hello()["pid"] == b.pid
    again = subprocess.run(
        [sys.executable, "-m", "broker", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert again.returncode == 1 and "already running" in again.stderr
    log = (root / "var" / "log" / "baton" / "brokerd.log").read_text()
    assert "serving" in log
    b.stop()


def _memfd_digest(client: BrokerClient, vm: str, name: str) -> bytes:
    import hashlib

    fd = client.get(vm, [name])[name]
    try:
        return hashlib.sha256(os.pread(fd, os.fstat(fd).st_size, 0)).digest()
    finally:
        os.close(fd)


def test_restart_with_reregistration_loses_no_fd(root):
    """kill -9 of the broker; a new one starts; the holders hand every fd back."""
    b = BrokerProcess(root).start()
    supervisor = b.client()  # the administrator, as the supervisor would be
    supervisor.create_vm("vm1")
    supervisor.create_memfd("vm1", "ram", 8 * MiB)
    r, w = os.pipe()
    supervisor.put("vm1", {"console-in": r, "console-in-w": w})
    token = supervisor.mint_token("vm1")
    held = supervisor.get("vm1", ["ram", "console-in", "console-in-w"])
    supervisor.remember("vm1", held)
    os.pwrite(held["ram"], os.urandom(8 * MiB), 0)
    before = {f["name"]: f["ino"] for f in supervisor.list_fds("vm1")}
    digest = _memfd_digest(supervisor, "vm1", "ram")
    # a worker holds its RAM too, and its token must survive the restart
    worker = BrokerClient(b.paths.broker_socket, token=token)
    worker_ram = worker.get("vm1", ["ram"])
    worker.remember("vm1", worker_ram)

    b.kill9()
    b2 = BrokerProcess(root).start()
    with b2.client() as fresh:
        listed = {f["name"]: f["state"] for f in fresh.list_fds("vm1")}
        assert listed == dict.fromkeys(before, "missing")
        with pytest.raises(RemoteError) as e:
            fresh.get("vm1", ["ram"])
        assert e.value.code == Code.UNAVAILABLE
    # the worker (with its old token) hands back RAM first, the supervisor the rest
    worker.reconnect(time.monotonic() + 10)
    supervisor.reconnect(time.monotonic() + 10)
    with b2.client() as fresh:
        after = {f["name"]: (f["ino"], f["state"]) for f in fresh.list_fds("vm1")}
        assert after == {n: (ino, "held") for n, ino in before.items()}
        assert _memfd_digest(fresh, "vm1", "ram") == digest
        assert fresh.hello()["generation"] == 2
    # a stranger cannot re-register a different inode under a missing name
    b2.kill9()
    b3 = BrokerProcess(root).start()
    impostor = os.memfd_create("fake")
    with b3.client() as c, pytest.raises(RemoteError) as e:
        c.put("vm1", {"ram": impostor})
    assert e.value.code == Code.CONFLICT
    os.close(impostor)
    supervisor.reconnect(time.monotonic() + 10)
    with b3.client() as c:
        assert _memfd_digest(c, "vm1", "ram") == digest
    for fd in (*held.values(), *worker_ram.values(), r, w):
        os.close(fd)
    supervisor.close()
    worker.close()
    b3.stop()


def test_self_upgrade_loses_no_fd_and_keeps_connections(broker, root):
    with broker.client() as admin:
        for vm in ("a", "b"):
            admin.create_vm(vm)
            admin.create_memfd(vm, "ram", 4 * MiB)
            fd = admin.get(vm, ["ram"])["ram"]
            os.pwrite(fd, os.urandom(4 * MiB), 0)
            os.close(fd)
        token = admin.mint_token("a")
    old_pid = broker.pid
    idle = BrokerClient(broker.paths.broker_socket, token=token)
    assert idle.hello()["vm"] == "a"
    with broker.client() as admin:
        before = {(v["name"], f["name"]): f["ino"] for v in admin.status()["vms"] for f in v["fds"]}
        digests = {k: _memfd_digest(admin, *k) for k in before}
        res = admin.upgrade()
        assert res["pid"] != old_pid and res["generation"] == 2
        # the same connection talks to the successor now
        hello = admin.hello()
        assert hello["pid"] == res["pid"] and hello["generation"] == 2
        after = {(v["name"], f["name"]): f["ino"] for v in admin.status()["vms"] for f in v["fds"]}
        assert after == before
        assert {k: _memfd_digest(admin, *k) for k in after} == digests
    # an idle client connection and its token survived too
    assert idle.hello()["pid"] == res["pid"]
    assert [f["name"] for f in idle.list_fds("a")] == ["ram"]
    idle.close()
    wait_until(lambda: broker.proc.poll() is not None, what="old broker to exit")
    assert broker.proc.returncode == 0


def test_self_upgrade_to_a_broken_successor_keeps_serving(broker):
    with broker.client() as admin:
        admin.create_vm("a")
        admin.create_memfd("a", "ram", MiB)
        old = admin.hello()["pid"]
        with pytest.raises(RemoteError) as e:
            admin.upgrade([sys.executable, "-c", "import sys; sys.exit(3)"])
        assert e.value.code == Code.UNAVAILABLE
        with pytest.raises(RemoteError) as e:
            admin.upgrade(["/nonexistent/baton-brokerd"])
        assert e.value.code == Code.NOT_FOUND
        assert admin.hello()["pid"] == old
        assert [f["state"] for f in admin.list_fds("a")] == ["held"]


def test_vmctl_broker_status(broker):
    with broker.client() as admin:
        admin.create_vm("demo")
        admin.create_memfd("demo", "ram", 16 * MiB)
    vmctl = [sys.executable, "-m", "supervisor.vmctl", "--root", str(broker.root)]
    out = subprocess.run([*vmctl, "--json", "broker", "status"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["pid"] == broker.pid and st["open_fds"] > 0
    (vm,) = st["vms"]
    assert vm["name"] == "demo" and vm["fds"][0]["size"] == 16 * MiB
    human = subprocess.run([*vmctl, "broker", "status"], capture_output=True, text=True)
    assert human.returncode == 0
    assert "VM demo" in human.stdout and "16 MiB" in human.stdout and "memfd" in human.stdout


def test_vmctl_without_broker_fails_clearly(root):
    out = subprocess.run(
        [sys.executable, "-m", "supervisor.vmctl", "--root", str(root), "broker", "status"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 3
    assert out.stderr.count("\n") == 1 and "broker is not running" in out.stderr


def test_broken_config_is_reported(root):
    (root / "etc" / "baton").mkdir(parents=True)
    cfg = root / "etc" / "baton" / "baton.toml"
    cfg.write_text('[broker]\nsocket_mode = "rw-all"\n')
    out = subprocess.run(
        [sys.executable, "-m", "broker", "--root", str(root), "--foreground"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "baton.toml" in out.stderr and "broker.socket_mode" in out.stderr
    assert "'rw-all'" in out.stderr
