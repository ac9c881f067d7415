"""Create a VM's fds in the broker: guest RAM, console log, console input,
disks, and one tap per NIC.

Their names (what workers ask the broker for) are part of the worker
contract, ``baton.contract``; disks go by their configured names, taps by
``contract.tap_fd(nic)``.

Taps: the broker opens each one (``tun.open``, ``IFF_TAP | IFF_NO_PI``, no
``IFF_VNET_HDR``: every read and write is one bare Ethernet frame; QEMU
takes such an fd as ``-netdev tap,fd=N,vnet_hdr=off``), non-persistent, so
the interface lives exactly as long as some process holds its fd: the
broker (across every upgrade, crash and restart of a worker or of the
supervisor; a restarted broker gets it back from the supervisor) until
``vmctl stop`` drops the VM. The supervisor then attaches it to its bridge,
if one is configured, and sets it up (netlink: ``supervisor.netdev``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from baton.config import ConfigError, load_settings
from baton.contract import (
    CONSOLE_IN,
    CONSOLE_IN_WRITER,
    CONSOLE_LOG,
    RAM,
    tap_fd,
)
from baton.paths import Paths
from baton.wire import Code, RemoteError
from broker.client import BrokerClient
from supervisor import netdev
from supervisor.vmconfig import NetConfig, VmConfig

__all__ = ["CONSOLE_IN", "CONSOLE_IN_WRITER", "CONSOLE_LOG", "DiskImage", "provision"]


@dataclass(frozen=True)
class DiskImage:
    name: str
    path: Path
    size: int
    read_only: bool = False


def ensure_image(disk: DiskImage) -> None:
    """Create a sparse image of the configured size if it does not exist yet."""
    disk.path.parent.mkdir(parents=True, exist_ok=True)
    if not disk.path.exists():
        fd = os.open(disk.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, disk.size)
        finally:
            os.close(fd)


def allow_disks(
    broker: BrokerClient, vm: str, disks: list[DiskImage], taps: list[str] | None = None
) -> None:
    """Register the VM's own files (and taps) with the broker (``vm.allow``)."""
    files = [
        {"path": os.path.abspath(d.path), "mode": "ro" if d.read_only else "rw", "create": False}
        for d in disks
    ]
    try:
        broker.allow(vm, files=files, taps=taps if taps is not None else [])
    except RemoteError as e:
        if e.code != Code.UNKNOWN_OP:  # an older broker, which restricts nothing
            raise


def provision(
    broker: BrokerClient,
    paths: Paths,
    vm: str,
    ram_bytes: int,
    disks: list[DiskImage],
    nics: Sequence[NetConfig] = (),
) -> list[str]:
    """Create every fd VM ``vm`` needs that the broker does not hold yet.

    Idempotent: after a supervisor restart, or for a VM whose worker crashed,
    what exists (above all the RAM) is kept as it is. Returns the names created.

    Also tells the broker exactly which files (the VM's disks, in their
    configured modes) and which taps (its NICs') its workers' tokens may open:
    a token reaches nothing else."""
    broker.create_vm(vm, exist_ok=True)
    allow_disks(broker, vm, disks, [n.tap for n in nics])
    held = {f["name"] for f in broker.list_fds(vm)}
    created = []
    if RAM not in held:
        broker.create_memfd(vm, RAM, ram_bytes, labels={"role": "ram"})
        created.append(RAM)
    if CONSOLE_LOG not in held:
        paths.log.mkdir(parents=True, exist_ok=True, mode=0o700)
        broker.open_file(vm, CONSOLE_LOG, paths.console_log(vm), mode="append", create=True)
        created.append(CONSOLE_LOG)
    if CONSOLE_IN not in held or CONSOLE_IN_WRITER not in held:
        for name in (CONSOLE_IN, CONSOLE_IN_WRITER):
            if name in held:
                broker.drop_fd(vm, name)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            broker.put(vm, {CONSOLE_IN: r, CONSOLE_IN_WRITER: w})
        finally:
            os.close(r)
            os.close(w)
        created += [CONSOLE_IN, CONSOLE_IN_WRITER]
    for i, disk in enumerate(disks):
        if disk.name not in held:
            ensure_image(disk)
            mode = "ro" if disk.read_only else "rw"
            try:
                broker.open_file(vm, disk.name, disk.path, mode=mode)
            except RemoteError as e:
                raise RemoteError(e.code, f"disk[{i}].path: {e.message}") from None
            created.append(disk.name)
    for i, nic in enumerate(nics):
        name = tap_fd(nic.name)
        if name not in held:
            try:
                broker.open_tun(vm, name, nic.tap, vnet_hdr=False)
            except RemoteError as e:
                raise RemoteError(e.code, f"net[{i}].tap: tap {nic.tap!r}: {e.message}") from None
            created.append(name)
        try:
            netdev.attach(nic.tap, nic.bridge)  # after a restart too: idempotent
        except netdev.NetdevError as e:
            key = "bridge" if nic.bridge else "tap"
            raise RemoteError(Code.IO_ERROR, f"net[{i}].{key}: {e}") from None
    return created


def allowed_path(path: str, open_allow: Sequence[str]) -> bool:
    """Whether ``path`` lies under the fixed directory part of some
    ``broker.open_allow`` pattern: checked before anything is created, so that a
    refused disk leaves no image behind (the broker's check decides; this one is
    never stricter)."""
    for pattern in open_allow:
        fixed = []
        for part in pattern.split("/"):
            if set("*?[") & set(part):
                break
            fixed.append(part)
        prefix = "/".join(fixed).rstrip("/") + "/"
        if path.startswith(prefix) and len(path) > len(prefix):
            return True
    return False


class ProvisionError(RemoteError):
    """A VM's configuration that cannot be provisioned; names the file and key."""


def provision_vm(broker: BrokerClient, paths: Paths, cfg: VmConfig) -> list[str]:
    """``provision`` for a configured VM, every kind alike: checks what only the
    host can tell (each NIC's bridge exists) before anything is created, and
    reports a refusal with the VM file and key it comes from."""
    where = cfg.source
    for i, nic in enumerate(cfg.nets):
        if nic.bridge:
            problem = netdev.check_bridge(nic.bridge)
            if problem:
                raise ProvisionError(Code.BAD_REQUEST, f"{where}: net[{i}].bridge: {problem}")
    try:
        open_allow = load_settings(paths).broker.open_allow
    except ConfigError as e:
        raise ProvisionError(Code.BAD_REQUEST, str(e)) from None
    for i, d in enumerate(cfg.disks):
        if not allowed_path(os.path.abspath(d.path), open_allow):
            raise ProvisionError(
                Code.DENIED,
                f"{where}: disk[{i}].path: {d.path} is not under any directory of "
                f"broker.open_allow in {paths.config_file} ({', '.join(open_allow)})",
            )
    disks = [DiskImage(d.name, d.path, d.size_mib << 20, d.read_only) for d in cfg.disks]
    try:
        return provision(broker, paths, cfg.name, cfg.memory_bytes, disks, cfg.nets)
    except RemoteError as e:
        raise ProvisionError(e.code, f"{where}: {e.message}") from None
    except netdev.NetdevError as e:
        raise ProvisionError(Code.IO_ERROR, f"{where}: {e}") from None
    except OSError as e:
        raise ProvisionError(Code.IO_ERROR, f"{where}: {e}") from None
