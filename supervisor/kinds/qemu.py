"""Stock QEMU as a Baton worker: the same broker, vmctl and live upgrade.

Guest RAM is the broker's memfd, inherited by QEMU and mapped with
``memory-backend-file,mem-path=/proc/self/fd/N,share=on``. The serial
console writes to the broker-held console log (``append=on``: without it
QEMU truncates the file) and reads the broker-held console pipe, attached
over QMP (``chardev-change``) because QEMU 7.2's file chardev takes no input
path on the command line. QMP listens on a socket the supervisor binds and
hands over, so it exists before QEMU starts and a restarted supervisor can
reconnect.

The upgrade is QEMU's own local migration with ``x-ignore-shared`` (RAM is
not copied: only a few hundred KB of ROM blocks move) over a socket pair:
the new QEMU starts with ``-incoming defer -S`` on the old one's exact
machine type; ``return-path`` makes a destination that fails to load show
up as ``failed`` on the source, which then resumes by itself. The new QEMU
runs only after the supervisor commits (``cont``), and serial input moves
to it only then (attached to a QEMU still in ``inmigrate`` it loses a byte).
Measured facts behind each choice: docs/qemu-notes.md.

Devices ride the same fds the broker holds for the VM's life: each NIC is
``virtio-net-pci`` on ``-netdev tap,fd=N`` (the broker's tap; QEMU reads
from the fd whether it carries virtio-net headers), each disk ``virtio-blk-pci``
on ``-add-fd fd=N,set=S`` and ``/dev/fdset/S`` (QEMU dups the broker's file,
never opens the path). A new QEMU inherits the same fds under the same argv
shape; the devices' state rides the migration stream.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import struct
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton import contract, runflag, wire
from baton.contract import ExitMeaning, Hello
from baton.wire import Code, RemoteError
from supervisor import faults, jail, provision
from supervisor.kinds.base import (
    Compatibility,
    InFlight,
    Loaded,
    Preflight,
    Resumed,
    Saved,
    Sent,
    StartRequest,
    Transfer,
    WorkerKind,
)
from supervisor.kinds.qmp import QmpClient, QmpClosed, QmpError, QmpEvent, QmpTimeout
from supervisor.vmconfig import VmConfig
from supervisor.workers import (
    PREPARE_NICE,
    LaunchSpec,
    WorkerHandle,
    abandon,
    launch,
    logs_to,
)

log = logging.getLogger("supervisor.kinds.qemu")

CAPABILITIES = ("x-ignore-shared", "events", "return-path")
#: the fd sets (``-add-fd``) of the console log and the console input; disks use 1..N.
#: QEMU dups from a set (``/dev/fdset/N``) and never reopens a path, so a jailed
#: QEMU, in its own uid, uses the broker's root-owned log file and pipe.
LOG_SET, IN_SET = 1000, 1001
#: what stock QEMU refuses itself (its own seccomp filter, on top of the jail's)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
STATUS = {
    "running": "running",
    "inmigrate": "incoming",
    "prelaunch": "paused",
    "paused": "paused",
    "postmigrate": "paused",
    "finish-migrate": "paused",
    "shutdown": "stopped",
}


class Qmp:
    """A QMP session shared by the supervisor's threads (QmpClient is not thread-safe)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.client = QmpClient.connect(path, timeout=timeout)
        self.lock = threading.Lock()

    def run(self, command: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        with self.lock:
            return self.client.execute(command, arguments, **kw)

    def close(self) -> None:
        self.client.close()


TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_VNET_HDR = 0x4000


def tap_vnet_hdr(fd: int) -> bool:
    """Whether the tap behind ``fd`` was opened with IFF_VNET_HDR; an error if it is
    no tap. (QEMU 7.2 refuses ``vnet_hdr=`` beside ``fd=``: it asks the fd itself.)"""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError as e:
        raise RemoteError(Code.BAD_REQUEST, f"fd {fd} is not a tap: {e.strerror}") from None
    (flags,) = struct.unpack_from("H", ifr, 16)
    if not flags & IFF_TAP:
        raise RemoteError(Code.BAD_REQUEST, f"fd {fd} is a tun, not a tap")
    return bool(flags & IFF_VNET_HDR)


def device_args(
    vm: VmConfig, fds: dict[str, int]
) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """QEMU's options for the VM's NICs and disks on the broker's fds ``fds``
    (by broker name), in config order so that every QEMU of the VM gets the same
    devices at the same PCI addresses. Returns the options and the fd numbers
    used, per NIC and per disk.

    Disks: ``cache=writeback`` honours the guest's flushes with fdatasync and
    needs no O_DIRECT (which QEMU would set on the broker's own open file
    description); ``file.locking=off`` because both QEMUs of an upgrade share
    that description, so OFD locks could not tell them apart: the run lease is
    what keeps two QEMUs from running the guest; ``file.auto-read-only=off`` or
    -drive first asks the fd set for a read-only fd, which it does not hold."""
    args: list[str] = []
    nics: dict[str, int] = {}
    disks: dict[str, int] = {}
    for nic in vm.nets:
        fd = nics[nic.name] = fds[contract.tap_fd(nic.name)]
        args += [
            "-netdev", f"tap,id=netdev-{nic.name},fd={fd}",
            "-device",
            f"virtio-net-pci,id={nic.name},netdev=netdev-{nic.name},mac={nic.mac},romfile=",
        ]  # fmt: skip
    for i, disk in enumerate(vm.disks):
        fd = disks[disk.name] = fds[disk.name]
        ro = ",readonly=on" if disk.read_only else ""
        args += [
            "-add-fd", f"fd={fd},set={i + 1},opaque={disk.name}",
            "-drive",
            f"file=/dev/fdset/{i + 1},format=raw,if=none,id=drive-{disk.name},"
            f"cache=writeback,file.locking=off,file.auto-read-only=off{ro}",
            "-device", f"virtio-blk-pci,id={disk.name},drive=drive-{disk.name},serial={disk.name}",
        ]  # fmt: skip
    return args, nics, disks


def _ns(event: QmpEvent) -> int:
    return int(event.timestamp * 1e9)


@dataclass
class QemuWorker:
    """What the supervisor keeps about one QEMU: the numbers its inherited fds have
    inside it (persisted: QMP commands name the console's; the taps' and disks'
    are what its command line named, per NIC and per disk), its QMP session, and
    for an incoming QEMU our end of the migration socket pair."""

    log_fd: int
    in_fd: int
    mig_fd: int | None = None
    fdsets: bool = True  # the console through fd sets (False: a QEMU started before them)
    nics: dict[str, int] = field(default_factory=dict)  # NIC -> tap fd
    disks: dict[str, int] = field(default_factory=dict)  # disk -> fd (fdset i+1)
    session: Qmp | None = field(default=None, repr=False)
    migration: socket.socket | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        return {
            "log_fd": self.log_fd,
            "in_fd": self.in_fd,
            "mig_fd": self.mig_fd,
            "fdsets": self.fdsets,
            "nics": dict(self.nics),
            "disks": dict(self.disks),
        }

    def close(self) -> None:
        for obj in (self.session, self.migration):
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close()
        self.session = self.migration = None


@dataclass
class Migration(InFlight):
    """What QEMU's events told us about the migration: when the guest stopped."""

    stopped_at_ns: int | None = None
    state_size: int = 0
    flag: int | None = None  # the VM's run flag, fetched before the guest paused

    def close(self) -> None:
        if self.flag is not None:
            os.close(self.flag)
            self.flag = None


class QemuKind(WorkerKind):
    name = "qemu"
    uses_token = False  # QEMU never talks to the broker: we hand it its fds

    def exit_meaning(self, code: int | None) -> ExitMeaning:
        # QEMU exits 0 when the guest powers off
        return ExitMeaning.SHUTDOWN if code == 0 else ExitMeaning.FAILURE

    def provision(self, vm: VmConfig) -> None:
        provision.provision_vm(self.broker, self.paths, vm)  # RAM, console, disks, taps

    # ---------------------------------------------------------------- sessions
    @staticmethod
    def worker(h: WorkerHandle) -> QemuWorker:
        if not isinstance(h.kind_data, QemuWorker):
            raise RemoteError(Code.INVALID_STATE, f"QEMU pid {h.pid}: not started or adopted here")
        return h.kind_data

    def adopt(self, handle: WorkerHandle) -> None:
        rec = handle.recorded_kind_data
        try:
            handle.kind_data = QemuWorker(
                int(rec["log_fd"]),
                int(rec["in_fd"]),
                fdsets=bool(rec.get("fdsets", False)),
                nics={str(k): int(v) for k, v in rec.get("nics", {}).items()},
                disks={str(k): int(v) for k, v in rec.get("disks", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RemoteError(
                Code.BAD_REQUEST, f"QEMU pid {handle.pid}: its record lacks its fd numbers"
            ) from None

    def qmp(self, h: WorkerHandle, timeout: float = 10.0) -> Qmp:
        w = self.worker(h)
        if w.session is None:
            try:
                w.session = Qmp(h.control, timeout)
            except (OSError, QmpClosed, QmpTimeout) as e:
                raise RemoteError(Code.UNAVAILABLE, f"QEMU pid {h.pid}: no QMP: {e}") from None
        return w.session

    def run(
        self, h: WorkerHandle, command: str, args: dict[str, Any] | None = None, **kw: Any
    ) -> Any:
        try:
            return self.qmp(h).run(command, args, **kw)
        except QmpError as e:
            raise RemoteError(Code.IO_ERROR, f"QEMU pid {h.pid}: {e}") from None
        except (QmpClosed, OSError) as e:
            raise RemoteError(Code.UNAVAILABLE, f"QEMU pid {h.pid} is gone: {e}") from None
        except QmpTimeout as e:
            raise RemoteError(Code.TIMEOUT, f"QEMU pid {h.pid}: {e}") from None

    # ------------------------------------------------------------------ start
    def start(self, req: StartRequest) -> WorkerHandle:
        vm, incoming, command, source = req.vm, req.incoming, req.command, req.source
        q = vm.qemu
        binary = list(command) if command else [q["binary"]]
        machine = q["machine"]
        if source is not None:  # the new QEMU must be the old one's exact machine type
            machine = self._machine(source)
        elif req.machine:  # a resume: the machine type the image was saved on
            machine = req.machine
        instance = uuid.uuid4().hex
        log_path = self.paths.worker_log(vm.name)
        cell = jail.prepare(  # None unless this VM is jailed
            self.paths, self.broker, vm, self.name,
            files=[q["kernel"], q["initrd"], *jail.command_files(
                [shutil.which(binary[0]) or binary[0], *binary[1:]]
            )],
            ours=lambda pid: logs_to(pid, log_path), kvm="kvm" in q["accel"],
        )  # fmt: skip
        run_dir = self.paths.vm_run_dir(vm.name)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        qmp_path = Path(self.control_path(vm, instance))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(qmp_path))
        os.chmod(qmp_path, 0o600)
        listener.listen(4)
        device_fds = [*(contract.tap_fd(n.name) for n in vm.nets), *(d.name for d in vm.disks)]
        try:
            fds = self.broker.get(
                vm.name, [contract.RAM, contract.CONSOLE_LOG, contract.CONSOLE_IN, *device_fds]
            )
        except RemoteError as e:
            listener.close()
            raise RemoteError(e.code, f"the broker's fds for {vm.name}: {e.message}") from None
        mig_ours = mig_theirs = None
        if incoming:
            mig_ours, mig_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ram, log, cin = fds[contract.RAM], fds[contract.CONSOLE_LOG], fds[contract.CONSOLE_IN]
        try:
            for nic in vm.nets:  # a clear error here rather than QEMU's
                tap_vnet_hdr(fds[contract.tap_fd(nic.name)])
        except RemoteError:
            listener.close()
            for fd in fds.values():
                os.close(fd)
            raise
        if cell is not None:
            # QEMU 7.2 maps RAM only by path (mem-path; /dev/fdset is not taken there):
            # the memfd becomes the VM uid's own, mode 0600, so the one path QEMU
            # reopens (/proc/self/fd/N, its own fd) is a file of its own uid.
            os.fchown(ram, cell.uid, cell.gid)
            os.fchmod(ram, 0o600)
        devices, nic_fds, disk_fds = device_args(vm, fds)
        argv = [
            *binary,
            "-name", f"{vm.name},debug-threads=on",
            "-uuid", str(uuid.UUID(instance)),
            "-machine", f"{machine},accel={q['accel']},memory-backend=ram0",
            "-m", f"{vm.memory_mib}M",
            "-smp", str(vm.vcpus),
            "-object",
            f"memory-backend-file,id=ram0,size={vm.memory_bytes},"
            f"mem-path=/proc/self/fd/{ram},share=on",
            "-nodefaults", "-display", "none", "-no-user-config",
            "-kernel", q["kernel"], "-append", q["append"],
            *(("-initrd", q["initrd"]) if q["initrd"] else ()),
            "-chardev", f"socket,id=mon0,fd={listener.fileno()},server=on,wait=off",
            "-mon", "chardev=mon0,mode=control",
            "-add-fd", f"fd={log},set={LOG_SET},opaque=console-log",
            "-add-fd", f"fd={cin},set={IN_SET},opaque=console-in",
            "-chardev", f"file,id=c0,path=/dev/fdset/{LOG_SET},append=on",
            "-serial", "chardev:c0",
            *devices,
            *(("-sandbox", SANDBOX) if cell is not None else ()),
            *q["args"],
        ]  # fmt: skip
        pass_fds = [ram, log, cin, *nic_fds.values(), *disk_fds.values(), listener.fileno()]
        # -S always: its vCPUs run only once we hold the run lease for it.
        argv.append("-S")
        if incoming:
            assert mig_theirs is not None
            argv += ["-incoming", "defer"]
            pass_fds.append(mig_theirs.fileno())
        try:
            spec = LaunchSpec(
                vm=vm.name,
                kind=self.name,
                control=str(qmp_path),
                instance=instance,
                token=None,
                log_path=log_path,
                nice=PREPARE_NICE if incoming else 0,
                jail=cell,
            )
            handle = launch(spec, argv, pass_fds=pass_fds)
        except RemoteError:
            if mig_ours is not None:
                mig_ours.close()
            raise
        finally:
            listener.close()
            for fd in fds.values():
                os.close(fd)
            if mig_theirs is not None:
                mig_theirs.close()
        # QEMU inherits each fd under the number it has here.
        handle.kind_data = QemuWorker(
            log_fd=log,
            in_fd=cin,
            mig_fd=pass_fds[-1] if incoming else None,
            nics=nic_fds,
            disks=disk_fds,
            migration=mig_ours,
        )
        try:
            session = self.qmp(handle, req.timeout)
            handle.version = str(session.client.version)
            status = session.run("query-status")["status"]
            expected = "inmigrate" if incoming else "prelaunch"
            if status != expected:
                raise RemoteError(Code.INVALID_STATE, f"QEMU is {status!r}, expected {expected!r}")
            if not incoming:
                self._take_lease(handle)
                self.run(handle, "cont")
                self._attach_input(handle, True)
        except RemoteError as e:
            raise abandon(handle, f"{e.message}; see {self.paths.worker_log(vm.name)}") from None
        return handle

    def _machine(self, h: WorkerHandle) -> str:
        machine: str = self.run(h, "qom-get", {"path": "/machine", "property": "type"})
        return machine.removesuffix("-machine")

    def _take_lease(self, h: WorkerHandle) -> None:
        """QEMU never talks to the broker: the supervisor takes the VM's run lease
        for it (by its pid and start time) before its vCPUs may run."""
        try:
            self.broker.lease_acquire(h.vm, h.instance, pid=h.pid, start_time=h.create_time)
        except wire.WireError as e:
            raise RemoteError(
                Code.UNAVAILABLE, f"the broker cannot grant the run lease: {e}"
            ) from None

    def _attach_input(self, h: WorkerHandle, attached: bool) -> None:
        """Console output always to the log; input from the console pipe only when
        this QEMU runs the guest (two QEMUs reading one pipe lose lines)."""
        w = self.worker(h)
        out, cin = (
            (f"/dev/fdset/{LOG_SET}", f"/dev/fdset/{IN_SET}")
            if w.fdsets
            else (f"/proc/self/fd/{w.log_fd}", f"/proc/self/fd/{w.in_fd}")
        )
        data: dict[str, Any] = {"out": out, "append": True}
        if attached:
            data["in"] = cin
        self.run(h, "chardev-change", {"id": "c0", "backend": {"type": "file", "data": data}})

    def control_path(self, vm: VmConfig, instance: str) -> str:
        return str(self.paths.vm_run_dir(vm.name) / f"qmp.{instance[:12]}.sock")

    def describe(self, handle: WorkerHandle, timeout: float = 10.0) -> Hello:
        status = self.run(handle, "query-status", timeout=timeout)["status"]
        uid = self.run(handle, "query-uuid", timeout=timeout)["UUID"]
        name = self.run(handle, "query-name", timeout=timeout).get("name", "")
        raw = {
            "vm": name.split(",")[0],
            "instance": uid.replace("-", ""),
            "state": STATUS.get(status, status),
            "qemu_status": status,
            "version": self.qmp(handle).client.version,
            "state_versions": {},
        }
        return Hello.parse(raw)

    def status(self, handle: WorkerHandle) -> dict[str, Any]:
        hello = self.describe(handle)
        return {
            "state": hello.state,
            "qemu_status": hello.raw["qemu_status"],
            "qemu_version": hello.version,
            "detail": f"QEMU {hello.raw['qemu_status']}",
        }

    def quit(self, handle: WorkerHandle, timeout: float) -> None:
        with contextlib.suppress(RemoteError):
            self.run(handle, "quit", timeout=timeout)

    # ---------------------------------------------------------------- upgrade
    def check(self, old: WorkerHandle, new: WorkerHandle) -> Compatibility:
        for h in (old, new):
            self.run(h, "migrate-set-capabilities", {
                "capabilities": [{"capability": c, "state": True} for c in CAPABILITIES]
            })  # fmt: skip
        old_status = self.run(old, "query-status")["status"]
        if old_status != "running":
            raise RemoteError(Code.INVALID_STATE, f"the old QEMU is {old_status}")
        self.run(new, "migrate-incoming", {"uri": f"fd:{self.worker(new).mig_fd}"})
        return Compatibility({}, old.version, new.version)

    def preflight(self, old: WorkerHandle, new: WorkerHandle, pf: Preflight) -> None:
        """What QEMU lets us check without migrating: the new QEMU started incoming on
        the old one's machine type (``start`` with ``source``), the migration
        capabilities the upgrade sets, on both. The old QEMU's settings are only
        read; the new one is ended after the check."""
        pf.old_version, pf.new_version = old.version, new.version
        pf.versions = pf.rollback_versions = {}
        old_status = self.run(old, "query-status")["status"]
        if old_status != "running":
            pf.refused = f"the old QEMU is {old_status}"
            return
        new_status = self.run(new, "query-status")["status"]
        if new_status != "inmigrate":
            pf.refused = f"the new QEMU is {new_status!r}, not waiting for a migration"
            return
        types = [
            self.run(h, "qom-get", {"path": "/machine", "property": "type"}) for h in (old, new)
        ]
        if types[0] != types[1]:
            pf.refused = f"machine types differ: old {types[0]}, new {types[1]}"
            return
        have = {c["capability"] for c in self.run(old, "query-migrate-capabilities")}
        missing = [c for c in CAPABILITIES if c not in have]
        if missing:
            pf.refused = f"the old QEMU lacks migration capabilities {missing}"
            return
        try:
            self.run(new, "migrate-set-capabilities", {
                "capabilities": [{"capability": c, "state": True} for c in CAPABILITIES]
            })  # fmt: skip
        except RemoteError as e:
            pf.refused = f"the new QEMU refuses the migration capabilities: {e.message}"
            return
        pf.notes.append(
            f"QEMU {pf.old_version} -> {pf.new_version}, machine type {types[0]}; "
            "QEMU's device state is checked only at migration time (by the new QEMU, "
            "as it loads): this check cannot try it"
        )

    def begin_transfer(self, t: Transfer, timeout_ms: int, commit_by_ns: int | None) -> None:
        """The old QEMU stops reading the console pipe, then migrates over our end of the
        pair. QEMU's migration stops the guest at the end; the supervisor commits."""
        new = self.worker(t.new)
        mig_ours, new.migration = new.migration, None
        if mig_ours is None:
            raise RemoteError(Code.INVALID_STATE, "the new QEMU has no migration channel")
        t.inflight = Migration(flag=self._run_flag(t.new.vm))
        self._attach_input(t.old, False)
        session = self.qmp(t.old)
        with session.lock:
            session.client.clear_events()  # a stale MIGRATION completed from its own arrival
        kill_new = faults.armed("kill-new-qemu-mid-migration")
        # Only ROM blocks travel; no limit. (The test hook slows the stream so that
        # its kill lands inside the migration.)
        bandwidth = 64 * 1024 if kill_new else 1 << 40
        self.run(t.old, "migrate-set-parameters", {"max-bandwidth": bandwidth})
        try:
            self.run(t.old, "getfd", {"fdname": "baton-mig"}, fds=[mig_ours.fileno()])
        finally:
            mig_ours.close()
        self.run(t.old, "migrate", {"uri": "fd:baton-mig"})
        if kill_new:
            t.new.signal(signal.SIGKILL)

    @staticmethod
    def _migration(t: Transfer) -> Migration:
        assert isinstance(t.inflight, Migration), "begin_transfer was not called"
        return t.inflight

    def wait_loaded(self, t: Transfer, timeout_ms: int) -> Loaded:
        session = self.qmp(t.old)
        done = ("completed", "failed", "cancelled")
        try:
            with session.lock:
                event = session.client.wait_event(
                    "MIGRATION", timeout_ms / 1000, match=lambda e: e.data.get("status") in done
                )
        except QmpTimeout:
            with contextlib.suppress(RemoteError):
                self.run(t.old, "migrate_cancel")
            raise RemoteError(
                Code.TIMEOUT, f"the migration did not finish within {timeout_ms} ms"
            ) from None
        except QmpClosed:
            raise RemoteError(Code.UNAVAILABLE, "the old QEMU died during the migration") from None
        if event.data["status"] != "completed":
            info = self.run(t.old, "query-migrate")
            raise RemoteError(
                Code.IO_ERROR, f"migration {event.data['status']}: {info.get('error-desc', '?')}"
            )
        with session.lock:
            stop = next((e for e in session.client.events() if e.name == "STOP"), None)
        m = self._migration(t)
        m.stopped_at_ns = _ns(stop) if stop else _ns(event)
        # No QMP command to the old QEMU here: the guest is paused, and each command
        # wakes its monitor thread for about a millisecond of syscalls (hundreds, each
        # through both seccomp filters when jailed). The size is asked after the resume.
        return Loaded()

    def _run_flag(self, vm: str) -> int | None:
        """The VM's run flag, so that the commit inside QEMU's pause is a ``pwrite``
        (None if the broker cannot give it: the commit then asks the broker)."""
        try:
            return self.broker.lease_flag(vm)
        except (RemoteError, wire.WireError, OSError) as e:
            log.warning("vm %s: no run flag (the commit will ask the broker): %s", vm, e)
            return None

    def resume_new(self, t: Transfer, timeout_ms: int) -> Resumed:
        """The point of no return, on the offer the upgrade made: the run flag names
        the new QEMU (no broker round trip inside the pause), then ``cont``; once it
        runs, the broker is asked to agree (it settles the lease from the flag)."""
        m = t.inflight if isinstance(t.inflight, Migration) else None
        if m is not None and m.flag is not None:
            runflag.write(m.flag, runflag.encode(t.new.instance))
            m.close()
        else:
            self._take_lease(t.new)
        session = self.qmp(t.new)
        self.run(t.new, "cont", timeout=timeout_ms / 1000)
        try:
            with session.lock:
                resume = session.client.wait_event("RESUME", timeout_ms / 1000)
        except (QmpTimeout, QmpClosed) as e:
            raise RemoteError(Code.UNAVAILABLE, f"the new QEMU did not resume: {e}") from None
        if m is not None:
            try:
                self._take_lease(t.new)  # settled from the flag: already ours
            except RemoteError as e:
                with contextlib.suppress(RemoteError):
                    self.run(t.new, "stop")
                raise RemoteError(
                    e.code, f"the broker did not settle the run lease on the new QEMU: {e.message}"
                ) from None
        self._attach_input(t.new, True)
        return Resumed(resumed_at_ns=_ns(resume), clock="realtime")

    def finish_transfer(self, t: Transfer, timeout_ms: int) -> Sent:
        m = t.inflight if isinstance(t.inflight, Migration) else None
        if m is not None:
            m.close()
        if m is None or m.stopped_at_ns is None:
            return Sent()
        with contextlib.suppress(RemoteError):  # the figure only; the guest runs already
            info = self.run(t.old, "query-migrate", timeout=timeout_ms / 1000)
            m.state_size = int(info.get("ram", {}).get("transferred", 0))
        return Sent(
            paused_at_ns=m.stopped_at_ns,
            stopped_at_ns=m.stopped_at_ns,
            state_size=m.state_size,
            clock="realtime",  # QMP event stamps; both sides from the same clock
        )

    def resume_old(self, handle: WorkerHandle, timeout_ms: int) -> None:
        """After a failed migration the old QEMU already runs again (return-path);
        after a completed one it waits in postmigrate for this cont, which it may get
        only while it still holds the run lease (the new QEMU never took it)."""
        self._take_lease(handle)
        self.run(handle, "cont", timeout=timeout_ms / 1000)
        self._attach_input(handle, True)

    # ------------------------------------------------------- suspend to disk
    def _wait_migration(self, h: WorkerHandle, timeout_s: float) -> None:
        """Until QEMU's MIGRATION event says completed; RemoteError if it failed."""
        session = self.qmp(h)
        done = ("completed", "failed", "cancelled")
        try:
            with session.lock:
                event = session.client.wait_event(
                    "MIGRATION", timeout_s, match=lambda e: e.data.get("status") in done
                )
        except QmpTimeout:
            raise RemoteError(Code.TIMEOUT, f"QEMU pid {h.pid}: migration unfinished") from None
        except QmpClosed:
            raise RemoteError(Code.UNAVAILABLE, f"QEMU pid {h.pid} died migrating") from None
        if event.data["status"] != "completed":
            info = self.run(h, "query-migrate")
            raise RemoteError(
                Code.IO_ERROR, f"migration {event.data['status']}: {info.get('error-desc', '?')}"
            )

    def _file_caps(self, h: WorkerHandle) -> None:
        """RAM is shared (the broker's memfd, written by Baton): only the device state
        and the ROMs go into the stream. A file has no return path."""
        self.run(h, "migrate-set-capabilities", {"capabilities": [
            {"capability": c, "state": True} for c in ("x-ignore-shared", "events")
        ]})  # fmt: skip

    def save_paused(self, handle: WorkerHandle) -> Saved:
        """``stop``, then QEMU's own migration into a memfd we read back: the device
        state (QEMU's VMState), with the RAM left out (x-ignore-shared)."""
        status = self.run(handle, "query-status")["status"]
        if status != "running":
            raise RemoteError(Code.INVALID_STATE, f"QEMU is {status}")
        machine = self._machine(handle)
        self._file_caps(handle)
        self.run(handle, "migrate-set-parameters", {"max-bandwidth": 1 << 40})
        self._attach_input(handle, False)
        self.run(handle, "stop")
        fd = os.memfd_create("qemu-state", os.MFD_CLOEXEC)
        try:
            session = self.qmp(handle)
            with session.lock:
                session.client.clear_events()
            self.run(handle, "getfd", {"fdname": "baton-suspend"}, fds=[fd])
            self.run(handle, "migrate", {"uri": "fd:baton-suspend"})
            self._wait_migration(handle, 60)
            size = os.fstat(fd).st_size
            state = os.pread(fd, size, 0)
        except BaseException:
            with contextlib.suppress(RemoteError):
                self.resume_old(handle, 10_000)
            raise
        finally:
            os.close(fd)
        return Saved(state, {}, "qemu", handle.version, machine)

    def load_saved(self, handle: WorkerHandle, state: bytes) -> dict[str, Any]:
        """The incoming QEMU (``-incoming defer -S``) loads the stream from a memfd."""
        self._file_caps(handle)
        fd = os.memfd_create("qemu-state", os.MFD_CLOEXEC)
        try:
            os.write(fd, state)
            os.lseek(fd, 0, os.SEEK_SET)
            session = self.qmp(handle)
            with session.lock:
                session.client.clear_events()
            self.run(handle, "getfd", {"fdname": "baton-resume"}, fds=[fd])
        finally:
            os.close(fd)
        self.run(handle, "migrate-incoming", {"uri": "fd:baton-resume"})
        self._wait_migration(handle, 60)
        return {}

    def run_loaded(self, handle: WorkerHandle, timeout_ms: int) -> Resumed:
        self._take_lease(handle)
        handle.renice(0)
        session = self.qmp(handle)
        self.run(handle, "cont", timeout=timeout_ms / 1000)
        try:
            with session.lock:
                resume = session.client.wait_event("RESUME", timeout_ms / 1000)
        except (QmpTimeout, QmpClosed) as e:
            raise RemoteError(Code.UNAVAILABLE, f"the resumed QEMU did not run: {e}") from None
        self._attach_input(handle, True)
        return Resumed(resumed_at_ns=_ns(resume), clock="realtime")
