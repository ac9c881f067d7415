"""baton-supervisord: reads /etc/baton, runs and watches workers, performs live upgrades.

A supervisor restart or crash never stops a VM: workers run in their own
sessions, and a new supervisor re-adopts them (and resolves any upgrade
journal left behind) before it does anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time

from baton import daemonize, logs, sdnotify, wire
from baton.config import ConfigError, load_settings
from baton.daemonize import PidLock, Signals, add_daemon_arguments
from baton.paths import Paths, paths_from_args
from baton.rpc import Dispatcher, ThreadedServer
from broker.client import BrokerClient
from supervisor.control import Control
from supervisor.kinds.base import WorkerKind
from supervisor.kinds.baton import BatonKind
from supervisor.kinds.qemu import QemuKind
from supervisor.service import Supervisor
from supervisor.standby import StandbyPool
from supervisor.suspend import Suspender
from supervisor.upgrade import Upgrader
from supervisor.zygote import ZygotePool

log = logging.getLogger("supervisor")


class StartClock:
    """How long each step of the supervisor's start took, in ms (``supervisor.status``
    ``start_ms``): what a restart costs before ``vmctl`` is served again, broken down."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._last = time.monotonic()
        with contextlib.suppress(OSError, ValueError):  # exec to here: the interpreter, imports
            with open("/proc/self/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            since_exec = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
            self.ms["exec_to_main"] = round(since_exec * 1000, 1)

    def mark(self, step: str) -> None:
        now = time.monotonic()
        self.ms[step] = round((now - self._last) * 1000, 1)
        self._last = now


def build_kinds(
    paths: Paths, broker: BrokerClient, zygotes: ZygotePool | None = None
) -> dict[str, WorkerKind]:
    """The kind registry: the one place that knows every kind of worker."""
    baton = BatonKind(paths, broker)
    baton.zygotes = zygotes
    return {k.name: k for k in (baton, QemuKind(paths, broker))}


def main(argv: list[str] | None = None) -> int:
    clock = StartClock()
    parser = argparse.ArgumentParser(
        prog="baton-supervisord", description="Run, watch and live-upgrade Baton VMs."
    )
    add_daemon_arguments(parser)
    args = parser.parse_args(argv)
    paths = paths_from_args(args)
    logs.setup("baton-supervisord", debug=args.debug)
    try:
        settings = load_settings(paths)
    except ConfigError as e:
        print(f"baton-supervisord: {e}", file=sys.stderr)
        return 2
    paths.ensure()
    try:
        pidlock = PidLock.acquire(paths.supervisor_pidfile)
    except daemonize.AlreadyRunning as e:
        print(f"baton-supervisord: {e}", file=sys.stderr)
        return 1
    signals = Signals()
    readiness = daemonize.start(
        "supervisord", paths, foreground=args.foreground, signals=signals, preserve=[pidlock.fd]
    )
    pidlock.write()
    broker = BrokerClient(paths.broker_socket)
    try:
        broker.wait_up(time.monotonic() + settings.supervisor.broker_wait_s)
    except (wire.WireError, OSError) as e:
        readiness.failed(f"the broker is not running: {e}")
        log.error("the broker is not running: %s", e)
        return 1
    # [upgrade] zygote is read at each start, so a reload turns it on or off
    zygotes = ZygotePool(paths.log / "zygote.log", lambda: sup.settings.upgrade.zygote)
    sup = Supervisor(paths, settings, broker, build_kinds(paths, broker, zygotes))
    sup.zygotes = zygotes
    sup.start_ms = clock.ms
    upgrader = Upgrader(sup)
    served = None
    if settings.metrics.enabled:
        from supervisor import metrics  # prometheus_client and http.server: only when asked

        served = metrics.start(sup, settings.metrics)
    clock.mark("setup")
    sup.load_config()
    clock.mark("config")
    sup.watcher.thread.start()
    sup.adopt_all()
    clock.mark("adopt")
    upgrader.resolve_journals()
    suspender = Suspender(sup)
    suspender.recover()  # a suspend a previous supervisor left in flight
    clock.mark("journals")
    # A predecessor's standbys are checked by their records first (no broker question
    # each): those kept (adopted) and those killed, the orphan sweep passes over.
    standby = StandbyPool(sup)
    standby.recover()
    clock.mark("standbys")
    sup.sweep_orphans(keep=standby.adopted_pids())
    sup.release_gone_uids()
    clock.mark("sweep")
    sup.standby = standby
    dispatcher = Dispatcher()
    dispatcher.bind(Control(sup, upgrader, suspender))
    try:
        listener = wire.listen(paths.control_socket, settings.supervisor.socket_mode)
    except OSError as e:
        readiness.failed(f"cannot listen on {paths.control_socket}: {e}")
        return 1
    server = ThreadedServer(
        listener,
        dispatcher,
        name="control",
        max_conns=settings.supervisor.max_connections,
        idle_timeout=settings.supervisor.idle_timeout_s,
    )
    server.start()
    clock.mark("serving")
    # After the server: the adopted standbys' round trips (an upgrade asked meanwhile
    # waits for them), then fresh ones where needed, do not delay it.
    standby.start()
    sup.autostart()
    suspender.resume_all(autostart_only=True)  # after a reboot: the suspended VMs come back
    sdnotify.notify(f"READY=1\nSTATUS=supervising {len(sup.vms)} VMs")
    readiness.ready()
    log.info("serving %s with %d VMs", paths.control_socket, len(sup.vms))
    watchdog = sdnotify.watchdog_interval()
    last_ping = 0.0
    reloading: threading.Thread | None = None

    def reload() -> None:
        try:
            sup.reload()
        except Exception:
            log.exception("reload failed")
        sdnotify.notify("READY=1")

    # The main loop never waits for a VM: reloads (which may start VMs) and
    # restarts run on threads of their own, so the watchdog pings keep coming.
    while not signals.term.wait(0.2):
        if signals.hup.is_set() and (reloading is None or not reloading.is_alive()):
            signals.hup.clear()  # (one that comes during a reload is served after it)
            sdnotify.notify("RELOADING=1")
            reloading = threading.Thread(target=reload, name="reload", daemon=True)
            reloading.start()
        sup.housekeeping()
        if watchdog and time.monotonic() - last_ping >= watchdog:
            sdnotify.notify("WATCHDOG=1")
            last_ping = time.monotonic()
    sdnotify.notify("STOPPING=1")
    log.info("stopping; the VMs keep running and the next supervisor adopts them")
    server.close()
    with contextlib.suppress(OSError):
        paths.control_socket.unlink()
    standby.close()
    left = upgrader.close()  # old workers a rollout retired aside, still exiting
    if left:
        log.warning("old workers still retiring, left to the next supervisor: %s", left)
    zygotes.close()
    sup.watcher.close()
    sup.reaper.close()
    if served is not None:
        served.close()
    for rt in sup.vms.values():
        if rt.worker is not None:
            rt.worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
