"""baton-supervisord and vmctl with real daemons: a real broker, a real supervisor and
real KVM workers under a temporary root."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import NOBODY, fd_count, run_as, wait_until

from baton import __version__, wire
from baton.daemonize import read_pidfile
from baton.paths import Paths
from baton_lab.harness import BrokerProcess, SupervisorProcess, alive, vmctl
from broker.client import BrokerClient
from vmm.guest import continuity_problems, expected_ram, heartbeats

pytestmark = pytest.mark.kvm

WAIT = 30.0  # generous: the machine is shared and nested KVM is slow (as Host waits)


# ---------------------------------------------------------------- helpers


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_vm(root: Path, name: str, *, disks: tuple[str, ...] = (), **keys: Any) -> Path:
    """ROOT/etc/baton/vms.d/NAME.toml; small and quick unless told otherwise."""
    keys.setdefault("memory_mib", 16)
    keys.setdefault("tick_ms", 50)
    lines = [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    for d in disks:
        lines += ["", "[[disk]]", f'name = "{d}"', "size_mib = 1"]
    path = Paths(root).vms_dir / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def ok(root: Path, *args: str) -> str:
    """vmctl ARGS, which must succeed; its stdout."""
    r = vmctl(root, *args, timeout=120)
    assert r.returncode == 0, f"vmctl {' '.join(args)}: exit {r.returncode}: {r.stderr}"
    return r.stdout


def ok_or_fail(root: Path, *args: str) -> str:
    """vmctl ARGS that may exit 1 (config check with errors); its stdout."""
    r = vmctl(root, *args, timeout=120)
    assert r.returncode in (0, 1), r.stderr
    return r.stdout


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {text!r}"
    return lines[0]


# ------------------------------------------------------------------ tests


def test_out_of_the_box_demo(host):
    root = host.root
    assert not host.paths.vms_dir.exists()
    host.supervisor()
    assert "started" in ok(root, "start", "demo")
    got = wait_until(
        lambda: len(b := heartbeats(ok(root, "logs", "demo"))) >= 3 and b,
        WAIT,
        0.1,
        "heartbeats in vmctl logs demo",
    )
    assert continuity_problems(got) == []
    assert got[0].ram == expected_ram()

    st = host.status("demo")
    assert st["name"] == "demo"
    assert st["state"] == "running"
    assert isinstance(st["pid"], int) and alive(st["pid"])
    assert st["pid"] in host.worker_pids()
    assert st["worker_version"] == __version__
    assert isinstance(st["uptime_s"], int | float) and 0 <= st["uptime_s"] < 300

    listing = ok(root, "list").splitlines()
    assert listing[0].split()[:3] == ["NAME", "STATE", "PID"]
    demo = [line.split() for line in listing[1:] if line.split()[0] == "demo"]
    assert len(demo) == 1 and demo[0][1] == "running" and demo[0][2] == str(st["pid"])

    again = vmctl(root, "start", "demo")
    assert again.returncode == 1
    line = one_line(again.stderr)
    assert "demo" in line and "already running" in line and str(st["pid"]) in line
    assert host.status("demo")["pid"] == st["pid"]  # the running worker is untouched

    assert "stopped" in ok(root, "stop", "demo")
    wait_until(lambda: not alive(st["pid"]), WAIT, what="the demo worker to exit")


def test_config_three_vms_and_broken_files(host):
    root = host.root
    for name in ("alpha", "beta", "gamma"):
        write_vm(root, name, autostart=True)
    broken = write_vm(root, "broken", memory_mib="4G")
    syntax = host.paths.vms_dir / "syntax.toml"
    syntax.write_text("memory_mib = 16\ntick_ms = 50\nvcpus = = 1\n")  # line 3

    sup = host.supervisor()
    vms = wait_until(
        lambda: (
            (v := host.vm_list())
            and all(v.get(n, {}).get("state") == "running" for n in ("alpha", "beta", "gamma"))
            and v
        ),
        WAIT,
        0.1,
        "three VMs running",
    )
    assert set(vms) == {"alpha", "beta", "gamma"}
    assert len({v["pid"] for v in vms.values()}) == 3
    assert {v["pid"] for v in vms.values()} <= host.worker_pids()

    check = vmctl(root, "config", "check")
    assert check.returncode == 1
    text = check.stdout + check.stderr
    broken_line = one_line("\n".join(ln for ln in text.splitlines() if "broken.toml" in ln))
    assert "memory_mib" in broken_line
    syntax_line = one_line("\n".join(ln for ln in text.splitlines() if "syntax.toml" in ln))
    assert "line 3" in syntax_line

    as_json = json.loads(ok_or_fail(root, "--json", "config", "check"))
    assert as_json["vms"] == ["alpha", "beta", "gamma"]
    assert set(as_json["errors"]) == {str(broken), str(syntax)}

    errors = sup.call("supervisor.status")["config_errors"]
    assert set(errors) == {str(broken), str(syntax)}
    assert "memory_mib" in errors[str(broken)] and "broken.toml" in errors[str(broken)]
    assert "line 3" in errors[str(syntax)]
    # the three good ones are still running
    assert all(v["state"] == "running" for v in host.vm_list().values())


def test_supervisor_kill9_workers_keep_running_and_are_adopted(host):
    root = host.root
    names = ("one", "two")
    for name in names:
        write_vm(root, name, autostart=True, tick_ms=20)
    sup = host.supervisor()
    for name in names:
        host.wait_beats(3, name)
    pids = {name: host.status(name)["pid"] for name in names}

    sup.kill9()
    assert vmctl(root, "list").returncode == 3
    # heartbeats carry on with nobody supervising
    counts = {name: len(host.beats(name)) for name in names}
    for name in names:
        host.wait_beats(counts[name] + 10, name)
    assert all(alive(pid) for pid in pids.values())

    host.supervisor()
    for name in names:
        st = host.status(name)
        assert st["state"] == "running", st
        assert st["pid"] == pids[name]
    assert host.worker_pids() == set(pids.values())
    for name in names:
        got = host.wait_beats(len(host.beats(name)) + 5, name)
        # one worker all along: seq from 0 with no gap, no reboot
        assert continuity_problems(got) == [], name
        assert "baton-guest boot" in host.console_text(name)
        assert host.console_text(name).count("baton-guest boot") == 1


def test_worker_kill9_restart_policies(host):
    root = host.root
    write_vm(root, "phoenix", autostart=True, restart="on-failure", restart_backoff_ms=100)
    write_vm(root, "mortal", autostart=True, restart="no")
    host.supervisor()
    old = {n: host.wait_state("running", n)["pid"] for n in ("phoenix", "mortal")}
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)

    # on-failure: a new worker
    st = wait_until(
        lambda: (
            (s := host.status("phoenix"))["state"] == "running"
            and s["pid"] not in (None, old["phoenix"])
            and s
        ),
        WAIT,
        0.1,
        "phoenix to come back",
    )
    assert alive(st["pid"]) and not alive(old["phoenix"])
    assert "SIGKILL" in (st["last_exit"] or "")

    # no: failed, with the signal named, and its fds kept for inspection
    st = host.wait_state("failed", "mortal")
    assert "SIGKILL" in st["reason"]
    assert st["pid"] is None
    assert not alive(old["mortal"])
    fds = ok(root, "fds", "mortal")
    assert "ram" in [line.split()[0] for line in fds.splitlines()[1:]]
    with host.broker.client() as c:
        assert "mortal" in c.list_vms()
    assert host.status("mortal")["state"] == "failed"  # nobody restarted it meanwhile

    assert "stopped" in ok(root, "stop", "mortal")
    with host.broker.client() as c:
        assert "mortal" not in c.list_vms()
        assert "phoenix" in c.list_vms()
    assert host.status("mortal")["state"] == "stopped"
    gone = vmctl(root, "fds", "mortal")
    assert gone.returncode == 1 and "ram" not in gone.stdout


def assert_unreachable(r: subprocess.CompletedProcess[str], what: str) -> None:
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith("vmctl: ") and f"the {what} is not running" in line, line
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


SUPERVISOR_COMMANDS = (
    ("list",),
    ("status", "demo"),
    ("start", "demo"),
    ("stop", "demo"),
    ("console", "demo"),
    ("restart", "demo"),
    ("upgrade", "demo"),
    ("reload",),
    ("--json", "list"),
)


def test_vmctl_against_dead_daemons(root):
    # never started: no run directory at all
    for args in SUPERVISOR_COMMANDS:
        assert_unreachable(vmctl(root, *args, timeout=30), "supervisor")
    assert_unreachable(vmctl(root, "broker", "status"), "broker")
    assert_unreachable(vmctl(root, "fds", "demo"), "broker")

    broker = BrokerProcess(root).start()
    try:
        sup = SupervisorProcess(root).start()
        try:
            assert vmctl(root, "list").returncode == 0
            sup.stop()  # SIGTERM: a clean stop
            for args in SUPERVISOR_COMMANDS:
                assert_unreachable(vmctl(root, *args, timeout=30), "supervisor")
            sup = SupervisorProcess(root).start()
            sup.kill9()  # a stale socket file stays behind
            assert Paths(root).control_socket.exists()
            for args in SUPERVISOR_COMMANDS:
                assert_unreachable(vmctl(root, *args, timeout=30), "supervisor")
        finally:
            sup.stop()
        broker.stop()
        assert_unreachable(vmctl(root, "broker", "status"), "broker")
        broker = BrokerProcess(root).start()
        broker.kill9()
        assert_unreachable(vmctl(root, "broker", "status"), "broker")
        assert_unreachable(vmctl(root, "--json", "broker", "status"), "broker")
    finally:
        broker.stop()


def test_stop_start_30_times_leaks_nothing(host):
    root = host.root
    write_vm(root, "cycle", autostart=False, tick_ms=100)
    sup = host.supervisor()
    broker = host.broker

    def cycle(i: int) -> None:
        # every tenth cycle through the real CLI, the rest straight on the control socket
        if i % 10 == 0:
            ok(root, "start", "cycle")
            ok(root, "stop", "cycle")
        else:
            assert sup.call("vm.start", {"vm": "cycle"})["state"] == "running"
            assert sup.call("vm.stop", {"vm": "cycle"})["state"] == "stopped"

    cycle(0)
    assert not host.worker_pids()
    base_broker, base_sup = broker.fd_count(), fd_count(sup.pid)
    for i in range(1, 31):
        cycle(i)

    def settled() -> bool:
        return broker.fd_count() <= base_broker and fd_count(sup.pid) <= base_sup

    with contextlib.suppress(AssertionError):
        wait_until(settled, 10, 0.1, "fd counts back to baseline")
    assert (broker.fd_count(), fd_count(sup.pid)) == (base_broker, base_sup)
    wait_until(lambda: not host.worker_pids(), WAIT, 0.1, "no worker left")
    zombies = [c.pid for c in psutil.Process(sup.pid).children() if c.status() == "zombie"]
    assert zombies == [], "workers the supervisor never reaped"
    assert host.status("cycle")["state"] == "stopped"
    with broker.client() as c:
        assert "cycle" not in c.list_vms()


def test_broker_liveness_check_survives_a_reply_in_flight(broker):
    """What the supervisor's housekeeping asks every 0.2 s while its control threads call
    the broker on the same connection: a reply not yet read is no sign of a dead broker.
    (Seen as `vm.start` failing with "Bad file descriptor" or a 10 s WireTimeout in the
    50-cycle test, each time right after "broker reconnected" in the supervisor's log.)"""
    with BrokerClient(broker.paths.broker_socket) as c:
        assert c.hello()["pid"] == broker.pid
        assert not c.broker_gone()
        rid = c.conn.send_request("hello")  # as Connection.call does, under its lock
        p = select.poll()
        p.register(c.conn.fileno(), select.POLLIN)
        assert p.poll(WAIT * 1000), "the broker did not answer"
        assert not c.broker_gone(), "a queued reply was taken for a dead broker"
        assert c.conn.wait_reply(rid).result["pid"] == broker.pid  # the call still completes
        broker.kill9()
        assert c.broker_gone(timeout=WAIT), "a killed broker was not noticed"


def test_sighup_reload(host):
    root = host.root
    write_vm(root, "keep", autostart=True)
    gone_file = write_vm(root, "gone", autostart=True)
    write_vm(root, "fragile", autostart=True)
    sup = host.supervisor()
    pids = {n: host.wait_state("running", n)["pid"] for n in ("keep", "gone", "fragile")}

    # a new autostart VM starts
    write_vm(root, "fresh", autostart=True)
    os.kill(sup.pid, signal.SIGHUP)
    st = host.wait_state("running", "fresh")
    assert alive(st["pid"])

    # a running VM whose file went away keeps running, reported as removed
    gone_file.unlink()
    os.kill(sup.pid, signal.SIGHUP)
    listed = wait_until(
        lambda: (v := host.vm_list())["gone"]["removed_from_config"] and v, WAIT, 0.1, "removal"
    )
    assert listed["gone"]["state"] == "running" and listed["gone"]["pid"] == pids["gone"]
    assert alive(pids["gone"])
    assert not listed["keep"]["removed_from_config"]

    # a running VM whose file breaks keeps running, on its previous config
    broken = write_vm(root, "fragile", memory_mib="4G")
    os.kill(sup.pid, signal.SIGHUP)
    wait_until(
        lambda: str(broken) in sup.call("supervisor.status")["config_errors"],
        WAIT,
        0.1,
        "the broken file to be reported",
    )
    st = host.status("fragile")
    assert st["state"] == "running" and st["pid"] == pids["fragile"]
    assert st["memory_mib"] == 16 and not st["removed_from_config"]

    listed = host.vm_list()
    assert {n: v["pid"] for n, v in listed.items() if n in pids} == pids
    assert all(v["state"] == "running" for v in listed.values())
    # once stopped, a removed VM leaves the table
    ok(root, "stop", "gone")
    assert "gone" not in host.vm_list()


class Reader:
    """Collects a pipe's output in a thread."""

    def __init__(self, f: Any) -> None:
        self.data = b""
        self._f = f
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while chunk := os.read(self._f.fileno(), 65536):
            self.data += chunk

    def text(self) -> str:
        return self.data.decode(errors="replace")


def test_console_attach_echo_and_detach(host):
    root = host.root
    write_vm(root, "con", autostart=True, tick_ms=20, disks=("disk0",))
    host.supervisor()
    host.wait_beats(3, "con")
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.vmctl", "--root", str(root), "console", "con"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out = Reader(proc.stdout)
        err = Reader(proc.stderr)
        assert proc.stdin is not None
        # attached: the console's output follows on stdout
        wait_until(lambda: heartbeats(out.text()), WAIT, 0.05, "heartbeats on the console")
        proc.stdin.write(b"w1 hello\n")
        proc.stdin.flush()
        wait_until(
            lambda: (
                "baton-guest echo w1 hello" in (t := out.text())
                and "baton-guest disk write sector=1 status=0" in t
            ),
            WAIT,
            0.05,
            "the guest's echo on the console",
        )
        before = len(host.beats("con"))
        proc.stdin.write(b"\x1d")
        proc.stdin.flush()
        assert proc.wait(WAIT) == 0, err.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    got = host.wait_beats(before + 10, "con")
    assert continuity_problems(got) == []
    assert host.status("con")["state"] == "running"
    # and the console can be attached again
    r = vmctl(root, "console", "con", input=b"r1\n\x1d", timeout=60)
    assert r.returncode == 0, r.stderr
    wait_until(
        lambda: "baton-guest disk read sector=1 status=0 data=hello" in host.console_text("con"),
        WAIT,
        0.05,
        "the second attach to reach the guest",
    )
    assert continuity_problems(host.beats("con")) == []


def test_guest_reboot_boots_again(host):
    root = host.root
    write_vm(root, "rb", autostart=True, tick_ms=20)
    host.supervisor()
    host.wait_beats(3, "rb")
    old = host.status("rb")["pid"]
    r = vmctl(root, "console", "rb", input=b"reboot\n\x1d", timeout=60)
    assert r.returncode == 0, r.stderr

    st = wait_until(
        lambda: (s := host.status("rb"))["state"] == "running" and s["pid"] != old and s,
        WAIT,
        0.1,
        "rb to boot again",
    )
    assert alive(st["pid"]) and not alive(old)
    assert st["last_exit"] == "exited with status 3"  # EXIT_GUEST_RESET

    def after_reboot():
        text = host.console_text("rb")
        mark = text.find("baton-guest echo reboot")
        return heartbeats(text[mark:]) if mark >= 0 else []

    got = wait_until(lambda: len(b := after_reboot()) >= 5 and b, WAIT, 0.05, "new heartbeats")
    # the first heartbeats after the echo may still be the old boot's last ones
    seq0 = [i for i, b in enumerate(got) if b.seq == 0]
    assert seq0, f"no seq=0 after the reboot: {got[:5]}"
    fresh = got[seq0[-1] :]
    assert continuity_problems(fresh) == []


def test_daemon_mode(host):
    root = host.root
    write_vm(root, "d1", autostart=True)
    cmd = [sys.executable, "-m", "supervisor", "--root", str(root)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # ready means ready: the control socket answers right away
    with wire.Connection.connect(host.paths.control_socket, timeout=10) as c:
        hello = c.call("hello").result
    pid = read_pidfile(host.paths.supervisor_pidfile)
    assert pid is not None and hello["pid"] == pid and alive(pid)
    assert int(host.paths.supervisor_pidfile.read_text()) == pid

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert read_pidfile(host.paths.supervisor_pidfile) == pid

    st = host.wait_state("running", "d1")
    worker = st["pid"]
    host.wait_beats(2, "d1")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), WAIT, 0.05, "the daemon to stop")
    assert vmctl(root, "list").returncode == 3
    assert alive(worker)
    n = len(host.beats("d1"))
    host.wait_beats(n + 3, "d1")  # the guest carries on

    host.supervisor()
    assert host.status("d1")["pid"] == worker
    ok(root, "stop", "d1")
    wait_until(lambda: not alive(worker), WAIT, 0.05, "the worker to stop")


def test_non_admin_is_denied(host):
    root, paths = host.root, host.paths
    paths.etc.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text('[supervisor]\nsocket_mode = "0666"\n')
    host.supervisor()
    for d in (root, root / "run", paths.run):
        d.chmod(0o755)
    sock = str(paths.control_socket)

    def call(op: str, args: dict[str, Any] | None = None):
        def fn():
            with wire.Connection.connect(sock, timeout=10) as c:
                return c.call(op, args).result

        return fn

    hello = run_as(NOBODY, call("hello"))  # the socket is reachable ...
    assert isinstance(hello, dict) and hello["service"] == "supervisor"
    denied = ("error", "denied")  # ... but nothing else is allowed
    assert run_as(NOBODY, call("vm.list")) == denied
    assert run_as(NOBODY, call("vm.start", {"vm": "demo"})) == denied
    assert run_as(NOBODY, call("vm.stop", {"vm": "demo"})) == denied
    assert run_as(NOBODY, call("supervisor.status")) == denied
    assert run_as(NOBODY, call("config.reload")) == denied
    assert host.status("demo")["state"] == "stopped"
    assert not host.worker_pids()


def test_systemd_notify_ready_watchdog_and_reload(host):
    """Under systemd: READY=1 once serving, WATCHDOG=1 at half WATCHDOG_USEC,
    RELOADING=1 then READY=1 around a SIGHUP reload."""
    notify = host.root / "notify.sock"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(notify))
    ns.settimeout(WAIT)
    sup = host.supervisor(env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "400000"})
    messages: list[str] = []

    def until(pred) -> None:
        while not pred():
            messages.append(ns.recv(4096).decode())

    until(lambda: any("READY=1" in m for m in messages))
    until(lambda: sum("WATCHDOG=1" in m for m in messages) >= 2)
    os.kill(sup.pid, signal.SIGHUP)
    until(lambda: any("RELOADING=1" in m for m in messages))
    i = next(i for i, m in enumerate(messages) if "RELOADING=1" in m)
    until(lambda: any("READY=1" in m for m in messages[i + 1 :]))
    ns.close()
