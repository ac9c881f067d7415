"""One vCPU's state as one fixed-layout record: the ``vcpu`` component from version 2.

Version 1 carries each vCPU as a map of twelve fields (``vcpu_state.VCPU_STATE``);
reading, checking and applying it walks those fields in Python inside the
guest's pause. Version 2 carries the same twelve values as one byte string laid
out as KVM's own x86-64 structs (a stable ABI: their sizes are part of the
ioctl numbers), so a save is one batch of GET ioctls straight into the record,
a load one length check, and the apply one C call (``baton_vcpu_restore``) with
pointers into it. Layout (little-endian; sizes from this host's headers)::

    u32 flags (SREGS2, XCRS, TSC_OFFSET) | u32 cpuid_len | u32 xsave_len | u32 0
    cpuid[cpuid_len] (kvm_cpuid_entry2 array) | kvm_regs | kvm_sregs or kvm_sregs2
    kvm_xcrs (if XCRS) | kvm_lapic_state | kvm_vcpu_events | kvm_debugregs
    kvm_mp_state | u32 0 | u64 tsc_offset (if TSC_OFFSET) | xsave[xsave_len]
    u32 nmsrs | u32 0 | kvm_msr_entry[nmsrs]

``parse`` takes nothing on trust: every size comes from the header and is
range-checked, and the record's length must be exactly what the header says
(truncated and surplus bytes alike are refused). A record reads like version
1's map (``VcpuRecord`` is a ``Mapping`` of the same field names), so a version
1 state is read into a record (``from_fields``) and a record written back as
version 1 for an older worker, and one apply path serves both.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any, NamedTuple

from vmm._kvm import ffi

SREGS2, XCRS, TSC_OFFSET = 1, 2, 4
FLAGS = SREGS2 | XCRS | TSC_OFFSET
HEADER = struct.Struct("<4I")
MSRS_HEADER = struct.Struct("<2I")
CPUID_ENTRY = ffi.sizeof("struct kvm_cpuid_entry2")
MSR_ENTRY = ffi.sizeof("struct kvm_msr_entry")
MAX_CPUID = 1024
MAX_MSRS = 4096
XSAVE_MIN, XSAVE_MAX = 4096, 1 << 16
SIZE = {
    name: ffi.sizeof(f"struct kvm_{name}")
    for name in ("regs", "sregs", "sregs2", "xcrs", "lapic_state", "vcpu_events", "debugregs")
}
MP_STATE = 8  # struct kvm_mp_state and a u32 of padding: what follows is 8-aligned


class RecordError(ValueError):
    """A record that is not what its header says (``state.StateError`` wraps it)."""


class Layout(NamedTuple):
    """Where each part of a record starts (-1: absent), and the record's sizes."""

    flags: int
    cpuid_len: int
    xsave_len: int
    cpuid: int
    regs: int
    sregs: int
    xcrs: int
    lapic: int
    events: int
    debugregs: int
    mp_state: int
    tsc: int
    xsave: int
    msrs: int  # the u32 nmsrs, u32 0 header; the entries follow it

    @property
    def sregs_len(self) -> int:
        return SIZE["sregs2" if self.flags & SREGS2 else "sregs"]

    def size(self, nmsrs: int) -> int:
        return self.msrs + MSRS_HEADER.size + nmsrs * MSR_ENTRY


@lru_cache(maxsize=64)
def layout(flags: int, cpuid_len: int, xsave_len: int) -> Layout:
    """The layout of a record with this header (validated by the caller)."""
    at = HEADER.size
    cpuid, at = at, at + cpuid_len
    regs, at = at, at + SIZE["regs"]
    sregs, at = at, at + SIZE["sregs2" if flags & SREGS2 else "sregs"]
    xcrs = -1
    if flags & XCRS:
        xcrs, at = at, at + SIZE["xcrs"]
    lapic, at = at, at + SIZE["lapic_state"]
    events, at = at, at + SIZE["vcpu_events"]
    debugregs, at = at, at + SIZE["debugregs"]
    mp_state, at = at, at + MP_STATE
    tsc = -1
    if flags & TSC_OFFSET:
        tsc, at = at, at + 8
    xsave, at = at, at + xsave_len
    return Layout(
        flags, cpuid_len, xsave_len, cpuid, regs, sregs, xcrs, lapic, events, debugregs,
        mp_state, tsc, xsave, at,
    )  # fmt: skip


class VcpuRecord(Mapping[str, Any]):
    """A record and its layout; reads as version 1's twelve fields (copies)."""

    __slots__ = ("lay", "nmsrs", "raw")

    def __init__(self, raw: bytes, lay: Layout, nmsrs: int) -> None:
        self.raw, self.lay, self.nmsrs = raw, lay, nmsrs

    def __bytes__(self) -> bytes:
        return self.raw

    def part(self, at: int, n: int) -> bytes:
        return self.raw[at : at + n]

    def __getitem__(self, key: str) -> Any:
        lay, raw = self.lay, self.raw
        if key == "cpuid":
            return self.part(lay.cpuid, lay.cpuid_len)
        if key == "regs":
            return self.part(lay.regs, SIZE["regs"])
        if key == "sregs_kind":
            return "sregs2" if lay.flags & SREGS2 else "sregs"
        if key == "sregs":
            return self.part(lay.sregs, lay.sregs_len)
        if key == "xsave":
            return self.part(lay.xsave, lay.xsave_len)
        if key == "xcrs":
            return self.part(lay.xcrs, SIZE["xcrs"]) if lay.xcrs >= 0 else None
        if key == "msrs":
            return raw[lay.msrs + MSRS_HEADER.size :]
        if key == "lapic":
            return self.part(lay.lapic, SIZE["lapic_state"])
        if key == "events":
            return self.part(lay.events, SIZE["vcpu_events"])
        if key == "mp_state":
            return int.from_bytes(self.part(lay.mp_state, 4), "little")
        if key == "debugregs":
            return self.part(lay.debugregs, SIZE["debugregs"])
        if key == "tsc_offset":
            return int.from_bytes(self.part(lay.tsc, 8), "little") if lay.tsc >= 0 else None
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(FIELDS)

    def __len__(self) -> int:
        return len(FIELDS)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VcpuRecord):
            return self.raw == other.raw
        return Mapping.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def msr_indices_are(self, stride: tuple[bytes, bytes, bytes, bytes]) -> bool:
        """Whether the MSRs are exactly those ``index_stride`` gave (same order):
        four strided slices compared, not a walk over the entries."""
        e = self.raw[self.lay.msrs + MSRS_HEADER.size :]
        return (e[0::MSR_ENTRY], e[1::MSR_ENTRY], e[2::MSR_ENTRY], e[3::MSR_ENTRY]) == stride


FIELDS = (
    "cpuid", "regs", "sregs_kind", "sregs", "xsave", "xcrs", "msrs", "lapic", "events",
    "mp_state", "debugregs", "tsc_offset",
)  # fmt: skip


def index_stride(entries: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """The four bytes of each entry's index, as ``VcpuRecord.msr_indices_are`` compares them."""
    return (
        entries[0::MSR_ENTRY],
        entries[1::MSR_ENTRY],
        entries[2::MSR_ENTRY],
        entries[3::MSR_ENTRY],
    )


def parse(data: Any) -> VcpuRecord:
    """A record from the wire, checked: header, every size, the exact length."""
    if type(data) is not bytes:
        raise RecordError(f"expected a byte string, found {type(data).__name__}")
    if len(data) < HEADER.size:
        raise RecordError(f"{len(data)} bytes is shorter than the record's header")
    flags, cpuid_len, xsave_len, zero = HEADER.unpack_from(data)
    if flags & ~FLAGS or zero:
        raise RecordError(f"unknown flags {flags:#x} in the record's header")
    if cpuid_len % CPUID_ENTRY or not CPUID_ENTRY <= cpuid_len <= MAX_CPUID * CPUID_ENTRY:
        raise RecordError(
            f"cpuid of {cpuid_len} bytes: expected 1..{MAX_CPUID} whole {CPUID_ENTRY}-byte entries"
        )
    if not XSAVE_MIN <= xsave_len <= XSAVE_MAX:
        raise RecordError(f"xsave of {xsave_len} bytes, expected {XSAVE_MIN}..{XSAVE_MAX}")
    lay = layout(flags, cpuid_len, xsave_len)
    if len(data) < lay.msrs + MSRS_HEADER.size:
        raise RecordError(f"{len(data)} bytes, truncated (its header says at least {lay.msrs + 8})")
    nmsrs, zero = MSRS_HEADER.unpack_from(data, lay.msrs)
    if nmsrs > MAX_MSRS or zero:
        raise RecordError(f"{nmsrs} MSRs (at most {MAX_MSRS}) or a bad MSR header")
    if len(data) != lay.size(nmsrs):
        raise RecordError(f"{len(data)} bytes, its header says {lay.size(nmsrs)}")
    return VcpuRecord(data, lay, nmsrs)


def build(lay: Layout, nmsrs: int, parts: dict[str, Any]) -> VcpuRecord:
    """A record from version 1's fields (already checked by its reader)."""
    out = bytearray(lay.size(nmsrs))
    HEADER.pack_into(out, 0, lay.flags, lay.cpuid_len, lay.xsave_len, 0)
    for key, at in (
        ("cpuid", lay.cpuid), ("regs", lay.regs), ("sregs", lay.sregs), ("xcrs", lay.xcrs),
        ("lapic", lay.lapic), ("events", lay.events), ("debugregs", lay.debugregs),
        ("xsave", lay.xsave),
    ):  # fmt: skip
        if at >= 0:
            out[at : at + len(parts[key])] = parts[key]
    struct.pack_into("<I", out, lay.mp_state, parts["mp_state"])
    if lay.tsc >= 0:
        struct.pack_into("<Q", out, lay.tsc, parts["tsc_offset"])
    MSRS_HEADER.pack_into(out, lay.msrs, nmsrs, 0)
    out[lay.msrs + MSRS_HEADER.size :] = parts["msrs"]
    return VcpuRecord(bytes(out), lay, nmsrs)


def from_fields(d: Mapping[str, Any]) -> VcpuRecord:
    """Version 1's map as a record; the sizes the record's layout fixes are checked
    here (version 1's schema allowed any sregs length up to the larger kind)."""
    kind = d["sregs_kind"]
    want = SIZE[kind]
    if len(d["sregs"]) != want:
        raise RecordError(f"sregs: {len(d['sregs'])} bytes, expected {want}")
    flags = (SREGS2 if kind == "sregs2" else 0) | (XCRS if d["xcrs"] is not None else 0)
    flags |= TSC_OFFSET if d["tsc_offset"] is not None else 0
    xsave_len = len(d["xsave"])
    if not XSAVE_MIN <= xsave_len <= XSAVE_MAX:
        raise RecordError(f"xsave of {xsave_len} bytes, expected {XSAVE_MIN}..{XSAVE_MAX}")
    lay = layout(flags, len(d["cpuid"]), xsave_len)
    return build(lay, len(d["msrs"]) // MSR_ENTRY, dict(d))
