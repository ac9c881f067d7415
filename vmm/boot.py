"""A fresh boot: page tables, GDT, boot info and the guest image in RAM, and
every vCPU's registers set for a direct start in 64-bit long mode (no BIOS)."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vmm import kvm, layout
from vmm._kvm import ffi
from vmm.memory import GuestMemory

HEADER = struct.Struct("<8sIIII")
MAGIC = b"BATONGST"
BOOT_INFO_MAGIC = 0x49425442  # "BTBI"
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
APIC_BUS_HZ = 1_000_000_000  # KVM's emulated APIC bus runs at 1 GHz


@dataclass(frozen=True)
class GuestImage:
    data: bytes
    bsp_entry: int
    ap_entry: int
    sha256: str

    @classmethod
    def load(cls, path: Path | None = None) -> GuestImage:
        data = (
            path.read_bytes()
            if path is not None
            else resources.files("vmm.guest").joinpath("guest.bin").read_bytes()
        )
        if len(data) < HEADER.size:
            raise ValueError("guest image is too short for its header")
        magic, version, bsp, ap, mem = HEADER.unpack_from(data)
        if magic != MAGIC or version != 1:
            raise ValueError("not a Baton guest image (bad header)")
        if layout.GUEST_LOAD + max(mem, len(data)) > layout.GUEST_MAX_END:
            raise ValueError(f"guest image needs {mem} bytes, more than the boot area holds")
        return cls(
            data,
            layout.GUEST_LOAD + bsp,
            layout.GUEST_LOAD + ap,
            hashlib.sha256(data).hexdigest(),
        )


def timer_config(tick_ns: int) -> tuple[int, int]:
    """(initial count, divide configuration) of the LAPIC timer for one tick."""
    # TDCR encodings for divide by 1, 2, 4, ..., 128
    for shift, tdcr in enumerate((0xB, 0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA)):
        count = tick_ns * (APIC_BUS_HZ // 1_000_000_000) >> shift
        if count <= 0xFFFF_FFFF:
            return max(count, 1), tdcr
    raise ValueError(f"tick of {tick_ns} ns is too long for the LAPIC timer")


def write_boot_area(memory: GuestMemory, image: GuestImage, vcpus: int, tick_ns: int) -> None:
    memory.zero(0, layout.BOOT_AREA_END)
    # Identity map of the first 4 GiB with 2 MiB pages (covers RAM below the hole and the APICs).
    memory.write(layout.PML4, struct.pack("<Q", layout.PDPT | 3))
    memory.write(
        layout.PDPT, b"".join(struct.pack("<Q", layout.PD_BASE + i * 0x1000 | 3) for i in range(4))
    )
    entries = b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(4 * 512))
    memory.write(layout.PD_BASE, entries)
    gdt = [
        0,
        0x00AF9A000000FFFF,  # 0x08: 64-bit code
        0x00CF92000000FFFF,  # 0x10: data
        _tss_low(layout.TSS, 0x67),  # 0x18: 64-bit TSS (two slots)
        layout.TSS >> 32,
    ]
    memory.write(layout.GDT, b"".join(struct.pack("<Q", g) for g in gdt))
    tmict, tdcr = timer_config(tick_ns)
    memory.write(
        layout.BOOT_INFO,
        struct.pack("<IIIIIIQ", BOOT_INFO_MAGIC, 1, vcpus, tmict, tdcr, 0, memory.size),
    )
    memory.write(layout.GUEST_LOAD, image.data)


def _tss_low(base: int, limit: int) -> int:
    return (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (0x89 << 40)  # present, 64-bit available TSS
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56)
    )


def _segment(seg: Any, selector: int, type_: int, code: bool) -> None:
    """``seg``: a cffi ``struct kvm_segment``."""
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = type_
    seg.present = 1
    seg.dpl = 0
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1


def long_mode_registers(sregs_raw: bytes, index: int, entry: int) -> tuple[bytes, bytes]:
    """(kvm_sregs, kvm_regs) for a vCPU starting at ``entry`` in long mode."""
    sregs = kvm.from_raw("struct kvm_sregs", sregs_raw)
    _segment(sregs.cs, 0x08, 0xB, True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, 0x10, 0x3, False)
    sregs.tr.base = layout.TSS
    sregs.tr.limit = 0x67
    sregs.tr.selector = 0x18
    sregs.tr.type = 0xB  # busy 64-bit TSS
    sregs.tr.present = 1
    sregs.tr.s = 0
    sregs.gdt.base = layout.GDT
    sregs.gdt.limit = 5 * 8 - 1
    sregs.cr3 = layout.PML4
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    regs = ffi.new("struct kvm_regs *")
    regs.rip = entry
    regs.rflags = 0x2
    regs.rsp = layout.STACKS + (index + 1) * layout.STACK_SIZE
    return kvm.raw(sregs), kvm.raw(regs)
