"""Stock QEMU's devices on the broker's fds, across live upgrades: a TCP connection into the
guest through its virtio-net NIC (the broker's tap), and fsync'd records on its virtio-blk disk
(the broker's image fd). A real Linux guest under TCG; one boot per test.

Every test here runs in a network namespace of its own (tests/netns.py): the broker creates the
tap in it, the tap's host side gets 169.254.0.1/16 and the guest 169.254.0.2/16; nothing
addresses anything outside it."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_until
from netns import isolated
from qemu_assets import (
    ECHO_PORT,
    HALTED_RE,
    build_initramfs,
    counter_problems,
    counters,
    disk_records,
    ensure_assets,
    load_modules,
    qemu_skip_reason,
)

from baton import contract
from baton.config import load_settings
from baton.paths import Paths
from baton_lab.harness import Host
from supervisor import netdev
from supervisor.kinds.qemu import device_args
from supervisor.vmconfig import default_tap, load_vms

REASON = qemu_skip_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or "")]
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"
WAIT = 90.0
HOST_IP, GUEST_IP = "169.254.0.1", "169.254.0.2"
TAP, TAP_FD = default_tap("q1", "net0"), contract.tap_fd("net0")
UPGRADES = 20  # live upgrades of one jailed QEMU, continuity checked after each


@pytest.fixture(scope="module")
def assets():
    return ensure_assets(CACHE)


def write_vm(root: Path, assets) -> Path:
    """q1: one NIC, one disk; started by the test (so that its tap can be set up first)."""
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    image = root / "var" / "lib" / "baton" / "images" / "q1-disk0.img"
    (d / "q1.toml").write_text(
        'vmm = "qemu"\nmemory_mib = 256\nautostart = false\n'
        '[qemu]\naccel = "tcg"\n'
        f'kernel = "{assets.kernel}"\ninitrd = "{assets.initramfs}"\n'
        f'append = "{assets.cmdline} baton.ip={GUEST_IP}/16"\n'
        '[[net]]\nname = "net0"\n'
        f'[[disk]]\nname = "disk0"\nsize_mib = 4\npath = "{image}"\n'
    )
    return image


def add_address(ifname: str, address: str, prefixlen: int) -> None:
    """An address on ``ifname`` in this network namespace (netlink: no ``ip`` needed)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.addr(
            "add", index=ipr.link_lookup(ifname=ifname)[0], address=address, prefixlen=prefixlen
        )


def start_q1(host: Host) -> None:
    """vmctl start q1 (the supervisor has the broker create its tap, and sets it up),
    then the tap's host side gets its address, in this namespace only."""
    r = host.vmctl("start", "q1")
    assert r.returncode == 0, r.stdout + r.stderr
    (fd,) = [f for f in host.broker.status()["vms"][0]["fds"] if f["name"] == TAP_FD]
    assert fd["kind"] == "tun" and fd["detail"] == TAP, fd
    add_address(TAP, HOST_IP, 16)
    wait_until(lambda: len(counters(host.console_text())) >= 3, WAIT, 0.05, "the guest's counter")


def records(image: Path) -> list[int]:
    with open(image, "rb") as f:
        return disk_records(f.read(1 << 20))


def connect(timeout: float = WAIT) -> socket.socket:
    """A TCP connection to the guest's echo service (its NIC comes up during boot)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((GUEST_IP, ECHO_PORT), timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Stream:
    """Numbered lines sent to the echo service at a steady rate, and what comes back."""

    def __init__(self, sock: socket.socket, interval: float = 0.005) -> None:
        self.sock = sock
        self.interval = interval
        self.sent = bytearray()
        self.received = bytearray()
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._recv)]
        sock.settimeout(None)

    def __enter__(self) -> Stream:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.threads[0].join(10)

    def _send(self) -> None:
        n = 0
        while not self.stop.is_set():
            line = b"line %08d\n" % n
            try:
                self.sock.sendall(line)
            except OSError as e:
                self.errors.append(f"send: {e!r}")
                return
            self.sent += line
            n += 1
            time.sleep(self.interval)

    def _recv(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError as e:
                self.errors.append(f"recv: {e!r}")
                return
            if not chunk:
                return
            self.received += chunk


@isolated(timeout=900)
def test_twenty_jailed_upgrades_keep_tcp_disk_counter_and_console(root: Path, assets):
    """Twenty upgrades of a jailed QEMU, each followed by proof that the guest's TCP
    connection and its disk still work; then, on the same connection (one boot: a TCG
    boot is the slow part), every restart of the supervisor and the broker (each
    adopts the same QEMU), one more upgrade, and the console both ways. At the end:
    every line echoed byte-exact, every disk record in order, the guest's counter
    (in its RAM) without a gap or a repeat, and the jail unchanged throughout."""
    image = write_vm(root, assets)
    with Host(root, vm="q1", wait=WAIT) as host:
        host.supervisor()
        start_q1(host)
        link = netdev.lookup(TAP)
        assert link is not None and link.queue == netdev.TAP_QUEUE
        st = host.status()
        assert st["kind"] == "qemu" and st["worker_version"].startswith("7."), st
        check_qemu_jail(st)
        uid = st["jail"]["uid"]

        def same_tap_and_working() -> None:
            now = netdev.lookup(TAP)
            assert now is not None and now.index == link.index, "the tap changed"
            still_working(stream, image)

        pids = {st["pid"]}
        with Stream(connect()) as stream:
            wait_until(lambda: len(stream.received) > 1000, WAIT, 0.05, "echoed lines")
            for _ in range(UPGRADES):
                rc, r = host.upgrade()
                assert rc == 0 and r["outcome"] == "committed", r
                assert 0 < r["blackout_ms"] < 1000 and r["state_bytes"] < 4 << 20  # no RAM copy
                assert host.status()["pid"] == r["new_pid"]
                pids.add(r["new_pid"])
                same_tap_and_working()  # the new QEMU carries both devices on
            assert len(pids) == UPGRADES + 1
            check_qemu_jail(before := host.status(), uid=uid)  # the VM's uid, stable
            (vm,) = host.broker.status()["vms"]
            assert vm["tokens"] == 0, "QEMU never talks to the broker: no token is minted for it"
            host.restart_daemons(same_tap_and_working, {TAP_FD, "disk0"})
            assert host.status()["pid"] == before["pid"], "a restarted supervisor adopts it"
            rc, r = host.upgrade()
            assert rc == 0 and r["outcome"] == "committed", r
            check_qemu_jail(host.status(), uid=uid)
            same_tap_and_working()
            # the console works in both directions on the new QEMU, through vmctl console
            con = host.vmctl("console", "q1", input=b"hello-after-upgrades\n\x1d", timeout=60)
            assert con.returncode == 0, con.stderr
            wait_until(
                lambda: "input=hello-after-upgrades" in host.console_text(), WAIT, 0.05, "echo"
            )
            # what an operator sees of both devices
            text = host.vmctl("status", "q1").stdout
            assert f"disk0      {image}, 4 MiB" in text, text
            assert f"net0       tap {TAP}, mac " in text and ", no bridge" in text, text
            assert f"host: ifindex {link.index}, up, to guest " in text, text
            fds = {line.split()[0]: line for line in host.vmctl("fds", "q1").stdout.splitlines()}
            assert " tun " in fds[TAP_FD] and TAP in fds[TAP_FD], fds
            assert " file " in fds["disk0"] and str(image) in fds["disk0"], fds
            assert "memfd" in fds[contract.RAM], fds
        lines, written = finish(host, stream, image)
    print(f"{lines} lines echoed byte-exact, {written} disk records, {UPGRADES + 1} upgrades")


def check_qemu_jail(st: dict, uid: int | None = None) -> None:
    """A jailed QEMU: its own uid, namespaces and cgroup, seccomp (the jail's and
    -sandbox's), and every host file it uses an fd it inherited, never a path it
    reopens (but its own RAM memfd, /proc/self/fd/N, which the VM's uid owns)."""
    j = st["jail"]
    assert j["enabled"] and j["uid"] >= 700000 and (uid is None or j["uid"] == uid), j
    assert j["seccomp"] == "filter" and j["no_new_privs"] and int(j["cap_eff"], 16) == 0, j
    assert j["namespaces"] == ["ipc", "mnt", "net", "pid", "uts"] and j["cgroup"], j
    pid = st["pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in argv and b"spawn=deny" in argv[argv.index(b"-sandbox") + 1]
    reopened = [a for a in argv if b"/proc/self/fd/" in a]
    assert len(reopened) == 1 and b"memory-backend-file" in reopened[0], reopened
    ram = int(reopened[0].split(b"/proc/self/fd/")[1].split(b",")[0])
    assert os.stat(f"/proc/{pid}/fd/{ram}").st_uid == j["uid"]
    assert b"/dev/fdset/1000" in b" ".join(argv)  # the console log, from a set
    assert not os.path.exists(f"/proc/{pid}/root/dev/kvm")  # TCG: no /dev/kvm at all


def still_working(stream: Stream, image: Path) -> None:
    """Lines sent from now on come back, and the guest adds disk records."""
    mark, on_disk = len(stream.sent), len(records(image))
    wait_until(lambda: len(stream.received) > mark, WAIT, 0.01, "echoes")
    wait_until(lambda: len(records(image)) > on_disk, WAIT, 0.05, "a new record")
    assert stream.errors == [], stream.errors


def finish(host: Host, stream: Stream, image: Path) -> tuple[int, int]:
    """The stream stopped (by the caller), every line back byte-exact, a clean close;
    then a clean guest shutdown, and every record on the image in order. Returns the
    lines echoed and the records written."""
    wait_until(lambda: len(stream.received) >= len(stream.sent), WAIT, 0.05, "every echo")
    assert stream.errors == [], stream.errors
    assert bytes(stream.received) == bytes(stream.sent), "the stream is not byte-exact"
    stream.sock.shutdown(socket.SHUT_WR)  # the guest's cat sees EOF and hangs up
    stream.threads[1].join(WAIT)
    assert stream.errors == [] and not stream.threads[1].is_alive()
    stream.sock.close()
    assert counter_problems(counters(host.console_text())) == []
    # a clean shutdown: the guest stops writing records, syncs and powers off
    host.type_line("halt")
    st = host.wait_state("stopped")
    assert st["reason"] == "the guest shut down" and "status 0" in st["last_exit"], st
    halted = wait_until(lambda: HALTED_RE.search(host.console_text()), WAIT, 0.05)
    written = int(halted.group(1))
    found = records(image)
    assert found == list(range(written)), (len(found), found[-3:], written)
    return len(stream.sent) // 14, written


@isolated(timeout=600)
def test_rollback_after_the_migration_keeps_both_devices(root: Path, assets):
    """The supervisor dies right after the new QEMU loaded the state (old in postmigrate,
    its disk handed over); the next one adopts both, rolls back (the old QEMU takes its
    disk back and runs on), and a later upgrade commits. Nothing is lost on either."""
    image = write_vm(root, assets)
    with Host(root, vm="q1", wait=WAIT) as host:
        host.supervisor(env={"BATON_FAULT_SUPERVISOR": "crash-after-loaded"})
        start_q1(host)
        old = host.status()["pid"]
        with Stream(connect()) as stream:
            wait_until(lambda: len(stream.received) > 1000, WAIT, 0.05, "echoed lines")
            r = host.vmctl("upgrade", "q1")
            assert r.returncode == 3 and "lost the connection" in r.stderr, r.stderr
            host.sup.proc.wait(10)
            host.supervisor()
            st = wait_until(lambda: (s := host.status()) and s["state"] == "running" and s, WAIT)
            assert st["pid"] == old, "before the commit the old QEMU keeps the guest"
            still_working(stream, image)
            rc, rep = host.upgrade()
            assert rc == 0 and rep["outcome"] == "committed", rep
            still_working(stream, image)
        finish(host, stream, image)


def test_device_args_name_the_broker_fds(tmp_path: Path, assets):
    """No boot: the options a VM with a NIC and a disk gets, on the fd numbers given."""
    write_vm(tmp_path, assets)
    paths = Paths(tmp_path)
    vm = load_vms(paths, load_settings(paths).supervisor).vms["q1"]
    args, nics, disks = device_args(vm, {contract.tap_fd("net0"): 7, "disk0": 9})
    assert nics == {"net0": 7} and disks == {"disk0": 9}
    joined = " ".join(args)
    assert "-netdev tap,id=netdev-net0,fd=7 " in joined  # vnet_hdr: QEMU asks the fd
    assert f"virtio-net-pci,id=net0,netdev=netdev-net0,mac={vm.nets[0].mac},romfile=" in joined
    assert "-add-fd fd=9,set=1,opaque=disk0" in joined
    assert "-drive file=/dev/fdset/1,format=raw,if=none,id=drive-disk0,cache=writeback" in joined
    assert "virtio-blk-pci,id=disk0,drive=drive-disk0" in joined


def test_initramfs_is_reproducible(assets):
    busybox = Path("/bin/busybox").read_bytes()
    moddir = next(CACHE.glob(f"modules-{assets.kernel_package}"))
    modules = load_modules(moddir)
    assert [n for n, _ in modules] == list(assets.modules)
    assert build_initramfs(busybox, modules) == build_initramfs(busybox, modules)
    order = [n for n, _ in modules]
    for name, deps in (("virtio_pci", ("virtio", "virtio_ring")), ("virtio_net", ("failover",))):
        assert all(order.index(d) < order.index(name) for d in deps), order


@isolated(timeout=600)
def test_suspend_kill_everything_resume_keeps_disk_and_reaches_the_guest(root: Path, assets):
    """vmctl suspend of a QEMU VM with a NIC and a disk, every Baton process killed (the
    broker too: the tap and every memfd are gone), fresh daemons, vmctl resume: the
    guest goes on (counter without a gap), a TCP connection the test opens again reaches
    its echo service on the new tap, and its disk records stay in order."""
    image = write_vm(root, assets)
    with Host(root, vm="q1", wait=WAIT) as host:
        host.supervisor()
        start_q1(host)
        with Stream(connect()) as stream:
            wait_until(lambda: len(stream.received) > 1000, WAIT, 0.05, "echoed lines")
        wait_until(lambda: len(stream.received) >= len(stream.sent), WAIT, 0.05, "every echo")
        assert bytes(stream.received) == bytes(stream.sent) and stream.errors == []
        stream.sock.close()
        on_disk = len(records(image))
        r = host.vmctl("suspend", "q1")
        assert r.returncode == 0, r.stderr
        host.sup.kill9()
        host.broker.kill9()
        host.broker.start()
        host.supervisor()
        assert host.status()["state"] == "suspended"
        r = host.vmctl("resume", "q1")
        assert r.returncode == 0, r.stderr
        add_address(TAP, HOST_IP, 16)  # the tap is a new one: its host side again
        with Stream(connect()) as again:
            still_working(again, image)
        assert len(records(image)) > on_disk
        finish(host, again, image)
