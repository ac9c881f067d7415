"""contrib/ansible: the rollout playbook, run by a real ansible-playbook against
localhost aliases, each driving a real Baton host under its own temporary root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import WORKER, short_root

from baton_lab.harness import Host

pytestmark = pytest.mark.kvm
PLAYBOOK = Path(__file__).resolve().parent.parent / "contrib" / "ansible" / "rollout.yml"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"  # the test extra's


def write_vm(root: Path, name: str, worker: str) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(
        f"memory_mib = 32\ntick_ms = 200\nworker = {json.dumps(worker.split())}\n"
    )


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rollout_playbook_stops_at_the_first_host_that_did_not_commit(
    root: Path, broker, tmp_path: Path
):
    assert ANSIBLE_PLAYBOOK.exists(), "ansible-core is in the test extra (pyproject.toml)"
    bad_root = short_root()
    try:
        for vm in ("vm1", "vm2"):
            write_vm(root, vm, WORKER)
        write_vm(bad_root, "vm1", f"env BATON_FAULT=load {WORKER}")  # its upgrades roll back
        with Host(root, broker) as good, Host(bad_root) as bad:
            good.supervisor()
            bad.supervisor()
            for h, vms in ((good, ("vm1", "vm2")), (bad, ("vm1",))):
                for vm in vms:
                    h.wait_beats(2, vm)
            good_pids = {vm: good.status(vm)["pid"] for vm in ("vm1", "vm2")}
            bad_pid = bad.status("vm1")["pid"]
            # Three batches of one: good commits, bad rolls back and stops the play,
            # and "after" (the good host again) must never be reached.
            local = f"ansible_connection=local ansible_python_interpreter={sys.executable}"
            inventory = tmp_path / "inventory.ini"
            inventory.write_text(
                "[baton]\n"
                f"good baton_root={root} {local}\n"
                f"bad baton_root={bad_root} {local}\n"
                f"after baton_root={root} {local}\n"
            )
            reports = tmp_path / "reports"
            extra = {
                "baton_vmctl": [sys.executable, "-m", "supervisor.vmctl"],
                "baton_max_blackout_ms": 1000,
                "baton_report_dir": str(reports),
            }
            env = {
                **os.environ,
                "LC_ALL": "C.UTF-8",
                "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
                "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote"),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_RETRY_FILES_ENABLED": "0",
            }
            r = subprocess.run(
                [
                    str(ANSIBLE_PLAYBOOK),
                    "-i",
                    str(inventory),
                    str(PLAYBOOK),
                    "-e",
                    json.dumps(extra),
                ],
                capture_output=True,
                text=True,
                timeout=180,
                env=env,
                cwd=tmp_path,
            )
            out = r.stdout + r.stderr
            assert r.returncode != 0, out
            # the healthy host: preflight and rollout reports collected, all committed
            checks = jsonl(reports / "good.check.jsonl")
            assert [c["vm"] for c in checks[:-1]] == ["vm1", "vm2"] and checks[-1]["ok"] == 2
            lines = jsonl(reports / "good.rollout.jsonl")
            summary = lines[-1]
            assert summary["event"] == "summary" and summary["upgraded"] == 2, out
            assert all(x["outcome"] == "committed" for x in lines[:-1])
            for vm in ("vm1", "vm2"):
                st = good.status(vm)
                assert st["pid"] != good_pids[vm] and st["upgrades"] == 1  # once: no "after"
            # the failing host: its report says why, its guest stays with the old worker
            (report, summary) = jsonl(reports / "bad.rollout.jsonl")
            assert report["outcome"] == "rolled-back" and summary["not_committed_vms"] == ["vm1"]
            assert bad.status("vm1")["pid"] == bad_pid
            assert "rollout on bad did not commit" in out
            # the play stopped: the last batch never ran
            assert not list(reports.glob("after.*")), out
            assert "after" not in [
                line.split()[0] for line in out.split("PLAY RECAP", 1)[1].splitlines()[1:] if line
            ]
    finally:
        shutil.rmtree(bad_root, ignore_errors=True)
