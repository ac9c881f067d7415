"""Prometheus metrics of the supervisor, with the official ``prometheus_client``.

``[metrics] listen = "127.0.0.1:9464"`` serves them over HTTP (any path,
``/metrics`` by convention) on that address only; ``[metrics] textfile =
"/var/lib/node_exporter/textfile/baton.prom"`` writes them for
node_exporter's textfile collector, atomically (a temporary file in the same
directory, then rename), whenever a VM changes state or an upgrade or
restart is counted, and at least every ``textfile_interval_s`` seconds. Both
are off by default, and both are read once, at start.

Two kinds of metric, in one private registry (never the process-wide default):

* gauges read from the supervisor's live state at scrape time, by
  ``LiveState`` (a custom collector): ``baton_vm_state{vm,state}`` (1 for the
  state the VM is in, 0 for the others), ``baton_broker_up``,
  ``baton_broker_fds{kind}`` (from the broker's ``broker.status``, on a
  connection of the scrape's own) and ``baton_build_info{version,python}``;
* counters and histograms fed by ``supervisor.events`` as things happen:
  ``baton_upgrades_total{vm,outcome}``, ``baton_upgrade_blackout_seconds``
  (committed upgrades: first vCPU out of KVM_RUN in the old worker to the
  new worker's vCPUs running), ``baton_upgrade_duration_seconds`` (every
  upgrade, begin to report) and ``baton_worker_restarts_total{vm,cause}``.

Upgrades settled by journal recovery after a supervisor restart are not
counted (they have no report); counters start at zero with each supervisor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from baton import __version__, wire
from baton.config import MetricsConfig
from baton.wire import RemoteError
from broker.client import BrokerClient
from supervisor.events import RESTART_CAUSES, Events
from supervisor.lifecycle import VmState
from supervisor.service import Supervisor
from supervisor.transaction import Outcome, Report

log = logging.getLogger("supervisor.metrics")

#: a blackout is about a millisecond: 100 us to 100 ms, roughly 1-2.5-5 per decade
BLACKOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
#: a whole upgrade is dominated by building the new worker: tens of ms to a minute
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BROKER_TIMEOUT_S = 2.0


class LiveState(Collector):
    """Gauges read from the supervisor (and its broker) at each scrape."""

    def __init__(self, sup: Supervisor, on_new_vm: Metrics) -> None:
        self.sup = sup
        self.metrics = on_new_vm

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "baton_build_info",
            "Always 1; the labels say which Baton and which Python the supervisor runs.",
            labels=["version", "python"],
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield build

        state = GaugeMetricFamily(
            "baton_vm_state",
            "1 for the state each VM is in, 0 for every other state.",
            labels=["vm", "state"],
        )
        for name, rt in sorted(list(self.sup.vms.items())):
            self.metrics.known_vm(name)
            current = rt.state
            for s in VmState:
                state.add_metric([name, str(s)], 1 if s is current else 0)
        yield state

        up = GaugeMetricFamily(
            "baton_broker_up", "1 if the broker answered its status request, else 0."
        )
        fds = GaugeMetricFamily(
            "baton_broker_fds",
            "File descriptors the broker holds for all VMs, by kind.",
            labels=["kind"],
        )
        try:
            with BrokerClient(self.sup.paths.broker_socket, timeout=BROKER_TIMEOUT_S) as c:
                status = c.status()
        except (wire.WireError, RemoteError, OSError) as e:
            log.debug("metrics: broker status: %s", e)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            by_kind: dict[str, int] = {}
            for vm in status.get("vms", []):
                for fd in vm.get("fds", []):
                    if fd.get("state") == "held":
                        kind = str(fd.get("kind", "other"))
                        by_kind[kind] = by_kind.get(kind, 0) + 1
            for kind, n in sorted(by_kind.items()):
                fds.add_metric([kind], n)
        yield up
        yield fds


class Metrics(Events):
    """The registry, the event-driven metrics, and what serves or writes them."""

    def __init__(self, sup: Supervisor, cfg: MetricsConfig) -> None:
        self.sup = sup
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=True)
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
        # First, so that a VM seen for the first time gets its zero counters in this scrape.
        self.registry.register(LiveState(sup, self))
        self.upgrades = Counter(
            "baton_upgrades_total",
            "Live upgrades, by VM and outcome (committed, rolled-back, aborted, failed).",
            ["vm", "outcome"],
            registry=self.registry,
        )
        self.blackout = Histogram(
            "baton_upgrade_blackout_seconds",
            "How long the guest was paused in a committed upgrade.",
            buckets=BLACKOUT_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "baton_upgrade_duration_seconds",
            "How long a live upgrade took from begin to its report, whatever its outcome.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.restarts = Counter(
            "baton_worker_restarts_total",
            "Workers started again by the restart policy, by VM and cause.",
            ["vm", "cause"],
            registry=self.registry,
        )
        for name in list(sup.vms):
            self.known_vm(name)
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()

    # ------------------------------------------------------------- the hooks
    def known_vm(self, vm: str) -> None:
        """Every counter series of a VM exists from the first scrape that sees the
        VM, at 0, so that ``rate``/``increase`` see its first increment."""
        with self._known_lock:
            if vm in self._known:
                return
            self._known.add(vm)
        for outcome in Outcome:
            self.upgrades.labels(vm, str(outcome))
        for cause in RESTART_CAUSES:
            self.restarts.labels(vm, cause)

    def upgrade_finished(self, report: Report) -> None:
        try:
            self.known_vm(report.vm)
            self.upgrades.labels(report.vm, str(report.outcome)).inc()
            if report.total_ms is not None:
                self.duration.observe(report.total_ms / 1000)
            if report.outcome is Outcome.COMMITTED and report.blackout_ms is not None:
                self.blackout.observe(report.blackout_ms / 1000)
        except Exception:  # an observer never fails an upgrade
            log.exception("metrics: counting an upgrade of %s", report.vm)
        self._wake.set()

    def worker_restarting(self, vm: str, cause: str) -> None:
        try:
            self.known_vm(vm)
            self.restarts.labels(vm, cause).inc()
        except Exception:
            log.exception("metrics: counting a restart of %s", vm)
        self._wake.set()

    # ---------------------------------------------------------- exposition
    def text(self) -> bytes:
        """The exposition, in the Prometheus text format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve the metrics over HTTP on ``host:port`` only, from a daemon thread."""
        self._server, self._server_thread = start_http_server(
            port, addr=host, registry=self.registry
        )
        self._server_thread.name = "metrics-http"
        addr = self._server.server_address
        return str(addr[0]), int(addr[1])

    def write_textfile(self, path: Path) -> None:
        """Replace ``path`` atomically: a reader sees the old file or the new one."""
        data = self.text()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # node_exporter seldom runs as our user
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def start_textfile(self, path: Path, interval_s: float) -> None:
        self._writer = threading.Thread(
            target=self._write_loop, args=(path, interval_s), name="metrics-textfile", daemon=True
        )
        self._writer.start()

    def _states(self) -> dict[str, VmState]:
        return {name: rt.state for name, rt in list(self.sup.vms.items())}

    def _write_loop(self, path: Path, interval_s: float) -> None:
        """Write now, then on every change we can see (a counted event, a VM state),
        and at least every ``interval_s`` so that the file's age says we are alive."""
        last_states: dict[str, VmState] | None = None
        last_write = 0.0
        while not self._stop.is_set():
            states = self._states()
            due = time.monotonic() - last_write >= interval_s
            if self._wake.is_set() or states != last_states or due:
                self._wake.clear()
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self.write_textfile(path)
                except OSError as e:
                    log.warning("metrics: cannot write %s: %s", path, e)
                last_states, last_write = states, time.monotonic()
            self._wake.wait(min(1.0, interval_s))

    def close(self) -> None:
        """Stop serving and writing; the last textfile written stays in place."""
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in (self._server_thread, self._writer):
            if t is not None:
                t.join(5)


def start(sup: Supervisor, cfg: MetricsConfig) -> Metrics | None:
    """The metrics as ``cfg`` says (None if they are off), installed as the
    supervisor's event observer. A listen address that cannot be bound is
    logged, not fatal: the VMs matter more than their metrics."""
    if not cfg.enabled:
        return None
    m = Metrics(sup, cfg)
    sup.events = m
    if cfg.listen is not None:
        host, port = cfg.listen
        try:
            bound = m.serve(host, port)
            log.info("metrics: serving http://%s:%d/metrics", *bound)
        except OSError as e:
            log.error("metrics: cannot listen on %s:%d: %s", host, port, e)
    if cfg.textfile is not None:
        m.start_textfile(cfg.textfile, cfg.textfile_interval_s)
        log.info("metrics: writing %s", cfg.textfile)
    return m
