"""Stock QEMU under Baton: a real Linux guest under TCG, the same vmctl and live upgrade."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers import read_log, wait_until
from qemu_assets import counter_problems, ensure_assets, qemu_binary, qemu_skip_reason
from qemu_assets import counters as parse_counters

from baton_lab.harness import Host, processes_under, vmctl
from vmm.guest import continuity_problems, heartbeats

REASON = qemu_skip_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or "")]
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"
WAIT = 90.0  # Linux boots under TCG here in 2-4 s; a loaded CI machine is slower


@pytest.fixture(scope="module")
def assets():
    return ensure_assets(CACHE)


def write_qemu_vm(root: Path, name: str, assets, memory_mib: int = 256) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(
        f'vmm = "qemu"\nmemory_mib = {memory_mib}\n[qemu]\naccel = "tcg"\n'
        f'kernel = "{assets.kernel}"\ninitrd = "{assets.initramfs}"\n'
    )


def counters(root: Path, vm: str) -> list[tuple[int, float]]:
    return parse_counters(read_log(root / "var" / "log" / "baton" / f"{vm}.console.log"))


def wait_more(root: Path, vm: str, k: int = 3) -> list[tuple[int, float]]:
    n = len(counters(root, vm))
    return wait_until(lambda: (c := counters(root, vm)) and len(c) >= n + k and c, WAIT, 0.05)


@pytest.fixture
def host(root: Path, broker, assets):
    """q1 running under a broker and a supervisor (overrides tests/conftest.py's)."""
    write_qemu_vm(root, "q1", assets)
    with Host(root, broker, vm="q1", wait=WAIT) as h:
        h.supervisor()
        wait_until(lambda: len(counters(root, "q1")) >= 3, WAIT, 0.05, "the Linux guest's counter")
        yield h


def test_new_qemu_failing_to_start_aborts(host: Host):
    old = host.status("q1")["pid"]
    rc, r = host.upgrade("q1", worker="/bin/false")
    assert rc == 4 and r["outcome"] == "aborted" and "failed in prepare" in r["reason"]
    rc, r = host.upgrade("q1", worker="/nonexistent/qemu-system-x86_64")
    assert rc == 4 and r["outcome"] == "aborted" and "not found" in r["reason"]
    assert host.status("q1")["pid"] == old
    assert counter_problems(wait_more(host.root, "q1")) == []


def test_check_starts_a_new_qemu_and_ends_it(host: Host):
    st = host.status("q1")
    r = vmctl(host.root, "--json", "upgrade", "q1", "--check", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["kind"] == "qemu" and rep["new_version"].startswith("7.")
    assert rep["versions"] == {} and rep["rollback"]["ok"]
    assert any("checked only at migration time" in n for n in rep["notes"])
    qemus = wait_until(
        lambda: (
            (q := [p for p in processes_under(host.root) if "qemu" in p.name()])
            and len(q) == 1
            and q
        ),
        WAIT,
        0.05,
        "only the old QEMU",
    )
    assert qemus[0].pid == st["pid"] == host.status("q1")["pid"]
    assert host.broker.client().lease_status("q1")["offer"] is None
    r = vmctl(host.root, "--json", "upgrade", "q1", "--check", "--worker", "/bin/false")
    assert r.returncode == 4 and "failed to start" in json.loads(r.stdout)["reason"]
    assert counter_problems(wait_more(host.root, "q1")) == []


def test_new_qemu_killed_mid_migration_rolls_back(root: Path, broker, assets):
    write_qemu_vm(root, "q1", assets)
    with Host(root, broker, vm="q1", wait=WAIT) as host:
        host.supervisor(env={"BATON_FAULT_SUPERVISOR": "kill-new-qemu-mid-migration"})
        wait_until(lambda: len(counters(root, "q1")) >= 3, WAIT, 0.05)
        old = host.status("q1")["pid"]
        rc, r = host.upgrade("q1")
        assert rc == 4 and r["outcome"] == "rolled-back", r
        assert "migration failed" in r["reason"], r["reason"]
        st = host.status("q1")
        assert st["pid"] == old and st["state"] == "running"
        rows = wait_more(root, "q1", 5)
        assert counter_problems(rows) == []


def test_mixed_host_upgrade_all(root: Path, broker, assets):
    write_qemu_vm(root, "q1", assets)
    d = root / "etc" / "baton" / "vms.d"
    worker = json.dumps([sys.executable, "-m", "vmm.worker"])
    (d / "b1.toml").write_text(f"memory_mib = 32\ntick_ms = 100\nworker = {worker}\n")
    with Host(root, broker, wait=WAIT) as host:
        host.supervisor()
        wait_until(lambda: len(counters(root, "q1")) >= 3, WAIT, 0.05)
        blog = root / "var" / "log" / "baton" / "b1.console.log"
        wait_until(lambda: len(heartbeats(read_log(blog))) >= 3, WAIT, 0.05)
        r = vmctl(root, "--json", "upgrade", "--all")
        events = [json.loads(line) for line in r.stdout.splitlines()]
        assert r.returncode == 0, r.stdout + r.stderr
        kinds = {e["vm"]: e["outcome"] for e in events if "vm" in e}
        assert kinds == {"q1": "committed", "b1": "committed"}
        assert events[-1]["upgraded"] == 2
        assert counter_problems(wait_more(root, "q1")) == []
        n = len(heartbeats(read_log(blog)))
        wait_until(lambda: len(heartbeats(read_log(blog))) > n + 2, WAIT)
        assert continuity_problems(heartbeats(read_log(blog))) == []
        listed = {v["name"]: v["kind"] for v in json.loads(vmctl(root, "--json", "list").stdout)}
        assert listed == {"q1": "qemu", "b1": "baton"}


def test_qemu_binary_is_known():
    assert qemu_binary() is not None and re.search(r"qemu-system-x86_64$", qemu_binary())
