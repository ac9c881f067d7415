"""Workers forked by a zygote (vmm.zygote, supervisor.zygote): real daemons, real
KVM, as root.

One host: a jailed VM and an unjailed one, both forked; a third whose worker
command is not baton-vmm by name, exec'd. The forked workers are confined as
exec'd ones are, hold none of the zygote's fds, and outlive their zygote
(killed -9: the next start forks from a new one) and their supervisor (killed
-9: the zygote exits, the next supervisor adopts the workers). Bad requests
to a zygote are refused and it serves on.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
from helpers import copy_packages, patch, wait_until

from baton import wire
from baton.wire import Code
from baton_lab.harness import Host, alive, short_root
from supervisor.priority import BACKGROUND
from supervisor.zygote import MAX_ZYGOTES, Zygote, ZygotePool

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jail and the zygote's forks need root"),
]
WORKER = [sys.executable, "-m", "vmm.worker"]
#: baton-vmm all the same, but not by a name the supervisor starts a zygote for
NOT_BY_NAME = [sys.executable, "-c", "import sys, vmm.worker; sys.exit(vmm.worker.main())"]


def write_vm(root: Path, name: str, worker: list[str] = WORKER, extra: str = "") -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(
        f"memory_mib = 16\ntick_ms = 50\nworker = {json.dumps(worker)}\n{extra}"
    )


def zygotes(sup_pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(sup_pid).children():
        try:
            if "--zygote" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def the_zygote(sup_pid: int, other_than: int | None = None) -> psutil.Process:
    found: list[psutil.Process] = wait_until(
        lambda: [z for z in zygotes(sup_pid) if z.pid != other_than],
        30,
        0.05,
        "the supervisor's zygote",
    )
    assert len(found) == 1, found
    return found[0]


def fd_targets(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return out


def forked_by(h: Host, vm: str) -> list[int]:
    """The zygote pids the VM's worker log says its workers were forked by."""
    text = h.paths.worker_log(vm).read_text()
    return [int(line.split()[-1]) for line in text.splitlines() if "forked by zygote pid" in line]


def test_forked_workers_are_confined_hold_their_own_fds_and_outlive_zygote_and_supervisor():
    root = short_root()
    write_vm(root, "a")
    write_vm(root, "b", extra="jail = false\n")
    write_vm(root, "c", NOT_BY_NAME)
    with Host.start(root, vm="a") as h:
        sup = h.sup.pid
        st = {vm: h.wait_state("running", vm) for vm in ("a", "b", "c")}
        z = the_zygote(sup)
        assert h.call("supervisor.status")["zygotes"] == [{"pid": z.pid, "command": WORKER}]
        assert forked_by(h, "a") == [z.pid] and forked_by(h, "b") == [z.pid]
        assert forked_by(h, "c") == []  # exec'd, as before
        # Warmed up on a machine of its own, closed before any fork: one thread again,
        # no KVM fd and no memfd left to reach a worker.
        assert z.num_threads() == 1
        held = fd_targets(z.pid)
        assert not [t for t in held if "kvm" in t or t.startswith("/memfd:")], held
        assert "no warm-up" not in (h.paths.log / "zygote.log").read_text()

        # Confined as an exec'd worker is, and shows its own command line.
        jail = st["a"]["jail"]
        assert jail["uid"] >= 700000 and jail["seccomp"] == "filter" and jail["no_new_privs"]
        assert jail["namespaces"] == ["ipc", "mnt", "net", "pid", "uts"]
        assert jail["cap_eff"] == "0000000000000000"
        assert st["b"]["jail"]["uid"] == 0 and st["b"]["jail"]["namespaces"] == []
        for vm in ("a", "b"):
            w = psutil.Process(st[vm]["pid"])
            assert w.ppid() == sup  # the supervisor's own child, as every worker
            cmd = w.cmdline()
            assert cmd[:3] == WORKER and ("--vm", vm) in itertools.pairwise(cmd)
            # None of the zygote's fds (its socket, its log) reached the worker.
            leaked = fd_targets(w.pid) & fd_targets(z.pid) - {"/dev/null"}
            assert not leaked, f"{vm}'s worker holds the zygote's {leaked}"
            assert os.readlink(f"/proc/{w.pid}/fd/1") == str(h.paths.worker_log(vm))
            assert os.readlink(f"/proc/{w.pid}/fd/0") == "/dev/null"
            environ = Path(f"/proc/{w.pid}/environ").read_bytes()
            assert b"NOTIFY_SOCKET" not in environ and environ.strip(b"\0") == b""

        # The zygote killed: every worker runs on; the next start forks from a new one.
        z.send_signal(signal.SIGKILL)
        wait_until(lambda: not alive(z.pid), 10, 0.02, "the zygote to die")
        code, report = h.upgrade("a")
        assert code == 0 and report["outcome"] == "committed", report
        z2 = the_zygote(sup, other_than=z.pid)
        assert [x["pid"] for x in h.call("supervisor.status")["zygotes"]] == [z2.pid]
        assert forked_by(h, "a") == [z.pid, z2.pid]
        for vm in ("b", "c"):
            assert h.status(vm)["pid"] == st[vm]["pid"] and h.status(vm)["state"] == "running"
        pids = {vm: h.status(vm)["pid"] for vm in ("a", "b", "c")}

        # The supervisor killed -9: its zygote exits; the next supervisor adopts the workers.
        h.sup.kill9()
        # (an exited zygote may stay a zombie of whoever inherited it: not alive)
        wait_until(lambda: not alive(z2.pid), 10, 0.02, "the zygote to exit")
        h.supervisor()
        for vm in ("a", "b", "c"):
            assert h.wait_state("running", vm)["pid"] == pids[vm]
        h.wait_beats(len(h.beats("a")) + 1, "a")


def test_a_zygote_refuses_bad_requests_and_serves_on(tmp_path):
    z = Zygote(WORKER, tmp_path / "zygote.log")
    try:
        assert z.conn.call("hello").result["pid"] == z.pid
        r, w = os.pipe()
        try:
            good = {"args": [], "cmdline": ["x"], "env": {}, "fds": [r, w], "stdout": r}
            good |= {"report": w, "nice": 0, "jail": None}
            bad = [
                ("fork", {}, [], Code.BAD_REQUEST),  # nothing it needs
                ("fork", good, [r], Code.BAD_REQUEST),  # two fds named, one sent
                ("fork", {**good, "env": {"A": 1}}, [r, w], Code.BAD_REQUEST),
                ("fork", {**good, "jail": {"uid": 5}}, [r, w], Code.BAD_REQUEST),  # half a jail
                ("fork", {**good, "fds": [r, r]}, [r, w], Code.BAD_REQUEST),
                ("fork", {**good, "report": 999}, [r, w], Code.BAD_REQUEST),
                ("exec", {}, [], Code.UNKNOWN_OP),
            ]
            for op, args, fds, code in bad:
                with pytest.raises(wire.RemoteError) as e:
                    z.conn.call(op, args, fds=fds)
                assert e.value.code == code, (op, args, e.value)
        finally:
            os.close(r)
            os.close(w)
        # A datagram that is no message at all: an error, and the zygote serves on.
        z.conn.sock.send(b"\xc1 not msgpack")
        with pytest.raises(wire.RemoteError):
            z.conn.wait_reply(0, 5)
        hello = z.conn.call("hello").result
        assert hello["forks"] == 0
        children = [c.pid for c in psutil.Process(z.pid).children()]
        assert z.alive() and children == ([hello["spare"]] if hello["spare"] else [])
    finally:
        z.close()
    assert not z.alive()  # our end closed: it exits by itself


def test_a_fork_is_the_spare_made_ahead_and_the_spare_ends_with_its_zygote(tmp_path):
    """Idle, the zygote forks a spare (``vmm.zygote.Spare``); a fork request is handed
    to it (the reply names its pid), the next spare is another process, and the
    zygote's exit takes its spare along (reaped, not left to the supervisor)."""
    z = Zygote(WORKER, tmp_path / "zygote.log")
    spares = []
    try:
        spare = wait_until(lambda: z.conn.call("hello").result["spare"], 10, 0.01, "a spare")
        assert [c.pid for c in psutil.Process(z.pid).children()] == [spare]
        with open(tmp_path / "worker.log", "ab") as log:
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                req = {"args": ["--no-such-option"], "cmdline": ["baton-vmm"], "env": {}}
                req |= {"fds": [log.fileno(), w], "stdout": log.fileno(), "report": w}
                req |= {"nice": 0, "jail": None}
                assert z.fork(req, [log.fileno(), w]) == spare
                os.close(w)
                w = -1
                with os.fdopen(os.dup(r), "rb") as report:
                    said = report.read().decode()
                assert said.startswith("pid "), said  # the spare forked the worker
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
        spares.append(spare)
        again = wait_until(
            lambda: (s := z.conn.call("hello").result["spare"]) not in (None, spare) and s,
            10,
            0.01,
            "the next spare",
        )
        spares.append(again)
    finally:
        z.close()
    assert not z.alive()
    assert not psutil.pid_exists(spares[-1]), "the unused spare ended and was reaped"


def test_a_zygote_yields_to_pauses_and_leaves_the_registry_before_its_reap(tmp_path):
    """What it forks during a pause is born SCHED_IDLE (supervisor.priority); a zygote
    found dead is out of the registry before it is reaped, so a reused pid is never
    touched."""
    z = Zygote(WORKER, tmp_path / "zygote.log")
    try:
        assert z.pid in BACKGROUND.pids
        with BACKGROUND.quiet():
            assert os.sched_getscheduler(z.pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(z.pid) == os.SCHED_OTHER
        os.kill(z.pid, signal.SIGKILL)
        wait_until(lambda: not z.alive(), 10, 0.02, "the zygote seen dead")
        assert z.pid not in BACKGROUND.pids
        assert z.proc.returncode == -signal.SIGKILL  # reaped after
    finally:
        z.close()


def test_no_zygote_when_switched_off():
    root = short_root()
    write_vm(root, "a")
    (root / "etc" / "baton" / "baton.toml").write_text("[upgrade]\nzygote = false\n")
    with Host.start(root, vm="a") as h:
        h.wait_state("running", "a")
        assert zygotes(h.sup.pid) == [] and forked_by(h, "a") == []


def test_the_pool_keeps_four_zygotes_and_closes_them_when_switched_off(tmp_path):
    on = [True]
    pool = ZygotePool(tmp_path / "zygote.log", lambda: on[0])
    try:
        commands = [["env", f"BATON_TEST_ZYGOTE={i}", *WORKER] for i in range(MAX_ZYGOTES + 1)]
        first = pool.get(commands[0])
        assert first is not None and first.alive()
        assert pool.get(commands[0]) is first  # one per command
        for cmd in commands[1:]:
            assert pool.get(cmd) is not None
        running = pool.running()
        assert len(running) == MAX_ZYGOTES and first not in running and not first.alive()
        assert pool.get(NOT_BY_NAME) is None  # never a zygote for what is not baton-vmm by name
        on[0] = False
        assert pool.get(commands[1]) is None
        assert pool.running() == [] and not any(z.alive() for z in running)
    finally:
        pool.close()


def test_an_install_in_place_reaches_the_next_upgrade(tmp_path):
    """A new baton-vmm installed over the old one (same command, new files): the
    next upgrade runs the new code, though a zygote and a standby of the old one
    are ready (baton.codestamp): neither is used once a file it loaded changed."""
    code = tmp_path / "install"
    copy_packages(code, "1.0.0-old")
    command = ["env", f"PYTHONPATH={code}", *WORKER]
    root = short_root()
    write_vm(root, "a", command, extra="standby = true\n")
    with Host.start(root, vm="a") as h:
        assert h.wait_state("running", "a")["worker_version"] == "1.0.0-old"
        z = the_zygote(h.sup.pid)
        standby = wait_until(lambda: h.status("a")["standby"]["pid"], 60, 0.05, "a standby")
        # The same install upgraded in place: one file the zygote and standby loaded.
        patch(code / "baton" / "__init__.py", '"1.0.0-old"', '"1.0.0-new"')
        rc, report = h.upgrade("a")
        assert rc == 0 and report["outcome"] == "committed", report
        assert report["new_pid"] != standby and not alive(standby)
        assert h.status("a")["worker_version"] == "1.0.0-new"
        assert not alive(z.pid) and forked_by(h, "a")[-1] != z.pid  # a fresh zygote's fork
        h.wait_beats(len(h.beats("a")) + 1, "a")
