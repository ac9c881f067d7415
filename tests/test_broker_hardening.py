"""baton-brokerd against hostile clients: paths, other VMs' files, quotas,
decoding bombs, connection floods and broken state files.

Every test runs a real broker, attacks it, then proves that it still serves
another VM (a bystander with its own token and RAM) and that its fd count is
back to where it was before the attack."""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import NOBODY, BrokerProcess, raw_socket, reply_of, run_as, wait_until

from baton import wire
from baton.wire import Code, RemoteError
from broker.client import BrokerClient
from supervisor.provision import DiskImage, provision

MiB = 1 << 20
PER_UID = 8


# -- fixtures and helpers --------------------------------------------------------


class LoggedBroker(BrokerProcess):
    """A BrokerProcess whose stderr (its log, in the foreground) goes to a file."""

    @property
    def log_path(self) -> Path:
        return self.root / "brokerd.stderr"

    def start(self, timeout: float | None = None) -> LoggedBroker:
        timeout = self.start_timeout if timeout is None else timeout
        with open(self.log_path, "ab") as err:
            proc = self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "--root", str(self.root), "--foreground"],
                stdin=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"broker exited with {proc.returncode}: {self.log()}"
            with contextlib.suppress(OSError, wire.WireError):
                if self.hello()["pid"] == proc.pid:
                    return self
            if time.monotonic() > deadline:
                self.kill9()
                raise AssertionError(f"broker did not serve within {timeout}s: {self.log()}")
            time.sleep(0.01)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _configure(root: Path, extra: str = "") -> None:
    (root / "etc" / "baton").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "baton" / "baton.toml").write_text(
        f'[broker]\nsocket_mode = "0666"\nmax_connections_per_uid = {PER_UID}\n{extra}'
    )


def _open_for_nobody(b: BrokerProcess) -> None:
    for d in (b.root, b.root / "run", b.paths.run):
        os.chmod(d, 0o755)


@pytest.fixture
def hard(root: Path) -> Iterator[BrokerProcess]:
    """A broker non-root peers may connect to, with a small per-uid connection cap."""
    _configure(root)
    b = BrokerProcess(root).start()
    _open_for_nobody(b)
    yield b
    b.stop()


def _settled_fd_count(b: BrokerProcess, c: BrokerClient) -> int:
    wait_until(
        lambda: c.status(fds=False)["connections"] == 1, 60, 0.01, "other connections reaped"
    )
    return b.fd_count()


def _baseline(b: BrokerProcess) -> int:
    with b.client() as c:
        return _settled_fd_count(b, c)


def _fd_count_returns(b: BrokerProcess, baseline: int) -> None:
    """The broker's fd count comes back to ``baseline`` (polled, with a deadline)."""
    with b.client() as c:
        wait_until(
            lambda: _settled_fd_count(b, c) == baseline,
            30,
            0.02,
            f"broker fd count back to {baseline} (now {b.fd_count()})",
        )


class Bystander:
    """A VM that has nothing to do with the attack: its worker must keep working."""

    def __init__(self, b: BrokerProcess, vm: str = "bystander") -> None:
        self.b = b
        self.vm = vm
        self.pattern = os.urandom(MiB)
        with b.client() as admin:
            admin.create_vm(vm)
            admin.create_memfd(vm, "ram", MiB)
            fd = admin.get(vm, ["ram"])["ram"]
            os.pwrite(fd, self.pattern, 0)
            os.close(fd)
            self.token = admin.mint_token(vm)

    def check(self) -> None:
        with BrokerClient(self.b.paths.broker_socket, token=self.token) as c:
            fd = c.get(self.vm, ["ram"])["ram"]
            try:
                assert os.pread(fd, MiB, 0) == self.pattern
            finally:
                os.close(fd)
            assert [f["name"] for f in c.list_fds(self.vm)] == ["ram"]


def _as_token(b: BrokerProcess, token: str, op: Callable[[BrokerClient], Any]) -> Any:
    """Run ``op`` as uid nobody with ``token``: its result, or (code, message)."""

    def run() -> Any:
        try:
            with BrokerClient(b.paths.broker_socket, token=token) as c:
                return op(c)
        except RemoteError as e:
            return (str(e.code), e.message)

    return run_as(NOBODY, run)


def _images(b: BrokerProcess) -> Path:
    images = b.paths.lib / "images"
    images.mkdir(parents=True, exist_ok=True)
    return images


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# -- 1. fd.open resolves nothing it should not -------------------------------------


def test_open_refuses_symlinks_fifos_devices_and_escapes(hard):
    by = Bystander(hard)
    base = _baseline(hard)
    images = _images(hard)
    outside = hard.root / "outside"
    outside.mkdir()
    (outside / "disk.img").write_bytes(b"secret")
    (images / "real").mkdir()
    (images / "real" / "disk.img").write_bytes(b"\0" * 4096)
    (images / "link").symlink_to(images / "real")  # a directory symlink inside
    (images / "swap").mkdir()
    (images / "swap" / "disk.img").write_bytes(b"\0" * 4096)
    os.mkfifo(images / "fifo.img")
    os.mknod(images / "null.img", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    paths = {
        "via-link": images / "link" / "disk.img",
        "swapped": images / "swap" / "disk.img",
        "fifo": images / "fifo.img",
        "chardev": images / "null.img",
        "escape": hard.paths.lib / "secret.img",
    }
    (hard.paths.lib / "secret.img").write_bytes(b"secret")
    with hard.client() as admin:
        admin.create_vm("a")
        admin.allow("a", files=[{"path": str(p), "mode": "rw"} for p in paths.values()])
        token = admin.mint_token("a")

    def open_as_a(path: str | Path, name: str = "disk0") -> Any:
        return _as_token(hard, token, lambda c: c.open_file("a", name, path)["kind"])

    # Before the swap the directory is a directory: this works.
    assert open_as_a(paths["swapped"], "before-swap") == "file"
    # A symlinked directory in the path is refused, not followed.
    code, message = open_as_a(paths["via-link"])
    assert code == Code.DENIED and "symlink" in message
    # The directory swapped for a symlink to somewhere else between checks:
    (images / "swap").rename(images / "swap.old")
    (images / "swap").symlink_to(outside)
    code, message = open_as_a(paths["swapped"])
    assert code == Code.DENIED and "symlink" in message
    # A FIFO: refused at once (it used to block the broker's only thread).
    t0 = time.monotonic()
    code, message = open_as_a(paths["fifo"])
    assert code == Code.BAD_REQUEST and "FIFO" in message
    assert time.monotonic() - t0 < 5
    # A character device is never opened (its driver would see an open).
    code, message = open_as_a(paths["chardev"])
    assert code == Code.BAD_REQUEST and "character device" in message
    # '..' out of the images directory: refused by name, and the target is
    # not under broker.open_allow either.
    code, message = open_as_a(f"{images}/../secret.img")
    assert code == Code.DENIED and ".." in message
    code, message = open_as_a(paths["escape"])
    assert code == Code.DENIED and "open_allow" in message
    # The administrator may name any path, but gets no FIFO or device either.
    with hard.client() as admin:
        for p, word in ((paths["fifo"], "FIFO"), (paths["chardev"], "character device")):
            with pytest.raises(RemoteError) as e:
                admin.open_file("a", "x", p)
            assert e.value.code == Code.BAD_REQUEST and word in e.value.message
        assert {f["name"] for f in admin.list_fds("a")} == {"before-swap"}
        admin.drop_vm("a")
    by.check()
    _fd_count_returns(hard, base)


# -- 2. a token opens only what its VM's configuration names -----------------------


def test_token_opens_only_its_own_vms_files(hard):
    by = Bystander(hard)
    base = _baseline(hard)
    images = _images(hard)
    for vm in ("a", "b"):
        (images / f"{vm}.img").write_bytes(vm.encode() * 4096)
    with hard.client() as admin:
        for vm in ("a", "b"):
            admin.create_vm(vm)
            admin.allow(vm, files=[{"path": str(images / f"{vm}.img"), "mode": "rw"}])
        token_a = admin.mint_token("a")

    def as_a(op: Callable[[BrokerClient], Any]) -> Any:
        return _as_token(hard, token_a, op)

    code, message = as_a(lambda c: c.open_file("a", "steal", images / "b.img"))
    assert code == Code.DENIED and "does not name" in message
    code, message = as_a(lambda c: c.open_file("a", "new", images / "b-next.img", create=True))
    assert code == Code.DENIED
    assert not (images / "b-next.img").exists()
    code, message = as_a(lambda c: c.open_tun("a", "tap0", "btap-a"))
    assert code == Code.DENIED and "tap" in message
    # a's own image, in its configured mode (and the weaker ro), works
    assert as_a(lambda c: c.open_file("a", "disk0", images / "a.img")["kind"]) == "file"
    assert as_a(lambda c: c.open_file("a", "disk0-ro", images / "a.img", mode="ro")["kind"]) == (
        "file"
    )
    code, _ = as_a(lambda c: c.open_file("a", "disk0-c", images / "a.img", create=True))
    assert code == Code.DENIED  # create was not allowed
    # what a opened really is a's image
    with hard.client() as admin:
        fd = admin.get("a", ["disk0"])["disk0"]
        assert os.pread(fd, 1, 0) == b"a"
        os.close(fd)
        # the supervisor's provision registers each VM's disks
        disk = DiskImage("disk0", images / "c.img", MiB)
        provision(admin, hard.paths, "c", MiB, [disk])
        (c_status,) = [v for v in admin.status()["vms"] if v["name"] == "c"]
        assert c_status["allow"] == {
            "files": [{"path": str(images / "c.img"), "mode": "rw", "create": False}],
            "taps": [],
            "uid": None,  # not jailed: a token works from any uid the socket lets in
        }
        token_c = admin.mint_token("c")
    got = _as_token(hard, token_c, lambda c: c.open_file("c", "again", images / "c.img")["kind"])
    assert got == "file"
    code, _ = _as_token(hard, token_c, lambda c: c.open_file("c", "x", images / "a.img"))
    assert code == Code.DENIED
    with hard.client() as admin:
        for vm in ("a", "b", "c"):
            admin.drop_vm(vm)
    by.check()
    _fd_count_returns(hard, base)


def test_allowance_survives_restart_and_is_reregistered(root):
    """Persisted in table.json; and a supervisor re-sends it to a broker that lost it."""
    _configure(root)
    b = BrokerProcess(root).start()
    _open_for_nobody(b)
    images = _images(b)
    (images / "a.img").write_bytes(b"\0" * 4096)
    sup = b.client()
    sup.create_vm("a")
    sup.allow("a", files=[{"path": str(images / "a.img"), "mode": "ro"}])
    token = sup.mint_token("a")
    efd = os.eventfd(0)
    sup.put("a", {"ev": efd})
    sup.remember("a", {"ev": efd})
    b.kill9()
    b = BrokerProcess(root).start()
    got = _as_token(b, token, lambda c: c.open_file("a", "d", images / "a.img", mode="ro")["kind"])
    assert got == "file"
    code, _ = _as_token(b, token, lambda c: c.open_file("a", "w", images / "a.img", mode="rw"))
    assert code == Code.DENIED
    # a broker that lost its table entirely gets the allowance back from the supervisor
    b.kill9()
    b.paths.broker_state.unlink()
    b = BrokerProcess(root).start()
    sup.reconnect(time.monotonic() + 10)
    (vm,) = b.status()["vms"]
    assert vm["allow"]["files"] == [{"path": str(images / "a.img"), "mode": "ro", "create": False}]
    os.close(efd)
    sup.close()
    b.stop()


# -- 3. quotas, bounded replies, and a self-upgrade at the limit ------------------


def _put_many(admin: BrokerClient, vm: str, names: list[str], labels: dict[str, str]) -> None:
    for i in range(0, len(names), wire.MAX_FDS):
        chunk = names[i : i + wire.MAX_FDS]
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in chunk]
        try:
            admin.put(vm, dict(zip(chunk, fds, strict=True)), labels=labels)
        finally:
            for fd in fds:
                os.close(fd)


def _max_labels(tag: str) -> dict[str, str]:
    """32 pairs of 128-character strings: the most one request may carry (8 KiB)."""
    return {f"{tag}{i:03d}".ljust(128, "k"): "v" * 128 for i in range(32)}


def test_quota_at_the_limit_and_upgrade_keeps_every_fd(hard):
    by = Bystander(hard)
    base = _baseline(hard)
    with hard.client() as admin:
        quotas = admin.status(fds=False)["quotas"]
        max_fds, max_labels = quotas["max_fds_per_vm"], quotas["max_label_bytes_per_vm"]
        assert (max_fds, max_labels) == (256, 64 * 1024)
        per_put = sum(len(k) + len(v) for k, v in _max_labels("x").items())
        labelled = max_labels // per_put
        vms = [f"full{i:02d}" for i in range(16)]
        for vm in vms:
            admin.create_vm(vm)
            for i in range(labelled):  # each fd with the most labels one put can carry
                _put_many(admin, vm, [f"l{i}"], _max_labels(f"{vm}-{i}-"))
            _put_many(admin, vm, [f"fd{i}" for i in range(max_fds - labelled)], {})
        token = admin.mint_token(vms[0])
        # one more fd, or one more label byte, is a clear quota error
        with pytest.raises(RemoteError) as e:
            _put_many(admin, vms[0], ["one-too-many"], {})
        assert e.value.code == Code.QUOTA and "max_fds_per_vm" in e.value.message
        admin.create_vm("labels")
        _put_many(admin, "labels", [f"l{i}" for i in range(labelled)], _max_labels("y"))
        with pytest.raises(RemoteError) as e:
            _put_many(admin, "labels", ["more"], {"k": "v"})
        assert e.value.code == Code.QUOTA and "max_label_bytes_per_vm" in e.value.message
        # a token holder hits the same wall
        code, _ = _as_token(hard, token, lambda c: _put_many(c, vms[0], ["mine"], {}))
        assert code == Code.QUOTA
        # every reply stays bounded: fd.list of a full VM, status page by page
        assert len(admin.list_fds(vms[0])) == max_fds
        page = admin.call("broker.status").result
        assert len(wire.pack(page)) < 4 * MiB and page["next"] is not None
        status = admin.status()
        before = {
            (v["name"], f["name"]): (f["ino"], f["labels"]) for v in status["vms"] for f in v["fds"]
        }
        assert len(before) == 16 * max_fds + labelled + 1
        # re-handing an fd it holds changes nothing, so the table is not rewritten
        state = hard.paths.broker_state
        written = os.stat(state).st_ino
        fd = admin.get(vms[1], ["fd0"])["fd0"]
        assert admin.put(vms[1], {"fd0": fd})["unchanged"] == ["fd0"]
        os.close(fd)
        assert os.stat(state).st_ino == written
        # the self-upgrade hands every fd over, at the limit
        old = hard.pid
        res = admin.upgrade()
        assert res["pid"] != old
        after = {
            (v["name"], f["name"]): (f["ino"], f["labels"])
            for v in admin.status()["vms"]
            for f in v["fds"]
        }
        assert after == before
        assert all(f["state"] == "held" for v in admin.status()["vms"] for f in v["fds"])
    wait_until(lambda: hard.proc.poll() is not None, what="old broker to exit")
    with hard.client() as admin:
        for vm in [*vms, "labels"]:
            admin.drop_vm(vm)
    by.check()
    # The successor is another process: it holds what its predecessor held.
    _fd_count_returns(hard, base)


# -- 4. decoding bombs and connection floods ---------------------------------------


def _nested_empties(size: int) -> bytes:
    """About ``size`` bytes of msgpack: one big array of arrays of empty maps."""
    inner_n = 4096
    inner = b"\xdd" + inner_n.to_bytes(4, "big") + b"\x80" * inner_n
    outer_n = max(1, size // len(inner))
    return b"\xdd" + outer_n.to_bytes(4, "big") + inner * outer_n


def _send_blob(s: socket.socket, data: bytes) -> None:
    fd = wire.sealed_memfd(data)
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        s.sendmsg([wire.pack({"blob": len(data)})], anc)
    finally:
        os.close(fd)


class Hammer:
    """A bystander worker calling the broker in a loop in a thread, meanwhile."""

    def __init__(self, by: Bystander) -> None:
        self.by = by
        self.calls = 0
        self.errors: list[BaseException] = []
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with BrokerClient(self.by.b.paths.broker_socket, token=self.by.token) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    os.close(c.get(self.by.vm, ["ram"])["ram"])
                except BaseException as e:
                    self.errors.append(e)
                    return
                self.worst = max(self.worst, time.monotonic() - t0)
                self.calls += 1

    def __enter__(self) -> Hammer:
        self._thread.start()
        wait_until(lambda: self.calls > 0, what="the bystander's first call")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_decoding_bombs_are_refused_cheaply(hard):
    by = Bystander(hard)
    base = _baseline(hard)
    rss0 = _rss(hard.pid)
    bomb16 = _nested_empties(16 * MiB)
    bomb1 = _nested_empties(MiB - 4096)  # fits the administrator's size limit
    deep = b"\x91" * 60000 + b"\xc0"
    with Hammer(by) as hammer:
        with raw_socket(hard.paths.broker_socket) as s:  # root: the administrator's limits
            for data, code in ((bomb16, Code.TOO_LARGE), (bomb1, Code.BAD_FRAME)):
                t0 = time.monotonic()
                _send_blob(s, data)
                reply, fds = reply_of(s, 10)
                assert fds == [] and reply["error"]["code"] == code, reply
                assert time.monotonic() - t0 < 2, "decoding was not cut short"
            s.sendmsg([deep])
            reply, _ = reply_of(s)
            assert (
                reply["error"]["code"] == Code.BAD_FRAME and "nesting" in reply["error"]["message"]
            )

        def as_nobody() -> list[str]:
            codes = []
            with raw_socket(hard.paths.broker_socket) as s:
                _send_blob(s, bomb16)  # no blobs at all before authorisation
                codes.append(reply_of(s, 10)[0]["error"]["code"])
                s.sendmsg([_nested_empties(wire.MAX_INLINE - 16)])
                codes.append(reply_of(s, 10)[0]["error"]["code"])
                s.sendmsg([wire.pack({"id": 7, "op": "hello"})])  # the connection still works
                codes.append("ok" if reply_of(s)[0]["ok"] else "broken")
            return codes

        assert run_as(NOBODY, as_nobody) == [Code.TOO_LARGE, Code.BAD_FRAME, "ok"]
    assert not hammer.errors and hammer.calls > 0
    assert hammer.worst < 2, f"the bystander waited {hammer.worst:.2f}s"
    assert _rss(hard.pid) - rss0 < 100 * MiB
    by.check()
    _fd_count_returns(hard, base)


def test_per_uid_connection_cap_and_fair_service(hard):
    by = Bystander(hard)
    base = _baseline(hard)
    sock_path = hard.paths.broker_socket
    holding_r, holding_w = os.pipe()
    go_r, go_w = os.pipe()

    def flood() -> Any:
        clients = [BrokerClient(sock_path) for _ in range(PER_UID)]
        for c in clients:
            assert c.hello()["admin"] is False
        try:
            BrokerClient(sock_path).hello()
            refused: Any = "not refused"
        except RemoteError as e:
            refused = (str(e.code), e.message)
        # keep every allowed connection busy with pipelined requests
        for c in clients:
            for _ in range(100):
                c.conn.send_request("hello")
        os.write(holding_w, b"1")
        os.read(go_r, 1)
        for c in clients:
            c.close()
        return refused

    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(run_as(NOBODY, flood)))
    t.start()
    wait_until(lambda: result or select.select([holding_r], [], [], 0)[0], 60, 0.01, "the flood")
    assert not result, f"the flood failed: {result}"
    os.read(holding_r, 1)
    # nobody is at its cap and busy; root connects and is served promptly
    t0 = time.monotonic()
    with hard.client() as admin:
        assert admin.hello()["admin"] is True
    assert time.monotonic() - t0 < 2
    by.check()
    os.write(go_w, b"1")
    t.join(60)
    (refused,) = result
    assert refused[0] == Code.QUOTA and "max_connections_per_uid" in refused[1], refused
    # once those connections are gone, nobody may connect again
    with hard.client() as admin:
        wait_until(lambda: admin.status(fds=False)["connections"] == 1, what="flood reaped")
    assert run_as(NOBODY, lambda: BrokerClient(sock_path).hello()["service"]) == "broker"
    for fd in (holding_r, holding_w, go_r, go_w):
        os.close(fd)
    by.check()
    _fd_count_returns(hard, base)


# -- 5. table.json: durable, and never a reason not to start -----------------------


def _good_table(root: Path) -> bytes:
    """A real table.json with a VM, a token and an fd, written by a real broker."""
    b = BrokerProcess(root).start()
    with b.client() as admin:
        admin.create_vm("good")
        admin.create_memfd("good", "ram", MiB)
        admin.mint_token("good")
    b.stop()
    return b.paths.broker_state.read_bytes()


def _wrong_types(good: bytes) -> bytes:
    doc = json.loads(good)
    vm = doc["vms"]["good"]
    doc["vms"]["bad-time"] = {**vm, "created_at": "yesterday", "tokens": {}, "fds": {}}
    doc["vms"]["bad-fds"] = {**vm, "tokens": {"x" * 64: [1, "never"]}, "fds": []}
    doc["vms"]["good"]["fds"]["ino-text"] = {**vm["fds"]["ram"], "ino": "many"}
    doc["vms"]["good"]["fds"]["labels"] = {**vm["fds"]["ram"], "labels": {"k": 5}}
    doc["vms"]["../evil"] = vm
    return json.dumps(doc).encode()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "not-an-object": lambda good: b"[1, 2, 3]",
    "garbage": lambda good: os.urandom(512),
    "wrong-types": _wrong_types,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_broker_starts_with_a_bad_table(root, kind):
    good = _good_table(root)
    state = root / "var" / "lib" / "baton" / "broker" / "table.json"
    bad = CORRUPTIONS[kind](good)
    state.write_bytes(bad)
    b = LoggedBroker(root).start()
    try:
        by = Bystander(b, "fresh")
        base = _baseline(b)
        log = b.log()
        assert "table.json" in log and ("moved it to" in log or "bad entries" in log), log
        (aside,) = state.parent.glob("table.json.corrupt-*")
        assert aside.read_bytes() == bad, "the bad file is kept as it was"
        doc = json.loads(state.read_bytes())  # rewritten, whole
        assert doc["version"] == 1 and "fresh" in doc["vms"]
        with b.client() as admin:
            vms = admin.list_vms()
            if kind == "wrong-types":
                # only the bad entries are gone; the good VM waits for its fds
                assert vms == ["bad-fds", "fresh", "good"]
                assert {f["name"]: f["state"] for f in admin.list_fds("good")} == {"ram": "missing"}
                assert "skipping" in log and "ino-text" in log
            else:
                assert vms == ["fresh"]
        by.check()
        _fd_count_returns(b, base)
    finally:
        b.stop()


def test_empty_table_relearns_from_reregistration(root):
    """A broker that had to start empty gets every VM back from the supervisor."""
    b = BrokerProcess(root).start()
    sup = b.client()
    sup.create_vm("vm1")
    sup.create_memfd("vm1", "ram", MiB)
    held = sup.get("vm1", ["ram"])
    sup.remember("vm1", held)
    ino = os.fstat(held["ram"]).st_ino
    b.kill9()
    b.paths.broker_state.write_bytes(b'{"version": 1, "generation": 3, "vms": {"vm1": {"crea')
    b = LoggedBroker(root).start()
    sup.reconnect(time.monotonic() + 10)
    (f,) = b.client().list_fds("vm1")
    assert (f["name"], f["state"], f["ino"]) == ("ram", "held", ino)
    assert "moved it to" in b.log()
    os.close(held["ram"])
    sup.close()
    b.stop()
