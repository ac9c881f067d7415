"""A whole VM in one worker: composes the KVM VM, the vCPUs, the buses and the
devices, and runs its lifecycle and the live handoff.

Lifecycle (``GuestState``): ``incoming`` (built, waiting for a state) or
``running`` after ``boot``; ``paused``; ``stopped`` (the guest asked for a
reset or shutdown); ``failed`` (a vCPU hit an error). ``save`` needs a paused
VM; ``load`` validates the whole state before it touches KVM, and if KVM still
refuses a part, puts the previous state back.

Each part saves and restores its own state (its component is defined beside
it: ``Vm``, ``vcpu_state``, each device); the machine's own component is
``MACHINE_STATE`` below, and ``_collect``/``_apply`` put the parts together
in the restore order that works.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton import fdinfo
from baton.contract import (
    CONSOLE_IN,
    CONSOLE_LOG,
    RAM,
    DiskArg,
    GuestState,
    NicArg,
    tap_fd,
)
from baton.schema import U64, Int, Name, Str
from baton.trace import mark
from vmm import awake, boot, kvm, layout, state, vcpu_state
from vmm._kvm import ffi, lib
from vmm.bus import MmioBus, PioBus
from vmm.devices import i8042, net
from vmm.devices.block import Block
from vmm.devices.i8042 import I8042
from vmm.devices.net import Net
from vmm.devices.serial import Serial
from vmm.lease import LeaseRefused, RunLease
from vmm.memory import GuestMemory
from vmm.state import Component, F
from vmm.vcpu import KICK_SIGNAL, Vcpu
from vmm.vm import Vm

log = logging.getLogger("vmm.machine")
PAUSE_TIMEOUT = 5.0
PAUSE_NS = int(PAUSE_TIMEOUT * 1e9)


#: What the whole machine is: checked against the VM a state is loaded into.
MACHINE_STATE = Component(
    "machine",
    version=1,
    min_version=1,
    fields={
        "name": F(Name),
        "ram_size": F(U64),
        "vcpus": F(Int(1, layout.MAX_VCPUS)),
        "tick_ns": F(U64),
        "guest_sha256": F(Str(64)),
        "paused_at_ns": F(U64),
    },
)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside a handoff (the guest's pause): the
    pause's objects (maps, lists, byte strings) are acyclic and freed by their
    reference counts, and a collection that the allocation counts happen to
    trigger there walks every tracked object of the worker (tens of
    microseconds for the youngest generation, milliseconds for the oldest).
    Put back as it was afterwards; the next collection comes when it would have."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class MachineError(RuntimeError):
    """An operation that is not possible in the machine's current state."""


@dataclass
class MachineSpec:
    name: str
    vcpus: int = 1
    tick_ns: int = 50_000_000
    guest: Path | None = None
    disks: list[DiskArg] = field(default_factory=list)
    instance: str = ""
    nets: list[NicArg] = field(default_factory=list)


def _cpuid_for(entries: Sequence[tuple[int, ...]], index: int) -> bytes:
    """Give each vCPU its own APIC id in CPUID (leaf 1 EBX[31:24], leaves 0xb/0x1f EDX)."""
    out = []
    for fn, idx, flags, a, b, c, d in entries:
        if fn == 1:
            b = (b & 0x00FFFFFF) | (index << 24)
        elif fn in (0xB, 0x1F):
            d = index
        out.append((fn, idx, flags, a, b, c, d))
    return kvm.pack_cpuid(out)


#: rounds of ``Machine._rehearse``: enough for cold code to be specialised; a
#: zygote lowers it for its forks once it has warmed the code itself
REHEARSAL_ROUNDS = 12


class Machine:
    def __init__(
        self, spec: MachineSpec, fds: dict[str, int], lease: RunLease | None = None
    ) -> None:
        if not 1 <= spec.vcpus <= layout.MAX_VCPUS:
            raise ValueError(f"vcpus must be 1..{layout.MAX_VCPUS}, found {spec.vcpus}")
        self.spec = spec
        self.image = boot.GuestImage.load(spec.guest)
        self.system = kvm.System()
        self.memory = GuestMemory(fds[RAM])
        self.lease = lease  # None only where no broker decides (unit tests)
        self.vm = Vm(self.system, self.memory)
        mark("M.vm")
        self.state = GuestState.CREATED
        self.reason = ""
        self.stop_kind = ""
        self.stopped = threading.Event()
        self._lock = threading.RLock()
        self.serial = Serial(
            lambda level: self.vm.irq_line(layout.COM1_IRQ, level),
            fds.get(CONSOLE_LOG),
            fds.get(CONSOLE_IN),
        )
        self.i8042 = I8042(lambda: self.guest_stopped("reset", "guest asked for a reset (i8042)"))
        self.blocks = [Block(d.name, fds[d.name], self.memory, d.read_only) for d in spec.disks]
        if len(spec.nets) > len(layout.NET_IRQS):
            raise ValueError(f"at most {len(layout.NET_IRQS)} NICs, found {len(spec.nets)}")
        self.nets = [
            Net(n.name, n.mac, fds[tap_fd(n.name)], self.memory, self._irq_of(layout.NET_IRQS[i]))
            for i, n in enumerate(spec.nets)
        ]
        self.pio = PioBus()
        self.mmio = MmioBus()  # nothing there yet: every access reads all ones
        self.pio.register(self.serial, layout.COM1_BASE, Serial.PORTS)
        self.pio.register(self.i8042, layout.I8042_DATA, 1, i8042.DATA)
        self.pio.register(self.i8042, layout.I8042_COMMAND, 1, i8042.COMMAND)
        if self.blocks:
            self.pio.register(self.blocks[0], layout.BLOCK_PORT, 1)
        for i, n in enumerate(self.nets):
            self.pio.register(n, layout.NET_PORT + i * layout.NET_PORT_STRIDE, net.PORTS)
        supported = self.system.supported_cpuid()
        self.vcpus: list[Vcpu] = []
        for i in range(spec.vcpus):
            msrs = self.vcpus[0].msr_indices if self.vcpus else None
            self.vcpus.append(
                Vcpu(
                    self.system,
                    self.vm.fd,
                    i,
                    _cpuid_for(supported, i),
                    self.pio,
                    self.mmio,
                    self._vcpu_event,
                    msrs,
                )
            )
        mark("M.vcpus")
        self._frame_reader = vcpu_state.FrameReader(self.vcpus)
        self.last_pause: dict[str, Any] = {}
        self.last_resume: dict[str, Any] = {}
        self.last_save: dict[str, Any] = {}
        self._known: dict[str, Any] | None = None
        self._incoming = False
        self._offered = False  # the broker showed the lease offered to us, before the pause
        self._warm_blob = self._warm_frame = b""
        self._save_job: tuple[Any, Any] | None = None  # the last handoff's (Machine.handoff_out)
        self._head = state.HeadEncoder()
        self._rehearse()
        mark("M.rehearsed")
        self.vm.wait_memory()  # mapped meanwhile (``Vm``): before any vCPU can run
        for v in self.vcpus:
            v.start()

    def _irq_of(self, line: int) -> Callable[[int], None]:
        return lambda level: self.vm.irq_line(line, level)

    def _quiesce_devices(self) -> None:
        """No device takes more input from the host (console bytes, frames)."""
        self.serial.quiesce()
        for n in self.nets:
            n.quiesce()

    def _rehearse(self, rounds: int | None = None) -> None:
        """Run the whole save and load path on this not-yet-started VM.

        A worker runs its blackout path once in its life, and cold Python code
        (before the interpreter has specialised it) is several times slower.
        Saving this fresh VM and loading that state back changes nothing and
        makes the real save or load, inside the guest's pause, run warm. A fork
        of a zygote that has rehearsed a machine of its own (``vmm.zygote``)
        rehearses as many rounds: two saved no time measurably on a quiet host
        and left the blackout no better (docs/benchmarks.md)."""
        parts = self._collect()
        for _ in range(REHEARSAL_ROUNDS if rounds is None else rounds):
            parts = self._collect()
            blob = (state.encode_frame(parts) if state.FRAME_ENABLED else None) or state.encode(
                parts
            )
            parts = state.decode(blob)
            self._cross_check(parts)
            self._apply(parts, self._known)
            self._known = parts  # exactly what KVM holds now
        self._warm_blob = state.encode(parts)
        self._warm_frame = state.encode_frame(parts) or self._warm_blob

    def _warm_up(self, frame: bool = False) -> None:
        """Just before a pause: run the pure-Python save and load paths (and the
        VM-wide reads, which are safe while vCPUs run) on the rehearsal's state, so
        that the real ones inside the pause find warm caches. Nothing is kept.
        ``frame``: the state frame's paths (``state.encode_frame``) rather than
        format 1's."""
        self.vm.save_state()
        parts = self.keep_warm(frame)
        if frame:
            state.encode_frame(parts)
        else:
            state.encode(parts)

    def keep_warm(self, frame: bool = False) -> dict[str, Any]:
        """The new worker's pure-Python load path (decode, cross-check) on the
        rehearsal's state: run again and again while it waits for the state awake
        (``control``: between short spins), because a spin's system calls leave the
        caches and branch predictors cold for the load that follows it (three
        times its warm cost here). Nothing is kept."""
        blob = self._warm_frame if frame or state.FRAME_ENABLED else self._warm_blob
        end = state.head_length(blob)
        if 0 < end < len(blob):  # as handoff_in reads a frame
            parts = state.decode_head(blob[:end])
            checked = self._read_vcpus(parts, blob[end:])
        else:
            parts, checked = state.decode(blob), False
        self._cross_check(parts, checked)
        return parts

    def _read_vcpus(self, parts: dict[str, Any], section: bytes) -> bool:
        """A frame's vCPU section into ``parts``, validated: by
        ``vcpu_state.FrameReader`` where it can (True: the records are checked
        against this VM's vCPUs too, as ``vcpu_state.check`` would), else by
        ``state.decode_vcpus`` (False)."""
        recs = self._frame_reader.read(section)
        if recs is None:
            parts["vcpu"] = state.decode_vcpus(section)
            return False
        parts["vcpu"] = recs
        return True

    # -- called on vCPU threads (I/O exits go to the buses)
    def _vcpu_event(self, vcpu: Vcpu, kind: str, detail: str) -> None:
        self.guest_stopped(kind, detail if kind != "failed" else f"vcpu{vcpu.index}: {detail}")

    def guest_stopped(self, kind: str, reason: str) -> None:
        """The guest is done (reset, shutdown) or broken; park every vCPU."""
        if self.stopped.is_set():
            return
        self.state = GuestState.FAILED if kind == "failed" else GuestState.STOPPED
        self.stop_kind = kind
        self.reason = reason
        log.info("guest %s: %s", kind, reason)
        for v in self.vcpus:
            v.request_pause()
        self.stopped.set()

    # -- lifecycle
    def boot(self) -> None:
        with self._lock:
            if self.state != GuestState.CREATED:
                raise MachineError(f"cannot boot a machine that is {self.state}")
            self._take_lease()  # before the first write to guest RAM
            boot.write_boot_area(self.memory, self.image, len(self.vcpus), self.spec.tick_ns)
            for v in self.vcpus:
                sregs = v.get_classic_sregs()
                entry = self.image.bsp_entry if v.index == 0 else self.image.ap_entry
                sregs, regs = boot.long_mode_registers(sregs, v.index, entry)
                v.set_sregs("sregs", sregs)
                v.set_regs(regs)
                if v.index > 0:
                    v.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
            self.state = GuestState.PAUSED
            self.resume()

    def mark_incoming(self) -> None:
        self.state = GuestState.INCOMING
        self._incoming = True  # its first run is an upgrade's commit (the run flag)

    def pause(self) -> dict[str, Any]:
        with self._lock:
            if self.state != GuestState.RUNNING:
                raise MachineError(f"cannot pause a machine that is {self.state}")
            t0 = time.monotonic_ns()
            for v in self.vcpus:
                v.request_pause()
            deadline = time.monotonic() + PAUSE_TIMEOUT
            for v in self.vcpus:
                if not v.wait_paused(deadline):
                    raise MachineError(f"vcpu{v.index} did not stop within {PAUSE_TIMEOUT}s")
            self._quiesce_devices()
            t1 = time.monotonic_ns()
            self.state = GuestState.PAUSED
            self.last_pause = {
                "paused_at_ns": t0,
                "stopped_at_ns": min(v.stopped_at_ns for v in self.vcpus),
                "parked_at_ns": t1,
                "pause_us": (t1 - t0) / 1000,
            }
            return self.last_pause

    def resume(self) -> dict[str, Any]:
        with self._lock:
            if self.state != GuestState.PAUSED:
                raise MachineError(f"cannot resume a machine that is {self.state}")
            committing = self._incoming  # supervisor-commit mode: the commit is this resume
            if committing:
                if not self._offered:  # not seen while the state came: ask now
                    self._lease_step(RunLease.expect_offer)
                self._commit_lease()
            else:
                self._take_lease()
            t0 = time.monotonic_ns()
            for v in self.vcpus:
                v.resume()
            running = self._running_since(t0)
            if committing:
                self._confirm_commit()
            return running

    def _running_since(self, t0: int) -> dict[str, Any]:
        """Once every vCPU is back in KVM_RUN: console input flows, stamps recorded."""
        for v in self.vcpus:
            v.wait_entered(PAUSE_TIMEOUT)
        self.serial.unquiesce()
        self.serial.start()
        for n in self.nets:
            n.unquiesce()
            n.start()
        entered = max(v.entered_at_ns for v in self.vcpus)
        self.state = GuestState.RUNNING
        self._incoming = self._offered = False
        self.last_resume = {
            "resume_started_ns": t0,
            "resumed_at_ns": entered,
            "resume_us": (entered - t0) / 1000,
        }
        return self.last_resume

    def _take_lease(self) -> None:
        """Hold the VM's run lease before any vCPU runs here (a no-op while we hold
        it). The broker grants it to one live process at a time, so a second VMM on
        this guest cannot start, and an old one never resumes over memory a newer
        one has run on."""
        self._lease_step(RunLease.confirm)

    def _commit_lease(self) -> None:
        """The commit of an upgrade, on vCPU 0's thread inside the pause: the run
        flag's ``pwrite`` (``vmm.lease``), no round trip."""
        self._lease_step(RunLease.commit)

    def _lease_step(self, step: Callable[[RunLease], None]) -> None:
        if self.lease is not None:
            try:
                step(self.lease)
            except LeaseRefused as e:
                raise MachineError(str(e)) from None

    def _confirm_commit(self) -> None:
        """Once the guest runs here: does the broker agree that we hold the lease?
        It should (the offer named us, and is withdrawn only once we are dead); if
        it does not, the guest stops here rather than run beside another worker."""
        if self.lease is None:
            return
        try:
            self.lease.confirm()
        except LeaseRefused as e:
            self.guest_stopped("failed", f"the broker did not settle the run lease on us: {e}")
            raise MachineError(str(e)) from None

    # -- state
    def _save_machine(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "ram_size": self.memory.size,
            "vcpus": len(self.vcpus),
            "tick_ns": self.spec.tick_ns,
            "guest_sha256": self.image.sha256,
            "paused_at_ns": self.last_pause.get("paused_at_ns", 0),
        }

    def _collect(
        self, vcpus: list[dict[str, Any]] | None = None, st: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """Every component, from its owner (vCPUs parked, console input quiesced).
        ``vcpus``: the ``vcpu`` part to carry instead of reading it from KVM (the
        preview, whose vCPUs are running)."""
        parts = self._collect_head(st)
        parts["vcpu"] = [vcpu_state.save(v) for v in self.vcpus] if vcpus is None else vcpus
        return parts

    def _collect_head(self, st: dict[str, int] | None = None) -> dict[str, Any]:
        """Every component but the vCPUs' (``vcpu`` None, in its place in the order)."""
        m = self._save_machine()
        vm = self.vm.save_state()
        if st is not None:
            st["vm_saved"] = time.monotonic_ns()
        return {
            "machine": m,
            "vm": vm,
            "vcpu": None,  # in the components' order, but read after the devices
            **self.device_parts(),
        }

    def device_parts(self) -> dict[str, Any]:
        """The devices' state (each read under its own lock: the guest may be running)."""
        return {
            "serial": self.serial.save(),
            "i8042": self.i8042.save(),
            "block": [b.save() for b in self.blocks],
            "net": [n.save() for n in self.nets],
        }

    def save(self, versions: dict[str, int] | None = None) -> bytes:
        with self._lock:
            if self.state not in (GuestState.PAUSED, GuestState.STOPPED, GuestState.FAILED):
                raise MachineError(f"cannot save a machine that is {self.state}; pause it first")
            t0 = time.monotonic_ns()
            parts = self._collect()
            t1 = time.monotonic_ns()
            blob = state.encode(parts, versions)
            t2 = time.monotonic_ns()
            self.last_save = {"collect_us": (t1 - t0) / 1000, "encode_us": (t2 - t1) / 1000}
            if self.lease is not None:
                self.lease.handed_off()  # the state may run elsewhere now
            return blob

    def _cross_check(self, parts: dict[str, Any], vcpus_checked: bool = False) -> None:
        """The state against this VM; ``vcpus_checked``: the vCPU records were
        checked against its vCPUs as they were read (``vcpu_state.FrameReader``)."""
        m = parts["machine"]
        if m["vcpus"] != len(self.vcpus) or len(parts["vcpu"]) != len(self.vcpus):
            raise state.StateError(
                f"state has {len(parts['vcpu'])} vCPUs (machine says {m['vcpus']}), "
                f"this VM has {len(self.vcpus)}"
            )
        if m["ram_size"] != self.memory.size:
            raise state.StateError(
                f"state is for {m['ram_size']} bytes of RAM, this VM maps {self.memory.size}"
            )
        if m["name"] != self.spec.name:
            raise state.StateError(f"state belongs to VM {m['name']!r}, not {self.spec.name!r}")
        if sorted(b["name"] for b in parts["block"]) != sorted(b.name for b in self.blocks):
            raise state.StateError("state and this VM have different disks")
        theirs = sorted((n["name"], n["mac"]) for n in parts["net"])
        if theirs != sorted((n.name, n.mac) for n in self.nets):
            raise state.StateError(
                f"state and this VM have different NICs: {theirs} in the state, "
                f"{sorted((n.name, n.mac) for n in self.nets)}"
            )
        if vcpus_checked:
            return
        readable = set(self.vcpus[0].msr_indices)
        for i, (v, s) in enumerate(zip(self.vcpus, parts["vcpu"], strict=True)):
            vcpu_state.check(v, s, i, readable)

    def _apply(
        self,
        parts: dict[str, Any],
        known: dict[str, Any] | None = None,
        st: dict[str, int] | None = None,
    ) -> None:
        """The restore order that works (each step relies on the ones before it;
        see ``vmm.vcpu_state``): CPUID on every vCPU, the VM-wide state, the rest
        of each vCPU, then the devices.

        ``known``: what KVM holds right now, if we know it exactly (a fresh VM
        just after its rehearsal). Parts equal to it are skipped: setting a
        value KVM already holds changes nothing, and each ioctl costs several
        microseconds inside the guest's pause."""
        kvm_vm = known["vm"] if known else {}
        kvm_vcpus = known["vcpu"] if known else [None for _ in self.vcpus]
        for v, s in zip(self.vcpus, parts["vcpu"], strict=True):
            vcpu_state.restore_cpuid(v, s)
        if st is not None:
            st["cpuid"] = time.monotonic_ns()
        self.vm.restore_state(parts["vm"], kvm_vm)
        if st is not None:
            st["vm_restored"] = time.monotonic_ns()
        for v, s, k in zip(self.vcpus, parts["vcpu"], kvm_vcpus, strict=True):
            vcpu_state.restore(v, s, k)
        if st is not None:
            st["vcpus_restored"] = time.monotonic_ns()
        self.serial.restore(parts["serial"])
        self.i8042.restore(parts["i8042"])
        by_name = {b["name"]: b for b in parts["block"]}
        for b in self.blocks:
            b.restore(by_name[b.name])
        nics = {n["name"]: n for n in parts["net"]}
        for n in self.nets:
            n.restore(nics[n.name])

    def load(self, blob: Any, from_image: bool = False) -> dict[str, Any]:
        """Validate completely, then apply; on a KVM refusal put the old state back.
        ``from_image``: the state comes from a suspend image, perhaps from before a
        host reboot (``_rebase_tsc``), and no worker hands the guest over: its
        first run takes the run lease as a boot does (``acquire``), not by the
        run flag, which counts only for an upgrade's offered worker."""
        with self._lock:
            self._check_loadable()
            result = self._load_unlocked(blob)
            if from_image:
                result.update(self._rebase_tsc(state.decode(blob)))
                self._incoming = False
            self.state = GuestState.PAUSED
            return result

    def _rebase_tsc(self, parts: dict[str, Any]) -> dict[str, Any]:
        """Move each vCPU's TSC offset so that the guest TSC goes on from where it was
        by the time kvmclock says passed, whatever the host TSC did meanwhile (after a
        reboot it starts again near zero): KVM's KVM_VCPU_TSC_OFFSET migration
        recipe, ofs += (guest_dst - guest_src) * freq + (host_tsc_src - host_tsc_dst).
        Within one host boot the shift is about zero. Needs the host TSC in both
        clock readings (KVM_CLOCK_HOST_TSC); without it the offsets stay as saved."""
        saved, now = parts["vm"]["clock"], self.vm.get_clock()
        if not saved["flags"] & now["flags"] & lib.KVM_CLOCK_HOST_TSC:
            return {"tsc_rebased": False}
        khz = kvm.ioctl_val(self.vcpus[0].fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")
        shift = (now["clock"] - saved["clock"]) * khz // 1_000_000
        shift += saved["host_tsc"] - now["host_tsc"]
        for v, s in zip(self.vcpus, parts["vcpu"], strict=True):
            if s["tsc_offset"] is not None and v.has_tsc_offset:
                v.set_tsc_offset((s["tsc_offset"] + shift) % (1 << 64))
        # The shift in microseconds of guest TSC: about 0 unless the host TSC jumped.
        return {"tsc_rebased": True, "tsc_shift_us": round(shift * 1000 / khz, 1)}

    def _check_loadable(self) -> None:
        if self.state not in (GuestState.INCOMING, GuestState.PAUSED):
            raise MachineError(f"cannot load into a machine that is {self.state}; pause it first")

    def _load_unlocked(
        self,
        blob: Any,
        st: dict[str, int] | None = None,
        parts: dict[str, Any] | None = None,
        spent_ns: int = 0,
        vcpus_checked: bool = False,
    ) -> dict[str, Any]:
        """``parts``: ``blob`` already decoded (a frame received in its two sections,
        which took ``spent_ns`` to decode); cross-checked here all the same
        (``vcpus_checked``: its vCPU records already against this VM's vCPUs)."""
        t0 = time.monotonic_ns() - spent_ns
        if parts is None:
            parts = state.decode(blob)
        if st is not None:
            st["decoded"] = time.monotonic_ns()
        self._cross_check(parts, vcpus_checked)
        t1 = time.monotonic_ns()
        if st is not None:
            st["checked"] = t1
        # A fresh incoming VM has nothing to protect; a paused one gets its state back.
        previous = self._collect() if self.state == GuestState.PAUSED else None
        known, self._known = self._known, None  # from now on KVM's state is not known here
        try:
            self._apply(parts, known, st)
        except (OSError, ValueError) as e:
            if previous is None:
                self.guest_stopped("failed", f"state refused by KVM: {e}")
                raise state.StateError(f"KVM refused the state: {e}") from e
            try:
                self._apply(previous)
            except (OSError, ValueError) as e2:
                self.guest_stopped("failed", f"state refused ({e}) and rollback failed ({e2})")
                raise state.StateError(f"KVM refused the state ({e}); rollback failed") from e2
            raise state.StateError(f"KVM refused the state: {e}; previous state restored") from e
        t2 = time.monotonic_ns()
        return {"validate_us": (t1 - t0) / 1000, "apply_us": (t2 - t1) / 1000, "loaded_at_ns": t2}

    # -- the preflight (vmctl upgrade --check): nothing pauses, nothing is applied
    def preview(self, versions: dict[str, int] | None = None) -> tuple[bytes, dict[str, Any]]:
        """The state a save at ``versions`` would produce, built while the guest runs.

        Live: ``machine``; ``vm`` (PICs, IOAPIC, PIT, kvmclock: VM ioctls, safe
        while vCPUs run, as ``_warm_up`` does before every pause); every device
        (its own fields, read under its lock). Not live: ``vcpu``. KVM reads a
        vCPU's registers only while its thread is out of KVM_RUN, which is a
        pause; the preview carries the rehearsal's vCPU state instead: this VM's
        own CPUID, MSR list, XSAVE size and sregs kind, with the register values
        this VM had before it first ran. So the blob has the real state's
        components, shapes and sizes, and exercises encode at ``versions`` and
        the reader's whole decode and cross-check; the register values
        themselves are checked only by a real upgrade."""
        with self._lock:
            if self.state != GuestState.RUNNING:
                raise MachineError(f"cannot preview the state of a machine that is {self.state}")
            t0 = time.monotonic_ns()
            parts = self._collect(vcpus=state.decode(self._warm_blob)["vcpu"])
            blob = state.encode(parts, versions)
            t1 = time.monotonic_ns()
            return blob, {
                "preview_us": (t1 - t0) / 1000,
                "live": [name for name in parts if name != "vcpu"],
                "rehearsed": ["vcpu"],
            }

    def validate(self, blob: Any) -> dict[str, Any]:
        """Decode and cross-check ``blob`` as ``load`` would, and apply nothing."""
        with self._lock:
            self._check_loadable()
            t0 = time.monotonic_ns()
            parts = state.decode(blob)
            self._cross_check(parts)
            t1 = time.monotonic_ns()
            return {"validate_us": (t1 - t0) / 1000, "state_size": len(blob)}

    # -- the live handoff, run on vCPU 0's own thread (see Vcpu.post_task)
    def handoff_out(
        self,
        send: Callable[[list[Any]], None],
        versions: dict[str, int] | None,
        before_pause: Callable[[], None] | None = None,
        frame: bool = False,
    ) -> dict[str, Any]:
        """Pause, save at ``versions`` and ``send`` the state; the guest stays paused.
        ``send(pieces)``: one message of these bytes-like pieces, in order.
        ``before_pause``: called after the warm-up, just before the pause (the
        pre-wake: it waits for the new worker's word that it waits awake); if it
        raises, nothing has paused. ``frame``: the reader takes the state frame
        (``state.encode_frame``; format 1 where the versions need it).

        The frame's vCPU records are read in C, without the GIL, straight into
        each vCPU's record buffer and sent from there (``baton_save_vcpus``):
        every other vCPU's by its own parked thread as soon as all are parked
        (``Vcpu.post_save``), while vCPU 0's thread reads the VM-wide state and
        the devices and encodes the head; then by vCPU 0's thread its own, and
        any that its thread did not take in time."""
        with self._lock, collector_paused():
            if self.state != GuestState.RUNNING:
                raise MachineError(f"cannot hand off a machine that is {self.state}")
            done: Future[dict[str, Any]] = Future()
            deadline = time.monotonic() + PAUSE_TIMEOUT
            n = len(self.vcpus)
            job: Any = None
            go: Any = None
            section: list[Any] = []
            finished = ffi.new("uint32_t[1]")
            if frame and state.frame_carries(versions):
                job = ffi.new("struct baton_save_vcpu[]", n)
                go = ffi.new("uint32_t[1]")
                self._save_job = (job, go)  # alive while any vCPU thread may look at it
                for i, v in enumerate(self.vcpus):
                    v.save_slot(job[i])
                # The vCPU section as it will go, made now: the records' buffers and sizes
                # are fixed (but where a record needs sregs2: then it is made again).
                section = state.vcpus_section([v.slot_view() for v in self.vcpus])

            st: dict[str, int] = {}

            def task() -> None:
                st["task"] = time.monotonic_ns()
                try:
                    for v in self.vcpus[1:]:
                        if not v.wait_paused(deadline, awake.PARK_SPIN_NS):
                            raise MachineError(
                                f"vcpu{v.index} did not stop within {PAUSE_TIMEOUT}s"
                            )
                        if not v.stopped_at_ns:  # parked says it stopped first: never
                            raise MachineError(f"vcpu{v.index} said parked before it stopped")
                    t1 = st["others_parked"] = time.monotonic_ns()
                    if job is not None:
                        for i, v in enumerate(self.vcpus):
                            v.arm_slot(job[i])
                        go[0] = 1  # the other vCPUs' threads read their own records now
                    parts = self._collect_head(st)
                    if job is not None:
                        head = self._head.encode(parts, versions)
                        assert head is not None  # state.frame_carries said so
                        th = st["head_encoded"] = time.monotonic_ns()
                        if n > 1:
                            # Its head goes first, and the new worker checks it while
                            # the records are read.
                            if self.lease is not None:
                                self.lease.handed_off()  # resuming here needs the lease again
                            send([head])
                        tv = st["head_sent"] = time.monotonic_ns()
                        lib.baton_save_vcpus(job, n)  # its own, and any not yet claimed
                        read = lib.baton_save_wait(job, n, awake.PARK_SPIN_NS, PAUSE_NS)
                        if not read:
                            raise MachineError(f"vCPU records not read in {PAUSE_TIMEOUT}s")
                        pieces = section
                        if read != 1:  # a record to read here (sregs2), or an error to raise
                            recs = [v.slot_record(job[i]) for i, v in enumerate(self.vcpus)]
                            pieces = state.vcpus_section(recs)
                        tc = st["collected"] = time.monotonic_ns()
                        if n == 1:
                            # One datagram: the read is too short for the head's check
                            # to hide behind it, and a second message costs the new
                            # worker more than that check.
                            pieces = [head, *pieces]
                        t2 = time.monotonic_ns()
                        if n == 1 and self.lease is not None:
                            self.lease.handed_off()  # resuming here now needs the lease again
                        send(pieces)
                        t3 = time.monotonic_ns()
                        for i in range(n):
                            st[f"vcpu{i}_read"] = job[i].read_at_ns + job[i].read_ns
                        collect, save = (th - t1) + (tc - tv), (t2 - t1) - (tv - th)
                        size = sum(len(p) for p in pieces) + (len(head) if n > 1 else 0)
                        fmt = "frame"
                    else:
                        # Format 1, in one datagram.
                        parts["vcpu"] = [vcpu_state.save(v) for v in self.vcpus]
                        tc = st["collected"] = time.monotonic_ns()
                        blob = state.encode(parts, versions)
                        t2 = time.monotonic_ns()
                        if self.lease is not None:
                            self.lease.handed_off()  # resuming here now needs the lease again
                        send([blob])
                        t3 = time.monotonic_ns()
                        collect, save, size, fmt = tc - t1, t2 - t1, len(blob), "v1"
                    done.set_result(
                        {
                            "stamps": st,
                            "parked_at_ns": t1,
                            "collect_us": collect / 1000,
                            "save_us": save / 1000,
                            "send_us": (t3 - t1 - save) / 1000,
                            "sent_at_ns": t3,
                            "state_size": size,
                            "state_format": fmt,
                        }
                    )
                except BaseException as e:
                    done.set_exception(e)
                finally:
                    if go is not None and not go[0]:
                        go[0] = 2  # nothing for the other vCPUs' threads to read
                    lib.baton_ring(finished)  # the caller's thread, asleep in baton_kick_wait

            self._warm_up(frame)
            if before_pause is not None:
                before_pause()
            if job is not None:
                # The head as it is now, packed: inside the pause only what changed
                # since is packed again (state.HeadEncoder).
                self._head.encode(self._collect_head(), versions)
            threads = ffi.new("unsigned long[]", [v.thread_ident for v in self.vcpus])
            # No device takes host input from here on (held in its pipe or tap for
            # whoever runs the guest next): before the stop, not inside the pause.
            self._quiesce_devices()
            t0 = time.monotonic_ns()
            if job is not None:
                for i, v in enumerate(self.vcpus[1:], 1):
                    v.post_save(job + i, go)  # once the pause is sure to come
            self.vcpus[0].post_task(task)
            for v in self.vcpus:
                v.prepare_pause()
            self.state = GuestState.PAUSED
            lib.baton_kick_wait(threads, n, KICK_SIGNAL, finished, 2 * PAUSE_NS)
            try:
                out = done.result(PAUSE_TIMEOUT * 2)
            except MachineError:
                self.state = GuestState.PAUSED
                self.resume()  # not every vCPU stopped: the guest runs on, nothing was sent
                raise
            for v in self.vcpus:
                st[f"stopped{v.index}"] = v.stopped_at_ns
            self.last_pause = {
                "paused_at_ns": t0,
                "stopped_at_ns": min(v.stopped_at_ns for v in self.vcpus),
                "parked_at_ns": out["parked_at_ns"],
                "pause_us": (out["parked_at_ns"] - t0) / 1000,
            }
            return {**self.last_pause, **out}

    def handoff_in(
        self,
        receive: Callable[[], bytes],
        commit_by_ns: int | None,
        before_commit: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        """``receive`` the state and load it; with ``commit_by_ns``, resume right away
        if that instant has not passed (taking the run lease first, at the last
        moment: a worker that dies before it took the lease provably never ran
        the guest, so the old one may take it back)."""
        with self._lock, collector_paused():
            self._check_loadable()
            done: Future[dict[str, Any]] = Future()
            st: dict[str, int] = {}

            def task() -> Callable[[], None] | None:
                try:
                    self._warm_up()  # while the old worker is still pausing
                    blob = receive()
                    received = time.monotonic_ns()
                    size, parts, spent, checked = len(blob), None, 0, False
                    end = state.head_length(blob)
                    if 0 < end == len(blob):
                        # A frame's head alone: checked while the old worker reads
                        # the vCPUs, whose section comes next. Nothing is applied
                        # before both are checked.
                        t = time.monotonic_ns()
                        parts = state.decode_head(blob)
                        st["head_checked"] = t1 = time.monotonic_ns()
                        vcpus = receive()
                        st["vcpus_received"] = t2 = time.monotonic_ns()
                        checked = self._read_vcpus(parts, vcpus)
                        size += len(vcpus)
                        spent = (t1 - t) + (time.monotonic_ns() - t2)
                    elif 0 < end < len(blob) <= state.MAX_STATE:  # a whole frame at once
                        t = time.monotonic_ns()
                        parts = state.decode_head(blob[:end])
                        checked = self._read_vcpus(parts, blob[end:])
                        spent = time.monotonic_ns() - t
                    if commit_by_ns is not None:
                        # They resume as soon as it is loaded: now that the old worker
                        # has sent everything, their spins take no CPU it needs.
                        for v in self.vcpus[1:]:
                            v.expect_resume(awake.RESUME_SPIN_NS)
                    st["expected"] = time.monotonic_ns()
                    loaded = self._load_unlocked(blob, st, parts, spent, checked)
                    result = {**loaded, "received_at_ns": received, "state_size": size}
                    result["stamps"] = st
                    if commit_by_ns is None:
                        done.set_result(result)
                        return None
                    before_commit()
                    if time.monotonic_ns() > commit_by_ns:
                        raise MachineError("state loaded after the commit deadline; not resuming")
                    st["before_commit"] = time.monotonic_ns()
                    self._commit_lease()
                    t0 = time.monotonic_ns()
                    for v in self.vcpus[1:]:
                        v.resume()
                    lease_us = self.lease.last_commit_us if self.lease else 0.0
                    result.update(resume_started_ns=t0, committed=True, lease_us=lease_us)
                    # vCPU 0 enters KVM_RUN from this thread; the reply waits till then.
                    return lambda: done.set_result(result)
                except BaseException as e:
                    done.set_exception(e)
                    return None

            if commit_by_ns is not None:
                # While the old worker warms up and pauses: may we commit at all?
                self._lease_step(RunLease.expect_offer)
                self._offered = True
            elif self._incoming:
                # Supervisor-commit mode: the same question now, so that the resume
                # (the commit, inside the pause) need not ask; if the offer is not
                # there yet, the resume asks again.
                try:
                    self._lease_step(RunLease.expect_offer)
                    self._offered = True
                except MachineError:
                    self._offered = False
            self.vcpus[0].post_task(task)
            out = done.result()
            if not out.get("committed"):
                self.state = GuestState.PAUSED
                return out
            running = self._running_since(out["resume_started_ns"])
            for v in self.vcpus:
                st[f"entered{v.index}"] = v.entered_at_ns
            t0 = time.monotonic_ns()
            self._confirm_commit()
            return {**out, **running, "confirm_us": (time.monotonic_ns() - t0) / 1000}

    # -- teardown and status
    def close(self) -> None:
        """Tear down; slow (tens of ms to close KVM fds), so after the guest runs elsewhere."""
        for v in self.vcpus:
            v.stop()
        self.serial.close()
        for n in self.nets:
            n.close()
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.memory.close()
        self.system.close()

    def status(self) -> dict[str, Any]:
        return {
            "vm": self.spec.name,
            "state": self.state,
            "reason": self.reason,
            "vcpus": len(self.vcpus),
            "ram_size": self.memory.size,
            "tick_ns": self.spec.tick_ns,
            "guest_sha256": self.image.sha256,
            "exits": sum(v.exits_total for v in self.vcpus),
            "console_tx_bytes": self.serial.tx_bytes,
            "console_rx_bytes": self.serial.rx_bytes,
            "disks": [b.save() for b in self.blocks],
            "nets": [n.save() for n in self.nets],
            "last_pause": self.last_pause,
            "last_resume": self.last_resume,
            "last_save": self.last_save,
            "open_fds": fdinfo.open_fd_count(),
            "threads": threading.active_count(),
        }
