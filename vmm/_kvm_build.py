"""cffi API-mode build of the KVM binding (``vmm._kvm``).

API mode compiles against the host's ``<linux/kvm.h>``: every struct is
declared partially (``...;``) so the compiler supplies the real sizes and
offsets, and every ioctl number comes from the header's own macros. Nothing
here is a hand-copied layout. Built by ``pip install .`` (setup.py names this
file in ``cffi_modules``).
"""

from cffi import FFI

ffibuilder = FFI()

IOCTLS = [
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID",
    "KVM_GET_MSR_INDEX_LIST",
    "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_CREATE_IRQCHIP",
    "KVM_CREATE_PIT2",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_CREATE_VCPU",
    "KVM_IRQ_LINE",
    "KVM_GET_IRQCHIP",
    "KVM_SET_IRQCHIP",
    "KVM_GET_PIT2",
    "KVM_SET_PIT2",
    "KVM_GET_CLOCK",
    "KVM_SET_CLOCK",
    "KVM_RUN",
    "KVM_GET_REGS",
    "KVM_SET_REGS",
    "KVM_GET_SREGS",
    "KVM_SET_SREGS",
    "KVM_GET_SREGS2",
    "KVM_SET_SREGS2",
    "KVM_GET_XSAVE",
    "KVM_GET_XSAVE2",
    "KVM_SET_XSAVE",
    "KVM_GET_XCRS",
    "KVM_SET_XCRS",
    "KVM_GET_MSRS",
    "KVM_SET_MSRS",
    "KVM_SET_CPUID2",
    "KVM_GET_CPUID2",
    "KVM_GET_LAPIC",
    "KVM_SET_LAPIC",
    "KVM_GET_VCPU_EVENTS",
    "KVM_SET_VCPU_EVENTS",
    "KVM_GET_MP_STATE",
    "KVM_SET_MP_STATE",
    "KVM_GET_DEBUGREGS",
    "KVM_SET_DEBUGREGS",
    "KVM_HAS_DEVICE_ATTR",
    "KVM_GET_DEVICE_ATTR",
    "KVM_SET_DEVICE_ATTR",
    "KVM_GET_TSC_KHZ",
]

CONSTANTS = [
    "KVM_CAP_IRQCHIP",
    "KVM_CAP_PIT2",
    "KVM_CAP_ADJUST_CLOCK",
    "KVM_CAP_XSAVE",
    "KVM_CAP_XCRS",
    "KVM_CAP_SREGS2",
    "KVM_CAP_XSAVE2",
    "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_CAP_VCPU_EVENTS",
    "KVM_CAP_DEBUGREGS",
    "KVM_CAP_MP_STATE",
    "KVM_CAP_NR_VCPUS",
    "KVM_CAP_MAX_VCPUS",
    "KVM_CAP_GET_TSC_KHZ",
    "KVM_CAP_TSC_DEADLINE_TIMER",
    "KVM_CAP_SYNC_REGS",
    "KVM_SYNC_X86_REGS",
    "KVM_SYNC_X86_SREGS",
    "KVM_SYNC_X86_EVENTS",
    "KVM_EXIT_UNKNOWN",
    "KVM_EXIT_EXCEPTION",
    "KVM_EXIT_IO",
    "KVM_EXIT_HLT",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_INTR",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    "KVM_SYSTEM_EVENT_SHUTDOWN",
    "KVM_SYSTEM_EVENT_RESET",
    "KVM_IRQCHIP_PIC_MASTER",
    "KVM_IRQCHIP_PIC_SLAVE",
    "KVM_IRQCHIP_IOAPIC",
    "KVM_MP_STATE_RUNNABLE",
    "KVM_MP_STATE_UNINITIALIZED",
    "KVM_MP_STATE_HALTED",
    "KVM_VCPUEVENT_VALID_NMI_PENDING",
    "KVM_VCPUEVENT_VALID_SIPI_VECTOR",
    "KVM_VCPUEVENT_VALID_SHADOW",
    "KVM_VCPUEVENT_VALID_SMM",
    "KVM_VCPUEVENT_VALID_PAYLOAD",
    "KVM_CLOCK_TSC_STABLE",
    "KVM_CLOCK_REALTIME",
    "KVM_CLOCK_HOST_TSC",
    "KVM_VCPU_TSC_CTRL",
    "KVM_VCPU_TSC_OFFSET",
    "KVM_PIT_SPEAKER_DUMMY",
    "KVM_MAX_XCRS",
]

RUN_FIELDS = {
    "RUN_IMMEDIATE_EXIT": "immediate_exit",
    "RUN_EXIT_REASON": "exit_reason",
    "RUN_IO_DIRECTION": "io.direction",
    "RUN_IO_SIZE": "io.size",
    "RUN_IO_PORT": "io.port",
    "RUN_IO_COUNT": "io.count",
    "RUN_IO_DATA_OFFSET": "io.data_offset",
    "RUN_MMIO_PHYS_ADDR": "mmio.phys_addr",
    "RUN_MMIO_DATA": "mmio.data",
    "RUN_MMIO_LEN": "mmio.len",
    "RUN_MMIO_IS_WRITE": "mmio.is_write",
    "RUN_SYSTEM_EVENT_TYPE": "system_event.type",
    "RUN_INTERNAL_SUBERROR": "internal.suberror",
    "RUN_FAIL_ENTRY_REASON": "fail_entry.hardware_entry_failure_reason",
    "RUN_VALID_REGS": "kvm_valid_regs",
    "RUN_DIRTY_REGS": "kvm_dirty_regs",
    "RUN_SYNC_REGS": "s.regs.regs",
    "RUN_SYNC_SREGS": "s.regs.sregs",
    "RUN_SYNC_EVENTS": "s.regs.events",
}

CDEF = "\n".join(f"#define {name} ..." for name in IOCTLS + CONSTANTS + list(RUN_FIELDS))
CDEF += """
#define SIZEOF_KVM_RUN ...

struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr; ...;
};
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags; ...;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector; uint8_t type; uint8_t present, dpl, db,
    s, l, g, avl; uint8_t unusable; ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base; ...;
};
struct kvm_sregs2 {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base, flags; ...;
};
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; ...; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags;
    uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_lapic_state { char regs[1024]; ...; };
struct kvm_xsave { uint32_t region[1024]; ...; };
struct kvm_xcr { uint32_t xcr; uint32_t reserved; uint64_t value; ...; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_vcpu_events { uint32_t flags; ...; };
struct kvm_mp_state { uint32_t mp_state; ...; };
struct kvm_debugregs { uint64_t db[4]; uint64_t dr6; uint64_t dr7; uint64_t flags; ...; };
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_state2 { uint32_t flags; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_clock_data {
    uint64_t clock; uint32_t flags; uint64_t realtime; uint64_t host_tsc; ...;
};
struct kvm_irq_level { uint32_t irq; uint32_t level; ...; };
struct kvm_device_attr { uint32_t flags; uint32_t group; uint64_t attr; uint64_t addr; ...; };

int baton_ioctl_ptr(int fd, unsigned long request, void *arg);
int baton_ioctl_val(int fd, unsigned long request, unsigned long arg);
void *baton_map_shared(int fd, size_t length, long offset, int *err);
int baton_unmap(void *addr, size_t length);
int baton_madvise(void *addr, size_t length, int advice);
int baton_ioctl_batch(int fd, int n, const unsigned long *requests, void **args,
                      const int *expect, int *rets);
int baton_msrs_changed(const char *entries, const char *known, int n, int n_known,
                       const uint32_t *drop, int n_drop, void *out);
"""

SOURCE = (
    """
#include <errno.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

#define SIZEOF_KVM_RUN sizeof(struct kvm_run)
"""
    + "\n".join(f"#define {k} offsetof(struct kvm_run, {v})" for k, v in RUN_FIELDS.items())
    + """

/* ioctl wrappers that return -errno: no thread-local errno dance in Python. */
int baton_ioctl_ptr(int fd, unsigned long request, void *arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}
int baton_ioctl_val(int fd, unsigned long request, unsigned long arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}
void *baton_map_shared(int fd, size_t length, long offset, int *err) {
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, offset);
    if (p == MAP_FAILED) { *err = errno; return NULL; }
    *err = 0;
    return p;
}
int baton_unmap(void *addr, size_t length) {
    return munmap(addr, length) < 0 ? -errno : 0;
}
int baton_madvise(void *addr, size_t length, int advice) {
    return madvise(addr, length, advice) < 0 ? -errno : 0;
}
/* n ioctls on one fd in order, each result (or -errno) in rets; stops at the
   first that fails, or returns other than expect[i] when that is >= 0 (the
   MSR ioctls return how many they did), and returns its index (n if none
   did). One call, with the GIL released, instead of n calls through Python
   inside the guest's pause. */
int baton_ioctl_batch(int fd, int n, const unsigned long *requests, void **args,
                      const int *expect, int *rets) {
    for (int i = 0; i < n; i++) {
        int r = ioctl(fd, requests[i], args[i]);
        rets[i] = r < 0 ? -errno : r;
        if (r < 0 || (expect[i] >= 0 && r != expect[i])) return i;
    }
    return n;
}
/* The kvm_msr_entry array to set: the n entries except those equal to the
   entry at the same place in known (n_known entries: what KVM holds now)
   and those whose index is in drop. Returns how many were written to out. */
int baton_msrs_changed(const char *entries, const char *known, int n, int n_known,
                       const uint32_t *drop, int n_drop, void *out) {
    const struct kvm_msr_entry *e = (const void *)entries, *k = (const void *)known;
    struct kvm_msr_entry *o = out;
    int m = 0;
    for (int i = 0; i < n; i++) {
        int skip = i < n_known && e[i].index == k[i].index && e[i].data == k[i].data;
        for (int j = 0; !skip && j < n_drop; j++) skip = e[i].index == drop[j];
        if (!skip) o[m++] = e[i];
    }
    return m;
}
"""
)

ffibuilder.cdef(CDEF)
ffibuilder.set_source("vmm._kvm", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
