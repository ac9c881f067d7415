"""Jailed workers (supervisor.jail, baton.jail_launcher): real daemons, real KVM, as root.

A hostile worker in VM a's jail tries everything a compromised VMM would and
fails at each; VM b runs on with an unbroken heartbeat. A worker the seccomp
filter kills is reported and restarted. Jailed VMs upgrade as unjailed ones
do, and a restarted supervisor adopts them. Bad input is a clear error and
starts nothing.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import run_as, wait_until

from baton.config import WORKER_GID
from baton_lab.harness import Host
from broker.client import BrokerClient
from supervisor import jail
from supervisor.jail import cgwarm
from vmm.guest import continuity_problems

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(os.geteuid() != 0, reason="jails need root"),
]
REPO = Path(__file__).resolve().parent.parent
WORKER = [sys.executable, "-m", "vmm.worker"]
HOSTILE = [sys.executable, str(REPO / "tests" / "jail_hostile.py")]


def configure(root: Path, jail_toml: str = "") -> None:
    etc = root / "etc" / "baton"
    (etc / "vms.d").mkdir(parents=True, exist_ok=True)
    (etc / "baton.toml").write_text(
        # the defaults: the jail on (we are root), the broker socket 0660 in its group
        f"[supervisor]\nrestart_backoff_ms = 200\n[jail]\n{jail_toml}"
    )


def write_vm(root: Path, name: str, worker: list[str] = WORKER, extra: str = "") -> None:
    (root / "etc" / "baton" / "vms.d" / f"{name}.toml").write_text(
        f'memory_mib = 32\ntick_ms = 20\nworker = {json.dumps(worker)}\nrestart = "on-failure"\n'
        + extra
    )


def block_device() -> str:
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith(("loop", "ram", "zram")):
            return f"/dev/{name}"
    return "/dev/sda"


def test_hostile_worker_fails_at_everything_and_b_runs_on(tmp_path_factory):
    from baton_lab.harness import short_root

    root = short_root()
    configure(root, "pids_max = 64\nmemory_overhead_mib = 256\n")
    write_vm(root, "b", extra='[[disk]]\nname = "disk0"\nsize_mib = 4\n')
    with Host.start(root, vm="b") as h:
        st = h.wait_state("running", "b")
        h.wait_beats(3, "b")
        b_pid = st["pid"]
        run_dir = h.paths.vm_run_dir("b")
        control = next(str(p) for p in run_dir.iterdir() if p.name.startswith("worker."))
        info = {
            "root": str(root),
            "repo": str(REPO),
            "block_device": block_device(),
            "setuid_binary": "/usr/bin/mount",
            "b": {"pid": b_pid, "control": control, "disk": st["disks"][0]["path"]},
        }
        write_vm(root, "a", [*HOSTILE, json.dumps(info)])
        assert h.vmctl("reload").returncode == 0
        a = h.wait_state("running", "a", timeout=120)
        log = h.paths.worker_log("a").read_text()
        line = next(ln for ln in log.splitlines() if ln.startswith("HOSTILE {"))
        results = json.loads(line.removeprefix("HOSTILE "))
        print(json.dumps(results, indent=1))
        assert results.pop("own_ram_with_own_token").startswith("ALLOWED"), "the token must work"
        allowed = {k: v for k, v in results.items() if v.startswith("ALLOWED")}
        assert not allowed, f"a jailed worker got through: {allowed}"
        assert len(results) >= 30
        # Refused for the right reasons, not by accident.
        assert "denied" in results["b_ram_with_a_token"].lower()
        assert "forks" in results["fork_past_pids_limit"]
        assert "SIGKILL" in results["allocate_past_memory_limit"]
        assert "Operation not permitted" in results["ptrace_b"]
        assert "Operation not permitted" in results["mount"]
        assert "Operation not permitted" in results["clone_newuser"]
        assert "Function not implemented" in results["clone3_newuser"]
        # a itself is jailed and boots; b never noticed.
        j = a["jail"]
        assert j["uid"] >= 700000 and j["seccomp"] == "filter" and j["no_new_privs"]
        assert j["namespaces"] == ["ipc", "mnt", "net", "pid", "uts"]
        assert j["cgroup"], j
        h.wait_beats(3, "a")
        beats = h.more_beats(5, "b")
        assert not continuity_problems(beats)
        assert h.status("b")["pid"] == b_pid
        assert h.status("b")["jail"]["uid"] != j["uid"]


def test_seccomp_kill_is_reported_and_restarted(root):
    configure(root)
    write_vm(root, "a", [*HOSTILE, json.dumps({"mode": "die"})])
    with Host.start(root, vm="a") as h:
        log = h.paths.worker_log("a")
        h.wait_state("running")
        wait_until(
            lambda: log.read_text().count("about to call getitimer") >= 2,
            60,
            0.2,
            "the restart policy to start the worker again",
        )
        st = h.status("a")
        text = json.dumps(st)
        assert "SIGSYS" in text, st
        assert "still alive" not in log.read_text()
        h.vmctl("stop", "a")


def test_jailed_upgrades_and_adoption(root):
    configure(root)
    write_vm(root, "a")
    with Host.start(root, vm="a") as h:
        first = h.wait_state("running")
        # the broker socket: 0660 in the jailed workers' group, the worker in it
        sock = os.stat(h.paths.broker_socket)
        assert (sock.st_mode & 0o777, sock.st_gid) == (0o660, WORKER_GID)
        groups = Path(f"/proc/{first['pid']}/status").read_text().split("Groups:")[1]
        assert groups.split("\n")[0].split() == [str(WORKER_GID)]
        j = first["jail"]
        assert j["seccomp"] == "filter" and len(j["namespaces"]) == 5
        assert Path(f"/proc/{first['pid']}/status").read_text().count("NSpid") == 1
        h.wait_beats(3)
        blackouts = []
        for _ in range(20):
            rc, rep = h.upgrade()
            assert rc == 0 and rep["outcome"] == "committed", rep
            blackouts.append(rep["blackout_ms"])
        beats = h.more_beats(5)
        assert not continuity_problems(beats), continuity_problems(beats)
        st = h.status()
        assert st["jail"]["uid"] == j["uid"]  # stable per VM
        assert st["jail"]["seccomp"] == "filter"
        # A restarted supervisor adopts the jailed worker by its host pid.
        pid = st["pid"]
        h.sup.stop()
        h.supervisor()
        assert h.wait_state("running")["pid"] == pid
        rc, rep = h.upgrade()
        assert rc == 0 and rep["outcome"] == "committed", rep
        assert not continuity_problems(h.more_beats(5))
        out = h.vmctl("status", "a").stdout
        assert "jail       uid" in out and "seccomp filter" in out
        print("blackouts", sorted(blackouts))
        # A stopped VM's cgroup goes once its worker is confirmed dead.
        cgroups = cgroup_dirs(h.status()["pid"])
        assert cgroups and all(d.is_dir() for d in cgroups), cgroups
        assert h.vmctl("stop", "a").returncode == 0
        assert not [d for d in cgroups if d.exists()], cgroups


def cgroup_dirs(pid: int) -> list[Path]:
    """The worker's memory and pids cgroups (v1, or the v2 one), as directories."""
    out = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctl, path = line.split(":", 2)
        if "/baton/" not in path:
            continue
        for c in ctl.split(",") if ctl else [""]:
            if c in ("memory", "pids", ""):
                out.append(Path("/sys/fs/cgroup", c, path.lstrip("/")))
    return sorted(set(out))


def test_broker_token_works_only_from_the_vms_uid(shared_broker):
    sock = shared_broker.paths.broker_socket
    with shared_broker.client() as admin:
        admin.create_vm("a")
        admin.create_memfd("a", "ram", 1 << 20)
        token = admin.mint_token("a")
        admin.allow("a", uid=700123)

    def get() -> int:
        with BrokerClient(sock, token=token) as c:
            return len(c.get("a", ["ram"]))

    assert run_as(700123, get) == 1
    assert run_as(700124, get) == ("error", "denied")
    with shared_broker.client() as admin:  # the administrator is never bound by it
        assert len(admin.get("a", ["ram"])) == 1
        admin.allow("a", uid=-1)
    assert run_as(700124, get) == 1


def _start_fails(h: Host, vm: str, needle: str) -> None:
    r = h.vmctl("start", vm)
    assert r.returncode != 0, r.stdout
    assert needle in r.stderr + r.stdout, r.stderr + r.stdout
    assert not h.workers_of(vm)


def test_bad_input_is_a_clear_error_and_starts_nothing(root):
    configure(root, "uid_range = [750000, 750000]\n")
    write_vm(root, "a", extra="autostart = false\n")
    write_vm(root, "b", extra="autostart = false\n")
    with Host.start(root, vm="a") as h:
        # a uid range that is exhausted
        assert h.vmctl("start", "a").returncode == 0
        _start_fails(h, "b", "exhausted")
        h.vmctl("stop", "a")
        # a uid another process already uses
        pid = squat(750000)
        try:
            _start_fails(h, "a", "already used by pid")
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        # /dev/kvm missing, not openable (a node with no driver behind it, as /dev/kvm
        # is without the kvm module), a kernel without seccomp, without namespaces
        nodev = root / "kvm-no-driver"
        os.mknod(nodev, 0o600 | stat.S_IFCHR, os.makedev(240, 0))  # a local, unused major
        for env, needle in (
            ({"BATON_KVM_DEVICE": "/dev/no-kvm"}, "cannot open /dev/no-kvm"),
            ({"BATON_KVM_DEVICE": "/dev/net"}, "cannot open /dev/net: Is a directory"),
            ({"BATON_KVM_DEVICE": str(nodev)}, f"cannot open {nodev}: No such device"),
            ({jail_env(): "seccomp"}, "no seccomp"),
            ({jail_env(): "namespaces"}, "no mnt namespaces"),
        ):
            h.sup.stop()
            h.supervisor(env=env)
            _start_fails(h, "a", needle)
        h.sup.stop()
        h.supervisor()
        # a worker command naming a build its uid cannot read (Python would skip it
        # and import the installed package: the wrong code, silently)
        private = root / "private-build"
        private.mkdir(mode=0o700)
        write_vm(root, "a", ["env", f"PYTHONPATH={private}", *WORKER], extra="autostart = false\n")
        assert h.vmctl("reload").returncode == 0
        _start_fails(h, "a", "cannot read it")
        write_vm(root, "a", extra="autostart = false\n")
        assert h.vmctl("reload").returncode == 0
        assert h.vmctl("start", "a").returncode == 0
        h.wait_beats(2)
        # jail = false in a VM's file: it runs unconfined, and status says so
        write_vm(root, "c", extra="jail = false\n")
        assert h.vmctl("reload").returncode == 0
        j = h.wait_state("running", "c")["jail"]
        assert j["enabled"] is False and "unconfined" in j["warning"], j
        assert j["uid"] == 0 and j["namespaces"] == [] and j["seccomp"] == "off", j
        assert "WARNING    jail = false" in h.vmctl("status", "c").stdout


def squat(uid: int, fdless: bool = False) -> int:
    """A process that runs as ``uid`` until killed (SIGKILL it, then waitpid);
    ``fdless``: one that closed every fd, as if it were exiting."""
    pid = os.fork()
    if pid == 0:
        os.setgid(uid)
        os.setuid(uid)
        if fdless:
            os.closerange(0, 1 << 16)
        time.sleep(120)
        os._exit(0)
    wait_until(lambda: pid in jail.users_of(uid, exiting=True), 10, 0.05, "the squatter")
    return pid


def test_a_gone_vms_uid_is_released_never_while_in_use(root):
    """A VM removed from the config gives its uid back once its worker is confirmed
    dead (stop), or at the next supervisor start when a process still ran as it; the
    released uid serves the next VM of a range that was exhausted."""
    configure(root, "uid_range = [751000, 751001]\n")
    for name in "ab":
        write_vm(root, name)
    table = root / "var" / "lib" / "baton" / "jail" / "uids.json"
    with Host.start(root, vm="a") as h:
        uid = {n: h.wait_state("running", n)["jail"]["uid"] for n in "ab"}
        assert sorted(uid.values()) == [751000, 751001]
        assert json.loads(table.read_text()) == uid
        assert (jail.CLAIMS / str(uid["a"])).exists()
        run_a = h.paths.vm_run_dir("a")
        assert run_a.stat().st_uid == uid["a"]
        # a leaves the config but runs on: its uid stays its own
        (root / "etc" / "baton" / "vms.d" / "a.toml").unlink()
        write_vm(root, "c", extra="autostart = false\n")
        assert h.vmctl("reload").returncode == 0
        assert json.loads(table.read_text())["a"] == uid["a"]
        _start_fails(h, "c", "exhausted")
        # stopped, its worker confirmed dead: gone for good, and its uid with it
        assert h.vmctl("stop", "a").returncode == 0
        assert "a" not in json.loads(table.read_text())
        assert not (jail.CLAIMS / str(uid["a"])).exists() and not run_a.exists()
        assert h.vmctl("start", "c").returncode == 0
        assert h.wait_state("running", "c")["jail"]["uid"] == uid["a"]
        h.wait_beats(2, "c")
        # b stopped, then removed while a process still runs as its uid (one with no
        # fd left, which a start would take for an exiting one): kept
        assert h.vmctl("stop", "b").returncode == 0
        pid = squat(uid["b"], fdless=True)
        try:
            (root / "etc" / "baton" / "vms.d" / "b.toml").unlink()
            assert h.vmctl("reload").returncode == 0
            assert "b" not in h.vm_list()
            assert json.loads(table.read_text())["b"] == uid["b"]
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        # the next supervisor start releases it; c's stays
        h.sup.stop()
        h.supervisor()
        assert h.wait_state("running", "c")["jail"]["uid"] == uid["a"]
        assert json.loads(table.read_text()) == {"c": uid["a"]}
        assert not (jail.CLAIMS / str(uid["b"])).exists()


def jail_env() -> str:
    from baton.jail_launcher import SIMULATE_ENV

    return SIMULATE_ENV


def test_the_cgroup_warmer_moves_nothing_and_ends():
    """Its writes (``supervisor.jail.cgwarm``) are migrations of nothing: this process
    stays in its cgroups; stopped, its writes end by themselves. Not enabled: none."""
    before = Path("/proc/self/cgroup").read_text()
    with cgwarm.warmed(False):
        pass
    w = cgwarm.Warmer().start()
    try:
        wait_until(lambda: w.writes >= 3, 10, 0.005, "three empty migrations")
        assert Path("/proc/self/cgroup").read_text() == before
    finally:
        w.stop()
    wait_until(w.ended, 10, 0.01, "the warmer to end")
    writes = w.writes
    assert Path("/proc/self/cgroup").read_text() == before
    assert w.writes == writes, "no write after it ended"


def test_users_of_one_uid_is_what_the_full_scan_says():
    """The one-uid scan (``jail.users_of``, every prepare's check) finds the uid's
    processes as the full scan does, and none of another uid's."""
    uid = 799_998  # no VM's (tests use 700000 up) and no account's
    proc = subprocess.Popen(["sleep", "30"], user=uid, group=uid)
    try:
        wait_until(lambda: proc.pid in jail.users_of(uid), 10, 0.01, "the sleeper as its uid")
        assert proc.pid in jail.uid_users()[uid]
        assert proc.pid not in jail.users_of(uid + 1) and os.getpid() in jail.users_of(0)
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in jail.users_of(uid, exiting=True)


def test_checks_at_once_share_passes_and_each_sees_what_came_before_it():
    """``jail.SharedScan``: many checks at once take fewer passes over /proc than
    checks, each finds its own uid's process and none of another's, and a process
    that began running as a uid before a check is always seen by it (its pass
    began after it asked)."""
    base = 799_900  # no VM's (tests use 700000 up) and no account's
    scans = jail.SharedScan()
    procs = [subprocess.Popen(["sleep", "30"], user=base + i, group=base + i) for i in range(8)]
    try:
        for i, p in enumerate(procs):
            wait_until(lambda p=p, i=i: p.pid in jail.users_of(base + i), 10, 0.01, "the sleeper")
        found: dict[int, list[int]] = {}

        def ask(i: int) -> None:
            found[i] = scans.users_of(base + i)

        for _ in range(3):
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert {i: found[i] for i in range(8)} == {i: [p.pid] for i, p in enumerate(procs)}
        assert scans.asks == 24 and scans.passes < 24, (scans.asks, scans.passes)
        late = subprocess.Popen(["sleep", "30"], user=base + 9, group=base + 9)
        try:
            wait_until(lambda: late.pid in jail.users_of(base + 9), 10, 0.01, "the late one")
            assert scans.users_of(base + 9) == [late.pid]
        finally:
            late.kill()
            late.wait()
        assert scans.users_of(base + 9) == []
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_starts_in_flight_share_one_warmer():
    """Two jailed starts at once (``cgwarm.warmed``) share one writer; it ends with
    the last of them, and the next start gets a new one."""
    with cgwarm.warmed(True):
        first = cgwarm.SHARED.warmer
        assert first is not None and not first.ended()
        with cgwarm.warmed(True):
            assert cgwarm.SHARED.warmer is first
        assert cgwarm.SHARED.warmer is first and not first.ended()
        wait_until(lambda: first.writes >= 2, 10, 0.005, "writes")
    assert cgwarm.SHARED.warmer is None
    wait_until(first.ended, 10, 0.01, "the warmer to end")
    writes = first.writes
    with cgwarm.warmed(True):
        second = cgwarm.SHARED.warmer
        assert second not in (None, first)
    assert second is not None
    wait_until(second.ended, 10, 0.01, "the second to end")
    assert first.writes == writes, "the first wrote nothing after it ended"
