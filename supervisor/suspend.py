"""Suspend a VM to disk and resume it, so that it survives a host reboot.

Suspend (the VM's lock held throughout):

1. check the image's file system can take the RAM's populated pages (before
   anything is paused: a refusal changes nothing);
2. the worker pauses the guest and saves its whole versioned device state
   (the same state an upgrade sends);
3. the supervisor fsyncs the VM's disks and writes the image
   (``supervisor.ramimage``: RAM from its own copy of the broker's memfd, only
   the populated pages; the state; the manifest last). A write that fails (a
   full disk) removes the partial image and the guest runs on;
4. the worker quits, the broker drops the VM (RAM, taps, console pipe go);
   the VM is ``suspended``, recorded with its image's directory.

Resume: the image is checked (manifest, state checksum, RAM size, disks,
NICs), the VM's fds are provisioned afresh (the start path's
``provision``), the RAM memfd is filled from the image with every region's
checksum verified, an incoming worker is started and its state versions
checked against the image's, it loads the state, then takes the run lease
and runs (kvmclock is restored with KVM_CLOCK_REALTIME, so the guest's clock
is told about the gap, as after an upgrade's pause). Only then is the image
deleted. Any refusal before the worker runs leaves the image where it was
and the VM ``suspended``.

Why the supervisor writes the RAM, not the worker or the broker: it already
holds a copy of every VM's memfd (``rt.held``); the broker's single thread
must never block on gigabytes of disk I/O; and a worker may be jailed, with
no view of the image directory. The state travels over the worker's control
socket as it does in a preflight.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

from baton import __version__
from baton.contract import RAM, Hello
from baton.wire import Code, RemoteError
from supervisor import faults, ramimage
from supervisor.lifecycle import VmRuntime, VmState
from supervisor.ramimage import ImageError, Manifest
from supervisor.service import Supervisor
from supervisor.vmconfig import VmConfig
from supervisor.workers import WorkerHandle

log = logging.getLogger("supervisor.suspend")
S = VmState
RESUME_TIMEOUT_MS = 10_000


def _mib_s(nbytes: int, seconds: float) -> float | None:
    return round(nbytes / (1 << 20) / seconds, 1) if seconds > 0 else None


class Suspender:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def image_dir(self, name: str, base: str | None) -> Path:
        return (Path(base) if base else self.sup.paths.suspend_dir) / name

    # ------------------------------------------------------------- suspend
    def suspend(self, name: str, directory: str | None = None) -> dict[str, Any]:
        rt = self.sup.get(name)
        with rt.operation("a suspend"):
            return self._suspend_locked(rt, directory)

    def suspend_all(self, directory: str | None = None) -> list[dict[str, Any]]:
        """Every running VM, in name order; one failure does not stop the rest."""
        out = []
        for name in sorted(self.sup.vms):
            rt = self.sup.vms.get(name)
            if rt is None or rt.state is not S.RUNNING:
                continue
            try:
                out.append(self.suspend(name, directory))
            except RemoteError as e:
                out.append({"name": name, "error": e.message, "code": str(e.code)})
        return out

    def _suspend_locked(self, rt: VmRuntime, directory: str | None) -> dict[str, Any]:
        sup, name = self.sup, rt.name
        handle = rt.worker
        if rt.state is not S.RUNNING or handle is None:
            raise RemoteError(
                Code.INVALID_STATE, f"VM {name} is {rt.state}: only a running VM can be suspended"
            )
        memfd = rt.held.get(RAM)
        if memfd is None:
            raise RemoteError(
                Code.INVALID_STATE, f"VM {name}: the supervisor holds no copy of its RAM"
            )
        where = self.image_dir(name, directory)
        kind = sup.kind(rt)
        t0 = time.monotonic()
        try:
            if (where / ramimage.MANIFEST).exists():
                raise ImageError(Code.EXISTS, f"{where} already holds a suspended image")
            ramimage.check_space(where.parent, ramimage.populated_bytes(memfd))
        except ImageError as e:
            raise RemoteError(e.code, f"VM {name}: {e.message}") from None
        faults.fill_disk("suspend", where.parent)
        rt.change_state(S.SUSPENDING)
        rt.image = str(where)  # recorded, so a supervisor that dies now knows (``recover``)
        sup.persist(rt)
        try:
            saved = kind.save_paused(handle)  # the guest is paused from here
        except Exception as e:  # save_paused let the guest run on if it had paused it
            rt.image = None
            rt.change_state(S.RUNNING)
            sup.persist(rt)
            code, msg = (
                (e.code, e.message) if isinstance(e, RemoteError) else (Code.INTERNAL, repr(e))
            )
            raise RemoteError(code, f"VM {name}: cannot save its state: {msg}") from None
        t_saved = time.monotonic()
        meta = {
            "vm": name,
            "baton_version": __version__,
            "worker_kind": saved.worker_kind,
            "worker_version": saved.worker_version,
            "state_versions": saved.versions,
            "disks": [
                {"name": d.name, "path": str(d.path), "read_only": d.read_only}
                for d in rt.config.disks
            ],
            "nets": [{"name": n.name, "mac": n.mac} for n in rt.config.nets],
            "suspended_at": time.time(),
            "machine": saved.machine,
        }
        try:
            self._flush_disks(rt)
            m = ramimage.write_image(where, memfd, saved.state, meta)
        except Exception as e:  # a full disk, or anything else: the guest runs on
            self._abort(rt, handle, where, e)
        t_written = time.monotonic()
        faults.crash_after("suspend-written")
        # The image is whole: from here the guest lives on disk.
        if sup.standby is not None:
            sup.standby.discard(rt)
        rt.last_exit = sup.retire_worker(rt, handle, force=False)
        rt.worker = None
        sup.release_vm(rt)
        rt.image = str(where)
        rt.change_state(S.SUSPENDED, f"suspended to {where}")
        sup.persist(rt)
        t_end = time.monotonic()
        log.info("vm %s: suspended to %s (%d MiB populated)", name, where, m.populated_bytes >> 20)
        return {
            "name": name,
            "state": str(rt.state),
            "image": str(where),
            "ram_size": m.ram_size,
            "populated_bytes": m.populated_bytes,
            "state_bytes": m.state_size,
            "save_ms": round((t_saved - t0) * 1000, 1),
            "write_ms": round((t_written - t_saved) * 1000, 1),
            "total_ms": round((t_end - t0) * 1000, 1),
            "write_mib_s": _mib_s(m.populated_bytes, t_written - t_saved),
        }

    def _flush_disks(self, rt: VmRuntime) -> None:
        """The guest is paused: what it wrote reaches the disks before the image
        that depends on it is declared complete."""
        for d in rt.config.disks:
            fd = rt.held.get(d.name)
            if fd is not None and not d.read_only:
                os.fsync(fd)

    def _abort(self, rt: VmRuntime, handle: WorkerHandle, where: Path, e: Exception) -> None:
        """The image could not be written (it is removed): the guest runs on."""
        ramimage.remove(where)
        rt.image = None
        why = e.message if isinstance(e, ImageError) else f"writing {where}: {e!r:.300}"
        code = Code.QUOTA if getattr(e, "errno", None) == errno.ENOSPC else Code.IO_ERROR
        try:
            self.sup.kind(rt).resume_old(handle, RESUME_TIMEOUT_MS)
        except RemoteError as e2:
            rt.change_state(S.FAILED, f"suspend aborted ({why}) and the guest would not resume")
            self.sup.persist(rt)
            raise RemoteError(
                Code.INTERNAL,
                f"VM {rt.name}: suspend aborted ({why}); resuming the guest failed: {e2.message}",
            ) from None
        rt.change_state(S.RUNNING, "")
        self.sup.persist(rt)
        log.warning("vm %s: suspend aborted, the guest runs on: %s", rt.name, why)
        raise RemoteError(code, f"VM {rt.name}: suspend aborted, the guest runs on: {why}")

    def recover(self) -> dict[str, str]:
        """After a restart (adoption and journal recovery done): settle each suspend
        a previous supervisor left in flight. A live worker still holds the guest
        (journal recovery resumed it if it was paused): the image is stale and goes.
        A dead worker with a whole image (its manifest written): the VM is
        suspended. A dead worker and no manifest: the partial image goes, and the
        VM is the failed one adoption found."""
        out: dict[str, str] = {}
        for rt in list(self.sup.vms.values()):
            with rt.lock:
                if rt.image is None or rt.state is S.SUSPENDED:
                    continue
                where = Path(rt.image)
                if rt.worker is None and (where / ramimage.MANIFEST).exists():
                    self.sup.release_vm(rt)
                    rt.restart_at = None
                    rt.adopted(S.SUSPENDED, f"suspended to {where}")
                    out[rt.name] = "suspended (its worker died after the image was whole)"
                else:
                    ramimage.remove(where)
                    rt.image = None
                    out[rt.name] = f"suspend cut short; {rt.state}"
                self.sup.persist(rt)
                log.info("vm %s: %s", rt.name, out[rt.name])
        return out

    # -------------------------------------------------------------- resume
    def resume(self, name: str) -> dict[str, Any]:
        rt = self.sup.get(name)
        with rt.operation("a resume"):
            return self._resume_locked(rt)

    def resume_all(self, *, autostart_only: bool = False) -> list[dict[str, Any]]:
        """Every suspended VM (``autostart_only``: those configured to autostart,
        which is what a supervisor does as it starts)."""
        out = []
        for name in sorted(self.sup.vms):
            rt = self.sup.vms.get(name)
            if rt is None or rt.state is not S.SUSPENDED:
                continue
            if autostart_only and not rt.config.autostart:
                continue
            try:
                out.append(self.resume(name))
            except RemoteError as e:
                log.error("vm %s: resume failed: %s", name, e.message)
                out.append({"name": name, "error": e.message, "code": str(e.code)})
        return out

    def _resume_locked(self, rt: VmRuntime) -> dict[str, Any]:
        sup, name, cfg = self.sup, rt.name, rt.config
        if rt.state is not S.SUSPENDED or rt.image is None:
            raise RemoteError(Code.INVALID_STATE, f"VM {name} is {rt.state}, not suspended")
        where = Path(rt.image)
        kept = f"the image in {where} is kept and the VM stays suspended"
        t0 = time.monotonic()
        try:
            m, state = ramimage.read_image(where)
            _matches(cfg, m)
        except ImageError as e:
            raise RemoteError(e.code, f"VM {name}: image refused: {e.message}; {kept}") from None
        sup.check_memory(rt)
        rt.change_state(S.RESUMING)
        kind = sup.kind(rt)
        handle: WorkerHandle | None = None
        step = "provision"
        try:
            kind.provision(cfg)
            sup.hold_fds(rt)
            step = "fill RAM"
            t_fill = time.monotonic()
            ramimage.read_ram(where / ramimage.RAM_FILE, rt.held[RAM], m)
            t_filled = time.monotonic()
            step = "start the worker"
            handle = sup.start_incoming(rt, "resume", machine=m.machine or None)
            step = "load the state"
            _versions_readable(kind.describe(handle), m)
            loaded = kind.load_saved(handle, state)
        except (RemoteError, ImageError, OSError) as e:
            msg = e.message if isinstance(e, RemoteError | ImageError) else str(e)
            code = e.code if isinstance(e, RemoteError | ImageError) else Code.IO_ERROR
            self._undo(rt, handle)
            rt.change_state(S.SUSPENDED, f"resume refused ({step}): {msg}")
            sup.persist(rt)
            raise RemoteError(code, f"VM {name}: resume refused ({step}): {msg}; {kept}") from None
        try:
            kind.run_loaded(handle, RESUME_TIMEOUT_MS)
        except RemoteError as e:
            self._failed_run(rt, handle, where, e)
        rt.worker = handle
        sup.watch(handle)
        rt.image = None
        rt.change_state(S.RUNNING, "")
        sup.persist(rt)
        ramimage.remove(where)  # the guest has run on: the image is out of date
        t_end = time.monotonic()
        log.info("vm %s: resumed from %s (pid %d)", name, where, handle.pid)
        return {
            "name": name,
            "state": str(rt.state),
            "pid": handle.pid,
            "worker_version": handle.version,
            "image": str(where),
            "populated_bytes": m.populated_bytes,
            "suspended_s": round(time.time() - m.suspended_at, 3),
            "fill_ms": round((t_filled - t_fill) * 1000, 1),
            "fill_mib_s": _mib_s(m.populated_bytes, t_filled - t_fill),
            "total_ms": round((t_end - t0) * 1000, 1),
            "tsc_rebased": loaded.get("tsc_rebased"),
            "tsc_shift_us": loaded.get("tsc_shift_us"),
        }

    def _undo(self, rt: VmRuntime, handle: WorkerHandle | None) -> None:
        """A resume refused before any vCPU ran: nothing it made is left behind."""
        if handle is not None and not self.sup.kill_confirmed(rt, handle):
            log.error("vm %s: pid %d would not die", rt.name, handle.pid)
        self.sup.release_vm(rt)

    def _failed_run(self, rt: VmRuntime, handle: WorkerHandle, where: Path, e: RemoteError) -> None:
        """The worker was told to run and said no, or nothing. If it took the run
        lease the guest may have run on, and the image must never be resumed over
        that: the VM is failed and the image removed. If it never did, the image
        is as good as before: the VM stays suspended."""
        ran = True
        with contextlib.suppress(RemoteError):
            st = self.sup.broker.lease_status(rt.name)
            holder = st.get("holder") or {}
            ran = holder.get("instance") == handle.instance or handle.instance in st.get("past", [])
        self._undo(rt, handle)
        if ran:
            ramimage.remove(where)
            rt.image = None
            rt.change_state(S.FAILED, f"resumed worker failed after it ran: {e.message}")
        else:
            rt.change_state(S.SUSPENDED, f"resume refused (run): {e.message}")
        self.sup.persist(rt)
        raise RemoteError(e.code, f"VM {rt.name}: resume failed: {e.message} ({rt.state})")


def _matches(cfg: VmConfig, m: Manifest) -> None:
    """The image is for this VM as configured now: name, RAM size, disks, NICs."""
    if m.vm != cfg.name:
        raise ImageError(Code.CONFLICT, f"the image is VM {m.vm!r}'s, not {cfg.name!r}'s")
    if m.ram_size != cfg.memory_bytes:
        raise ImageError(
            Code.INCOMPATIBLE,
            f"wrong RAM size: the image holds {m.ram_size >> 20} MiB, {cfg.source} says "
            f"memory_mib = {cfg.memory_mib}",
        )
    disks = [(d.name, str(d.path)) for d in cfg.disks]
    if [(d.get("name"), d.get("path")) for d in m.disks] != disks:
        raise ImageError(Code.INCOMPATIBLE, f"the image's disks {m.disks} are not {disks}")
    nets = [(n.name, n.mac) for n in cfg.nets]
    if [(n.get("name"), n.get("mac")) for n in m.nets] != nets:
        raise ImageError(Code.INCOMPATIBLE, f"the image's NICs {m.nets} are not {nets}")


def _versions_readable(hello: Hello, m: Manifest) -> None:
    """Every component the image holds at a version this worker reads, and every
    component this worker needs present."""
    for comp in sorted(set(hello.state_versions) | set(m.state_versions)):
        rng, v = hello.state_versions.get(comp), m.state_versions.get(comp)
        if v is None:
            raise ImageError(Code.INCOMPATIBLE, f"the image has no {comp!r} state")
        if rng is None or not rng[0] <= v <= rng[1]:
            reads = f"reads {rng[0]}..{rng[1]}" if rng else "does not know it"
            raise ImageError(
                Code.INCOMPATIBLE,
                f"unknown state version: {comp!r} is version {v} in the image, worker "
                f"{hello.version} {reads}",
            )
