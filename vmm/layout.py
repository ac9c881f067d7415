"""Guest-physical layout shared by the VMM and the built-in guest (vmm/guest/guest.S).

RAM is mapped from GPA 0 up to the 3 GiB PCI/APIC hole, and the rest above
4 GiB, so a 16 GiB guest never overlaps the LAPIC (0xfee00000) or the IOAPIC
(0xfec00000). The low 4 MiB are the boot area.
"""

from __future__ import annotations

GiB = 1 << 30
MiB = 1 << 20

LOW_RAM_END = 3 * GiB
HIGH_RAM_START = 4 * GiB
MIN_RAM = 4 * MiB

BOOT_INFO = 0x500
PML4 = 0x1000
PDPT = 0x2000
PD_BASE = 0x3000  # four page directories: the first 4 GiB, 2 MiB pages
GDT = 0x7000
TSS = 0x7100
GUEST_LOAD = 0x10000
GUEST_MAX_END = 0x80000
STACKS = 0x80000  # vCPU n's stack tops out at STACKS + (n + 1) * STACK_SIZE
STACK_SIZE = 0x4000
MAX_VCPUS = 8
BOOT_AREA_END = 4 * MiB  # zeroed on every fresh boot

# In the gap above RAM, below the APIC: where KVM puts its TSS and identity map.
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

# Devices on the I/O port bus
COM1_BASE = 0x3F8
COM1_IRQ = 4
I8042_DATA = 0x60
I8042_COMMAND = 0x64
BLOCK_PORT = 0x6000
NET_PORT = 0x6010  # NIC i at NET_PORT + i * NET_PORT_STRIDE (vmm/devices/net.py)
NET_PORT_STRIDE = 0x10
NET_IRQS = (5, 9, 10, 11, 3, 7, 14, 15)  # NIC i's PIC line; the built-in guest drives net0


def ram_regions(size: int) -> list[tuple[int, int, int]]:
    """(guest-physical address, offset in the memfd, length) for each slot."""
    low = min(size, LOW_RAM_END)
    regions = [(0, 0, low)]
    if size > LOW_RAM_END:
        regions.append((HIGH_RAM_START, LOW_RAM_END, size - LOW_RAM_END))
    return regions
