"""``DIR/etc/baton/vms.d/NAME.toml``: one VM per file, validated into ``VmConfig``.

A broken file is reported (file, key, what was expected, what was found)
and skipped; the other files still load. With no vms.d at all, the built-in
default is one VM named ``demo`` running the built-in guest.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.config import RESTART_POLICIES, ConfigError, SupervisorConfig, load_toml
from baton.paths import Paths
from baton.schema import (
    NAME_PATTERN,
    AnyMap,
    Bool,
    Field,
    Int,
    ListOf,
    OneOf,
    SchemaError,
    Str,
    optional,
    record,
)

MiB = 1 << 20
KINDS = ("baton", "qemu")

DISK_SCHEMA = record(
    name=Field(Str(63, pattern=r"disk[0-9]{1,2}")),
    path=optional(Str(4096), ""),
    size_mib=Field(Int(1, 1 << 24), 64),
    read_only=Field(Bool(), False),
)

QEMU_SCHEMA = record(
    binary=Field(Str(4096), "qemu-system-x86_64"),
    machine=Field(Str(128, pattern=r"[A-Za-z0-9._-]+"), "pc"),
    accel=Field(OneOf(("kvm", "tcg", "kvm:tcg")), "kvm:tcg"),
    kernel=Field(Str(4096)),
    initrd=optional(Str(4096), ""),
    append=Field(Str(4096), "console=ttyS0 quiet panic=-1"),
    args=Field(ListOf(Str(4096), 64), factory=list),
)

VM_SCHEMA = record(
    vmm=Field(OneOf(KINDS), "baton"),
    memory_mib=Field(Int(4, 1 << 20), 256),
    vcpus=Field(Int(1, 8), 1),
    tick_ms=Field(Int(1, 60_000), 50),
    guest=optional(Str(4096), ""),
    autostart=Field(Bool(), True),
    # Start it even if the host's MemAvailable is less than memory_mib (or [supervisor]).
    overcommit=Field(Bool(), False),
    restart=optional(OneOf(RESTART_POLICIES)),
    restart_max=optional(Int(0, 1000)),
    restart_window_s=optional(Int(1, 86400)),
    restart_backoff_ms=optional(Int(0, 600_000)),
    on_reboot=Field(OneOf(("restart", "stop")), "restart"),
    worker=optional(ListOf(Str(4096), 64, 1)),
    standby=optional(Bool()),  # a pre-warmed incoming worker; default from [upgrade]
    disk=Field(ListOf(AnyMap(16), 8), factory=list),
    net=Field(ListOf(AnyMap(16), 8), factory=list),
    qemu=Field(AnyMap(32), factory=dict),
    # supervisor.jail reads these from VmConfig.raw: false runs the worker unjailed
    # (debugging; vmctl status warns), user a named account instead of [jail] uid_range.
    jail=optional(Bool()),
    user=optional(Str(32, pattern=r"[a-z_][a-z0-9_-]*")),
)

#: Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or spaces.
IFNAME_PATTERN = r"[A-Za-z0-9_.-]{1,15}"
MAC_PATTERN = r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"

NET_SCHEMA = record(
    name=Field(Str(8, pattern=r"net[0-7]")),
    tap=optional(Str(15, pattern=IFNAME_PATTERN), ""),
    mac=optional(Str(17, pattern=MAC_PATTERN), ""),
    bridge=optional(Str(15, pattern=IFNAME_PATTERN), ""),
)


@dataclass(frozen=True)
class DiskConfig:
    name: str
    path: Path
    size_mib: int
    read_only: bool


@dataclass(frozen=True)
class NetConfig:
    """One NIC: its host-side tap (held by the broker as ``contract.tap_fd(name)``)."""

    name: str  # net0 .. net7
    tap: str  # the host interface; default derived from the VM and NIC names
    mac: str  # the guest's MAC; default stable, derived from the VM and NIC names
    bridge: str  # an existing bridge to attach the tap to, or ""


def default_tap(vm: str, nic: str) -> str:
    """``bt-<vm>-<n>``, cut to Linux's 15 bytes with a hash when the VM name is long."""
    n = nic.removeprefix("net")
    name = f"bt-{vm}-{n}"
    if len(name) <= 15:
        return name
    digest = hashlib.sha256(vm.encode()).hexdigest()[:6]
    return f"bt-{vm[:4]}{digest}-{n}"[:15]


def default_mac(vm: str, nic: str) -> str:
    """Stable across restarts and hosts: 52:54:00 (locally administered, the OUI QEMU
    and libvirt use) then three bytes of a hash of the VM and NIC names."""
    h = hashlib.sha256(f"{vm}/{nic}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


@dataclass(frozen=True)
class RestartPolicy:
    policy: str
    max_restarts: int
    window_s: int
    backoff_ms: int


@dataclass(frozen=True)
class VmConfig:
    name: str
    vmm: str
    memory_mib: int
    vcpus: int
    tick_ms: int
    guest: Path | None
    autostart: bool
    restart: RestartPolicy
    on_reboot: str
    worker: tuple[str, ...]
    disks: tuple[DiskConfig, ...]
    nets: tuple[NetConfig, ...] = ()
    qemu: dict[str, Any] = field(default_factory=dict)
    standby: bool | None = None  # None: [upgrade] standby decides
    overcommit: bool = False  # start it whatever the host's MemAvailable
    source: str = "built-in"
    raw: dict[str, Any] = field(default_factory=dict)  # as written; rebuilt after a restart

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MiB


def default_worker_command() -> tuple[str, ...]:
    """The baton-vmm installed beside this Python, or this Python running the module."""
    sibling = Path(sys.executable).parent / "baton-vmm"
    if sibling.exists():
        return (str(sibling),)
    found = shutil.which("baton-vmm")
    return (found,) if found else (sys.executable, "-m", "vmm.worker")


def build(
    name: str, raw: dict[str, Any], paths: Paths, sup: SupervisorConfig, source: str
) -> VmConfig:
    v = VM_SCHEMA.check(raw, "")
    qemu: dict[str, Any] = {}
    if v["vmm"] == "qemu":
        qemu = QEMU_SCHEMA.check(v["qemu"], "qemu")
    elif v["qemu"]:
        raise SchemaError('only for vmm = "qemu"', "qemu")
    disks: list[DiskConfig] = []
    seen = set()
    for i, d in enumerate(v["disk"]):
        dv = DISK_SCHEMA.check(d, f"disk[{i}]")
        if dv["name"] in seen:
            raise SchemaError(f"duplicate disk name {dv['name']!r}", f"disk[{i}].name")
        seen.add(dv["name"])
        path = Path(dv["path"]) if dv["path"] else paths.lib / "images" / f"{name}-{dv['name']}.img"
        if not path.is_absolute():
            raise SchemaError(f"must be an absolute path, found {str(path)!r}", f"disk[{i}].path")
        for j, earlier in enumerate(disks):
            if _same_file(earlier.path, path):
                raise SchemaError(f"{path} is already disk[{j}]'s image", f"disk[{i}].path")
        disks.append(DiskConfig(dv["name"], path, dv["size_mib"], dv["read_only"]))
    nets: list[NetConfig] = []
    for i, n in enumerate(v["net"]):
        nv = NET_SCHEMA.check(n, f"net[{i}]")
        if any(x.name == nv["name"] for x in nets):
            raise SchemaError(f"duplicate NIC name {nv['name']!r}", f"net[{i}].name")
        nic = NetConfig(
            nv["name"],
            nv["tap"] or default_tap(name, nv["name"]),
            nv["mac"] or default_mac(name, nv["name"]),
            nv["bridge"] or "",
        )
        if int(nic.mac[:2], 16) & 1:
            raise SchemaError(f"{nic.mac} is a multicast address, not a NIC's", f"net[{i}].mac")
        if nic.mac == "00:00:00:00:00:00":
            raise SchemaError("the all-zero MAC is not a NIC's", f"net[{i}].mac")
        for j, prev in enumerate(nets):
            if prev.tap == nic.tap:
                raise SchemaError(f"tap {nic.tap!r} is already net[{j}]'s", f"net[{i}].tap")
            if prev.mac == nic.mac:
                raise SchemaError(f"MAC {nic.mac} is already net[{j}]'s", f"net[{i}].mac")
        if nic.bridge == nic.tap:
            raise SchemaError("a tap cannot be its own bridge", f"net[{i}].bridge")
        nets.append(nic)
    policy = RestartPolicy(
        v["restart"] or sup.restart,
        sup.restart_max if v["restart_max"] is None else v["restart_max"],
        v["restart_window_s"] or sup.restart_window_s,
        sup.restart_backoff_ms if v["restart_backoff_ms"] is None else v["restart_backoff_ms"],
    )
    return VmConfig(
        name=name,
        vmm=v["vmm"],
        memory_mib=v["memory_mib"],
        vcpus=v["vcpus"],
        tick_ms=v["tick_ms"],
        guest=Path(v["guest"]) if v["guest"] else None,
        autostart=v["autostart"],
        overcommit=v["overcommit"] or sup.overcommit,
        restart=policy,
        on_reboot=v["on_reboot"],
        worker=tuple(v["worker"]) if v["worker"] else default_worker_command(),
        disks=tuple(disks),
        nets=tuple(nets),
        qemu=qemu,
        standby=v["standby"],
        source=source,
        raw=raw,
    )


def builtin_demo(paths: Paths, sup: SupervisorConfig) -> VmConfig:
    """The out-of-the-box VM: started by hand (``vmctl start demo``), not at boot."""
    return build(
        "demo",
        {"autostart": False, "disk": [{"name": "disk0", "size_mib": 16}]},
        paths,
        sup,
        "built-in default",
    )


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def conflicts(cfg: VmConfig, others: dict[str, VmConfig]) -> str | None:
    """What ``cfg`` shares with an already accepted VM that no two VMs may share:
    a tap, a MAC, a disk image. Named as ``key: what (other VM, its file)``."""
    for other in others.values():
        theirs = f"VM {other.name} ({other.source})"
        for i, nic in enumerate(cfg.nets):
            for j, o in enumerate(other.nets):
                if nic.tap == o.tap:
                    return f"net[{i}].tap: tap {nic.tap!r} is already {theirs} net[{j}]'s"
                if nic.mac == o.mac:
                    return f"net[{i}].mac: MAC {nic.mac} is already {theirs} net[{j}]'s"
        for i, d in enumerate(cfg.disks):
            for j, od in enumerate(other.disks):
                if _same_file(d.path, od.path):
                    return f"disk[{i}].path: {d.path} is already {theirs} disk[{j}]'s image"
    return None


@dataclass
class LoadResult:
    vms: dict[str, VmConfig]
    errors: dict[str, str]  # file -> message


def load_vms(paths: Paths, sup: SupervisorConfig) -> LoadResult:
    """Every valid file in vms.d; errors per file. No vms.d at all: the demo VM.

    Files are read in name order; one that names a tap, a MAC or a disk image
    an earlier file already names is refused whole (the earlier VM is untouched)."""
    if not paths.vms_dir.is_dir():
        return LoadResult({"demo": builtin_demo(paths, sup)}, {})
    vms: dict[str, VmConfig] = {}
    errors: dict[str, str] = {}
    for path in sorted(paths.vms_dir.glob("*.toml")):
        name = path.stem
        try:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ConfigError(
                    path, f"file name must be NAME.toml with NAME matching {NAME_PATTERN}"
                )
            raw = load_toml(path)
            try:
                cfg = build(name, raw, paths, sup, str(path))
            except SchemaError as e:
                raise ConfigError(path, str(e)) from None
            clash = conflicts(cfg, vms)  # the first file (by name) keeps what it names
            if clash is not None:
                raise ConfigError(path, clash)
            vms[name] = cfg
        except ConfigError as e:
            errors[str(path)] = str(e)
    return LoadResult(vms, errors)
