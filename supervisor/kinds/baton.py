"""baton-vmm workers: a control socket, versioned msgpack state, a socket pair.

The supervisor knows baton-vmm only through ``baton.contract``: its command
line, its fd names, its exit statuses and what its ``hello`` says. Whether
two workers can hand off is decided by what each one advertises, never by
the supervisor's own copy of ``vmm`` (which it does not import).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from baton import contract, wire
from baton.contract import ContractError, ExitMeaning, GuestState, Hello, WorkerArgs
from baton.rpc import Peer
from baton.trace import mark
from baton.wire import Code, RemoteError
from supervisor import jail, provision
from supervisor.aside import Aside
from supervisor.jail import cgwarm
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
from supervisor.vmconfig import VmConfig
from supervisor.workers import (
    PREPARE_NICE,
    LaunchSpec,
    WorkerHandle,
    logs_to,
    spawn,
)
from supervisor.zygote import ZygotePool

#: how old a new worker's hello from its start may be for the upgrade's check to reuse it
FRESH_HELLO_S = 1.0
#: "0" in the supervisor's environment: every new worker's hello asked over its
#: control socket, none said with its ready word (the A/B switch)
READY_HELLO = os.environ.get("BATON_READY_HELLO_AB", "1") != "0"
#: "0" in the supervisor's environment: the old worker's hello asked in ``check``
#: only, after the new one's (the A/B switch)
EARLY_HELLO_ENV = "BATON_EARLY_HELLO"


@dataclass
class Handoff(InFlight):
    """The two requests of one handoff, whose replies come later."""

    receive: int | None = None  # request id on the new worker's connection
    send: int | None = None  # request id on the old worker's connection
    #: the old worker's end of the pair, until ``handoff.send`` takes it
    channel: socket.socket | None = None

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


class BatonKind(WorkerKind):
    name = "baton"
    commits_itself = True
    #: where workers are forked from (``supervisor.zygote``), set by the daemon;
    #: None: every worker is exec'd
    zygotes: ZygotePool | None = None

    @functools.cached_property
    def _fresh(self) -> dict[int, tuple[float, Hello]]:
        """pid -> (monotonic time, hello) of the workers ``start`` just saw answer."""
        return {}

    @functools.cached_property
    def _source_hello(self) -> dict[int, tuple[float, str, Aside[Hello]]]:
        """pid -> (monotonic time, instance, its hello being asked) of the worker an incoming one
        started to take over from (``StartRequest.source``), for ``check``."""
        return {}

    def provision(self, vm: VmConfig) -> None:
        provision.provision_vm(self.broker, self.paths, vm)

    def args(self, vm: VmConfig, incoming: bool, instance: str, control: str) -> WorkerArgs:
        return WorkerArgs(
            root=self.paths.root,
            vm=vm.name,
            incoming=incoming,
            vcpus=vm.vcpus,
            tick_ms=vm.tick_ms,
            instance=instance,
            control=control,
            guest=vm.guest,
            disks=[contract.DiskArg(d.name, d.read_only) for d in vm.disks],
            nets=[contract.NicArg(n.name, n.mac) for n in vm.nets],
        )

    def exit_meaning(self, code: int | None) -> ExitMeaning:
        return contract.baton_exit_meaning(code)

    def start(self, req: StartRequest) -> WorkerHandle:
        vm = req.vm
        instance = uuid.uuid4().hex
        control = self.control_path(vm, instance)
        log_path = self.paths.worker_log(vm.name)
        command = req.command or vm.worker
        env = {contract.READY_HELLO_ENV: "1"} if READY_HELLO else {}
        if req.merge_idle:
            env[contract.IDLE_MERGE_ENV] = "1"
        # the worker's cgroup join then finds the kernel's grace period passed
        with cgwarm.warmed(jail.jailed(self.paths, vm.raw)):
            cell = jail.prepare(  # None unless this VM is jailed
                self.paths, self.broker, vm, self.name,
                files=[str(vm.guest or ""), *jail.command_files(command)],
                ours=lambda pid: logs_to(pid, log_path),
                env=env,
            )  # fmt: skip
            mark("S.jail_prepared")
            try:
                token = req.the_token()  # minted meanwhile (``start_incoming``)
            except BaseException:
                if cell is not None:
                    cell.close()
                raise
            args = self.args(vm, req.incoming, instance, control)
            if cell is not None:
                args = dataclasses.replace(args, kvm_fd=cell.kvm_fd)
            spec = LaunchSpec(
                vm=vm.name,
                kind=self.name,
                control=control,
                instance=instance,
                token=token,
                log_path=log_path,
                nice=PREPARE_NICE if req.incoming else 0,
                jail=cell,
                env=env,
            )
            source = req.source

            def ask_source() -> None:
                """The old worker's hello for ``check``, asked once the new worker's
                start has left (its thread would otherwise hold the GIL the request
                needs): its round trip (the old worker's control thread wakes from
                sleep) then overlaps the build and adds nothing after the ready word."""
                if source is not None and os.environ.get(EARLY_HELLO_ENV, "1") != "0":
                    asked = Aside(lambda: self.describe(source))
                    self._source_hello[source.pid] = (time.monotonic(), source.instance, asked)

            try:
                pool = self.zygotes
                zygote = (lambda: pool.get(command)) if pool is not None else None
                handle = spawn(
                    spec, args, command, timeout=req.timeout, zygote=zygote, on_sent=ask_source
                )
            finally:
                if cell is not None:
                    cell.close()
        try:
            hello = self._ready_hello(handle) or self.describe(handle)
            if hello.instance != instance or hello.vm != vm.name:
                raise RemoteError(
                    Code.CONFLICT, "the worker that answered is not the one we started"
                )
        except BaseException:
            handle.kill_and_reap()
            raise
        mark("S.hello")
        handle.version = hello.version
        now = time.monotonic()
        for pid, (at, _) in list(self._fresh.items()):  # never checked (a boot, a standby)
            if now - at >= FRESH_HELLO_S:
                self._fresh.pop(pid, None)
        self._fresh[handle.pid] = (now, hello)
        return handle

    def _ready_hello(self, handle: WorkerHandle) -> Hello | None:
        """The hello the worker said with its ready word (``contract.READY_HELLO_ENV``),
        or None (a worker from before it: ask). Its control socket is connected now
        and must be the worker's own (SO_PEERCRED: the listening process), which is
        what a hello asked over it would have shown."""
        if not handle.ready_detail:
            return None
        try:
            hello = Hello.parse(json.loads(handle.ready_detail))
        except (ValueError, ContractError) as e:
            raise RemoteError(
                Code.BAD_REQUEST, f"worker {handle.pid}: its ready word: {e}"
            ) from None
        peer = Peer.of(handle.conn.sock)
        if peer.pid != handle.pid:
            raise RemoteError(
                Code.CONFLICT,
                f"the control socket {handle.control} is pid {peer.pid}'s, not the worker's",
            )
        return hello

    def control_path(self, vm: VmConfig, instance: str) -> str:
        return str(self.paths.vm_run_dir(vm.name) / f"worker.{instance[:12]}.sock")

    def describe(self, handle: WorkerHandle, timeout: float = 10.0) -> Hello:
        try:
            return Hello.parse(handle.call("hello", timeout=timeout))
        except ContractError as e:
            raise RemoteError(Code.BAD_REQUEST, f"worker {handle.pid}: {e}") from None

    def status(self, handle: WorkerHandle) -> dict[str, Any]:
        st: dict[str, Any] = handle.call("status", timeout=5)
        out = st.get("console_tx_bytes")
        if out is not None:
            st["detail"] = f"{out} console bytes out"
        return st

    def quit(self, handle: WorkerHandle, timeout: float) -> None:
        handle.call("quit", timeout=timeout)

    # -- live upgrade
    def _hello_of_new(self, new: WorkerHandle) -> Hello:
        """The incoming worker's hello: the one its start just read when that is under
        ``FRESH_HELLO_S`` old (a cold prepare: nothing else has talked to it since),
        else asked again (a standby, started long before)."""
        at, hello = self._fresh.pop(new.pid, (0.0, None))
        fresh = time.monotonic() - at < FRESH_HELLO_S
        if hello is not None and fresh and hello.instance == new.instance:
            return hello
        return self.describe(new)

    def _hello_of_old(self, old: WorkerHandle) -> Hello:
        """The old worker's hello: the one asked while the new worker's start read its
        own (``start``) under ``FRESH_HELLO_S`` ago, else asked now."""
        at, instance, asked = self._source_hello.pop(old.pid, (0.0, None, None))
        fresh = time.monotonic() - at < FRESH_HELLO_S
        if asked is not None and fresh and instance == old.instance:
            return asked.result()
        return self.describe(old)

    def check(self, old: WorkerHandle, new: WorkerHandle) -> Compatibility:
        new_hello, old_hello = self._hello_of_new(new), self._hello_of_old(old)
        if old_hello.state != GuestState.RUNNING:
            raise RemoteError(Code.INVALID_STATE, f"the old worker's guest is {old_hello.state}")
        if new_hello.state != GuestState.INCOMING:
            raise RemoteError(
                Code.INVALID_STATE, f"the new worker is {new_hello.state}, not incoming"
            )
        try:
            versions = contract.negotiate(old_hello.state_versions, new_hello.state_versions)
        except contract.IncompatibleVersions as e:
            raise RemoteError(Code.INCOMPATIBLE, str(e)) from None
        return Compatibility(
            versions,
            old_hello.version,
            new_hello.version,
            prewake=contract.prewake_between(old_hello, new_hello),
            frame=contract.frame_between(old_hello, new_hello),
        )

    def preflight(self, old: WorkerHandle, new: WorkerHandle, pf: Preflight) -> None:
        """Negotiate both ways; the old worker builds the state it would send
        (``state.preview``: the guest runs on), the new one decodes and
        cross-checks it (``state.validate``: nothing applied)."""
        old_hello, new_hello = self.describe(old), self.describe(new)
        pf.old_version, pf.new_version = old_hello.version, new_hello.version
        if old_hello.state != GuestState.RUNNING:
            pf.refused = f"the old worker's guest is {old_hello.state}"
            return
        if new_hello.state != GuestState.INCOMING:
            pf.refused = f"the new worker is {new_hello.state}, not incoming"
            return
        try:
            pf.rollback_versions = contract.negotiate(
                new_hello.state_versions, old_hello.state_versions, names=("new", "old")
            )
        except contract.IncompatibleVersions as e:
            pf.rollback_reason = str(e)
        try:
            pf.versions = contract.negotiate(old_hello.state_versions, new_hello.state_versions)
        except contract.IncompatibleVersions as e:
            pf.refused = f"incompatible state versions: {e}"
            return
        preview = old.call("state.preview", {"versions": pf.versions}, timeout=30)
        pf.state_bytes, pf.preview_us = int(preview["size"]), preview.get("preview_us")
        pf.notes.append(
            f"state built while the guest ran: {', '.join(preview.get('live', []))} live; "
            f"{', '.join(preview.get('rehearsed', []))} from the old worker's rehearsal "
            "(vCPU registers are read only inside a pause)"
        )
        try:
            checked = new.call("state.validate", {"state": preview["state"]}, timeout=30)
        except RemoteError as e:
            pf.refused = f"the new worker refused the state: {e.message}"
            return
        pf.validate_us = checked.get("validate_us")

    def ready_receiver(self, t: Transfer, timeout_ms: int, commit_by_ns: int | None) -> None:
        """The new worker's request goes out first: it asks the broker about the lease
        offer and warms up while the supervisor journals the transfer; its reply is
        awaited later (``wait_loaded``)."""
        a, b = wire.make_seqpacket_pair()
        handoff = Handoff(channel=a)
        t.inflight = handoff
        args: dict[str, Any] = {"timeout_ms": timeout_ms}
        if commit_by_ns is not None:
            args["commit_by_ns"] = commit_by_ns
        if t.prewake:
            args["prewake"] = True
        try:
            handoff.receive = t.new.conn.send_request("handoff.receive", args, [b.fileno()])
        except wire.WireError as e:
            raise RemoteError(Code.UNAVAILABLE, f"a worker went away: {e}") from None
        finally:
            b.close()

    def begin_transfer(self, t: Transfer, timeout_ms: int, commit_by_ns: int | None) -> None:
        """The old worker pauses and sends on the pair the new one waits on (asked
        here, unless ``ready_receiver`` asked already). No reply is awaited here."""
        if not isinstance(t.inflight, Handoff):
            self.ready_receiver(t, timeout_ms, commit_by_ns)
        handoff = self._handoff(t)
        assert handoff.channel is not None, "the handoff was begun twice"
        send: dict[str, Any] = {"versions": t.versions}
        if t.prewake:
            send["prewake"] = True
        if t.frame:
            send["frame"] = True
        try:
            handoff.send = t.old.conn.send_request("handoff.send", send, [handoff.channel.fileno()])
        except wire.WireError as e:
            raise RemoteError(Code.UNAVAILABLE, f"a worker went away: {e}") from None
        finally:
            handoff.close()

    @staticmethod
    def _handoff(t: Transfer) -> Handoff:
        assert isinstance(t.inflight, Handoff), "begin_transfer was not called"
        return t.inflight

    def wait_loaded(self, t: Transfer, timeout_ms: int) -> Loaded:
        handoff = self._handoff(t)
        rid, handoff.receive = handoff.receive, None
        if rid is None:
            raise RemoteError(Code.INVALID_STATE, "no handoff is waiting for the new worker")
        try:
            reply = t.new.conn.wait_reply(rid, timeout=timeout_ms / 1000).result
        except wire.WireTimeout:
            raise RemoteError(
                Code.TIMEOUT, f"the new worker did not load the state within {timeout_ms} ms"
            ) from None
        except wire.ConnectionClosed:
            raise RemoteError(
                Code.UNAVAILABLE, "the new worker died while loading the state"
            ) from None
        return Loaded.from_reply(reply)

    def resume_new(self, t: Transfer, timeout_ms: int) -> Resumed:
        return Resumed.from_reply(t.new.call("resume", timeout=timeout_ms / 1000))

    def finish_transfer(self, t: Transfer, timeout_ms: int) -> Sent:
        handoff = t.inflight if isinstance(t.inflight, Handoff) else None
        rid = handoff.send if handoff else None
        if handoff is None or rid is None:
            return Sent()
        handoff.send = None
        try:
            return Sent.from_reply(t.old.conn.wait_reply(rid, timeout=timeout_ms / 1000).result)
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

    # -- suspend to disk
    def save_paused(self, handle: WorkerHandle) -> Saved:
        """``pause`` then ``save`` at each component's newest version (what a worker
        of this version reads back; a newer one reads it too)."""
        hello = self.describe(handle)
        if hello.state != GuestState.RUNNING:
            raise RemoteError(Code.INVALID_STATE, f"the worker's guest is {hello.state}")
        versions = {name: hi for name, (_lo, hi) in hello.state_versions.items()}
        handle.call("pause", timeout=10)
        try:
            saved = handle.call("save", {"versions": versions}, timeout=30)
        except BaseException:
            self.resume_old(handle, 10_000)
            raise
        kind = str(hello.raw.get("kind", "baton-vmm"))
        return Saved(bytes(saved["state"]), versions, kind, hello.version)

    def load_saved(self, handle: WorkerHandle, state: bytes) -> dict[str, Any]:
        hello = self.describe(handle)
        if hello.state != GuestState.INCOMING:
            raise RemoteError(Code.INVALID_STATE, f"the new worker is {hello.state}, not incoming")
        # The host may have rebooted since the save (its TSC started again), and no
        # worker hands the guest over: the new one takes the lease as at boot.
        loaded: dict[str, Any] = handle.call(
            "load", {"state": state, "from_image": True}, timeout=30
        )
        return loaded

    def run_loaded(self, handle: WorkerHandle, timeout_ms: int) -> Resumed:
        handle.renice(0)  # started at nice 10 like every incoming worker
        return Resumed.from_reply(handle.call("resume", timeout=timeout_ms / 1000))
