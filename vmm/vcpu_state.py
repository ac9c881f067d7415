"""A vCPU's saved state (the ``vcpu`` component): collected from and applied to
one ``Vcpu``, in the restore order that works.

Restore order (each step relies on the ones before; the VM-wide steps in
between are ``Vm.restore_state``): CPUID on every vCPU (``restore_cpuid``),
then kvmclock, irqchips and PIT, then per vCPU (``restore``): sregs2, regs,
XSAVE, XCRs, MSRs except the TSC deadline, vcpu events, mp state, LAPIC, the
TSC deadline MSR (SET_LAPIC reset the timer), debug registers, TSC offset.
"""

from __future__ import annotations

import os

from baton.schema import U32, U64, Bytes, Nullable, OneOf
from vmm import kvm, layout
from vmm import vcpu_record as record
from vmm._kvm import ffi, lib
from vmm.state import Component, F, RawArray, Record, StateError, exact
from vmm.vcpu import Vcpu

CPUID_ENTRIES = RawArray(
    ffi.sizeof("struct kvm_cpuid_entry2"),
    1024 * ffi.sizeof("struct kvm_cpuid_entry2"),
    entry=ffi.sizeof("struct kvm_cpuid_entry2"),
)
MSR_ENTRIES = RawArray(
    0, 4096 * ffi.sizeof("struct kvm_msr_entry"), entry=ffi.sizeof("struct kvm_msr_entry")
)
SREGS_MAX = max(ffi.sizeof("struct kvm_sregs"), ffi.sizeof("struct kvm_sregs2"))

VCPU_STATE = Component(
    "vcpu",
    version=2,
    min_version=1,
    many=True,
    max_items=layout.MAX_VCPUS,
    # Version 1: each vCPU a map of these fields. Version 2: the same fields as
    # one fixed-layout record (``vmm.vcpu_record``), read and written by ``RECORD``.
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
    record=Record(since=2, parse=record.parse, from_fields=record.from_fields),
)


def save(v: Vcpu) -> record.VcpuRecord:
    """Every field of VCPU_STATE, read from KVM (the vCPU must be parked), as one
    record (``Vcpu.save_record``).

    Regs and sregs come from the copy KVM left in ``kvm_run`` as the vCPU
    parked (``Vcpu.captured``), when it is still valid: then the sregs travel
    as the classic ``sregs`` kind, which carries everything except under PAE
    paging outside long mode (PDPTRs), where sregs2 is read."""
    return v.save_record()


def check(v: Vcpu, s: record.VcpuRecord, i: int, readable: set[int]) -> None:
    """What the schema cannot know: whether this host's KVM and this vCPU take ``s``.
    ``readable``: the MSRs this VM's vCPUs read back (probed once). The usual
    case, the very MSR list this vCPU probed, is one comparison."""
    flags = s.lay.flags
    if flags & record.SREGS2 and not v.has_sregs2:
        raise StateError("state carries sregs2, which this host's KVM lacks")
    if s.lay.xsave_len > v.xsave_size:
        raise StateError(
            f"vcpu[{i}].xsave: {s.lay.xsave_len} bytes, this host takes {v.xsave_size}"
        )
    if flags & record.XCRS and not v.has_xcrs:
        raise StateError("state carries XCRs, which this host's KVM lacks")
    if v.has_run and v.cpuid != s["cpuid"]:
        raise StateError(f"vcpu[{i}]: CPUID differs and this vCPU has already run")
    if not s.msr_indices_are(v.msr_stride):
        missing = sorted(set(kvm.msr_indices(s["msrs"])) - readable)
        if missing:
            raise StateError(f"vcpu[{i}]: MSRs {[hex(m) for m in missing]} cannot be set here")


#: ``BATON_VMM_FRAME_SCAN=0``: every frame's vCPUs read and checked in Python (the A/B switch).
FRAME_SCAN = os.environ.get("BATON_VMM_FRAME_SCAN", "1") != "0"


class FrameReader:
    """A state frame's vCPU section read and checked for these vCPUs in one C call
    (``baton_vcpus_scan``): what ``state.decode_vcpus`` and ``check`` do, for the
    usual case of records in this VM's own shape. Made once per machine."""

    def __init__(self, vcpus: list[Vcpu]) -> None:
        v0 = vcpus[0]
        self._vcpus = vcpus
        self._msrs = kvm.pack_msrs([(i, 0) for i in v0.msr_indices])
        w = self._want = ffi.new("struct baton_vcpus_want *")
        w.n = len(vcpus)
        w.has_sregs2 = all(v.has_sregs2 for v in vcpus)
        w.has_xcrs = all(v.has_xcrs for v in vcpus)
        w.host_xsave = min(v.xsave_size for v in vcpus)
        w.nmsrs = len(v0.msr_indices)
        self._msrs_c = ffi.from_buffer(self._msrs)
        w.msrs = self._msrs_c
        self._out = ffi.new("long[]", 6 * len(vcpus))

    def read(self, section: bytes) -> list[record.VcpuRecord] | None:
        """Every record of ``section``, parsed and checked as ``decode_vcpus`` and
        ``check`` would; None where they must decide (and say what is wrong):
        another shape, another MSR list, a vCPU that has run (its CPUID is fixed),
        anything malformed."""
        if not FRAME_SCAN or any(v.has_run for v in self._vcpus):
            return None
        out = self._out
        if not lib.baton_vcpus_scan(section, len(section), self._want, out):
            return None
        recs = []
        for i in range(len(self._vcpus)):
            at, size, flags, cpuid_len, xsave_len, nmsrs = out[6 * i : 6 * i + 6]
            lay = record.layout(flags, cpuid_len, xsave_len)
            if lay.size(nmsrs) != size:  # never: C lays records out as vcpu_record does
                return None
            recs.append(record.VcpuRecord(section[at : at + size], lay, nmsrs))
        return recs


def restore_cpuid(v: Vcpu, s: record.VcpuRecord) -> None:
    """The first restore step, on every vCPU before anything else. Usually a no-op:
    the same CPUID was set when the vCPU was built, before the pause; KVM refuses
    CPUID changes once a vCPU has run (``check`` refuses that first)."""
    cpuid = s["cpuid"]
    if cpuid != v.cpuid:
        v.set_cpuid(cpuid)


def restore(v: Vcpu, s: record.VcpuRecord, known: record.VcpuRecord | None) -> None:
    """Everything else, after the VM-wide state (``Vcpu.restore_record``: one C
    call). ``known``: what KVM holds for this vCPU right now, if known exactly;
    parts equal to it are skipped, as are writes KVM would ignore (the TSC
    deadline outside TSC-deadline mode) or override (the TSC MSR, when the TSC
    offset is set after it): each vCPU ioctl costs 8 us or more inside the
    guest's pause here."""
    v.restore_record(s, known)
