"""Kinds of worker the supervisor can run, behind one interface.

The supervisor's lifecycle and upgrade transaction never look at what a
worker is; a kind says how to provision its fds, how to start it, and how to
move a running guest from one instance to the next:

    check(old, new)        can ``old`` hand its guest to ``new``? (before any pause)
    begin_transfer(...)    pause the old worker, stream its state to the new one
    wait_loaded(...)       until the new worker holds the state (it must not run yet)
    resume_new / resume_old  commit or roll back
    finish_transfer(...)   the old side's figures (pause time, state size)
"""

from __future__ import annotations

import os
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from baton import wire
from baton.paths import Paths
from baton.wire import Code, RemoteError
from broker.client import BrokerClient
from supervisor import provision
from supervisor.vmconfig import VmConfig
from supervisor.workers import PREPARE_NICE, WorkerHandle, spawn


@dataclass
class Transfer:
    """One in-flight handoff between two workers."""

    old: WorkerHandle
    new: WorkerHandle
    versions: dict[str, int] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)
    run_flag: int | None = None  # the VM's run-flag memfd (the supervisor's copy)


def mark_run(run_flag: int | None, instance: str) -> None:
    """Record in the run flag that worker ``instance`` may now run the guest."""
    if run_flag is not None:
        os.pwrite(run_flag, instance.encode().ljust(64, b"\0"), 0)


class WorkerKind(ABC):
    name: str
    uses_token = True  # does the worker talk to the broker itself?

    def __init__(self, paths: Paths, broker: BrokerClient) -> None:
        self.paths = paths
        self.broker = broker

    @abstractmethod
    def exit_kind(self, code: int | None) -> str:
        """What a worker's exit status means: reset, shutdown, clean or failure."""

    @abstractmethod
    def provision(self, broker: BrokerClient, vm: VmConfig) -> None: ...

    @abstractmethod
    def start(
        self,
        vm: VmConfig,
        *,
        incoming: bool,
        token: str | None,
        timeout: float,
        command: list[str] | None = None,
    ) -> WorkerHandle: ...

    @abstractmethod
    def describe(self, handle: WorkerHandle) -> dict[str, Any]:
        """hello-level facts: version, guest state, state versions."""

    @abstractmethod
    def status(self, handle: WorkerHandle) -> dict[str, Any]: ...

    @abstractmethod
    def quit(self, handle: WorkerHandle, timeout: float) -> None: ...

    # -- live upgrade
    @abstractmethod
    def check(self, old: WorkerHandle, new: WorkerHandle) -> dict[str, Any]: ...

    @abstractmethod
    def begin_transfer(self, t: Transfer, timeout_ms: int, commit_by_ns: int | None) -> None:
        """Start the handoff. With ``commit_by_ns`` the new worker resumes the guest
        itself if it has loaded the state by then (its reply then says committed)."""

    @abstractmethod
    def wait_loaded(self, t: Transfer, timeout_ms: int) -> dict[str, Any]: ...

    @abstractmethod
    def resume_new(self, t: Transfer, timeout_ms: int) -> dict[str, Any]: ...

    @abstractmethod
    def finish_transfer(self, t: Transfer, timeout_ms: int) -> dict[str, Any]: ...

    @abstractmethod
    def resume_old(self, handle: WorkerHandle, timeout_ms: int) -> None: ...


class BatonKind(WorkerKind):
    """baton-vmm workers: a control socket, versioned msgpack state, a socket pair."""

    name = "baton"

    def provision(self, broker: BrokerClient, vm: VmConfig) -> None:
        disks = [
            provision.DiskImage(d.name, d.path, d.size_mib << 20, d.read_only) for d in vm.disks
        ]
        provision.provision(broker, self.paths, vm.name, vm.memory_bytes, disks)

    def argv(
        self, vm: VmConfig, command: list[str] | None, incoming: bool, instance: str, control: str
    ) -> list[str]:
        argv = [*(command or vm.worker), "--root", str(self.paths.root), "--vm", vm.name]
        argv += ["--incoming" if incoming else "--boot", "--vcpus", str(vm.vcpus)]
        argv += ["--tick-ms", str(vm.tick_ms), "--instance", instance, "--control", control]
        if vm.guest is not None:
            argv += ["--guest", str(vm.guest)]
        for d in vm.disks:
            argv += ["--disk", f"{d.name}:{'ro' if d.read_only else 'rw'}"]
        return argv

    def exit_kind(self, code: int | None) -> str:
        return {0: "clean", 3: "reset", 6: "shutdown"}.get(code, "failure")  # vmm/worker.py

    def start(
        self,
        vm: VmConfig,
        *,
        incoming: bool,
        token: str | None,
        timeout: float,
        command: list[str] | None = None,
        source: WorkerHandle | None = None,
    ) -> WorkerHandle:
        instance = uuid.uuid4().hex
        control = str(self.paths.vm_run_dir(vm.name) / f"worker.{instance[:12]}.sock")
        handle = spawn(
            vm.name,
            self.name,
            self.argv(vm, command, incoming, instance, control),
            control=control,
            instance=instance,
            token=token,
            log_path=self.paths.worker_log(vm.name),
            timeout=timeout,
            nice=PREPARE_NICE if incoming else 0,
        )
        try:
            hello = handle.call("hello", timeout=10)
        except RemoteError:
            handle.expected_exit = True
            handle.kill()
            handle.reap()
            handle.close()
            raise
        if hello.get("instance") != instance or hello.get("vm") != vm.name:
            handle.expected_exit = True
            handle.kill()
            handle.reap()
            handle.close()
            raise RemoteError(Code.CONFLICT, "the worker that answered is not the one we started")
        handle.version = str(hello.get("version", ""))
        return handle

    def describe(self, handle: WorkerHandle) -> dict[str, Any]:
        return handle.call("hello", timeout=5)

    def status(self, handle: WorkerHandle) -> dict[str, Any]:
        return handle.call("status", timeout=5)

    def quit(self, handle: WorkerHandle, timeout: float) -> None:
        handle.call("quit", timeout=timeout)

    # -- live upgrade
    def check(self, old: WorkerHandle, new: WorkerHandle) -> dict[str, Any]:
        from vmm.state import IncompatibleState, negotiate

        old_hello = old.call("hello", timeout=5)
        new_hello = new.call("hello", timeout=5)
        if old_hello.get("state") != "running":
            raise RemoteError(
                Code.INVALID_STATE, f"the old worker's guest is {old_hello.get('state')}"
            )
        if new_hello.get("state") != "incoming":
            raise RemoteError(
                Code.INVALID_STATE, f"the new worker is {new_hello.get('state')}, not incoming"
            )
        try:
            versions = negotiate(
                old_hello.get("state_versions", {}), new_hello.get("state_versions", {})
            )
        except IncompatibleState as e:
            raise RemoteError(Code.INCOMPATIBLE, str(e)) from None
        return {
            "versions": versions,
            "old_version": old_hello.get("version"),
            "new_version": new_hello.get("version"),
        }

    def begin_transfer(self, t: Transfer, timeout_ms: int, commit_by_ns: int | None) -> None:
        """Both requests go out at once: the new worker waits on the pair, the old one
        pauses and sends. Neither reply is awaited here."""
        a, b = wire.make_seqpacket_pair()
        args: dict[str, Any] = {"timeout_ms": timeout_ms}
        if commit_by_ns is not None:
            args["commit_by_ns"] = commit_by_ns
        try:
            t.pending["receive"] = t.new.conn.send_request("handoff.receive", args, [b.fileno()])
            t.pending["send"] = t.old.conn.send_request(
                "handoff.send", {"versions": t.versions}, [a.fileno()]
            )
        except wire.WireError as e:
            raise RemoteError(Code.UNAVAILABLE, f"a worker went away: {e}") from None
        finally:
            a.close()
            b.close()

    def wait_loaded(self, t: Transfer, timeout_ms: int) -> dict[str, Any]:
        try:
            return t.new.conn.wait_reply(t.pending.pop("receive"), timeout=timeout_ms / 1000).result
        except wire.WireTimeout:
            raise RemoteError(
                Code.TIMEOUT, f"the new worker did not load the state within {timeout_ms} ms"
            ) from None
        except wire.ConnectionClosed:
            raise RemoteError(
                Code.UNAVAILABLE, "the new worker died while loading the state"
            ) from None

    def resume_new(self, t: Transfer, timeout_ms: int) -> dict[str, Any]:
        return t.new.call("resume", timeout=timeout_ms / 1000)

    def finish_transfer(self, t: Transfer, timeout_ms: int) -> dict[str, Any]:
        rid = t.pending.pop("send", None)
        if rid is None:
            return {}
        try:
            return t.old.conn.wait_reply(rid, timeout=timeout_ms / 1000).result
        except wire.WireTimeout:
            t.old.drop_conn()
            raise RemoteError(
                Code.TIMEOUT, f"the old worker did not finish its send within {timeout_ms} ms"
            ) from None
        except wire.ConnectionClosed:
            t.old.drop_conn()
            raise RemoteError(Code.UNAVAILABLE, "the old worker died during the handoff") from None

    def resume_old(self, handle: WorkerHandle, timeout_ms: int) -> None:
        try:
            handle.call("resume", timeout=timeout_ms / 1000)
        except RemoteError as e:
            if e.code != Code.INVALID_STATE or "running" not in e.message:
                raise  # "cannot resume a machine that is running" means it never paused


def kinds(paths: Paths, broker: BrokerClient) -> dict[str, WorkerKind]:
    from supervisor.qemu import QemuKind

    return {"baton": BatonKind(paths, broker), "qemu": QemuKind(paths, broker)}
