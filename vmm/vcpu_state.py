"""A vCPU's saved state (the ``vcpu`` component): collected from and applied to
one ``Vcpu``, in the restore order that works.

Restore order (each step relies on the ones before; the VM-wide steps in
between are ``Vm.restore_state``): CPUID on every vCPU (``restore_cpuid``),
then kvmclock, irqchips and PIT, then per vCPU (``restore``): sregs2, regs,
XSAVE, XCRs, MSRs except the TSC deadline, vcpu events, mp state, LAPIC, the
TSC deadline MSR (SET_LAPIC reset the timer), debug registers, TSC offset.
"""

from __future__ import annotations

import struct
from typing import Any

from baton.schema import U32, U64, Bytes, Nullable, OneOf
from vmm import kvm, layout
from vmm._kvm import ffi, lib
from vmm.state import Component, F, RawArray, StateError, exact
from vmm.vcpu import Vcpu

MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_IA32_TSC = 0x10
LVTT = 0x320  # the LAPIC timer's LVT entry in kvm_lapic_state.regs

CPUID_ENTRIES = RawArray(
    ffi.sizeof("struct kvm_cpuid_entry2"),
    1024 * ffi.sizeof("struct kvm_cpuid_entry2"),
    entry=ffi.sizeof("struct kvm_cpuid_entry2"),
)
MSR_ENTRIES = RawArray(
    0, 4096 * ffi.sizeof("struct kvm_msr_entry"), entry=ffi.sizeof("struct kvm_msr_entry")
)
SREGS_MAX = max(ffi.sizeof("struct kvm_sregs"), ffi.sizeof("struct kvm_sregs2"))
SREGS_SIZE = {
    "sregs": ffi.sizeof("struct kvm_sregs"),
    "sregs2": ffi.sizeof("struct kvm_sregs2"),
}

VCPU_STATE = Component(
    "vcpu",
    version=1,
    min_version=1,
    many=True,
    max_items=layout.MAX_VCPUS,
    fields={
        "cpuid": F(CPUID_ENTRIES),
        "regs": F(exact("struct kvm_regs")),
        "sregs_kind": F(OneOf(("sregs", "sregs2"))),
        "sregs": F(Bytes(1, SREGS_MAX)),
        "xsave": F(Bytes(4096, 1 << 16)),
        "xcrs": F(Nullable(exact("struct kvm_xcrs"))),
        "msrs": F(MSR_ENTRIES),
        "lapic": F(exact("struct kvm_lapic_state")),
        "events": F(exact("struct kvm_vcpu_events")),
        "mp_state": F(U32),
        "debugregs": F(exact("struct kvm_debugregs")),
        "tsc_offset": F(Nullable(U64)),
    },
)


def save(v: Vcpu) -> dict[str, Any]:
    """Every field of VCPU_STATE, read from KVM (the vCPU must be parked).

    Regs and sregs come from the copy KVM left in ``kvm_run`` as the vCPU
    parked (``Vcpu.captured``), when it is still valid: then the sregs travel
    as the classic ``sregs`` kind, which carries everything except under PAE
    paging outside long mode (PDPTRs), where sregs2 is read."""
    cap = v.captured()
    if cap is not None:
        regs, sregs = cap
        kind = "sregs"
        if not v.captured_sregs_complete():
            kind, sregs = v.get_sregs()
    else:
        regs = v.get_regs()
        kind, sregs = v.get_sregs()
    xsave, xcrs, msrs, lapic, events, debugregs, mp_state, tsc_offset = v.read_parked()
    return {
        "cpuid": v.cpuid,
        "regs": regs,
        "sregs_kind": kind,
        "sregs": sregs,
        "xsave": xsave,
        "xcrs": xcrs,
        "msrs": msrs,
        "lapic": lapic,
        "events": events,
        "mp_state": mp_state,
        "debugregs": debugregs,
        "tsc_offset": tsc_offset,
    }


def check(v: Vcpu, s: dict[str, Any], i: int, readable: set[int]) -> None:
    """What the schema cannot know: whether this host's KVM and this vCPU take ``s``.
    ``readable``: the MSRs this VM's vCPUs read back (probed once)."""
    want = SREGS_SIZE[s["sregs_kind"]]
    if len(s["sregs"]) != want:
        raise StateError(f"vcpu[{i}].sregs: {len(s['sregs'])} bytes, expected {want}")
    if s["sregs_kind"] == "sregs2" and not v.has_sregs2:
        raise StateError("state carries sregs2, which this host's KVM lacks")
    if len(s["xsave"]) > v.xsave_size:
        raise StateError(
            f"vcpu[{i}].xsave: {len(s['xsave'])} bytes, this host takes {v.xsave_size}"
        )
    if s["xcrs"] is not None and not v.has_xcrs:
        raise StateError("state carries XCRs, which this host's KVM lacks")
    if v.has_run and v.cpuid != s["cpuid"]:
        raise StateError(f"vcpu[{i}]: CPUID differs and this vCPU has already run")
    missing = sorted(set(kvm.msr_indices(s["msrs"])) - readable)
    if missing:
        raise StateError(f"vcpu[{i}]: MSRs {[hex(m) for m in missing]} cannot be set here")


def restore_cpuid(v: Vcpu, s: dict[str, Any]) -> None:
    """The first restore step, on every vCPU before anything else. Usually a no-op:
    the same CPUID was set when the vCPU was built, before the pause; KVM refuses
    CPUID changes once a vCPU has run (``check`` refuses that first)."""
    if s["cpuid"] != v.cpuid:
        v.set_cpuid(s["cpuid"])


def restore(v: Vcpu, s: dict[str, Any], known: dict[str, Any]) -> None:
    """Everything else, after the VM-wide state, in one batch of SET ioctls
    (``Vcpu.write``). ``known``: what KVM holds for this vCPU right now, if
    known exactly (else empty); parts equal to it are skipped, and so are
    writes KVM would ignore or override (``msrs_to_set``, ``deadline_matters``):
    each vCPU ioctl costs 8 us or more inside the guest's pause.

    On the vCPU's own thread (a handoff's vCPU 0), regs, sregs and events go in
    one sync-regs KVM_RUN that enters no guest code (``Vcpu.apply_synced``), so
    the events come before XSAVE and the MSRs rather than after them."""
    synced = v.has_sync_regs and v.on_own_thread()
    ops = []
    if synced:
        classic = s["sregs"] if s["sregs_kind"] == "sregs" else None
        if classic is None:
            v.set_sregs(s["sregs_kind"], s["sregs"])
        v.apply_synced(s["regs"], classic, s["events"])
    else:
        ops += [v.sregs_op(s["sregs_kind"], s["sregs"]), v.regs_op(s["regs"])]
    if s["xsave"] != known.get("xsave"):
        ops.append(v.xsave_op(s["xsave"]))
    if s["xcrs"] is not None and s["xcrs"] != known.get("xcrs"):
        ops.append(v.xcrs_op(s["xcrs"]))
    offset = s["tsc_offset"] is not None and v.has_tsc_offset
    before = msrs_to_set(s["msrs"], known.get("msrs", b""), offset)
    if before:
        ops.append(v.msrs_op(before))
    if not synced and s["events"] != known.get("events"):
        ops.append(v.events_op(s["events"]))
    if s["mp_state"] != known.get("mp_state"):
        ops.append(v.mp_state_op(s["mp_state"]))
    ops.append(v.lapic_op(s["lapic"]))
    if deadline_matters(s["lapic"]):
        after = msr_entry(s["msrs"], MSR_IA32_TSC_DEADLINE)
        if after:
            ops.append(v.msrs_op(after))  # SET_LAPIC reset the timer
    if s["debugregs"] != known.get("debugregs"):
        ops.append(v.debugregs_op(s["debugregs"]))
    if offset:
        ops.append(v.tsc_offset_op(s["tsc_offset"]))
    v.write(ops)


_DROP = {
    # with the TSC offset set last, the TSC MSR's write is overridden by it
    # (KVM_VCPU_TSC_OFFSET synchronises the TSC as the MSR write would)
    True: ffi.new("uint32_t[]", [MSR_IA32_TSC_DEADLINE, MSR_IA32_TSC]),
    False: ffi.new("uint32_t[]", [MSR_IA32_TSC_DEADLINE]),
}


def msrs_to_set(entries: bytes, known: bytes, tsc_offset_follows: bool) -> bytes:
    """The MSRs to set before the LAPIC: every entry except those equal, at the
    same place, to ``known`` (what KVM holds now), the TSC deadline (set after
    the LAPIC), and the TSC itself when the TSC offset is set after it."""
    n, size = len(entries) // kvm.MSR_ENTRY, kvm.MSR_ENTRY
    out = ffi.new("char[]", max(len(entries), 1))
    drop = _DROP[tsc_offset_follows]
    m = lib.baton_msrs_changed(entries, known, n, len(known) // size, drop, len(drop), out)
    return ffi.buffer(out, m * size)[:]


def msr_entry(entries: bytes, index: int) -> bytes:
    """The raw entry for MSR ``index`` in ``entries``, or b\"\"."""
    for i, (at,) in enumerate(struct.iter_unpack("<I12x", entries)):
        if at == index:
            return entries[i * kvm.MSR_ENTRY : (i + 1) * kvm.MSR_ENTRY]
    return b""


def deadline_matters(lapic: bytes) -> bool:
    """Whether this LAPIC's timer is in TSC-deadline mode (LVTT bits 17-18 = 2).
    In any other mode KVM ignores a write of the TSC deadline MSR (and reads it
    as 0), so restoring it is skipped."""
    return (int.from_bytes(lapic[LVTT : LVTT + 4], "little") >> 17) & 3 == 2
