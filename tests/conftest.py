"""Fixtures: a fresh temporary root per test, and real daemons started in it.

``host`` is a ``baton_lab.harness.Host``: the test's broker, the supervisors the
test starts with ``host.supervisor()``, and a teardown that stops every VM,
supervisor and worker under the root. Modules that want a VM running before
each test override it (tests/test_upgrade.py, tests/test_qemu.py)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import BrokerProcess, short_root

from baton_lab.harness import Host


def kvm_available() -> str | None:
    """None if /dev/kvm works, else the reason it does not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm unusable: {e.strerror}"
    os.close(fd)
    return None


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_root()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker(root: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(root).start()
    yield b
    b.stop()


@pytest.fixture
def host(root: Path, broker: BrokerProcess) -> Iterator[Host]:
    """A broker under ``root`` and no supervisor yet."""
    with Host(root, broker) as h:
        yield h


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kvm_available()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_broker(root: Path) -> Iterator[BrokerProcess]:
    """A broker whose socket non-root peers (tests' token holders) may connect to."""
    (root / "etc" / "baton").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "baton" / "baton.toml").write_text('[broker]\nsocket_mode = "0666"\n')
    b = BrokerProcess(root).start()
    for d in (b.root, b.root / "run", b.paths.run):
        os.chmod(d, 0o755)
    yield b
    b.stop()
