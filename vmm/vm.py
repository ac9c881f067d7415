"""The KVM VM object: memory slots, in-kernel irqchip and PIT, and the VM-wide
state (the ``vm`` component: PIC master, PIC slave, IOAPIC, PIT, kvmclock).

All of this is built before a guest pauses (a new worker does it during
prepare), because KVM ties a VM to the process that created it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from baton.schema import U32, U64, record
from vmm import kvm, layout
from vmm._kvm import ffi, lib
from vmm.memory import GuestMemory
from vmm.state import Component, F, exact

CHIPS = {
    "pic_master": lib.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": lib.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": lib.KVM_IRQCHIP_IOAPIC,
}

VM_STATE = Component(
    "vm",
    version=1,
    min_version=1,
    fields={
        "pic_master": F(exact("struct kvm_irqchip")),
        "pic_slave": F(exact("struct kvm_irqchip")),
        "ioapic": F(exact("struct kvm_irqchip")),
        "pit": F(exact("struct kvm_pit_state2")),
        "clock": F(record(clock=U64, flags=U32, realtime=U64, host_tsc=U64)),
    },
)


class Vm:
    def __init__(self, system: kvm.System, memory: GuestMemory) -> None:
        for cap, name in (
            (lib.KVM_CAP_IRQCHIP, "in-kernel irqchip"),
            (lib.KVM_CAP_PIT2, "in-kernel PIT"),
            (lib.KVM_CAP_IMMEDIATE_EXIT, "immediate_exit"),
            (lib.KVM_CAP_VCPU_EVENTS, "vcpu events"),
            (lib.KVM_CAP_XSAVE, "XSAVE state"),
        ):
            if system.check(cap) <= 0:
                raise kvm.KvmUnavailable(f"KVM lacks {name}")
        self.system = system
        self.memory = memory
        self.fd = system.create_vm()
        self.clock_flags = system.check(lib.KVM_CAP_ADJUST_CLOCK)
        try:
            kvm.ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, layout.TSS_ADDR, "KVM_SET_TSS_ADDR")
            addr = ffi.new("uint64_t *", layout.IDENTITY_MAP_ADDR)
            kvm.ioctl_ptr(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, addr, "SET_IDENTITY_MAP_ADDR")
            kvm.ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
            pit = ffi.new("struct kvm_pit_config *")
            pit.flags = lib.KVM_PIT_SPEAKER_DUMMY
            kvm.ioctl_ptr(self.fd, lib.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")
            self._build_reader()
            self._build_writer()
        except BaseException:
            os.close(self.fd)
            raise
        # The first memory slot waits out a grace period in the kernel (~7 ms here,
        # whatever the size): done on a thread of its own (the ioctl releases the
        # GIL) while the caller builds devices and vCPUs; ``wait_memory`` joins it.
        self._slots_error: BaseException | None = None
        self._slots = threading.Thread(target=self._add_slots, name="memslots", daemon=True)
        self._slots.start()

    def _add_slots(self) -> None:
        try:
            for slot, (gpa, offset, size) in enumerate(self.memory.regions):
                region = ffi.new("struct kvm_userspace_memory_region *")
                region.slot = slot
                region.guest_phys_addr = gpa
                region.memory_size = size
                region.userspace_addr = self.memory.host_addr + offset
                kvm.ioctl_ptr(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "memory slot")
        except BaseException as e:
            self._slots_error = e

    def wait_memory(self) -> None:
        """Until guest RAM is mapped into the VM; raises what mapping it raised."""
        self._slots.join()
        if self._slots_error is not None:
            raise self._slots_error

    def close(self) -> None:
        self._slots.join()  # never close the fd under its ioctl
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def irq_line(self, irq: int, level: int) -> None:
        req = ffi.new("struct kvm_irq_level *")
        req.irq = irq
        req.level = level
        kvm.ioctl_ptr(self.fd, lib.KVM_IRQ_LINE, req, "KVM_IRQ_LINE")

    # -- VM-wide state
    def _build_reader(self) -> None:
        """Every GET of ``save_state``, in one batch into buffers allocated once."""
        b = kvm.Batch(self.fd)
        views = []
        for chip, chip_id in CHIPS.items():
            obj = ffi.new("struct kvm_irqchip *")
            obj.chip_id = chip_id  # KVM reads it and writes it back as it was
            b.add(lib.KVM_GET_IRQCHIP, obj, f"KVM_GET_IRQCHIP {chip}")
            views.append(ffi.buffer(obj))
        pit = ffi.new("struct kvm_pit_state2 *")
        b.add(lib.KVM_GET_PIT2, pit, "KVM_GET_PIT2")
        views.append(ffi.buffer(pit))
        clock = ffi.new("struct kvm_clock_data *")
        b.add(lib.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        self._reader = (b, views, clock)

    def save_state(self) -> dict[str, Any]:
        """The ``vm`` component. Safe while vCPUs run (the warm-up reads it then)."""
        batch, (master, slave, ioapic, pit), c = self._reader
        batch.run()
        return {
            "pic_master": master[:],
            "pic_slave": slave[:],
            "ioapic": ioapic[:],
            "pit": pit[:],
            "clock": {
                "clock": c.clock,
                "flags": c.flags,
                "realtime": c.realtime,
                "host_tsc": c.host_tsc,
            },
        }

    def _build_writer(self) -> None:
        """Every SET of ``restore_state``, in one batch from buffers allocated once."""
        b = kvm.Batch(self.fd)
        clock = ffi.new("struct kvm_clock_data *")
        b.add(lib.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")
        bufs = []
        for chip in CHIPS:
            obj = ffi.new("struct kvm_irqchip *")
            b.add(lib.KVM_SET_IRQCHIP, obj, f"KVM_SET_IRQCHIP {chip}")
            bufs.append(obj)
        pit = ffi.new("struct kvm_pit_state2 *")
        b.add(lib.KVM_SET_PIT2, pit, "KVM_SET_PIT2")
        self._writer = (b, clock, bufs, pit)

    def restore_state(self, s: dict[str, Any], known: dict[str, Any]) -> None:
        """kvmclock, the three irqchips, the PIT, in that order, in one batch.
        ``known``: what KVM holds now, where known exactly (else empty); parts
        equal to it are skipped. With KVM_CLOCK_REALTIME, KVM adds the real time
        that passed since the save, so guest time stays in step with the host's."""
        batch, clock, bufs, pit = self._writer
        c = s["clock"]
        realtime = c["flags"] & self.clock_flags & lib.KVM_CLOCK_REALTIME
        clock.clock = c["clock"]
        clock.flags = lib.KVM_CLOCK_REALTIME if realtime else 0
        clock.realtime = c["realtime"] if realtime else 0
        mask = 1
        for i, (chip, chip_id) in enumerate(CHIPS.items()):
            data = s[chip]
            if data != known.get(chip):
                found = int.from_bytes(data[:4], "little")
                if found != chip_id:
                    raise ValueError(f"irqchip state for {chip} carries chip id {found}")
                ffi.memmove(bufs[i], data, len(data))
                mask |= 2 << i
        if s["pit"] != known.get("pit"):
            ffi.memmove(pit, s["pit"], len(s["pit"]))
            mask |= 16
        batch.run(mask)

    def get_clock(self) -> dict[str, int]:
        obj = ffi.new("struct kvm_clock_data *")
        kvm.ioctl_ptr(self.fd, lib.KVM_GET_CLOCK, obj, "KVM_GET_CLOCK")
        return {
            "clock": obj.clock,
            "flags": obj.flags,
            "realtime": obj.realtime,
            "host_tsc": obj.host_tsc,
        }
