"""One vCPU: its KVM fd, its thread, the pause protocol and its register state
(the ``vcpu`` state component built from these registers is ``vmm.vcpu_state``).

Pausing: set ``kvm_run.immediate_exit`` and kick the thread with a signal
that has a (no-op) Python handler, so KVM_RUN returns -EINTR at once. After
an I/O or MMIO exit KVM completes the instruction only on the next KVM_RUN,
so a paused vCPU first re-enters once with ``immediate_exit`` set: the saved
RIP is then past the OUT, and no console byte is ever written twice.

I/O and MMIO exits are dispatched through the machine's buses (``vmm.bus``).

Sync regs (KVM_CAP_SYNC_REGS): a pause request sets ``kvm_valid_regs``, so
the KVM_RUN that the kick ends copies regs and sregs into ``kvm_run`` as it
returns (``store_regs`` at the end of KVM_RUN; when that was not the last
KVM_RUN, or an I/O is pending, that last ``immediate_exit`` run on parking
is made with it set instead), and a save
reads them there instead of paying two ioctls inside the guest's pause (each
vCPU ioctl loads and puts the vCPU, 10-30 us under nested KVM). Only the
vCPU itself changes those, so the copy is valid until it runs again or
anything is set on it. Not the vcpu events: an NMI or SMI from another vCPU
(still running when this one parked) or from a device lands in them, so a
save reads them once every vCPU is parked. The other
way, ``apply_synced`` fills ``kvm_run`` and sets ``kvm_dirty_regs``, and one
KVM_RUN with ``immediate_exit`` set applies all three and returns -EINTR
before the guest is entered (x86.c: ``sync_regs`` precedes the
``wants_to_run`` check), so a refusal still comes before the commit. Only on
the vCPU's own thread: KVM_RUN from another thread moves the vCPU's pid, and
moving it back costs a ``synchronize_rcu``.

Parked, a vCPU thread waits in C without the GIL (``baton_park_wait``, when
``vmm.awake`` is on): on a doorbell word that every change of what it waits
for rings. So a thread waiting for it to park (``wait_paused``) sees the
"parked" word without then waiting for this thread's Python to release the
GIL, and a resume lets it enter KVM_RUN straight from that wait, awake if
``expect_resume`` asked it to spin, without first taking the GIL from the
thread that resumed it (each of those hand-offs would be a sleeping thread's
wake-up, 200-1,100 us on this host). Every vCPU but vCPU 0 even parks from C:
when the KVM_RUN that a pause's kick ends returns, C takes the park itself
(``baton_run_parking``, or in place in the parked wait that entered the run)
whenever nothing needs Python (no I/O to complete, the sync copy stored, no
task), so its Python never runs between the kick and "parked".
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from vmm import awake, kvm
from vmm import vcpu_record as record
from vmm._kvm import ffi, lib
from vmm.bus import MmioBus, PioBus

KICK_SIGNAL = signal.SIGUSR1
XSAVE_MIN = 4096
EVENTS_VALID = lib.KVM_VCPUEVENT_VALID_NMI_PENDING | lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR
SYNC_ALL = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS | lib.KVM_SYNC_X86_EVENTS
SYNC_CAPTURED = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS
PARKING, PARKED, GO = 0, 1, 2  # a vCPU thread's state word (baton_park_wait)
SIZEOF_REGS = ffi.sizeof("struct kvm_regs")
SIZEOF_SREGS = ffi.sizeof("struct kvm_sregs")
SIZEOF_EVENTS = ffi.sizeof("struct kvm_vcpu_events")
EFER_LMA = 1 << 10
RFLAGS_FIXED = 1 << 1  # reads as 1 in every real RFLAGS
#: ``BATON_VMM_C_PARK=0``: every vCPU parks through Python, as before
#: ``baton_run_parking`` (the A/B switch).
C_PARK = os.environ.get("BATON_VMM_C_PARK", "1") != "0"
PARK_POLL_S = 0.0005  # ``wait_paused`` asleep: a park in C notifies no one
CR0_PG = 1 << 31
CR4_PAE = 1 << 5

_STEPS = {
    lib.BATON_STEP_SREGS: "KVM_SET_SREGS",
    lib.BATON_STEP_REGS: "KVM_SET_REGS",
    lib.BATON_STEP_XSAVE: "KVM_SET_XSAVE",
    lib.BATON_STEP_XCRS: "KVM_SET_XCRS",
    lib.BATON_STEP_MSRS: "KVM_SET_MSRS",
    lib.BATON_STEP_EVENTS: "KVM_SET_VCPU_EVENTS",
    lib.BATON_STEP_MP_STATE: "KVM_SET_MP_STATE",
    lib.BATON_STEP_LAPIC: "KVM_SET_LAPIC",
    lib.BATON_STEP_DEADLINE: "KVM_SET_MSRS (TSC deadline)",
    lib.BATON_STEP_DEBUGREGS: "KVM_SET_DEBUGREGS",
    lib.BATON_STEP_TSC: "setting the TSC offset",
}


def _sregs_complete(sr: Any) -> bool:
    """Whether these classic sregs carry everything (``Vcpu.captured_sregs_complete``)."""
    return not (not sr.efer & EFER_LMA and sr.cr4 & CR4_PAE and sr.cr0 & CR0_PG)


@functools.lru_cache(maxsize=64)
def _rec_offsets(lay: record.Layout, nmsrs: int) -> Any:
    """``baton_vcpu_restore``'s view of a layout (made once per layout)."""
    r = ffi.new("struct baton_vcpu_rec *")
    r.regs, r.sregs, r.sregs2, r.xcrs = lay.regs, lay.sregs, lay.flags & record.SREGS2, lay.xcrs
    r.lapic, r.events, r.debugregs, r.mp_state = lay.lapic, lay.events, lay.debugregs, lay.mp_state
    r.tsc, r.xsave, r.xsave_len, r.msrs, r.nmsrs = (
        lay.tsc,
        lay.xsave,
        lay.xsave_len,
        lay.msrs,
        nmsrs,
    )
    return r


def install_kick_handler() -> None:
    """Call in the main thread before any vCPU thread starts.

    SIG_IGN would drop the kick and the default action kills the process; a
    Python handler makes the signal interrupt KVM_RUN and do nothing else."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def probe_msrs(vcpu_fd: int, indices: list[int]) -> list[int]:
    """The MSRs this vCPU can read back (probed once, before any pause)."""
    readable = []
    for index in indices:
        _buf, msrs = kvm.msrs_struct(kvm.pack_msrs([(index, 0)]))
        if lib.baton_ioctl_ptr(vcpu_fd, lib.KVM_GET_MSRS, msrs) == 1:
            readable.append(index)
    return readable


class Vcpu:
    def __init__(
        self,
        system: kvm.System,
        vm_fd: int,
        index: int,
        cpuid: bytes,
        pio: PioBus,
        mmio: MmioBus,
        on_event: Callable[[Vcpu, str, str], None],
        msr_indices: list[int] | None = None,
    ) -> None:
        """``on_event(vcpu, kind, detail)``: this vCPU parked for good (kind
        ``reset``, ``shutdown`` or ``failed``), called on its own thread."""
        self.index = index
        self._pio = pio
        self._mmio = mmio
        self._on_event = on_event
        self.fd = kvm.ioctl_val(vm_fd, lib.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        err = ffi.new("int *")
        self._map_size = system.vcpu_mmap_size
        self.run_ptr = lib.baton_map_shared(self.fd, self._map_size, 0, err)
        if self.run_ptr == ffi.NULL:
            os.close(self.fd)
            raise OSError(err[0], "cannot map kvm_run")
        base = ffi.cast("uint8_t *", self.run_ptr)
        self._imm = base + lib.RUN_IMMEDIATE_EXIT
        self._reason = ffi.cast("uint32_t *", base + lib.RUN_EXIT_REASON)
        self._io_dir = base + lib.RUN_IO_DIRECTION
        self._io_size = base + lib.RUN_IO_SIZE
        self._io_port = ffi.cast("uint16_t *", base + lib.RUN_IO_PORT)
        self._io_count = ffi.cast("uint32_t *", base + lib.RUN_IO_COUNT)
        self._io_off = ffi.cast("uint64_t *", base + lib.RUN_IO_DATA_OFFSET)
        self._mmio_addr = ffi.cast("uint64_t *", base + lib.RUN_MMIO_PHYS_ADDR)
        self._mmio_data = base + lib.RUN_MMIO_DATA
        self._mmio_len = ffi.cast("uint32_t *", base + lib.RUN_MMIO_LEN)
        self._mmio_write = base + lib.RUN_MMIO_IS_WRITE
        self._event_type = ffi.cast("uint32_t *", base + lib.RUN_SYSTEM_EVENT_TYPE)
        self._base = base
        self.has_sync_regs = system.check(lib.KVM_CAP_SYNC_REGS) & SYNC_ALL == SYNC_ALL
        self._valid_regs = ffi.cast("uint64_t *", base + lib.RUN_VALID_REGS)
        self._dirty_regs = ffi.cast("uint64_t *", base + lib.RUN_DIRTY_REGS)
        self._sync_regs = base + lib.RUN_SYNC_REGS
        self._sync_sregs = base + lib.RUN_SYNC_SREGS
        self._sync_events = base + lib.RUN_SYNC_EVENTS
        self._sync_sregs_t = ffi.cast("struct kvm_sregs *", self._sync_sregs)
        self._sync_regs_t = ffi.cast("struct kvm_regs *", self._sync_regs)
        self._sync_events_t = ffi.cast("struct kvm_vcpu_events *", self._sync_events)
        self._cap_w = ffi.new("uint32_t[1]")  # ``_captured``, also set by a park in C
        self.has_sregs2 = system.check(lib.KVM_CAP_SREGS2) > 0
        self.has_xcrs = system.check(lib.KVM_CAP_XCRS) > 0
        xsave2 = system.check(lib.KVM_CAP_XSAVE2)
        self.xsave_size = max(XSAVE_MIN, xsave2 if xsave2 > 0 else 0)
        self._xsave_get = lib.KVM_GET_XSAVE2 if xsave2 > 0 else lib.KVM_GET_XSAVE
        self.cpuid = cpuid
        self.set_cpuid(cpuid)
        if msr_indices is None:
            msr_indices = probe_msrs(self.fd, system.msr_index_list())
        self.msr_indices = msr_indices
        self._msr_template = kvm.pack_msrs([(i, 0) for i in msr_indices])
        self.msr_stride = record.index_stride(self._msr_template)  # the check's one step
        self.has_tsc_offset = self._tsc_attr() == 0
        self._readers: dict[tuple[bool, bytes], tuple[Any, Any, record.Layout]] = {}
        self._xsave_buf = ffi.new("char[]", self.xsave_size)
        self._msr_buf_n = len(msr_indices)
        self._msr_buf = ffi.new("char[]", 8 + self._msr_buf_n * record.MSR_ENTRY)
        self._restore_ret = ffi.new("int *")
        for sregs2 in (False, True) if self.has_sregs2 else (False,):
            self._reader(sregs2)  # made now, not inside a pause

        self._cond = threading.Condition()
        self._pause = True  # created paused; resume() lets it run
        self._paused = False
        self._quit = False
        self._entered = threading.Event()
        # The parked wait's words (baton_park_wait), shared with C:
        self._bell = ffi.new("uint32_t[1]")  # rung by whoever changes what a parked thread awaits
        # PARKING (reset as it parks), PARKED (set from C, GIL released, only from
        # PARKING), GO (resume(): enter KVM_RUN). One word, so that a resume racing
        # the park can never leave a stale PARKED behind while the guest runs.
        self._st = ffi.new("uint32_t[1]")
        self._entered_flag = awake.Flag()  # it entered KVM_RUN after the last resume
        self._entered_ns = ffi.new("long long[1]")  # when
        self._spin_req = ffi.new("long long[1]")  # expect_resume(): ns to wait awake for go
        self._ran = ffi.new("int[1]")  # the KVM_RUN result when C entered it
        self._task: Callable[[], Callable[[], None] | None] | None = None
        self._save_post: tuple[Any, Any] | None = None  # post_save's slot and go word
        self._after_entry: Callable[[], None] | None = None
        self.thread: threading.Thread | None = None
        self._stopped_w = ffi.new("long long[1]")  # ``stopped_at_ns``, also set from C
        self.exits_total = 0
        # A vCPU but vCPU 0 parks in C as its KVM_RUN returns for a pause
        # (``baton_run_parking``): vCPU 0's thread runs the handoff's Python, so it
        # keeps the Python way. Its words: a pause was asked; a task is posted.
        self._pause_w = ffi.new("uint32_t[1]")
        self._task_w = ffi.new("uint32_t[1]")
        self._c_park = C_PARK and awake.ENABLED and self.has_sync_regs and index > 0
        self._ctl = self._park_ctl()

    def _park_ctl(self) -> Any:
        """``baton_run_parking``'s view of this vCPU's words (made once)."""
        c = ffi.new("struct baton_park_ctl *")
        c.fd, c.pause, c.task = self.fd, self._pause_w, self._task_w
        c.bell, c.st = self._bell, self._st
        c.entered, c.captured, c.stopped_ns = self._entered_flag.ptr, self._cap_w, self._stopped_w
        c.spin_req, c.entered_ns, c.ret = self._spin_req, self._entered_ns, self._ran
        c.valid_regs = self._valid_regs
        c.rflags = ffi.cast("uint64_t *", ffi.addressof(self._sync_regs_t, "rflags"))
        c.save_slot, c.save_go, c.go_spin_ns = ffi.NULL, ffi.NULL, awake.PARK_SPIN_NS
        return c

    @property
    def _captured(self) -> bool:
        """kvm_run's sync copy is this parked vCPU's state."""
        return bool(self._cap_w[0])

    @_captured.setter
    def _captured(self, value: bool) -> None:
        self._cap_w[0] = int(value)

    @property
    def stopped_at_ns(self) -> int:
        """When KVM_RUN returned after the last pause request (0: not yet)."""
        return int(self._stopped_w[0])

    @stopped_at_ns.setter
    def stopped_at_ns(self, value: int) -> None:
        self._stopped_w[0] = value

    @property
    def entered_at_ns(self) -> int:
        """When this vCPU last entered KVM_RUN after a park (0: never)."""
        return int(self._entered_ns[0])

    # -- lifecycle
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    @property
    def thread_ident(self) -> int:
        """Its thread's pthread id, to kick it from C (0: not started)."""
        return (self.thread.ident or 0) if self.thread is not None else 0

    def _kick(self) -> None:
        if self.thread is not None and self.thread.ident is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(self.thread.ident, KICK_SIGNAL)

    def request_pause(self) -> None:
        self.prepare_pause()
        self._kick()

    def prepare_pause(self) -> None:
        """``request_pause`` but the kick, which the caller sends (``baton_kick_wait``)."""
        with self._cond:
            if not self._pause and self.has_sync_regs:
                # The KVM_RUN that the kick ends leaves regs and sregs in kvm_run as it
                # returns (the park's ``_capture`` then need not enter KVM again): the
                # copy's RFLAGS is poisoned first (bit 1 is always set in a real one),
                # so the park can tell whether KVM stored it after this request.
                self._sync_regs_t.rflags = 0
                self._valid_regs[0] = SYNC_CAPTURED
            self._pause = True
            self.stopped_at_ns = 0
            self._imm[0] = 1
            self._pause_w[0] = 1

    def _notify(self) -> None:
        """Wake whoever waits on the condition, and this thread if parked (the bell)."""
        self._cond.notify_all()
        lib.baton_ring(self._bell)

    def wait_paused(self, deadline: float, spin_ns: int = 0) -> bool:
        """Has this vCPU parked by ``deadline``? The first ``spin_ns`` awake
        (``vmm.awake``: on the word its parked wait sets, GIL released), the
        rest asleep on the condition."""
        if spin_ns and awake.spin_until(self._st, PARKED, spin_ns):
            return True
        # A park in C (``baton_run_parking``) sets the word only, and notifies no one.
        step = PARK_POLL_S if self._c_park else None
        with self._cond:
            while not self._parked():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.thread is None or not self.thread.is_alive():
                    return self._parked()
                self._cond.wait(remaining if step is None else min(step, remaining))
                if not self._parked():
                    self._kick()  # a kick can land just before KVM_RUN: repeat it
            return True

    def _parked(self) -> bool:
        return self._paused or self._st[0] == PARKED

    def _void_copy(self) -> None:
        """The vCPU is about to run: kvm_run's sync copy is stale from now on, and
        stays poisoned (``prepare_pause``) until a pause asks KVM to store it."""
        self._captured = False
        self._valid_regs[0] = 0
        self._sync_regs_t.rflags = 0
        self._save_post = None
        self._ctl.save_slot = ffi.NULL

    def resume(self) -> None:
        with self._cond:
            self._void_copy()
            self._entered.clear()
            self._entered_flag.set(False)
            # No longer parked from here on: its parked wait may be in KVM_RUN
            # before its Python looks again (its park loop says so again if not).
            self._paused = False
            self._pause = False
            self._pause_w[0] = 0
            self._imm[0] = 0
            self._st[0] = GO  # last: its parked wait may enter KVM_RUN the moment it sees it
            self._notify()

    def expect_resume(self, spin_ns: int) -> None:
        """Have this parked vCPU's thread wait for ``resume`` awake from now on, at
        most ``spin_ns`` (then asleep again): its wake-up is paid while the caller
        still works (the handoff's load), not after the resume."""
        if awake.ENABLED:
            self._spin_req[0] = spin_ns
            lib.baton_ring(self._bell)

    def wait_entered(self, timeout: float) -> bool:
        """Has it entered KVM_RUN since the resume? (Entered from the parked wait in
        C, its Python catches up only at the next exit: the word says it first.)"""
        if self._entered_flag.spin(awake.RESUME_SPIN_NS):
            return True
        deadline = time.monotonic() + timeout
        while not self._entered_flag:  # the Event alone may come only at its next exit
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._entered.wait(min(0.002, left)):
                return True
        return True

    def post_task(self, fn: Callable[[], Callable[[], None] | None]) -> None:
        """Run ``fn`` on this vCPU's own thread as soon as it is parked.

        The live handoff runs there on both sides: the thread the pause or the
        state wakes anyway does the work, so no other thread has to be woken
        inside the guest's pause (on this machine a cross-CPU wake-up costs
        50-100 us). If ``fn`` returns a callable, the vCPU resumes straight
        away and calls it just before re-entering KVM_RUN (to report back
        without making another thread compete for the GIL first)."""
        with self._cond:
            self._task = fn
            self._task_w[0] = 1  # a park in C leaves it to Python
            self._notify()

    def _run_task(self) -> None:
        """Called with the condition held, while parked."""
        fn, self._task = self._task, None
        self._task_w[0] = 0
        assert fn is not None
        self._cond.release()
        try:
            after = fn()
        finally:
            self._cond.acquire()
        if after is not None and not self._quit:
            self._void_copy()
            self._entered.clear()
            self._entered_flag.set(False)
            self._st[0] = GO  # it runs on: never PARKED while in KVM_RUN
            self._pause = False
            self._pause_w[0] = 0
            self._imm[0] = 0
            self._after_entry = after

    @property
    def has_run(self) -> bool:
        return self.entered_at_ns > 0

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._quit = True
            self._pause_w[0] = 0  # never parks in C again
            self._imm[0] = 1
            self._notify()
        self._kick()
        if self.thread is not None:
            self.thread.join(timeout)

    def close(self) -> None:
        if self.run_ptr is not None:
            lib.baton_unmap(self.run_ptr, self._map_size)
            self.run_ptr = None
        with contextlib.suppress(OSError):
            os.close(self.fd)

    # -- the run loop
    def _loop(self) -> None:
        need_complete = False
        run_ioctl = lib.baton_ioctl_val
        fd = self.fd
        ctl = self._ctl
        parked_here = False  # the last run parked in C, and its wait came back to look
        while True:
            ran: int | None = None  # KVM_RUN's result, if the parked wait entered it
            with self._cond:
                if self._quit:
                    return
                if self._pause or parked_here:
                    if self._pause:
                        self._park_state(need_complete)
                        need_complete = False
                    while self._pause and not self._quit:
                        if not self._paused:  # resumed and paused again while it waited
                            self.stopped_at_ns = self.stopped_at_ns or time.monotonic_ns()
                            self._st[0] = PARKING  # that resume's GO is void
                            self._paused = True
                            self._cond.notify_all()
                        if self._task is not None:
                            self._run_task()
                        else:
                            ran = self._park_wait()
                            if ran is not None:
                                break
                    self._paused = False
                    if self._quit:
                        return
                    if ran is None:
                        self._st[0] = GO  # never PARKED in KVM_RUN (a park in C set it)
                        self._entered_ns[0] = time.monotonic_ns()
                        self._entered_flag.set(True)
                    self._entered.set()
                    if self._after_entry is not None:
                        self._after_entry()
                        self._after_entry = None
                parked_here = False
            if ran is not None:
                ret = ran
            elif self._c_park:
                ret = lib.baton_run_parking(ctl)
                if ret == lib.BATON_RUN_PARKED:
                    parked_here = True
                    continue
                if ret == lib.BATON_RUN_RESUMED:  # parked in C, resumed, and it ran
                    self._entered.set()
                    ret = int(self._ran[0])
            else:
                ret = run_ioctl(fd, lib.KVM_RUN, 0)
            if self._pause and not self.stopped_at_ns:
                self.stopped_at_ns = time.monotonic_ns()  # the guest stopped running here
            if ret < 0:
                if ret in (-errno.EINTR, -errno.EAGAIN):
                    need_complete = False
                    continue
                self._park("failed", f"KVM_RUN failed: {os.strerror(-ret)}")
                continue
            self.exits_total += 1
            need_complete = self._handle_exit(self._reason[0])

    def _park_state(self, need_complete: bool) -> None:
        """Parking (condition held): the stop's stamp, the sync copy (``_capture``
        where the last KVM_RUN did not leave it, or an I/O is pending), the word."""
        if not self.stopped_at_ns:  # it was outside KVM_RUN when asked
            self.stopped_at_ns = time.monotonic_ns()
        if self.has_sync_regs:
            if need_complete or not self._sync_regs_t.rflags & RFLAGS_FIXED:
                self._capture()  # completes a pending I/O too
            else:  # the last KVM_RUN, after the request, left the copy
                self._valid_regs[0] = 0
                self._captured = True
        elif need_complete:
            # immediate_exit is set: completes the I/O, returns -EINTR
            lib.baton_ioctl_val(self.fd, lib.KVM_RUN, 0)
        self._st[0] = PARKING
        self._paused = True
        self._cond.notify_all()

    def _park_wait(self) -> int | None:
        """Called with the condition held, parked: wait for the bell with the
        condition and the GIL released (``baton_park_wait``). Returns KVM_RUN's
        result if a resume let the wait enter it, else None (look again).
        With ``vmm.awake`` off, the condition's plain wait."""
        if not awake.ENABLED:
            self._cond.wait()
            return None
        seq = self._bell[0]
        save, self._save_post = self._save_post, None
        self._cond.release()
        try:
            args = (
                self.fd,
                self._bell,
                seq,
                self._st,
                self._spin_req,
                self._entered_flag.ptr,
                self._entered_ns,
                self._ran,
            )
            ctl = self._ctl if self._c_park else ffi.NULL  # a run from it may park again in C
            if save is None:
                entered = lib.baton_park_wait(*args, ctl)
            else:
                entered = lib.baton_park_wait_save(*args, *save, awake.PARK_SPIN_NS, ctl)
        finally:
            self._cond.acquire()
        return int(self._ran[0]) if entered else None

    def _park(self, kind: str, reason: str) -> None:
        """Park this vCPU for good and tell the machine why (reset, shutdown, failed)."""
        with self._cond:
            self._pause = True
            self._imm[0] = 1
        self._on_event(self, kind, reason)

    def _handle_exit(self, reason: int) -> bool:
        """Handle one exit; True if KVM must complete it on the next KVM_RUN."""
        if reason == lib.KVM_EXIT_IO:
            size = self._io_size[0]
            port = self._io_port[0]
            count = self._io_count[0]
            data = self._base + self._io_off[0]
            if self._io_dir[0] == lib.KVM_EXIT_IO_OUT:
                raw = ffi.buffer(data, size * count)[:]
                write = self._pio.write
                for i in range(count):
                    chunk = raw[i * size : (i + 1) * size]
                    write(port, size, int.from_bytes(chunk, "little"))
            else:
                read = self._pio.read
                out = b"".join(read(port, size).to_bytes(size, "little") for _ in range(count))
                ffi.memmove(data, out, len(out))
            return True
        if reason == lib.KVM_EXIT_MMIO:
            length = self._mmio_len[0]
            addr = self._mmio_addr[0]
            if self._mmio_write[0]:
                self._mmio.write(addr, ffi.buffer(self._mmio_data, length)[:])
            else:
                ffi.memmove(self._mmio_data, self._mmio.read(addr, length), length)
            return True
        if reason in (lib.KVM_EXIT_INTR, lib.KVM_EXIT_HLT):
            return False
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = "reset" if self._event_type[0] == lib.KVM_SYSTEM_EVENT_RESET else "shutdown"
            self._park(kind, f"guest asked for a {kind}")
            return False
        if reason == lib.KVM_EXIT_SHUTDOWN:
            self._park("failed", "triple fault")
            return False
        self._park("failed", f"unhandled KVM exit reason {reason}")
        return False

    # -- sync regs (see the module docstring)
    def _capture(self) -> None:
        """On this vCPU's thread, parked, ``immediate_exit`` set: one KVM_RUN that
        enters no guest code, completes a pending I/O and leaves regs and sregs
        in ``kvm_run``. The first one (the thread's first park, before any
        guest runs) also does the VM's one-time KVM_RUN set-up and takes the
        vCPU's pid, both outside any pause."""
        self._imm[0] = 1  # a fresh kvm_run has it clear
        self._valid_regs[0] = SYNC_CAPTURED
        ret = lib.baton_ioctl_val(self.fd, lib.KVM_RUN, 0)
        self._valid_regs[0] = 0
        self._captured = ret == -errno.EINTR

    def captured(self) -> tuple[bytes, bytes] | None:
        """(regs, classic sregs) as the vCPU parked, if still valid."""
        if not self._captured:
            return None
        return (
            bytes(ffi.buffer(self._sync_regs, SIZEOF_REGS)),
            bytes(ffi.buffer(self._sync_sregs, SIZEOF_SREGS)),
        )

    def captured_sregs_complete(self) -> bool:
        """Whether classic sregs carry everything: not so under PAE paging outside
        long mode, where the PDPTRs live only in sregs2."""
        return _sregs_complete(self._sync_sregs_t)

    def on_own_thread(self) -> bool:
        return self.thread is not None and self.thread.ident == threading.get_ident()

    def apply_synced(self, regs: bytes, sregs: bytes | None, events: bytes) -> None:
        """Set regs, classic ``sregs`` (None: leave them) and events in one KVM_RUN
        that returns before entering the guest. Only on this vCPU's own thread,
        parked (``on_own_thread``)."""
        if not self.on_own_thread():
            raise RuntimeError(f"vcpu{self.index}: apply_synced off its own thread")
        self._captured = False
        ffi.memmove(self._sync_regs, regs, SIZEOF_REGS)
        dirty = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_EVENTS
        if sregs is not None:
            ffi.memmove(self._sync_sregs, sregs, SIZEOF_SREGS)
            dirty |= lib.KVM_SYNC_X86_SREGS
        ffi.memmove(self._sync_events, events, SIZEOF_EVENTS)
        self._sync_events_t.flags |= EVENTS_VALID
        self._imm[0] = 1
        self._dirty_regs[0] = dirty
        ret = lib.baton_ioctl_val(self.fd, lib.KVM_RUN, 0)
        # KVM clears each dirty bit it applied; it applies none on a vCPU still in
        # KVM_MP_STATE_UNINITIALIZED (a fresh AP), returning -EINTR before sync_regs.
        applied = self._dirty_regs[0] == 0
        self._dirty_regs[0] = 0  # never applied again by a later run
        if ret != -errno.EINTR:
            why = os.strerror(-ret) if ret < 0 else f"returned {ret}"
            raise OSError(errno.EINVAL, f"KVM refused regs/sregs/events (sync regs): {why}")
        if not applied:
            if sregs is not None:
                self.set_sregs("sregs", sregs)
            self.set_regs(regs)
            ev = kvm.from_raw("struct kvm_vcpu_events", events)
            ev.flags |= EVENTS_VALID
            kvm.ioctl_ptr(self.fd, lib.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    # -- register state (raw kernel structs: their size is fixed by the ioctl ABI)
    def set_cpuid(self, entries: bytes) -> None:
        """``entries``: a raw array of kvm_cpuid_entry2."""
        self._captured = False
        _buf, cpuid = kvm.cpuid_struct(entries)
        kvm.ioctl_ptr(self.fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")
        self.cpuid = entries

    def _get(self, ctype: str, request: int, what: str) -> bytes:
        obj = ffi.new(f"{ctype} *")
        kvm.ioctl_ptr(self.fd, request, obj, what)
        return kvm.raw(obj)

    def _set(self, ctype: str, request: int, data: bytes, what: str) -> None:
        self._captured = False
        kvm.ioctl_ptr(self.fd, request, kvm.from_raw(ctype, data), what)

    def get_regs(self) -> bytes:
        return self._get("struct kvm_regs", lib.KVM_GET_REGS, "KVM_GET_REGS")

    def set_regs(self, data: bytes) -> None:
        self._set("struct kvm_regs", lib.KVM_SET_REGS, data, "KVM_SET_REGS")

    def get_classic_sregs(self) -> bytes:
        return self._get("struct kvm_sregs", lib.KVM_GET_SREGS, "KVM_GET_SREGS")

    def get_sregs(self) -> tuple[str, bytes]:
        if self.has_sregs2:
            return "sregs2", self._get("struct kvm_sregs2", lib.KVM_GET_SREGS2, "GET_SREGS2")
        return "sregs", self._get("struct kvm_sregs", lib.KVM_GET_SREGS, "KVM_GET_SREGS")

    def set_sregs(self, kind: str, data: bytes) -> None:
        if kind == "sregs2":
            self._set("struct kvm_sregs2", lib.KVM_SET_SREGS2, data, "KVM_SET_SREGS2")
        else:
            self._set("struct kvm_sregs", lib.KVM_SET_SREGS, data, "KVM_SET_SREGS")

    def get_events(self) -> bytes:
        return self._get("struct kvm_vcpu_events", lib.KVM_GET_VCPU_EVENTS, "GET_VCPU_EVENTS")

    def set_mp_state(self, state: int) -> None:
        self._captured = False
        obj = ffi.new("struct kvm_mp_state *")
        obj.mp_state = state
        kvm.ioctl_ptr(self.fd, lib.KVM_SET_MP_STATE, obj, "KVM_SET_MP_STATE")

    def set_tsc_offset(self, offset: int) -> None:
        self._captured = False
        val = ffi.new("uint64_t *", offset)
        attr = ffi.new("struct kvm_device_attr *")
        attr.group = lib.KVM_VCPU_TSC_CTRL
        attr.attr = lib.KVM_VCPU_TSC_OFFSET
        attr.addr = int(ffi.cast("uintptr_t", val))
        kvm.ioctl_ptr(self.fd, lib.KVM_SET_DEVICE_ATTR, attr, "setting the TSC offset")

    # -- the whole saved state as one record (``vmm.vcpu_record``)
    def _reader(self, sregs2: bool) -> tuple[Any, Any, record.Layout]:
        """A record buffer of this vCPU's layout (header, CPUID and MSR indices in
        place) and the batch of GETs that fill the rest of it, made once."""
        key = (sregs2, self.cpuid)
        got = self._readers.get(key)
        if got is not None:
            return got
        flags = (record.SREGS2 if sregs2 else 0) | (record.XCRS if self.has_xcrs else 0)
        flags |= record.TSC_OFFSET if self.has_tsc_offset else 0
        lay = record.layout(flags, len(self.cpuid), self.xsave_size)
        n = len(self.msr_indices)
        buf = ffi.new("char[]", lay.size(n))
        head = record.HEADER.pack(flags, len(self.cpuid), self.xsave_size, 0)
        ffi.memmove(buf, head + self.cpuid, len(head) + len(self.cpuid))
        ffi.memmove(buf + lay.msrs, record.MSRS_HEADER.pack(n, 0) + self._msr_template, 8 + n * 16)
        b = kvm.Batch(self.fd)
        b.add(self._xsave_get, buf + lay.xsave, "KVM_GET_XSAVE")
        if lay.xcrs >= 0:
            b.add(lib.KVM_GET_XCRS, buf + lay.xcrs, "KVM_GET_XCRS")

        def short(done: int) -> str:
            return f"KVM_GET_MSRS stopped at MSR {self.msr_indices[done]:#x} ({done} of {n})"

        b.add(lib.KVM_GET_MSRS, buf + lay.msrs, "KVM_GET_MSRS", n, short)
        b.add(lib.KVM_GET_LAPIC, buf + lay.lapic, "KVM_GET_LAPIC")
        b.add(lib.KVM_GET_VCPU_EVENTS, buf + lay.events, "KVM_GET_VCPU_EVENTS")
        b.add(lib.KVM_GET_DEBUGREGS, buf + lay.debugregs, "KVM_GET_DEBUGREGS")
        b.add(lib.KVM_GET_MP_STATE, buf + lay.mp_state, "KVM_GET_MP_STATE")
        if lay.tsc >= 0:
            attr = ffi.new("struct kvm_device_attr *")
            attr.group = lib.KVM_VCPU_TSC_CTRL
            attr.attr = lib.KVM_VCPU_TSC_OFFSET
            attr.addr = int(ffi.cast("uintptr_t", buf + lay.tsc))
            b.add(lib.KVM_GET_DEVICE_ATTR, attr, "reading the TSC offset")
        got = self._readers[key] = (buf, b, lay)
        return got

    def save_record(self) -> record.VcpuRecord:
        """This parked vCPU's whole state: regs and sregs from the park's sync-regs
        copy when it is still valid and complete (else by GET ioctls), the rest by
        one batch of GETs straight into the record."""
        buf, batch, lay = self._reader(False)
        if self._captured:
            ffi.memmove(buf + lay.sregs, self._sync_sregs, SIZEOF_SREGS)
            regs = self._sync_regs
        else:  # classic sregs too, as after a park: the same layout, so a load can compare
            kvm.ioctl_ptr(self.fd, lib.KVM_GET_SREGS, buf + lay.sregs, "KVM_GET_SREGS")
            regs = buf + lay.regs
            kvm.ioctl_ptr(self.fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        if self.has_sregs2 and not _sregs_complete(ffi.cast("struct kvm_sregs *", buf + lay.sregs)):
            classic = buf
            buf, batch, lay = self._reader(True)
            ffi.memmove(buf + lay.regs, classic + lay.regs, SIZEOF_REGS)
            kvm.ioctl_ptr(self.fd, lib.KVM_GET_SREGS2, buf + lay.sregs, "KVM_GET_SREGS2")
        if regs is self._sync_regs:
            ffi.memmove(buf + lay.regs, regs, SIZEOF_REGS)
        batch.run()
        return record.VcpuRecord(ffi.buffer(buf)[:], lay, len(self.msr_indices))

    # -- a live handoff's save, read by two threads at once (``baton_save_vcpus``)
    def save_slot(self, slot: Any) -> None:
        """Fill ``slot`` (a ``struct baton_save_vcpu``) to read this vCPU's record as
        ``save_record`` does (before the pause: this vCPU's classic-sregs reader)."""
        buf, batch, lay = self._reader(False)
        requests, args, expect, rets = batch.arrays()
        slot.fd, slot.captured, slot.sregs2_ok = self.fd, 0, self.has_sregs2
        slot.sync_regs, slot.sync_sregs = self._sync_regs, self._sync_sregs
        slot.regs, slot.sregs = buf + lay.regs, buf + lay.sregs
        slot.n, slot.requests, slot.args, slot.expect, slot.rets = (
            len(batch),
            requests,
            args,
            expect,
            rets,
        )
        slot.state = lib.BATON_SAVE_FREE

    def post_save(self, slot: Any, go: Any) -> None:
        """Before a handoff's pause: once parked, read its own record into ``slot``
        (a ``struct baton_save_vcpu *``) as soon as ``go`` (a ``uint32_t[1]``) says
        1, in its parked wait (``baton_park_wait_save``), unless another thread has
        claimed it first. Both must live until the vCPU runs again."""
        with self._cond:
            self._save_post = (slot, go)
            self._ctl.save_go = go
            self._ctl.save_slot = slot  # for a park in C (baton_run_parking)

    def arm_slot(self, slot: Any) -> None:
        """Once parked: whether the park's sync copy holds its regs and sregs."""
        slot.captured = self._captured

    def slot_view(self) -> Any:
        """Where ``baton_save_vcpus`` reads this vCPU's record (``save_slot``): a view
        of the reader's buffer, valid until the next save."""
        return ffi.buffer(self._reader(False)[0])

    def slot_record(self, slot: Any) -> Any:
        """The record ``baton_save_vcpus`` read for ``slot`` (``slot_view``), or read
        here if it needs sregs2; raises what the read raised."""
        state = slot.state
        if state == lib.BATON_SAVE_READ:
            return self.slot_view()
        if state == lib.BATON_SAVE_SREGS2:
            return self.save_record().raw
        if state == lib.BATON_SAVE_FAILED:
            if slot.failed >= 0:
                raise self._reader(False)[1].error(slot.failed, slot.ret)
            what = "KVM_GET_SREGS" if slot.failed == -1 else "KVM_GET_REGS"
            raise OSError(-slot.ret, f"{what}: {os.strerror(-slot.ret)}")
        raise RuntimeError(f"vcpu{self.index}: its record was not read (state {state})")

    def restore_record(self, rec: record.VcpuRecord, known: record.VcpuRecord | None) -> None:
        """Everything of ``rec`` after its CPUID and the VM-wide state, in one C call
        (``baton_vcpu_restore``, which says what it skips). ``known``: what KVM
        holds for this vCPU now, if known exactly. On the vCPU's own thread regs,
        sregs and events go first, in one sync-regs KVM_RUN (``apply_synced``)."""
        lay = rec.lay
        synced = self.has_sync_regs and self.on_own_thread()
        if synced:
            classic = None
            if lay.flags & record.SREGS2:
                self.set_sregs("sregs2", rec["sregs"])
            else:
                classic = rec.part(lay.sregs, SIZEOF_SREGS)
            self.apply_synced(rec.part(lay.regs, SIZEOF_REGS), classic, rec["events"])
        self._captured = False
        if known is not None and (known.lay != lay or known.nmsrs != rec.nmsrs):
            known = None  # another layout: nothing can be compared
        if self._msr_buf_n < rec.nmsrs:
            self._msr_buf = ffi.new("char[]", 8 + rec.nmsrs * record.MSR_ENTRY)
            self._msr_buf_n = rec.nmsrs
        step = lib.baton_vcpu_restore(
            self.fd,
            rec.raw,
            known.raw if known is not None else ffi.NULL,
            _rec_offsets(lay, rec.nmsrs),
            synced,
            lay.tsc >= 0 and self.has_tsc_offset,
            self._xsave_buf,
            self.xsave_size,
            self._msr_buf,
            self._restore_ret,
        )
        if step:
            raise self._refused(step, self._restore_ret[0])

    def _refused(self, step: int, ret: int) -> OSError:
        what = _STEPS[step]
        if ret < 0:
            return OSError(-ret, f"{what}: {os.strerror(-ret)}")
        msrs = ffi.cast("struct kvm_msrs *", self._msr_buf)
        bad = msrs.entries[ret].index
        return OSError(errno.EINVAL, f"{what} refused MSR {bad:#x} ({ret} of {msrs.nmsrs} set)")

    def _tsc_attr(self) -> int:
        """KVM_HAS_DEVICE_ATTR for the TSC offset: 0 if this vCPU has it."""
        attr = ffi.new("struct kvm_device_attr *")
        attr.group = lib.KVM_VCPU_TSC_CTRL
        attr.attr = lib.KVM_VCPU_TSC_OFFSET
        return int(lib.baton_ioctl_ptr(self.fd, lib.KVM_HAS_DEVICE_ATTR, attr))
