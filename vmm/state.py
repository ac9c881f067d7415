"""Every schema of a worker's saved state, in one place, versioned per component.

The model is QEMU's VMState: each component carries a version and the
oldest version it can read (``min_version``); each field records the
version that added it (``since``) and the default an older writer implies.
A reader accepts a component at any version in [min_version, version],
filling added fields with their defaults; a writer can emit any version in
that same range by leaving newer fields out, which is how a newer worker
hands state back to an older one. Devices follow Firecracker's persist
pattern: each saves a plain map of its fields and restores from one.

Kernel structs travel as their raw bytes: their size is part of the ioctl
number, so the layout cannot change under us, and the exact length is
checked. The whole body carries a CRC-32, so a flipped bit or a truncation is
refused rather than loaded into KVM (it guards against corruption; the
channel itself is a socket pair the supervisor made, not an open door).

``decode`` validates everything (magic, format, digest, every component,
every field, every length) before anything touches KVM.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from baton import __version__, wire
from baton.schema import (
    U8,
    U32,
    U64,
    Bool,
    Bytes,
    Int,
    Name,
    Nullable,
    OneOf,
    SchemaError,
    Spec,
    Str,
    record,
)
from vmm import layout
from vmm._kvm import ffi

MAGIC = "baton-vm-state"
FORMAT = 1
MAX_STATE = 8 << 20


class StateError(ValueError):
    """State that this worker will not load; the message says exactly why."""


class IncompatibleState(StateError):
    """A well-formed state at a version this worker cannot read."""


@dataclass(frozen=True)
class F:
    """A field: its spec, the component version that added it, its implied default."""

    spec: Spec
    since: int = 1
    default: Any = None


@dataclass(frozen=True)
class Component:
    name: str
    version: int
    min_version: int
    fields: dict[str, F]
    many: bool = False  # a list of instances (vCPUs, disks)
    max_items: int = 1

    @property
    def versions(self) -> tuple[int, int]:
        return (self.min_version, self.version)

    def _check_one(self, version: int, data: Any, path: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise SchemaError(f"expected a map, found {type(data).__name__}", path)
        for key in data:
            f = self.fields.get(key)
            if f is None or f.since > version:
                raise SchemaError(f"unexpected key {key!r} at version {version}", path)
        out: dict[str, Any] = {}
        for key, f in self.fields.items():
            if f.since <= version:
                if key not in data:
                    raise SchemaError("required but missing", key).at(path)
                try:
                    out[key] = f.spec.check(data[key], "")
                except SchemaError as e:
                    raise e.at(key).at(path) from None
            else:
                out[key] = f.default
        return out

    def read(self, version: Any, data: Any) -> Any:
        """Validate data written at ``version``; returns it at this code's version."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise StateError(f"{self.name}: version must be an integer, found {version!r:.40}")
        lo, hi = self.versions
        if not lo <= version <= hi:
            raise IncompatibleState(
                f"{self.name}: state is version {version}, this worker reads {lo}..{hi}"
            )
        try:
            if not self.many:
                return self._check_one(version, data, self.name)
            if not isinstance(data, list) or len(data) > self.max_items:
                raise SchemaError(f"expected a list of at most {self.max_items}", self.name)
            out = []
            for i, d in enumerate(data):
                try:
                    out.append(self._check_one(version, d, ""))
                except SchemaError as e:
                    raise e.at(f"{self.name}[{i}]") from None
            return out
        except SchemaError as e:
            raise StateError(str(e)) from None

    def write(self, data: Any, version: int) -> dict[str, Any]:
        """Emit ``data`` (at this code's version) as ``version``."""
        lo, hi = self.versions
        if not lo <= version <= hi:
            raise IncompatibleState(
                f"{self.name}: cannot write version {version} (writes {lo}..{hi})"
            )

        def strip(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in d.items() if self.fields[k].since <= version}

        return {"version": version, "data": [strip(d) for d in data] if self.many else strip(data)}


def _exact(ctype: str) -> Bytes:
    n = ffi.sizeof(ctype)
    return Bytes(n, n)


@dataclass(frozen=True)
class RawArray(Bytes):
    """A raw array of kernel structs: a whole number of ``entry``-sized items."""

    entry: int = 1

    def check(self, value: Any, path: str) -> bytes:
        value = super().check(value, path)
        if len(value) % self.entry:
            raise SchemaError(
                f"{len(value)} bytes is not a whole number of {self.entry}-byte entries", path
            )
        return value


CPUID_ENTRIES = RawArray(
    ffi.sizeof("struct kvm_cpuid_entry2"),
    1024 * ffi.sizeof("struct kvm_cpuid_entry2"),
    entry=ffi.sizeof("struct kvm_cpuid_entry2"),
)
MSR_ENTRIES = RawArray(
    0, 4096 * ffi.sizeof("struct kvm_msr_entry"), entry=ffi.sizeof("struct kvm_msr_entry")
)
SREGS_MAX = max(ffi.sizeof("struct kvm_sregs"), ffi.sizeof("struct kvm_sregs2"))

MACHINE = Component(
    "machine",
    version=1,
    min_version=1,
    fields={
        "name": F(Name),
        "ram_size": F(U64),
        "vcpus": F(Int(1, layout.MAX_VCPUS)),
        "tick_ns": F(U64),
        "guest_sha256": F(Str(64)),
        "paused_at_ns": F(U64),
    },
)

VM = Component(
    "vm",
    version=1,
    min_version=1,
    fields={
        "pic_master": F(_exact("struct kvm_irqchip")),
        "pic_slave": F(_exact("struct kvm_irqchip")),
        "ioapic": F(_exact("struct kvm_irqchip")),
        "pit": F(_exact("struct kvm_pit_state2")),
        "clock": F(record(clock=U64, flags=U32, realtime=U64, host_tsc=U64)),
    },
)

VCPU = Component(
    "vcpu",
    version=1,
    min_version=1,
    many=True,
    max_items=layout.MAX_VCPUS,
    fields={
        "cpuid": F(CPUID_ENTRIES),
        "regs": F(_exact("struct kvm_regs")),
        "sregs_kind": F(OneOf(("sregs", "sregs2"))),
        "sregs": F(Bytes(1, SREGS_MAX)),
        "xsave": F(Bytes(4096, 1 << 16)),
        "xcrs": F(Nullable(_exact("struct kvm_xcrs"))),
        "msrs": F(MSR_ENTRIES),
        "lapic": F(_exact("struct kvm_lapic_state")),
        "events": F(_exact("struct kvm_vcpu_events")),
        "mp_state": F(U32),
        "debugregs": F(_exact("struct kvm_debugregs")),
        "tsc_offset": F(Nullable(U64)),
    },
)

SERIAL = Component(
    "serial",
    version=1,
    min_version=1,
    fields={
        "ier": F(U8),
        "lcr": F(U8),
        "mcr": F(U8),
        "scr": F(U8),
        "dll": F(U8),
        "dlm": F(U8),
        "fcr": F(U8),
        "thri_pending": F(Bool()),
        "overrun": F(Bool()),
        "irq_level": F(Bool()),
        "rx": F(Bytes(0, 16)),
        "tx_bytes": F(U64),
        "rx_bytes": F(U64),
    },
)

I8042 = Component(
    "i8042",
    version=1,
    min_version=1,
    fields={"command": F(U8), "reset_requested": F(Bool())},
)

BLOCK = Component(
    "block",
    version=1,
    min_version=1,
    many=True,
    max_items=8,
    fields={
        "name": F(Name),
        "capacity_sectors": F(U64),
        "read_only": F(Bool()),
        "reads": F(U64),
        "writes": F(U64),
        "flushes": F(U64),
        "errors": F(U64),
    },
)

COMPONENTS: dict[str, Component] = {c.name: c for c in (MACHINE, VM, VCPU, SERIAL, I8042, BLOCK)}


def versions() -> dict[str, list[int]]:
    """What hello advertises: per component, the versions this worker reads and writes."""
    return {name: list(c.versions) for name, c in COMPONENTS.items()}


def negotiate(writer: dict[str, Any], reader: dict[str, Any]) -> dict[str, int]:
    """The version of each component the writer should emit for the reader.

    Raises IncompatibleState naming the first component with no common version."""
    chosen: dict[str, int] = {}
    for name in COMPONENTS:
        w, r = writer.get(name), reader.get(name)
        if not (isinstance(w, list) and isinstance(r, list) and len(w) == len(r) == 2):
            raise IncompatibleState(f"{name}: one side does not advertise this component")
        lo, hi = max(w[0], r[0]), min(w[1], r[1])
        if lo > hi:
            raise IncompatibleState(
                f"{name}: the old worker writes versions {w[0]}..{w[1]}, "
                f"the new worker reads {r[0]}..{r[1]}"
            )
        chosen[name] = hi
    return chosen


def encode(parts: dict[str, Any], target: dict[str, int] | None = None) -> bytes:
    """The state blob: every component at ``target`` (default: this code's version)."""
    comps = {
        name: COMPONENTS[name].write(data, (target or {}).get(name, COMPONENTS[name].version))
        for name, data in parts.items()
    }
    body = wire.pack({"components": comps})
    return wire.pack(
        {
            "magic": MAGIC,
            "format": FORMAT,
            "writer": __version__,
            "crc32": zlib.crc32(body),
            "body": body,
        }
    )


def decode(blob: Any) -> dict[str, Any]:
    """Validate a state blob completely; returns each component at this code's version."""
    if not isinstance(blob, bytes):
        raise StateError(f"state must be binary data, found {type(blob).__name__}")
    if len(blob) > MAX_STATE:
        raise StateError(f"state of {len(blob)} bytes exceeds {MAX_STATE}")
    try:
        env = wire.unpack(blob)
    except Exception as e:
        raise StateError(f"state is not a msgpack document (truncated or corrupt): {e}") from None
    if not isinstance(env, dict) or env.get("magic") != MAGIC:
        raise StateError("not a Baton VM state (bad magic)")
    if env.get("format") != FORMAT:
        raise IncompatibleState(f"state format {env.get('format')!r}, this worker reads {FORMAT}")
    body = env.get("body")
    digest = env.get("crc32")
    if not isinstance(body, bytes) or not isinstance(digest, int):
        raise StateError("state envelope lacks its body or checksum")
    if zlib.crc32(body) != digest:
        raise StateError("state checksum mismatch: the state was altered or truncated")
    try:
        doc = wire.unpack(body)
    except Exception as e:
        raise StateError(f"state body is not decodable: {e}") from None
    comps = doc.get("components") if isinstance(doc, dict) else None
    if not isinstance(comps, dict):
        raise StateError("state body has no components map")
    unknown = sorted(set(comps) - set(COMPONENTS))
    if unknown:
        raise IncompatibleState(f"state has components this worker does not know: {unknown}")
    out: dict[str, Any] = {}
    for name, comp in COMPONENTS.items():
        entry = comps.get(name)
        if not isinstance(entry, dict) or set(entry) != {"version", "data"}:
            raise StateError(f"state lacks component {name!r} (or it is malformed)")
        out[name] = comp.read(entry["version"], entry["data"])
    return out
