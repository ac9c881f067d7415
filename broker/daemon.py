"""baton-brokerd: the long-lived process that holds every VM's fds."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import socket
import sys
from pathlib import Path

from baton import daemonize, logs, sdnotify, wire
from baton.config import BrokerConfig, ConfigError, broker_config
from baton.daemonize import PidLock, Readiness, Signals, add_daemon_arguments
from baton.paths import Paths, paths_from_args
from baton.rpc import Dispatcher, EventLoopServer, Request, Result
from broker import handover
from broker.lease import Leases, LeaseService
from broker.service import Broker
from broker.table import Table

log = logging.getLogger("broker")


def _raise_fd_limit() -> None:
    """The broker holds many fds by design: use the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _socket_is_ours(path: Path, ino: int) -> bool:
    try:
        return os.stat(path).st_ino == ino
    except OSError:
        return False


def serve(
    paths: Paths,
    config: BrokerConfig,
    table: Table,
    generation: int,
    listener_sock: socket.socket,
    pidlock: PidLock,
    signals: Signals,
    readiness: Readiness,
    conns: list[socket.socket] | None = None,
) -> int:
    dispatcher = Dispatcher()
    server = EventLoopServer(listener_sock, dispatcher, max_conns=config.max_connections)
    broker = Broker(
        paths,
        config,
        table,
        generation=generation,
        watch_hangup=server.watch_hangup,
        unwatch=server.unwatch,
    )
    server.limits_for = broker.limits_for
    server.uid_limit = broker.uid_limit
    broker.connection_count = lambda: len(server.conns)
    dispatcher.bind(broker)
    leases = Leases.load(paths.broker_leases)
    dispatcher.bind(LeaseService(broker, leases))
    handed_over = False

    def upgrade(req: Request, command: list[str] | None) -> Result:
        pid = handover.spawn_successor(
            paths, broker.table, broker.generation, server, pidlock, command
        )

        def finish() -> None:
            nonlocal handed_over
            handed_over = True
            server.stop()

        return Result({"pid": pid, "generation": broker.generation + 1}, after=finish)

    broker.upgrade_hook = upgrade
    for c in conns or ():
        server.adopt(c)
    signals.on_signal = server.wake
    server.install_signal_wakeup()
    broker.save()
    pidlock.write()
    held = len(table.held_fds())
    sdnotify.notify(f"MAINPID={os.getpid()}\nREADY=1\nSTATUS=holding {held} fds")
    readiness.ready()
    log.info(
        "serving %s (generation %d, %d VMs, %d fds)",
        paths.broker_socket,
        generation,
        len(table.vms),
        held,
    )

    def tick() -> None:
        leases.settle_all()  # a run flag written since the last turn becomes the lease
        if signals.term.is_set():
            server.stop()
        if signals.hup.is_set():
            signals.hup.clear()
            try:
                broker.config = broker_config(paths)
                log.info("configuration reloaded")
            except ConfigError as e:
                log.error("reload failed, keeping the old configuration: %s", e)

    # The path's own inode (not the socket's): unlink on exit only if still ours.
    socket_ino = os.stat(paths.broker_socket).st_ino
    server.run(tick=tick, busy_poll_us=config.busy_poll_us)
    if handed_over:
        log.info("handed over to the successor; exiting")
        # Our copies close with the process; the successor holds its own.
        os._exit(0)
    sdnotify.notify("STOPPING=1")
    log.info("stopping; running VMs keep their fds, holders re-register with the next broker")
    if _socket_is_ours(paths.broker_socket, socket_ino):
        with contextlib.suppress(OSError):
            paths.broker_socket.unlink()
    server.close()
    for fd in broker.table.held_fds():
        with contextlib.suppress(OSError):
            os.close(fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="baton-brokerd", description="Hold every VM's fds, independent of any VMM."
    )
    add_daemon_arguments(parser)
    parser.add_argument("--takeover", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--takeover-ready", type=int, metavar="FD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    paths = paths_from_args(args)
    logs.setup("baton-brokerd", debug=args.debug)
    try:
        config = broker_config(paths)
    except ConfigError as e:
        print(f"baton-brokerd: {e}", file=sys.stderr)
        return 2
    signals = Signals()

    if args.takeover is not None:
        ready = Readiness(args.takeover_ready)
        try:
            inherited = handover.take_over(args.takeover, paths)
        except Exception as e:
            log.exception("takeover failed")
            ready.failed(f"takeover failed: {e}")
            return 1
        signals.install()
        _raise_fd_limit()
        return serve(
            paths,
            config,
            inherited.table,
            inherited.generation,
            inherited.listener,
            inherited.pidlock,
            signals,
            ready,
            inherited.conns,
        )

    paths.ensure()
    try:
        pidlock = PidLock.acquire(paths.broker_pidfile)
    except daemonize.AlreadyRunning as e:
        print(f"baton-brokerd: {e}", file=sys.stderr)
        return 1
    readiness = daemonize.start(
        "brokerd", paths, foreground=args.foreground, signals=signals, preserve=[pidlock.fd]
    )
    try:
        _raise_fd_limit()
        table, generation = Table.load(paths.broker_state)
        listener_sock = wire.listen(paths.broker_socket, config.socket_mode, gid=config.socket_gid)
    except Exception as e:
        log.exception("startup failed")
        readiness.failed(str(e))
        return 1
    if table.vms:
        missing = sum(1 for vm in table.vms.values() for h in vm.fds.values() if h.fd is None)
        log.info("restarted: %d VMs known, %d fds await re-registration", len(table.vms), missing)
    return serve(paths, config, table, generation + 1, listener_sock, pidlock, signals, readiness)


if __name__ == "__main__":
    sys.exit(main())
