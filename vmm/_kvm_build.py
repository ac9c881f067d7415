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

# The binding's own structs, the same text in the cdef and in the C source
# (cffi needs both), written once.
STRUCTS = """
struct baton_vcpu_rec {
    int regs, sregs, sregs2, xcrs, lapic, events, debugregs, mp_state, tsc, xsave, xsave_len;
    int msrs, nmsrs;
};
struct baton_vcpus_want {
    int n, has_sregs2, has_xcrs, host_xsave, nmsrs;
    const char *msrs;
};
struct baton_save_vcpu {
    int fd, captured, sregs2_ok;
    const char *sync_regs, *sync_sregs;
    char *regs, *sregs;
    int n;
    const unsigned long *requests;
    void **args;
    const int *expect;
    int *rets;
    uint32_t state;
    int failed, ret;
    long long read_at_ns, read_ns;  /* when its read began (CLOCK_MONOTONIC), how long */
};
struct baton_park_ctl {
    int fd;
    uint32_t *pause, *task, *bell, *st, *entered, *captured;
    long long *stopped_ns, *spin_req, *entered_ns;
    int *ret;
    uint64_t *valid_regs;
    const uint64_t *rflags;
    struct baton_save_vcpu *save_slot;
    uint32_t *save_go;
    long long go_spin_ns;
};
"""

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

"""
CDEF += STRUCTS
CDEF += """
int baton_ioctl_ptr(int fd, unsigned long request, void *arg);
int baton_ioctl_val(int fd, unsigned long request, unsigned long arg);
void *baton_map_shared(int fd, size_t length, long offset, int *err);
int baton_unmap(void *addr, size_t length);
int baton_madvise(void *addr, size_t length, int advice);
int baton_wait_readable(int fd, long long spin_ns, int timeout_ms);
int baton_spin_until(uint32_t *word, uint32_t want, long long spin_ns);
void baton_ring(uint32_t *bell);
int baton_kick_wait(const unsigned long *threads, int n, int sig, uint32_t *word,
                    long long timeout_ns);
int baton_park_wait(int fd, uint32_t *bell, uint32_t seq, uint32_t *st,
                    long long *spin_req, uint32_t *entered, long long *entered_ns, int *ret,
                    struct baton_park_ctl *ctl);
int baton_ioctl_batch(int fd, int n, const unsigned long *requests, void **args,
                      const int *expect, int *rets, unsigned long long mask);
#define BATON_STEP_SREGS ...
#define BATON_STEP_REGS ...
#define BATON_STEP_XSAVE ...
#define BATON_STEP_XCRS ...
#define BATON_STEP_MSRS ...
#define BATON_STEP_EVENTS ...
#define BATON_STEP_MP_STATE ...
#define BATON_STEP_LAPIC ...
#define BATON_STEP_DEADLINE ...
#define BATON_STEP_DEBUGREGS ...
#define BATON_STEP_TSC ...
int baton_vcpu_restore(int fd, const char *raw, const char *known,
                       const struct baton_vcpu_rec *r, int synced, int set_tsc,
                       char *xsave_buf, int host_xsave, char *msr_buf, int *ret);
int baton_vcpus_scan(const char *blob, long len, const struct baton_vcpus_want *w, long *out);
#define BATON_SAVE_FREE ...
#define BATON_SAVE_BUSY ...
#define BATON_SAVE_READ ...
#define BATON_SAVE_SREGS2 ...
#define BATON_SAVE_FAILED ...
int baton_save_vcpus(struct baton_save_vcpu *v, int n);
int baton_save_wait(struct baton_save_vcpu *v, int n, long long spin_ns, long long timeout_ns);
int baton_park_wait_save(int fd, uint32_t *bell, uint32_t seq, uint32_t *st,
                         long long *spin_req, uint32_t *entered, long long *entered_ns,
                         int *ret, struct baton_save_vcpu *slot, uint32_t *go,
                         long long go_spin_ns, struct baton_park_ctl *ctl);
#define BATON_RUN_RESUMED ...
#define BATON_RUN_PARKED ...
int baton_run_parking(struct baton_park_ctl *c);
#define BATON_SHM_HEAD ...
#define BATON_SHM_SLOTS ...
uint32_t baton_shm_publish(void *head, uint32_t k, uint32_t len);
uint32_t baton_shm_put(void *head, uint32_t k, long offset, char **src, const long *lens, int n);
int baton_shm_wait(void *head, uint32_t k, int fd, long long spin_ns, int timeout_ms,
                   long long poll_ns, uint32_t *len);
"""

SOURCE = (
    """
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

#define SIZEOF_KVM_RUN sizeof(struct kvm_run)
#include <string.h>
#include <stdint.h>
"""
    + "\n".join(f"#define {k} offsetof(struct kvm_run, {v})" for k, v in RUN_FIELDS.items())
    + STRUCTS
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

/* Waiting awake inside a guest's pause (vmm/awake.py says why). cffi releases
   the GIL around each call, so a spinning thread holds no Python lock; every
   spin is bounded, and the rest of a wait is spent asleep. sched_yield lets
   anything else runnable on this CPU go first. */
static long long baton_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Is fd readable (or hung up) within timeout_ms? The first spin_ns awake on
   poll(0), the rest asleep in poll. 1: readable, 0: timed out, <0: -errno. */
int baton_wait_readable(int fd, long long spin_ns, int timeout_ms) {
    struct pollfd p = {fd, POLLIN, 0};
    long long start = baton_now_ns(), end = start + spin_ns;
    int r;
    while (spin_ns > 0) {
        r = poll(&p, 1, 0);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) return -errno;
        if (baton_now_ns() >= end) break;
        sched_yield();
    }
    for (;;) {
        long long left = (long long)timeout_ms - (baton_now_ns() - start) / 1000000;
        r = poll(&p, 1, left > 0 ? (int)left : 0);
        if (r >= 0) return r > 0;
        if (errno != EINTR) return -errno;
    }
}

/* Wait awake, at most spin_ns, until *word == want (another thread's plain
   store). 1 if it came, 0 if the bound passed first. */
int baton_spin_until(uint32_t *word, uint32_t want, long long spin_ns) {
    long long end = baton_now_ns() + spin_ns;
    for (;;) {
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == want) return 1;
        if (baton_now_ns() >= end) return 0;
        sched_yield();
    }
}

/* A live handoff's pause from its caller's thread (Machine.handoff_out): kick
   every vCPU thread (pthread_kill, as Vcpu._kick), then sleep until *word is
   not 0 (baton_ring: the task on vCPU 0's thread is done), at most timeout_ns.
   One call with the GIL released, so the vCPU threads that return from KVM_RUN
   find the GIL free instead of sleeping on it while this thread finishes the
   kicks and goes to wait (each such wake-up 50-150 us here). 1, or 0 if the
   bound passed first. */
int baton_kick_wait(const unsigned long *threads, int n, int sig, uint32_t *word,
                    long long timeout_ns) {
    for (int i = 0; i < n; i++)
        if (threads[i]) pthread_kill((pthread_t)threads[i], sig);  /* 0: not started */
    long long deadline = baton_now_ns() + timeout_ns;
    for (;;) {
        uint32_t w = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if (w) return 1;
        long long left = deadline - baton_now_ns();
        if (left <= 0) return 0;
        struct timespec ts = {left / 1000000000LL, left % 1000000000LL};
        syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, w, &ts, NULL, 0);
    }
}

/* A parked vCPU thread's doorbell: whoever changes what it waits for rings. */
void baton_ring(uint32_t *bell) {
    __atomic_fetch_add(bell, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, bell, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* A parked vCPU thread's wait, all of it without the GIL (vmm/vcpu.py, Vcpu._park_wait).
   *st is PARKING (0, reset as the thread parks), PARKED (1) or GO (2, set by
   Vcpu.resume). It says it is parked (PARKING -> PARKED, never over a GO: a
   resume that came first wins; nobody who sees PARKED has to wait for this
   thread's Python to let go of the GIL), then sleeps until the bell moves from
   seq. When the bell brings a spin request (*spin_req ns, Vcpu.expect_resume) it
   waits awake that long for GO. Whenever it finds GO it enters KVM_RUN on fd at
   once, stamping *entered_ns and *entered first, and returns 1 with the ioctl's
   result in *ret: a resumed vCPU runs the guest without first taking the GIL
   from the thread that resumed it. Returns 0 when the bell moved for anything
   else (a task, a stop): Python looks then. */
struct baton_save_vcpu;
static void park_save(struct baton_save_vcpu *slot, uint32_t *go, uint32_t *st, long long spin_ns);

/* A vCPU other than vCPU 0 parks in C when its KVM_RUN returns for a pause
   (Vcpu._loop; vCPU 0's thread runs the handoff's Python, so it keeps the
   Python way): -EINTR while *pause says a pause was asked, no task posted,
   and the sync copy stored by this very run (its RFLAGS not the poison that
   prepare_pause wrote). It parks then as the Python park path would (the
   stop's stamp, the copy taken, the handoff's save slot if one was posted),
   without the GIL, so the thread that waits for it to park (vCPU 0's,
   running the handoff) never waits for this one's Python, nor for the GIL to
   come back from it. Where a run entered from the parked wait ends so, the
   wait parks again in place (park_wait); a run from Python goes through
   baton_run_parking. */
#define BATON_RUN_RESUMED 1
#define BATON_RUN_PARKED 2
#define RFLAGS_FIXED 2

/* Whether a run that returned r ended for a pause this thread may take in C;
   if so, the park's bookkeeping done and *seq the bell to wait on. */
static int repark(struct baton_park_ctl *c, int r, uint32_t *seq) {
    if (r != -EINTR) return 0;
    /* The bell first: whatever rings after this is seen by the wait. */
    *seq = __atomic_load_n(c->bell, __ATOMIC_ACQUIRE);
    if (!__atomic_load_n(c->pause, __ATOMIC_ACQUIRE) || __atomic_load_n(c->task, __ATOMIC_ACQUIRE))
        return 0;
    if (!(*(volatile const uint64_t *)c->rflags & RFLAGS_FIXED)) return 0;
    if (!*c->stopped_ns) *c->stopped_ns = baton_now_ns();
    *c->valid_regs = 0;
    __atomic_store_n(c->captured, 1, __ATOMIC_RELEASE);
    __atomic_store_n(c->st, 0, __ATOMIC_RELEASE); /* parking; a racing resume's GO: see Vcpu */
    return 1;
}

static int park_wait(int fd, uint32_t *bell, uint32_t seq, uint32_t *st,
                     long long *spin_req, uint32_t *entered, long long *entered_ns, int *ret,
                     struct baton_save_vcpu *slot, uint32_t *go, long long go_spin_ns,
                     struct baton_park_ctl *ctl) {
again:;
    uint32_t parking = 0;
    __atomic_compare_exchange_n(st, &parking, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    if (slot) park_save(slot, go, st, go_spin_ns);
    for (;;) {
        long long spin_ns = __atomic_exchange_n(spin_req, 0, __ATOMIC_ACQ_REL);
        long long end = baton_now_ns() + spin_ns;
        int moved = 0;
        for (;;) {
            if (__atomic_load_n(st, __ATOMIC_ACQUIRE) == 2) {
                *entered_ns = baton_now_ns();
                __atomic_store_n(entered, 1, __ATOMIC_RELEASE);
                int r = ioctl(fd, KVM_RUN, 0);
                r = r < 0 ? -errno : r;
                if (ctl && repark(ctl, r, &seq)) {  /* paused again: park again, right here */
                    slot = __atomic_exchange_n(&ctl->save_slot, NULL, __ATOMIC_ACQ_REL);
                    go = ctl->save_go;
                    go_spin_ns = ctl->go_spin_ns;
                    goto again;
                }
                *ret = r;
                return 1;
            }
            if (moved) return 0;
            uint32_t now = __atomic_load_n(bell, __ATOMIC_ACQUIRE);
            if (now != seq) {
                seq = now;
                if (__atomic_load_n(spin_req, __ATOMIC_ACQUIRE)) break;  /* spin anew */
                moved = 1;  /* one more look at go, then back to Python */
                continue;
            }
            if (spin_ns > 0 && baton_now_ns() < end) {
                sched_yield();
                continue;
            }
            spin_ns = 0;
            syscall(SYS_futex, bell, FUTEX_WAIT_PRIVATE, seq, NULL, NULL, 0);
        }
    }
}
int baton_park_wait(int fd, uint32_t *bell, uint32_t seq, uint32_t *st,
                    long long *spin_req, uint32_t *entered, long long *entered_ns, int *ret,
                    struct baton_park_ctl *ctl) {
    return park_wait(fd, bell, seq, st, spin_req, entered, entered_ns, ret, NULL, NULL, 0, ctl);
}
/* n ioctls on one fd in order (those whose bit is set in mask: the first 64
   can be left out), each result (or -errno) in rets; stops at the
   first that fails, or returns other than expect[i] when that is >= 0 (the
   MSR ioctls return how many they did), and returns its index (n if none
   did). One call, with the GIL released, instead of n calls through Python
   inside the guest's pause. */
int baton_ioctl_batch(int fd, int n, const unsigned long *requests, void **args,
                      const int *expect, int *rets, unsigned long long mask) {
    for (int i = 0; i < n; i++) {
        rets[i] = 0;
        if (i < 64 && !(mask >> i & 1)) continue;
        int r = ioctl(fd, requests[i], args[i]);
        rets[i] = r < 0 ? -errno : r;
        if (r < 0 || (expect[i] >= 0 && r != expect[i])) return i;
    }
    return n;
}
/* One vCPU's restore from a version-2 record (vmm/vcpu_record.py), after its
   CPUID and the VM-wide state, in the order that works (vmm/vcpu_state.py):
   sregs, regs (unless ``synced``: one sync-regs KVM_RUN already set them and
   the events), XSAVE, XCRs, the MSRs but the TSC deadline, events, mp state,
   LAPIC, the TSC deadline (only in TSC-deadline mode: KVM ignores it in any
   other, and SET_LAPIC reset the timer), debug registers, the TSC offset
   (``set_tsc``; it overrides the TSC MSR's write, which is left out). Parts
   equal to ``known`` (what KVM holds now, a record of the same layout; NULL
   if not known) are skipped. Offsets and sizes were checked by the caller.
   Returns 0, or the step that failed with *ret its -errno (or, for the
   MSRs, how many KVM set before it stopped: msr_buf then holds them). */
enum {
    BATON_STEP_SREGS = 1, BATON_STEP_REGS, BATON_STEP_XSAVE, BATON_STEP_XCRS, BATON_STEP_MSRS,
    BATON_STEP_EVENTS, BATON_STEP_MP_STATE, BATON_STEP_LAPIC, BATON_STEP_DEADLINE,
    BATON_STEP_DEBUGREGS, BATON_STEP_TSC
};
#define MSR_TSC 0x10
#define MSR_TSC_DEADLINE 0x6e0
#define APIC_LVTT 0x320
#define SAME(off, len) (known && memcmp(raw + (off), known + (off), (len)) == 0)
#define STEP(step, request, arg) do { \
        int x_ = ioctl(fd, (request), (arg)); \
        if (x_ < 0) { *ret = -errno; return (step); } \
    } while (0)

static int set_msrs(int fd, struct kvm_msrs *m, int n, int step, int *ret) {
    m->nmsrs = n;
    m->pad = 0;
    int x = ioctl(fd, KVM_SET_MSRS, m);
    if (x < 0) { *ret = -errno; return step; }
    if (x != n) { *ret = x; return step; }
    return 0;
}

int baton_vcpu_restore(int fd, const char *raw, const char *known,
                       const struct baton_vcpu_rec *r, int synced, int set_tsc,
                       char *xsave_buf, int host_xsave, char *msr_buf, int *ret) {
    *ret = 0;
    if (r->xsave_len > host_xsave) { *ret = -EINVAL; return BATON_STEP_XSAVE; }
    if (!synced) {
        STEP(BATON_STEP_SREGS, r->sregs2 ? KVM_SET_SREGS2 : KVM_SET_SREGS, raw + r->sregs);
        STEP(BATON_STEP_REGS, KVM_SET_REGS, raw + r->regs);
    }
    if (!SAME(r->xsave, r->xsave_len)) {
        memset(xsave_buf, 0, host_xsave);
        memcpy(xsave_buf, raw + r->xsave, r->xsave_len);
        STEP(BATON_STEP_XSAVE, KVM_SET_XSAVE, xsave_buf);
    }
    if (r->xcrs >= 0 && !SAME(r->xcrs, sizeof(struct kvm_xcrs)))
        STEP(BATON_STEP_XCRS, KVM_SET_XCRS, raw + r->xcrs);
    struct kvm_msrs *m = (struct kvm_msrs *)msr_buf;
    const struct kvm_msr_entry *e = (const void *)(raw + r->msrs + 8);
    const struct kvm_msr_entry *k = known ? (const void *)(known + r->msrs + 8) : NULL;
    int n = 0, deadline = -1;
    for (int i = 0; i < r->nmsrs; i++) {
        uint32_t index = e[i].index;
        if (index == MSR_TSC_DEADLINE) { deadline = i; continue; }
        if (set_tsc && index == MSR_TSC) continue;
        if (k && k[i].index == index && k[i].data == e[i].data) continue;
        m->entries[n++] = e[i];
    }
    int step;
    if (n && (step = set_msrs(fd, m, n, BATON_STEP_MSRS, ret))) return step;
    if (!synced && !SAME(r->events, sizeof(struct kvm_vcpu_events))) {
        struct kvm_vcpu_events ev;
        memcpy(&ev, raw + r->events, sizeof ev);
        ev.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        STEP(BATON_STEP_EVENTS, KVM_SET_VCPU_EVENTS, &ev);
    }
    if (!SAME(r->mp_state, sizeof(struct kvm_mp_state)))
        STEP(BATON_STEP_MP_STATE, KVM_SET_MP_STATE, raw + r->mp_state);
    STEP(BATON_STEP_LAPIC, KVM_SET_LAPIC, raw + r->lapic);
    uint32_t lvtt;
    memcpy(&lvtt, raw + r->lapic + APIC_LVTT, 4);
    if (deadline >= 0 && ((lvtt >> 17) & 3) == 2) {
        m->entries[0] = e[deadline];
        if ((step = set_msrs(fd, m, 1, BATON_STEP_DEADLINE, ret))) return step;
    }
    if (!SAME(r->debugregs, sizeof(struct kvm_debugregs)))
        STEP(BATON_STEP_DEBUGREGS, KVM_SET_DEBUGREGS, raw + r->debugregs);
    if (set_tsc) {
        struct kvm_device_attr a = {0};
        a.group = KVM_VCPU_TSC_CTRL;
        a.attr = KVM_VCPU_TSC_OFFSET;
        a.addr = (uint64_t)(uintptr_t)(raw + r->tsc);
        STEP(BATON_STEP_TSC, KVM_SET_DEVICE_ATTR, &a);
    }
    return 0;
}

/* The fast path of a state frame's vCPU section (vmm/state.py, decode_vcpus)
   and of each record's check (vmm/vcpu_state.py, check) for one VM, in one
   call. 1 if the section is exactly w->n records that vcpu_record.parse and
   vcpu_state.check would both accept, each carrying exactly this VM's probed
   MSR list (w->msrs, a kvm_msr_entry array: the indices compared; its caller
   takes this path only while no vCPU has run, so CPUID may still change);
   out[6i..6i+5] then holds record i's
   offset in blob, its size, flags, cpuid_len, xsave_len and nmsrs. 0 when
   anything differs: the Python path then decides, and says why. Every length
   is checked before anything it bounds is read. */
#define VREC_FLAGS 7
int baton_vcpus_scan(const char *blob, long len, const struct baton_vcpus_want *w, long *out) {
    uint32_t hdr[3];  /* "BATNVCPU" | u32 n | u32 0 | u32 0 | u32 size[n] */
    if (len < 20 || memcmp(blob, "BATNVCPU", 8)) return 0;
    memcpy(hdr, blob + 8, 12);
    if (hdr[0] != (uint32_t)w->n || hdr[1] || hdr[2] || w->n <= 0) return 0;
    long at = 20 + 4L * w->n;
    if (len < at) return 0;
    long total = at;
    for (int i = 0; i < w->n; i++) {
        uint32_t size;
        memcpy(&size, blob + 20 + 4 * i, 4);
        total += size;
    }
    if (total != len) return 0;
    for (int i = 0; i < w->n; i++) {
        uint32_t size, h[4], m[2];
        memcpy(&size, blob + 20 + 4 * i, 4);
        const char *rec = blob + at;
        if (size < 16) return 0;
        memcpy(h, rec, 16);
        uint32_t flags = h[0], cpuid_len = h[1], xsave_len = h[2];
        if ((flags & ~VREC_FLAGS) || h[3]) return 0;
        if (cpuid_len % sizeof(struct kvm_cpuid_entry2) || cpuid_len == 0
            || cpuid_len > 1024 * sizeof(struct kvm_cpuid_entry2)) return 0;
        if (xsave_len < 4096 || xsave_len > 65536 || (int)xsave_len > w->host_xsave) return 0;
        if ((flags & 1) && !w->has_sregs2) return 0;
        if ((flags & 2) && !w->has_xcrs) return 0;
        long msrs = 16 + (long)cpuid_len + sizeof(struct kvm_regs)
            + ((flags & 1) ? sizeof(struct kvm_sregs2) : sizeof(struct kvm_sregs))
            + ((flags & 2) ? sizeof(struct kvm_xcrs) : 0)
            + sizeof(struct kvm_lapic_state) + sizeof(struct kvm_vcpu_events)
            + sizeof(struct kvm_debugregs) + 8 + ((flags & 4) ? 8 : 0) + xsave_len;
        if ((long)size < msrs + 8) return 0;
        memcpy(m, rec + msrs, 8);
        if (m[1] || m[0] != (uint32_t)w->nmsrs) return 0;
        if ((long)size != msrs + 8 + 16L * w->nmsrs) return 0;
        const char *e = rec + msrs + 8;
        for (int k = 0; k < w->nmsrs; k++)
            if (memcmp(e + 16 * k, w->msrs + 16 * k, 4)) return 0;
        long *o = out + 6 * i;
        o[0] = at; o[1] = size; o[2] = flags; o[3] = cpuid_len; o[4] = xsave_len; o[5] = m[0];
        at += size;
    }
    return 1;
}
/* A live handoff's vCPU records, read without the GIL (vmm/machine.py,
   Machine.handoff_out): each other vCPU's by its own parked thread as soon as
   every vCPU is parked (``go`` 1, a plain store; park_save below), while vCPU 0's thread reads
   the VM-wide state and encodes the head; then by vCPU 0's thread whatever is
   left, its own first. Each vCPU is claimed once (FREE -> BUSY)
   and read into its record buffer as Vcpu.save_record reads it: regs and
   sregs from the park's sync copy (``captured``) or by GETs, then the batch of
   the other GETs (``requests`` ..., as kvm.Batch). Classic sregs that are not
   complete (PAE paging outside long mode) with sregs2 at hand: SREGS2, for
   Python to read. A GET that fails: FAILED, with ``failed`` the op (-1 GET_SREGS,
   -2 GET_REGS, else the batch's index) and ``ret`` its result. */
#define BATON_SAVE_FREE 0
#define BATON_SAVE_BUSY 1
#define BATON_SAVE_READ 2
#define BATON_SAVE_SREGS2 3
#define BATON_SAVE_FAILED 4
#define EFER_LMA (1ULL << 10)
#define CR0_PG (1ULL << 31)
#define CR4_PAE (1ULL << 5)

static void save_done(struct baton_save_vcpu *v, uint32_t state, int failed, int ret) {
    v->read_ns = baton_now_ns() - v->read_at_ns;
    v->failed = failed;
    v->ret = ret;
    __atomic_store_n(&v->state, state, __ATOMIC_RELEASE);
}

static void save_one(struct baton_save_vcpu *v) {
    v->read_at_ns = baton_now_ns();
    if (v->captured) {
        memcpy(v->sregs, v->sync_sregs, sizeof(struct kvm_sregs));
    } else if (ioctl(v->fd, KVM_GET_SREGS, v->sregs) < 0) {
        save_done(v, BATON_SAVE_FAILED, -1, -errno);
        return;
    }
    const struct kvm_sregs *sr = (const void *)v->sregs;
    if (v->sregs2_ok && !(sr->efer & EFER_LMA) && (sr->cr4 & CR4_PAE) && (sr->cr0 & CR0_PG)) {
        save_done(v, BATON_SAVE_SREGS2, 0, 0);
        return;
    }
    if (v->captured) {
        memcpy(v->regs, v->sync_regs, sizeof(struct kvm_regs));
    } else if (ioctl(v->fd, KVM_GET_REGS, v->regs) < 0) {
        save_done(v, BATON_SAVE_FAILED, -2, -errno);
        return;
    }
    int done = baton_ioctl_batch(v->fd, v->n, v->requests, v->args, v->expect, v->rets, ~0ULL);
    if (done != v->n) save_done(v, BATON_SAVE_FAILED, done, v->rets[done]);
    else save_done(v, BATON_SAVE_READ, 0, 0);
}

/* Claim and read every vCPU still free, in order; how many. */
int baton_save_vcpus(struct baton_save_vcpu *v, int n) {
    int did = 0;
    for (int k = 0; k < n; k++) {
        struct baton_save_vcpu *one = &v[k];
        uint32_t free_ = BATON_SAVE_FREE;
        if (__atomic_compare_exchange_n(&one->state, &free_, BATON_SAVE_BUSY, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            save_one(one);
            did++;
        }
    }
    return did;
}

/* Until no vCPU is free or being read: the first spin_ns awake, then in 20 us
   naps, at most timeout_ns. 1 if every record was read, 2 if one was not
   (SREGS2, FAILED: Python looks), 0 if the bound passed first. */
int baton_save_wait(struct baton_save_vcpu *v, int n, long long spin_ns, long long timeout_ns) {
    long long start = baton_now_ns();
    int all_read = 1;
    for (int i = 0; i < n; i++) {
        uint32_t s;
        while ((s = __atomic_load_n(&v[i].state, __ATOMIC_ACQUIRE)) <= BATON_SAVE_BUSY) {
            long long now = baton_now_ns();
            if (now - start >= timeout_ns) return 0;
            if (now - start < spin_ns) {
                sched_yield();
            } else {
                struct timespec nap = {0, 20000};
                nanosleep(&nap, NULL);
            }
        }
        if (s != BATON_SAVE_READ) all_read = 0;
    }
    return all_read ? 1 : 2;
}

/* A parked vCPU thread's part of a live handoff's save (baton_park_wait_save):
   once vCPU 0's thread posts ``go`` 1 (every vCPU parked; 2: nothing to read
   here), it reads its own record, if vCPU 0's thread has not claimed it first.
   It waits for ``go`` awake, at most spin_ns, and no longer once resumed. */
static void park_save(struct baton_save_vcpu *slot, uint32_t *go, uint32_t *st, long long spin_ns) {
    long long end = baton_now_ns() + spin_ns;
    uint32_t g;
    while (!(g = __atomic_load_n(go, __ATOMIC_ACQUIRE))) {
        if (__atomic_load_n(st, __ATOMIC_ACQUIRE) == 2 || baton_now_ns() >= end) return;
        sched_yield();
    }
    if (g == 1) baton_save_vcpus(slot, 1);
}

/* baton_park_wait, but once parked the thread first reads its own record for
   a handoff (park_save, GIL still released): on its own thread and CPU, while
   vCPU 0's thread reads the VM-wide state and the devices. */
int baton_park_wait_save(int fd, uint32_t *bell, uint32_t seq, uint32_t *st,
                         long long *spin_req, uint32_t *entered, long long *entered_ns,
                         int *ret, struct baton_save_vcpu *slot, uint32_t *go,
                         long long go_spin_ns, struct baton_park_ctl *ctl) {
    return park_wait(fd, bell, seq, st, spin_req, entered, entered_ns, ret, slot, go, go_spin_ns,
                     ctl);
}

/* KVM_RUN from Python for a vCPU that parks in C (see repark). Returns
   KVM_RUN's result when it did not park (Python goes on as before, capture
   and all); BATON_RUN_RESUMED when it parked and a resume let the wait enter
   KVM_RUN (that run's result in *c->ret); BATON_RUN_PARKED when it parked and
   the bell moved for anything else (a task, a stop: Python parks and looks). */
int baton_run_parking(struct baton_park_ctl *c) {
    int r = ioctl(c->fd, KVM_RUN, 0);
    r = r < 0 ? -errno : r;
    uint32_t seq;
    if (!repark(c, r, &seq)) return r;
    struct baton_save_vcpu *slot = __atomic_exchange_n(&c->save_slot, NULL, __ATOMIC_ACQ_REL);
    int entered = park_wait(c->fd, c->bell, seq, c->st, c->spin_req, c->entered, c->entered_ns,
                            c->ret, slot, c->save_go, c->go_spin_ns, c);
    return entered ? BATON_RUN_RESUMED : BATON_RUN_PARKED;
}

/* The handoff's state through shared memory (vmm/state_shm.py says why). The
   new worker's sealed memfd opens with one cache line, this header; the
   published bytes follow it. Publication k (1-based) is slot[k - 1]: k in its
   high half, the length in the low half, one store after the bytes (release),
   so one load says both. sleeping: the receiver is (about to be) asleep in
   poll and wants a doorbell datagram on the channel for what comes next. */
#define BATON_SHM_SLOTS 4
struct baton_shm_head {
    uint64_t slot[BATON_SHM_SLOTS];
    uint32_t sleeping;
    uint32_t reserved[7];
};
#define BATON_SHM_HEAD sizeof(struct baton_shm_head)

/* The sender: publish k (its bytes are in place), then (a full barrier: the
   receiver's side is the mirror image) whether the receiver sleeps. */
uint32_t baton_shm_publish(void *head, uint32_t k, uint32_t len) {
    struct baton_shm_head *h = head;
    if (k < 1 || k > BATON_SHM_SLOTS) return 0;
    __atomic_store_n(&h->slot[k - 1], ((uint64_t)k << 32) | len, __ATOMIC_SEQ_CST);
    return __atomic_load_n(&h->sleeping, __ATOMIC_SEQ_CST);
}

/* The sender: the n pieces back to back at offset (past the header), then
   publication k of their total length (k 0: the copy alone, a rehearsal), in
   one call. The caller has checked that they fit. Returns baton_shm_publish's
   answer. (Streaming stores, to spare the lines' reads for ownership, were
   tried: no gain seen in one A/B on a loaded host.) */
uint32_t baton_shm_put(void *head, uint32_t k, long offset, char **src, const long *lens, int n) {
    char *dst = (char *)head + BATON_SHM_HEAD + offset;
    long total = 0;
    for (int i = 0; i < n; i++) {
        memcpy(dst + total, src[i], (size_t)lens[i]);
        total += lens[i];
    }
    return baton_shm_publish(head, k, (uint32_t)total);
}

static int shm_published(struct baton_shm_head *h, uint32_t k, uint32_t *len) {
    uint64_t s = __atomic_load_n(&h->slot[k - 1], __ATOMIC_SEQ_CST);
    if ((uint32_t)(s >> 32) != k) return 0;
    *len = (uint32_t)s;
    return 1;
}

/* The receiver: wait for publication k OR fd readable (a datagram: the state
   from a sender that does not use the memory, a doorbell, or the channel's
   close), at most timeout_ms: the first spin_ns awake on the word (poll(0) on fd
   every poll_ns), the rest asleep in poll after asking for a doorbell. 1: k is
   published, its length in *len; 2: fd readable; 0: timed out; <0: -errno. */
int baton_shm_wait(void *head, uint32_t k, int fd, long long spin_ns, int timeout_ms,
                   long long poll_ns, uint32_t *len) {
    struct baton_shm_head *h = head;
    struct pollfd p = {fd, POLLIN, 0};
    long long start = baton_now_ns(), end = start + spin_ns, next_poll = start;
    int r;
    if (k < 1 || k > BATON_SHM_SLOTS) return -EINVAL;
    for (;;) {
        if (shm_published(h, k, len)) return 1;
        long long t = baton_now_ns();
        if (t >= next_poll) {
            r = poll(&p, 1, 0);
            if (r > 0) return shm_published(h, k, len) ? 1 : 2;
            if (r < 0 && errno != EINTR) return -errno;
            next_poll = t + poll_ns;
        }
        if (t >= end) break;
        sched_yield();
    }
    for (;;) {  /* a timeout of 0 (a caller's spin) never sleeps: no doorbell wanted */
        if (timeout_ms > 0) __atomic_store_n(&h->sleeping, 1, __ATOMIC_SEQ_CST);
        if (shm_published(h, k, len)) r = 1;
        else {
            long long left = (long long)timeout_ms - (baton_now_ns() - start) / 1000000;
            r = poll(&p, 1, left > 0 ? (int)left : 0);
            if (r < 0 && errno == EINTR) continue;
            r = r < 0 ? -errno : shm_published(h, k, len) ? 1 : r > 0 ? 2 : 0;
        }
        if (timeout_ms > 0) __atomic_store_n(&h->sleeping, 0, __ATOMIC_SEQ_CST);
        return r;
    }
}

"""
)

ffibuilder.cdef(CDEF)
ffibuilder.set_source("vmm._kvm", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
