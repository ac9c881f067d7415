"""Issue #11's supervisor, worker and persistence holes, each proven with real daemons:
bounded control sockets, peer checks on worker sockets, signal handling that
cannot deadlock, failed starts and upgrades that always end consistent, no
token on disk, restarts off the main loop, bounded console logs, a memory
check at start, and state files that survive being torn."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import NOBODY, raw_socket, reply_of, run_as, wait_until

from baton import wire
from baton.paths import Paths
from baton_lab.harness import Host, alive

pytestmark = pytest.mark.kvm

WORKER = [sys.executable, "-m", "vmm.worker"]


# ---------------------------------------------------------------- helpers


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_vm(root: Path, name: str, **keys: Any) -> Path:
    keys.setdefault("memory_mib", 16)
    keys.setdefault("tick_ms", 50)
    path = Paths(root).vms_dir / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items()))
    return path


def write_settings(root: Path, text: str) -> None:
    path = Paths(root).config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def threads_of(pid: int) -> int:
    return psutil.Process(pid).num_threads()


def settled_threads(pid: int) -> int:
    """The thread count once it has held for five polls in a row: the thread that
    served a connection a moment ago (vmctl's) ends only after its client hung
    up, and a baseline that counted it is one too many for every check after."""
    seen: list[int] = []

    def steady() -> int | None:
        seen.append(threads_of(pid))
        return seen[-1] if len(seen) >= 5 and len(set(seen[-5:])) == 1 else None

    return wait_until(steady, 10, 0.05, what="the thread count to settle")


def tokens(host: Host, vm: str) -> int:
    for v in host.broker.status()["vms"]:
        if v["name"] == vm:
            return int(v["tokens"])
    return 0


def record(host: Host, vm: str) -> dict[str, Any]:
    path = host.paths.lib / "supervisor" / f"{vm}.json"
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def supervisor_log(host: Host) -> str:
    path = host.paths.log / "baton-supervisord.log"
    return path.read_text(errors="replace") if path.exists() else ""


# ------------------------------------------------ 1. bounded control sockets


def test_control_socket_caps_connections_and_closes_idle_ones(host: Host) -> None:
    cap = 8
    write_settings(host.root, f"[supervisor]\nmax_connections = {cap}\nidle_timeout_s = 3\n")
    sup = host.supervisor()
    assert host.vmctl("list").returncode == 0
    baseline = settled_threads(sup.pid)
    path = host.paths.control_socket
    held = [raw_socket(path) for _ in range(cap)]
    wait_until(lambda: threads_of(sup.pid) >= baseline + cap, 5, what="a thread per connection")
    extra = [raw_socket(path) for _ in range(10)]
    try:
        for s in extra:
            msg, fds = reply_of(s)
            assert not fds
            assert msg["id"] == 0 and msg["ok"] is False, msg
            assert msg["error"]["code"] == "busy", msg
            assert f"{cap} connections" in msg["error"]["message"]
        # vmctl is refused with that reason while the cap is reached...
        r = host.vmctl("list")
        assert r.returncode != 0 and "connections open" in r.stderr, r.stderr
        # ...and the held connections still work.
        c = wire.Connection(held[0], timeout=5)
        assert c.call("hello").result["pid"] == sup.pid
    finally:
        for s in held + extra:
            s.close()
    wait_until(lambda: host.vmctl("list").returncode == 0, 10, 0.05, what="vmctl to work again")
    wait_until(lambda: threads_of(sup.pid) == baseline, 10, 0.05, what="the threads to end")

    # A connection that sends nothing is closed after the idle timeout, not before.
    s = raw_socket(path)
    t0 = time.monotonic()
    s.settimeout(15)
    assert s.recv(100) == b""  # the server closed it
    idle = time.monotonic() - t0
    assert 2.5 <= idle <= 8, idle
    s.close()
    # One that keeps asking is served for longer than the timeout.
    with wire.Connection.connect(path, timeout=5) as c:
        end = time.monotonic() + 4.5
        while time.monotonic() < end:
            assert c.call("hello").result["pid"] == sup.pid
            time.sleep(0.5)
    wait_until(lambda: threads_of(sup.pid) == baseline, 10, 0.05, what="the threads to end")


# ------------------------------------------------ 2. worker sockets check peers


def test_worker_control_socket_refuses_other_uids(host: Host) -> None:
    write_vm(host.root, "vm1", worker=WORKER)
    host.supervisor()
    host.wait_beats(2, "vm1")
    control = Path(record(host, "vm1")["worker"]["control"])
    # Let anyone reach the socket: only the peer check may refuse.
    d = control
    while d != Path("/"):
        os.chmod(d, 0o777 if d == control else os.stat(d).st_mode | 0o755)
        d = d.parent

    def hello() -> Any:
        with wire.Connection.connect(control, timeout=5) as c:
            return c.call("hello").result

    assert run_as(NOBODY, hello) == ("error", "denied")
    assert hello()["vm"] == "vm1"  # root still may
    assert host.status("vm1")["state"] == "running"
    host.more_beats(2, "vm1")


# ------------------------------------------------ 3. signals cannot deadlock


def test_sighup_storm_keeps_the_supervisor_responsive(host: Host) -> None:
    sup = host.supervisor()
    write_vm(host.root, "late", worker=WORKER, autostart=False)
    errors: list[str] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            r = host.vmctl("list")
            if r.returncode != 0:
                errors.append(r.stderr)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        for _ in range(200):
            os.kill(sup.pid, signal.SIGHUP)
        for _ in range(5):  # and a few more while it may be reloading
            time.sleep(0.01)
            os.kill(sup.pid, signal.SIGHUP)
        wait_until(lambda: "late" in host.vm_list(), 10, 0.05, what="the reload")
        t0 = time.monotonic()
        assert sup.hello(timeout=5)["pid"] == sup.pid
        assert time.monotonic() - t0 < 2
    finally:
        stop.set()
        asker.join(30)
    assert not errors, errors
    os.kill(sup.pid, signal.SIGTERM)
    assert sup.proc is not None
    assert sup.proc.wait(15) == 0


# ------------------------------------------------ 4. failed starts and upgrades end consistent

#: A stand-in worker that speaks the ready-pipe protocol and serves a control
#: socket, but misbehaves as its first argument says.
FAKE_WORKER = r"""
import argparse, os, socket, sys, threading, time
from pathlib import Path
from baton import wire
from vmm import state

mode = sys.argv[1]
p = argparse.ArgumentParser()
for a in ("--root", "--vm", "--vcpus", "--tick-ms", "--instance", "--control", "--guest",
          "--ready-fd", "--token-fd", "--disk", "--kvm-fd"):
    p.add_argument(a)
p.add_argument("--boot", action="store_true")
p.add_argument("--incoming", action="store_true")
args = p.parse_args(sys.argv[2:])
if mode == "flaky":  # the first run works a little, then fails; every later one hangs
    marker = Path(args.root) / f"{args.vm}.ran"
    if marker.exists():
        mode = "hang"
    else:
        marker.write_text("")
if mode == "hang":  # never says ready
    while True:
        time.sleep(60)

def hello():
    if mode == "garbage-hello":
        return [1, 2, 3]
    return {"vm": args.vm, "instance": args.instance, "version": "fake",
            "state": "incoming" if args.incoming else "running",
            "state_versions": state.versions(), "pid": os.getpid()}

def serve(sock):
    while True:
        try:
            msg, fds = wire.recv_message(sock)
        except Exception:
            return
        wire.close_fds(fds)
        op = msg.get("op")
        if op == "handoff.receive" and mode == "bad-handoff":
            sock.send(b"\xc1 this is not msgpack")
            continue
        result = hello() if op in ("hello", "status") else {}
        wire.send_message(sock, {"id": msg["id"], "ok": True, "result": result})

listener = wire.listen(Path(args.control))
os.write(int(args.ready_fd), b"ready\n")
os.close(int(args.ready_fd))
if mode == "flaky":
    threading.Timer(1.0, lambda: os._exit(1)).start()
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def fake_worker(root: Path, mode: str) -> list[str]:
    path = root / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return [sys.executable, str(path), mode]


def fakes_running(root: Path) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmd = p.info["cmdline"] or []
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(root / "fake_worker.py") in cmd:
                out.append(p.pid)
    return out


def test_start_with_a_malformed_hello_fails_cleanly(host: Host) -> None:
    write_vm(host.root, "bad", worker=fake_worker(host.root, "garbage-hello"), autostart=False)
    write_vm(host.root, "good", worker=WORKER)
    host.supervisor()
    host.wait_beats(2, "good")
    r = host.vmctl("start", "bad")
    assert r.returncode != 0 and "hello" in r.stderr, r.stderr
    st = host.status("bad")
    assert st["state"] == "failed" and st["pid"] is None, st
    assert not fakes_running(host.root)
    assert tokens(host, "bad") == 0
    assert host.status("good")["state"] == "running"
    host.more_beats(2, "good")


def test_unexpected_exception_after_start_leaves_nothing(host: Host) -> None:
    write_vm(host.root, "vm1", worker=WORKER, autostart=False, restart="no")
    host.supervisor(env={"BATON_FAULT_SUPERVISOR": "fail-started"})
    r = host.vmctl("start", "vm1")
    assert r.returncode != 0 and "fault injected" in r.stderr, r.stderr
    st = host.status("vm1")
    assert st["state"] == "failed" and "internal error" in st["reason"], st
    wait_until(lambda: not host.workers_of("vm1"), 10, what="the started worker to be gone")
    assert tokens(host, "vm1") == 0


@pytest.mark.parametrize("mode", ["garbage-hello", "bad-handoff"])
def test_upgrade_to_a_misbehaving_worker_ends_consistent(host: Host, mode: str) -> None:
    write_vm(host.root, "vm1", worker=WORKER)
    write_vm(host.root, "vm2", worker=WORKER)
    host.supervisor()
    host.wait_beats(2, "vm1")
    host.wait_beats(2, "vm2")
    pid = host.status("vm1")["pid"]
    code, report = host.upgrade("vm1", worker=" ".join(fake_worker(host.root, mode)))
    assert code != 0, report
    expected = "aborted" if mode == "garbage-hello" else "rolled-back"
    assert report["outcome"] == expected, report
    st = host.status("vm1")
    assert st["state"] == "running" and st["pid"] == pid, st
    assert not fakes_running(host.root)
    assert tokens(host, "vm1") == 1  # the running worker's only
    host.more_beats(3, "vm1")
    host.more_beats(2, "vm2")
    journal = host.paths.lib / "upgrade" / "vm1.last"
    assert json.loads(journal.read_text().splitlines()[-1])["step"] == "done"


def test_unexpected_exception_in_prepare_aborts_the_upgrade(host: Host) -> None:
    write_vm(host.root, "vm1", worker=WORKER)
    host.supervisor(env={"BATON_FAULT_SUPERVISOR": "fail-prepared"})
    host.wait_beats(2, "vm1")
    pid = host.status("vm1")["pid"]
    code, report = host.upgrade("vm1")
    assert code != 0 and report["outcome"] == "aborted", report
    assert "fault injected" in report["reason"]
    st = host.status("vm1")
    assert st["state"] == "running" and st["pid"] == pid, st
    wait_until(lambda: len(host.workers_of("vm1")) == 1, 10, what="the new worker to be gone")
    assert tokens(host, "vm1") == 1
    host.more_beats(3, "vm1")


def test_a_failure_after_the_new_worker_was_asked_to_receive_aborts(host: Host) -> None:
    """The new worker waits on the handoff's pair before the transfer is journaled
    (``ready_receiver``): a failure there aborts, the old worker never paused, and
    the old worker's end of the pair is closed (the same fds after each attempt)."""
    write_vm(host.root, "vm1", worker=WORKER)
    host.supervisor(env={"BATON_FAULT_SUPERVISOR": "fail-receiver-ready"})
    host.wait_beats(2, "vm1")
    pid = host.status("vm1")["pid"]
    sup_fds = Path(f"/proc/{host.sup.proc.pid}/fd")
    counts = []
    for _ in range(2):
        code, report = host.upgrade("vm1")
        assert code != 0 and report["outcome"] == "aborted", report
        assert "fault injected" in report["reason"]
        wait_until(lambda: len(host.workers_of("vm1")) == 1, 10, what="the new worker gone")
        counts.append(len(list(sup_fds.iterdir())))
    wait_until(lambda: len(list(sup_fds.iterdir())) <= counts[0], 10, what="no fd kept per attempt")
    st = host.status("vm1")
    assert st["state"] == "running" and st["pid"] == pid, st
    assert tokens(host, "vm1") == 1
    host.more_beats(3, "vm1")


# ------------------------------------------------ 5. no token on disk

#: A worker command that notes the token it is given (outside the root), then
#: runs the real baton-vmm with it: the test then knows every token there was.
TOKEN_TAP = r"""
import os, sys
argv = sys.argv[2:]
i = argv.index("--token-fd")
fd = int(argv[i + 1])
token = b""
while data := os.read(fd, 4096):
    token += data
os.close(fd)
with open(sys.argv[1], "a") as f:
    f.write(token.decode() + "\n")
r, w = os.pipe()
os.write(w, token)
os.close(w)
os.set_inheritable(r, True)
argv[i + 1] = str(r)
os.execv(sys.executable, [sys.executable, "-m", "vmm.worker", *argv])
"""


def files_containing(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            found += [f"{path}: {n[:8]}..." for n in needles if n.encode() in data]
    return found


def test_no_token_is_ever_written_to_disk(host: Host, tmp_path: Path) -> None:
    tap = tmp_path / "tap.py"
    tap.write_text(TOKEN_TAP)
    seen = tmp_path / "tokens.txt"
    # jail = false: the tap writes what it sees to a host file, which a jail forbids
    write_vm(
        host.root,
        "vm1",
        worker=[sys.executable, str(tap), str(seen)],
        restart="on-failure",
        jail=False,
    )
    host.supervisor()
    host.wait_beats(2, "vm1")

    def restarted_after(pid: int) -> int:
        st = wait_until(
            lambda: (s := host.status("vm1"))["state"] == "running" and s["pid"] != pid and s,
            30,
            0.05,
            what="vm1 to run again",
        )
        return int(st["pid"])

    code, report = host.upgrade("vm1")
    assert code == 0, report
    pid = host.status("vm1")["pid"]
    os.kill(pid, signal.SIGKILL)
    pid = restarted_after(pid)
    host.sup.kill9()
    host.supervisor()
    assert host.status("vm1")["pid"] == pid
    code, report = host.upgrade("vm1")  # the adopted worker's token is revoked by its hash
    assert code == 0, report
    pid = host.status("vm1")["pid"]
    host.sup.kill9()
    os.kill(pid, signal.SIGKILL)  # dies while no supervisor watches
    wait_until(lambda: not alive(pid), what="the worker to die")
    host.supervisor()
    pid = restarted_after(pid)
    host.more_beats(2, "vm1")

    minted = seen.read_text().split()
    assert len(minted) >= 5, minted
    assert not files_containing(host.root, minted)
    assert tokens(host, "vm1") == 1  # the running worker's, nothing else
    assert not any("token" in k for k in record(host, "vm1")["worker"] if k != "token_sha256")


# ------------------------------------------------ 6. restarts off the main loop


def test_a_hanging_restart_delays_no_other_vm(host: Host) -> None:
    write_settings(
        host.root,
        "[supervisor]\nstart_timeout_s = 25\nrestart_backoff_ms = 100\n",
    )
    write_vm(
        host.root,
        "hang",
        worker=fake_worker(host.root, "flaky"),
        restart="on-failure",
        restart_max=1,
        jail=False,  # it keeps a marker file in the root, which a jail forbids
    )
    write_vm(host.root, "good", worker=WORKER, restart="on-failure")
    host.supervisor()
    host.wait_beats(2, "good")
    # hang's first worker fails after a second; its restart then never says ready.
    wait_until(lambda: (host.root / "hang.ran").exists(), 10, what="hang's first run")
    wait_until(
        lambda: host.status("hang")["state"] == "starting" and len(fakes_running(host.root)) == 1,
        10,
        0.05,
        what="hang's restart to hang",
    )
    pid = host.status("good")["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: (s := host.status("good"))["state"] == "running" and s["pid"] != pid,
        5,
        0.05,
        what="good to be restarted while hang's start hangs",
    )
    took = time.monotonic() - t0
    assert took < 4, took
    assert host.status("hang")["state"] == "starting"  # still hanging: we did not wait it out
    t0 = time.monotonic()
    assert host.vmctl("list").returncode == 0
    assert time.monotonic() - t0 < 3
    host.more_beats(2, "good")
    for fake in fakes_running(host.root):  # end the hang: its start fails, no more restarts
        os.kill(fake, signal.SIGKILL)
    host.wait_state("failed", "hang")
    assert not fakes_running(host.root)


# ------------------------------------------------ 7. bounded console logs, streamed logs


def test_console_log_is_rotated_and_stays_bounded(host: Host) -> None:
    cap = 16384
    write_settings(
        host.root, f"[supervisor]\nconsole_log_max_bytes = {cap}\nconsole_log_keep = 2\n"
    )
    write_vm(host.root, "chatty", worker=WORKER, tick_ms=2)
    host.supervisor()
    log = host.console_log("chatty")
    one, two, three = (log.with_name(f"{log.name}.{i}") for i in (1, 2, 3))
    most = 0

    def rotated_twice() -> bool:
        nonlocal most
        with contextlib.suppress(FileNotFoundError):
            most = max(most, log.stat().st_size)
        return two.exists()

    wait_until(rotated_twice, 60, 0.02, what="two rotations")
    assert most < cap + 256 * 1024, most  # bounded by the cap plus one housekeeping round
    assert one.stat().st_size > cap and not three.exists()
    assert b"baton-guest seq=" in one.read_bytes()
    host.more_beats(3, "chatty")  # the guest writes on, into the truncated file
    r = host.vmctl("logs", "chatty", "-n", "2")
    assert r.returncode == 0 and 1 <= r.stdout.count("\n") <= 2, r.stdout


def max_rss_kib(*args: str) -> int:
    """Peak RSS of ``vmctl ARGS`` (its output discarded), measured by a parent of its own."""
    probe = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    cmd = [sys.executable, "-c", probe, sys.executable, "-m", "supervisor.vmctl", *args]
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def test_vmctl_logs_streams_a_large_log(root: Path) -> None:
    paths = Paths(root)
    paths.log.mkdir(parents=True, exist_ok=True)
    small, big = paths.console_log("small"), paths.console_log("big")
    small.write_bytes(b"hello\n")
    line = b"x" * 99 + b"\n"
    with open(big, "wb") as f:
        for _ in range(50):
            f.write(line * 10_000)  # 1 MB at a time: 50 MB in all
        f.write(b"second to last\nlast\n")
    base = max_rss_kib("--root", str(root), "logs", "small")
    whole = max_rss_kib("--root", str(root), "logs", "big")
    tail = max_rss_kib("--root", str(root), "logs", "big", "-n", "2")
    assert whole - base < 16 * 1024, (base, whole)
    assert tail - base < 16 * 1024, (base, tail)
    out = subprocess.run(
        [sys.executable, "-m", "supervisor.vmctl", "--root", str(root), "logs", "big"],
        capture_output=True,
        check=True,
    ).stdout
    assert len(out) == big.stat().st_size
    r = subprocess.run(
        [sys.executable, "-m", "supervisor.vmctl", "--root", str(root), "logs", "big", "-n", "2"],
        capture_output=True,
        check=True,
    )
    assert r.stdout == b"second to last\nlast\n"


# ------------------------------------------------ 8. a VM the host cannot hold is refused


def test_vm_larger_than_the_host_is_refused(host: Host) -> None:
    huge = 1 << 20  # 1 TiB
    write_vm(host.root, "huge", worker=WORKER, memory_mib=huge, autostart=False)
    write_vm(host.root, "ok", worker=WORKER)
    host.supervisor()
    host.wait_beats(2, "ok")
    r = host.vmctl("start", "huge")
    assert r.returncode != 0, r.stderr
    assert f"VM huge needs {huge} MiB, the host has" in r.stderr, r.stderr
    assert "MiB available" in r.stderr and "overcommit" in r.stderr
    st = host.status("huge")
    assert st["state"] == "stopped" and st["pid"] is None, st
    assert not host.workers_of("huge")
    assert "huge" not in {v["name"] for v in host.broker.status()["vms"]}  # nothing provisioned
    assert host.status("ok")["state"] == "running"
    host.more_beats(2, "ok")


# ------------------------------------------------ 9. torn state files


def damage(path: Path, how: str, good: bytes) -> None:
    data = {
        "empty": b"",
        "garbage": b"\x00\xff not json at all \xc1\n",
        "truncated": good[: len(good) // 2],
    }.get(how)
    if how == "types":
        rec = json.loads(good)
        rec["worker"]["pid"] = str(rec["worker"]["pid"])
        data = json.dumps(rec).encode()
    assert data is not None, how
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("record_damage", "journal_damage"),
    [("empty", None), ("garbage", "garbage"), ("truncated", "torn"), ("types", "empty")],
)
def test_a_restart_survives_torn_records_and_journals(
    host: Host, capfd: pytest.CaptureFixture[str], record_damage: str, journal_damage: str | None
) -> None:
    write_vm(host.root, "vm1", worker=WORKER)
    write_vm(host.root, "vm2", worker=WORKER)
    host.supervisor()
    host.wait_beats(2, "vm1")
    pid = host.status("vm1")["pid"]
    rec_path = host.paths.lib / "supervisor" / "vm1.json"
    good = rec_path.read_bytes()
    host.sup.kill9()
    damage(rec_path, record_damage, good)
    journal = host.paths.lib / "upgrade" / "vm1.journal"
    if journal_damage is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        if journal_damage == "torn":
            begin = {
                "step": "begin",
                "t": time.time(),
                "txid": "x",
                "old": json.loads(good)["worker"],
            }
            line = json.dumps(begin).encode() + b"\n"
            journal.write_bytes(line + b'{"step":"prepa')
        else:
            damage(journal, journal_damage, b"")
    capfd.readouterr()
    host.supervisor()
    st = host.wait_state("running", "vm1")
    assert st["pid"] == pid  # the live worker was adopted, not doubled or lost
    assert len(host.workers_of("vm1")) == 1
    host.more_beats(2, "vm1")
    assert host.status("vm2")["state"] == "running"
    err = capfd.readouterr().err
    assert "vm1.json is unusable" in err and "vm1.json.corrupt" in err, err
    assert rec_path.with_name("vm1.json.corrupt").exists()
    json.loads(rec_path.read_text())  # written again, whole
    if journal_damage is not None:
        assert "upgrade journal" in err and "vm1.journal.corrupt" in err, err
        assert journal.with_name("vm1.journal.corrupt").exists()
        assert not journal.exists()
    r = host.upgrade("vm1")
    assert r[0] == 0, r[1]
