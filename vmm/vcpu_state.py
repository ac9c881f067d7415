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
from vmm._kvm import ffi
from vmm.state import Component, F, RawArray, StateError, exact
from vmm.vcpu import Vcpu

MSR_IA32_TSC_DEADLINE = 0x6E0

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
    return {
        "cpuid": v.cpuid,
        "regs": regs,
        "sregs_kind": kind,
        "sregs": sregs,
        "xsave": v.get_xsave(),
        "xcrs": v.get_xcrs(),
        "msrs": v.get_msrs(),
        "lapic": v.get_lapic(),
        "events": v.get_events(),
        "mp_state": v.get_mp_state(),
        "debugregs": v.get_debugregs(),
        "tsc_offset": v.get_tsc_offset(),
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
    """Everything else, after the VM-wide state. ``known``: what KVM holds for this
    vCPU right now, if known exactly (else empty); parts equal to it are skipped:
    setting a value KVM already holds changes nothing, and each ioctl costs several
    microseconds inside the guest's pause.

    On the vCPU's own thread (a handoff's vCPU 0), regs, sregs and events go in
    one sync-regs KVM_RUN that enters no guest code (``Vcpu.apply_synced``), so
    the events come before XSAVE and the MSRs rather than after them."""
    synced = v.has_sync_regs and v.on_own_thread()
    if synced:
        classic = s["sregs"] if s["sregs_kind"] == "sregs" else None
        if classic is None:
            v.set_sregs(s["sregs_kind"], s["sregs"])
        v.apply_synced(s["regs"], classic, s["events"])
    else:
        v.set_sregs(s["sregs_kind"], s["sregs"])
        v.set_regs(s["regs"])
    if s["xsave"] != known.get("xsave"):
        v.set_xsave(s["xsave"].ljust(v.xsave_size, b"\0"))
    if s["xcrs"] is not None and s["xcrs"] != known.get("xcrs"):
        v.set_xcrs(s["xcrs"])
    before, after = msr_split(s["msrs"])
    v.set_msrs(before)
    if not synced and s["events"] != known.get("events"):
        v.set_events(s["events"])
    if s["mp_state"] != known.get("mp_state"):
        v.set_mp_state(s["mp_state"])
    v.set_lapic(s["lapic"])
    v.set_msrs(after)  # the TSC deadline: SET_LAPIC reset the timer
    if s["debugregs"] != known.get("debugregs"):
        v.set_debugregs(s["debugregs"])
    if s["tsc_offset"] is not None and v.has_tsc_offset:
        v.set_tsc_offset(s["tsc_offset"])


def msr_split(entries: bytes) -> tuple[bytes, bytes]:
    """(MSRs to set before the LAPIC, the TSC deadline to set after it)."""
    size = kvm.MSR_ENTRY
    for i, (index,) in enumerate(struct.iter_unpack("<I12x", entries)):
        if index == MSR_IA32_TSC_DEADLINE:
            at = i * size
            return entries[:at] + entries[at + size :], entries[at : at + size]
    return entries, b""
