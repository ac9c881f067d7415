"""Config parsing: the shipped examples validate; errors name file, key, expectation, finding."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from baton.config import WORKER_GID, ConfigError, load_settings
from baton.paths import Paths
from baton.wire import Code, RemoteError
from supervisor.jail import load_config as load_jail_config
from supervisor.lifecycle import VmRuntime
from supervisor.vmconfig import load_vms

REPO = Path(__file__).resolve().parent.parent


def test_shipped_examples_are_valid(tmp_path: Path):
    shutil.copytree(REPO / "etc" / "baton", tmp_path / "etc" / "baton")
    paths = Paths(tmp_path)
    settings = load_settings(paths)
    assert settings.upgrade.commit == "worker" and settings.broker.busy_poll_us == 100
    result = load_vms(paths, settings.supervisor)
    assert result.errors == {}
    web1 = result.vms["web1"]
    assert web1.memory_mib == 1024 and web1.vcpus == 2 and web1.disks[0].size_mib == 256
    legacy = result.vms["legacy1"]
    assert legacy.vmm == "qemu" and legacy.qemu["machine"] == "pc" and not legacy.autostart
    jail = load_jail_config(paths)  # [jail], with enabled unset: on exactly when root
    assert jail.uid_range == (700000, 799999) and jail.enabled == (os.geteuid() == 0)
    assert (settings.broker.socket_mode, settings.broker.socket_gid) == (0o660, WORKER_GID)


def test_qemu_vm_needs_a_kernel_and_takes_disks(tmp_path: Path):
    paths = Paths(tmp_path)
    paths.vms_dir.mkdir(parents=True)
    (paths.vms_dir / "q.toml").write_text('vmm = "qemu"\n')
    (paths.vms_dir / "d.toml").write_text(
        'vmm = "qemu"\n[qemu]\nkernel = "/k"\n[[disk]]\nname = "disk0"\n'
    )
    (paths.vms_dir / "b.toml").write_text('[qemu]\nkernel = "/k"\n')
    errors = load_vms(paths, load_settings(paths).supervisor).errors
    assert "qemu.kernel: required but missing" in errors[str(paths.vms_dir / "q.toml")]
    assert str(paths.vms_dir / "d.toml") not in errors
    assert 'qemu: only for vmm = "qemu"' in errors[str(paths.vms_dir / "b.toml")]


def test_no_config_means_the_demo_vm(tmp_path: Path):
    paths = Paths(tmp_path)
    result = load_vms(paths, load_settings(paths).supervisor)
    assert list(result.vms) == ["demo"] and not result.vms["demo"].autostart


@pytest.mark.parametrize(
    "text,expected",
    [
        ('memory_mib = "4G"', "memory_mib: expected an integer, found str '4G'"),
        ("memory_mib = 2", "memory_mib: expected an integer in 4..1048576, found int 2"),
        ("vcpus = 0", "vcpus: expected an integer in 1..8, found int 0"),
        ('restart = "always"', "restart: expected one of 'no', 'on-failure', found str 'always'"),
        ("colour = 1", "unknown key 'colour'"),
        ('[[disk]]\nname = "sda"', "disk[0].name: expected a string matching disk[0-9]{1,2}"),
        ("memory_mib = 64\nmemory_mib = 65", "not valid TOML"),
    ],
)
def test_vm_file_errors_name_file_and_key(tmp_path: Path, text: str, expected: str):
    paths = Paths(tmp_path)
    paths.vms_dir.mkdir(parents=True)
    (paths.vms_dir / "good.toml").write_text("memory_mib = 16\n")
    (paths.vms_dir / "bad.toml").write_text(text + "\n")
    result = load_vms(paths, load_settings(paths).supervisor)
    assert list(result.vms) == ["good"], "a broken file must not stop the others loading"
    (msg,) = result.errors.values()
    assert msg.startswith(str(paths.vms_dir / "bad.toml") + ": ")
    assert expected in msg


def test_toml_syntax_error_gives_the_line(tmp_path: Path):
    paths = Paths(tmp_path)
    paths.vms_dir.mkdir(parents=True)
    (paths.vms_dir / "x.toml").write_text("vcpus = 1\nmemory_mib = = 3\n")
    (msg,) = load_vms(paths, load_settings(paths).supervisor).errors.values()
    assert "line 2" in msg


def test_bad_baton_toml_names_section_and_key(tmp_path: Path):
    paths = Paths(tmp_path)
    paths.etc.mkdir(parents=True)
    paths.config_file.write_text('[upgrade]\ncommit = "nobody"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(paths)
    assert "baton.toml: upgrade.commit: expected one of 'worker', 'supervisor'" in str(e.value)
    paths.config_file.write_text("[supervisr]\n")
    with pytest.raises(ConfigError) as e:
        load_settings(paths)
    assert "unknown key 'supervisr'" in str(e.value)


def test_bad_vm_name_in_file_name(tmp_path: Path):
    paths = Paths(tmp_path)
    paths.vms_dir.mkdir(parents=True)
    (paths.vms_dir / "-bad name.toml").write_text("")
    (msg,) = load_vms(paths, load_settings(paths).supervisor).errors.values()
    assert "file name must be NAME.toml" in msg


def test_an_operation_waits_out_housekeeping_but_not_another_operation(tmp_path: Path):
    """The token sweep holds a VM's lock for a broker round trip; an upgrade that
    arrives then must wait it out, not fail ``busy`` (CI saw exactly that). An
    operation that holds the lock means ``busy`` at once, however long the wait."""
    paths = Paths(tmp_path)
    rt = VmRuntime(load_vms(paths, load_settings(paths).supervisor).vms["demo"])
    taken, release = threading.Event(), threading.Event()

    def hold(what: str | None) -> None:
        with rt.operation(what, wait_s=None) if what else rt.lock:
            taken.set()
            release.wait(10)

    t = threading.Thread(target=hold, args=(None,))  # housekeeping
    t.start()
    assert taken.wait(10)
    threading.Timer(0.2, release.set).start()
    with rt.operation("an upgrade", wait_s=10):
        assert rt.busy_with == "an upgrade"
    assert rt.busy_with is None
    t.join()

    release.clear()
    taken.clear()
    t = threading.Thread(target=hold, args=("a start",))
    t.start()
    assert taken.wait(10)
    began = time.monotonic()
    with pytest.raises(RemoteError) as e, rt.operation("an upgrade", wait_s=10):
        pass
    assert time.monotonic() - began < 5, "another operation means busy at once"
    assert e.value.code == Code.BUSY and "a start is running" in e.value.message
    release.set()
    t.join()
