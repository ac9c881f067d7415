"""baton-vmm: one worker process runs one VM.

What must outlive the worker (RAM, console and disk fds) comes from the
broker; the worker builds its KVM VM around them, then either boots the
guest (``--boot``) or waits for a state to load (``--incoming``, the new
side of a live upgrade). Control socket: ``--control``, by default
``DIR/run/baton/vm/NAME/worker.PID.sock``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import select
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from baton import codestamp, logs, wire
from baton.contract import (
    RAM,
    READY_HELLO_ENV,
    WORKER_OPTIONAL_FDS,
    DiskArg,
    NicArg,
    WorkerExit,
    tap_fd,
)
from baton.daemonize import Readiness
from baton.paths import Paths, add_root_argument, paths_from_args
from baton.rpc import Dispatcher, Peer, ThreadedServer
from baton.schema import NAME_PATTERN
from baton.trace import mark
from broker.client import BrokerClient
from vmm import faults, idle_merge, kvm
from vmm.control import Control, WorkerInfo
from vmm.kvm import KvmUnavailable
from vmm.lease import RunLease
from vmm.machine import Machine, MachineError, MachineSpec
from vmm.vcpu import install_kick_handler

log = logging.getLogger("vmm")


#: the supervisor keeps one connection per worker, an upgrade one more; vmctl none
CONTROL_MAX_CONNS = 32


def _peer_allowed(peer: Peer) -> str | None:
    """Only root (the supervisor, the administrator) and our own uid may drive us."""
    if peer.uid in (0, os.getuid()):
        return None
    return f"uid {peer.uid} may not use this worker's control socket"


def control_path(paths: Paths, vm: str, pid: int) -> Path:
    return paths.vm_run_dir(vm) / f"worker.{pid}.sock"


def _disk(text: str) -> DiskArg:
    try:
        return DiskArg.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _nic(text: str) -> NicArg:
    try:
        return NicArg.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _read_token(fd: int | None) -> str | None:
    if fd is None:
        return os.environ.pop("BATON_TOKEN", None)
    chunks = []
    while data := os.read(fd, 4096):
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks).decode().strip() or None


@functools.cache
def parser() -> argparse.ArgumentParser:
    """Built once (a zygote's forks inherit it: building one costs more than parsing)."""
    p = argparse.ArgumentParser(prog="baton-vmm", description="Run one VM on broker-held RAM.")
    add_root_argument(p)
    p.add_argument("--vm", required=True, help="VM name (its fds in the broker)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--boot", action="store_true", help="boot the guest (default)")
    mode.add_argument("--incoming", action="store_true", help="wait for a state to load")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--tick-ms", type=float, default=50.0, help="guest timer tick")
    p.add_argument("--guest", type=Path, help="guest image (default: the built-in guest)")
    p.add_argument("--disk", type=_disk, action="append", default=[], metavar="NAME[:ro]")
    p.add_argument(
        "--net",
        type=_nic,
        action="append",
        default=[],
        metavar="NAME=MAC",
        help="a NIC on the broker's tap-NAME",
    )
    p.add_argument("--token-fd", type=int, help="read the broker token from this fd")
    p.add_argument("--ready-fd", type=int, help="write 'ready' or 'error: ...' here")
    p.add_argument("--kvm-fd", type=int, help="/dev/kvm, already open (a jailed worker)")
    p.add_argument("--control", type=Path, help="control socket path")
    p.add_argument("--instance", default=None, help="instance id (default: random)")
    p.add_argument("--debug", action="store_true")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if not re.fullmatch(NAME_PATTERN, args.vm):
        p.error(f"--vm: not a valid VM name: {args.vm!r}")
    return args


class BrokerWatch:
    """Re-register this worker's fds if the broker restarts (a crash dooms nothing)."""

    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="broker-watch", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.client.connected:
                self.stop.wait(1.0)
                continue
            if not self.client.broker_gone(timeout=1.0):
                continue
            log.warning("broker connection lost; handing our fds to the next broker")
            while not self.stop.is_set():
                try:
                    self.client.reconnect(time.monotonic() + 5)
                    log.info("re-registered with the broker")
                    break
                except (wire.WireError, OSError) as e:
                    log.warning("broker not back yet: %s", e)
                    self.stop.wait(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--zygote"]:  # a worker version's zygote (supervisor.zygote)
        from vmm import zygote

        return zygote.main(argv[1:])
    args = parse_args(argv)
    paths = paths_from_args(args)
    logs.setup(f"baton-vmm/{args.vm}", debug=args.debug)
    ready = Readiness(args.ready_fd)
    install_kick_handler()
    done = threading.Event()
    # The signal handler only sets a flag and writes a pipe: Event.set takes a lock
    # the interrupted main thread may hold. Whoever sets ``done`` writes it too.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    terminated = []

    def wake() -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"\0")

    def finish() -> None:
        done.set()
        wake()

    def on_term(signum: int, frame: object) -> None:
        terminated.append(signum)
        wake()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    mark("W.started")
    token = _read_token(args.token_fd)
    if args.kvm_fd is not None:
        kvm.use_fd(args.kvm_fd)
    faults.crash("prepare")
    broker = BrokerClient(paths.broker_socket, token=token)
    instance = args.instance or uuid.uuid4().hex
    spec = MachineSpec(
        args.vm,
        args.vcpus,
        int(args.tick_ms * 1_000_000),
        args.guest,
        list(args.disk),
        instance,
        list(args.net),
    )
    fds: dict[str, int] = {}
    try:
        held = {f["name"] for f in broker.list_fds(args.vm)}
        if RAM not in held:
            raise RuntimeError(f"the broker holds no RAM for VM {args.vm!r}")
        wanted = [RAM, *(n for n in WORKER_OPTIONAL_FDS if n in held)]
        wanted += [d.name for d in args.disk]
        wanted += [tap_fd(n.name) for n in args.net]
        fds = broker.get(args.vm, wanted)
        mark("W.fds_got")
        lease = RunLease(BrokerClient(paths.broker_socket, token=token), args.vm, instance)
        if args.incoming:
            lease.prepare()  # its request at the commit then pays no connect
        machine = Machine(spec, fds, lease)
        mark("W.machine_built")
        codestamp.remember()  # everything is imported now (a fork keeps its zygote's)
    except KvmUnavailable as e:
        ready.failed(str(e))
        print(f"baton-vmm: {e}", file=sys.stderr)
        return WorkerExit.NO_KVM
    except Exception as e:
        if not isinstance(e, wire.WireError | OSError | RuntimeError | ValueError):
            log.exception("unexpected failure while building the VM")
        ready.failed(str(e))
        print(f"baton-vmm: cannot start VM {args.vm}: {e}", file=sys.stderr)
        wire.close_fds(list(fds.values()))
        return WorkerExit.ERROR

    ctl_path = args.control or control_path(paths, args.vm, os.getpid())
    info = WorkerInfo(args.vm, instance)
    dispatcher = Dispatcher()
    control = Control(machine, info, on_quit=finish)
    dispatcher.bind(control)
    try:
        listener = wire.listen(ctl_path, 0o600)
    except OSError as e:
        ready.failed(f"cannot listen on {ctl_path}: {e}")
        return WorkerExit.ERROR
    server = ThreadedServer(
        listener, dispatcher, name="control", max_conns=CONTROL_MAX_CONNS, allow=_peer_allowed
    )
    if args.incoming:
        machine.mark_incoming()
    else:
        try:
            machine.boot()  # takes the run lease: refused while another VMM runs the guest
        except MachineError as e:
            ready.failed(str(e))
            print(f"baton-vmm: cannot start VM {args.vm}: {e}", file=sys.stderr)
            server.close()
            machine.close()
            wire.close_fds(list(fds.values()))
            return WorkerExit.ERROR
    broker.remember(args.vm, fds)
    # Ready as soon as the control socket listens: a connection waits in its backlog
    # while the threads start (each start waits until its thread runs, 0.3-0.5 ms
    # here), so they overlap the supervisor's wake-up instead of preceding it.
    mark("W.ready")
    if args.incoming and idle_merge.wanted():
        # A standby (vmm.idle_merge): before the ready word and the server, so that no
        # handoff can come first and find nothing to take back.
        idle_merge.offer()
    hello = os.environ.get(READY_HELLO_ENV) == "1"
    ready.ready(json.dumps(control.hello_info(), separators=(",", ":")) if hello else "")
    server.start()
    watch = BrokerWatch(broker)
    watch.thread.start()
    log.info("vm %s %s; control %s", args.vm, machine.state, ctl_path)

    def on_guest_stop() -> None:
        machine.stopped.wait()
        finish()

    threading.Thread(target=on_guest_stop, name="guest-watch", daemon=True).start()
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    while not done.is_set() and not terminated:
        poller.poll(1000)
        with contextlib.suppress(OSError):
            while os.read(wake_r, 4096):
                pass
    code = WorkerExit.OK
    if machine.stopped.is_set():
        code = {"reset": WorkerExit.GUEST_RESET, "shutdown": WorkerExit.GUEST_SHUTDOWN}.get(
            machine.stop_kind, WorkerExit.GUEST_FAILED
        )
        log.info("guest %s: %s", machine.state, machine.reason)
    watch.stop.set()
    if machine.lease is not None:
        machine.lease.release()  # still ours only if the guest ran here to the end
        machine.lease.close()
    server.close()
    with contextlib.suppress(OSError):
        ctl_path.unlink()
    machine.close()
    wire.close_fds(list(fds.values()))
    broker.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
