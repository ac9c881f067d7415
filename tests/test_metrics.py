"""Prometheus metrics (supervisor.metrics): the [metrics] settings, and a real
supervisor scraped over HTTP and through its textfile during live upgrades."""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.config import ConfigError, MetricsConfig, load_settings
from baton.paths import Paths
from baton_lab.harness import Host, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def write_settings(root: Path, text: str) -> None:
    (root / "etc" / "baton").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "baton" / "baton.toml").write_text(text)


def write_vm(root: Path, name: str, extra: str = "") -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(f"memory_mib = 32\ntick_ms = 20\n{extra}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels (the official parser)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return parse(r.read().decode())


# ------------------------------------------------------------------ settings
def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    assert load_settings(Paths(tmp_path)).metrics == MetricsConfig(None, None, 15)


def test_metrics_settings_parse(tmp_path: Path) -> None:
    write_settings(
        tmp_path,
        '[metrics]\nlisten = "[::1]:9464"\ntextfile = "/var/lib/ne/baton.prom"\n'
        "textfile_interval_s = 5\n",
    )
    m = load_settings(Paths(tmp_path)).metrics
    assert m.listen == ("::1", 9464)
    assert m.textfile == Path("/var/lib/ne/baton.prom")
    assert m.textfile_interval_s == 5


@pytest.mark.parametrize(
    "line",
    [
        'listen = "9464"',
        'listen = "127.0.0.1:99999"',
        'textfile = "relative.prom"',
        'textfile = "/var/lib/ne/baton.txt"',
        "colour = 1",
    ],
)
def test_bad_metrics_settings_are_errors(tmp_path: Path, line: str) -> None:
    write_settings(tmp_path, f"[metrics]\n{line}\n")
    with pytest.raises(ConfigError, match="metrics"):
        load_settings(Paths(tmp_path))


def test_the_example_config_serves_on_loopback_only(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "etc" / "baton" / "baton.toml"
    write_settings(tmp_path, example.read_text())
    assert load_settings(Paths(tmp_path)).metrics.listen == ("127.0.0.1", 9464)


# ------------------------------------------------------------- real daemons
@pytest.mark.kvm
def test_metrics_follow_live_upgrades_and_restarts(host: Host, root: Path) -> None:
    port = free_port()
    textfile = root / "textfile" / "baton.prom"
    write_settings(
        root,
        f'[metrics]\nlisten = "127.0.0.1:{port}"\ntextfile = "{textfile}"\n'
        "textfile_interval_s = 1\n",
    )
    write_vm(root, "vm1", "autostart = true\nrestart_backoff_ms = 0\n")
    host.vm = "vm1"
    sup = host.supervisor()
    host.wait_state("running")
    host.wait_beats(2)

    first = wait_until(lambda: scrape(port), 10, 0.05, "the metrics endpoint")
    # Bound to the configured address only, in the supervisor itself.
    listening = [
        c.laddr
        for c in psutil.Process(sup.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert [a.ip for a in listening] == ["127.0.0.1"]

    assert value(first, "baton_vm_state", vm="vm1", state="running") == 1
    assert value(first, "baton_vm_state", vm="vm1", state="upgrading") == 0
    assert value(first, "baton_broker_up") == 1
    assert (value(first, "baton_broker_fds", kind="memfd") or 0) >= 1
    assert any(name == "baton_build_info" and v == 1 for (name, _), v in first.items())
    assert value(first, "baton_upgrades_total", vm="vm1", outcome="committed") == 0
    assert value(first, "baton_upgrade_blackout_seconds_count") == 0

    # Scraped all the while the upgrades run (each scrape asks the broker too):
    # every scrape answers and parses, and the counter never goes backwards.
    done = threading.Event()
    seen: list[float] = []
    errors: list[BaseException] = []

    def keep_scraping() -> None:
        while not done.is_set():
            try:
                s = scrape(port)
                seen.append(value(s, "baton_upgrades_total", vm="vm1", outcome="committed") or 0)
            except BaseException as e:
                errors.append(e)
                return

    scraper = threading.Thread(target=keep_scraping, daemon=True)
    scraper.start()
    try:
        for n in (1, 2, 3):
            code, report = host.upgrade()
            assert code == 0 and report["outcome"] == "committed", report
            got = scrape(port)
            assert value(got, "baton_upgrades_total", vm="vm1", outcome="committed") == n
            assert value(got, "baton_upgrade_blackout_seconds_count") == n
            assert value(got, "baton_upgrade_duration_seconds_count") == n
            assert value(got, "baton_vm_state", vm="vm1", state="running") == 1
    finally:
        done.set()
        scraper.join(15)
    assert errors == [] and len(seen) > 3, (errors, len(seen))
    assert seen == sorted(seen) and set(seen) <= {0, 1, 2, 3}, seen
    # The buckets run from 100 us to 100 ms, cumulative; the pauses were measured.
    bounds = ["0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025"]
    bounds += ["0.05", "0.1", "+Inf"]
    counts = [value(got, "baton_upgrade_blackout_seconds_bucket", le=b) for b in bounds]
    assert counts == sorted(c or 0 for c in counts) and counts[-1] == 3, counts
    total = value(got, "baton_upgrade_blackout_seconds_sum")
    assert total is not None and total > 0

    # A worker killed under the supervisor is restarted, and counted with its cause.
    before = host.status()["pid"]
    os.kill(before, signal.SIGKILL)

    def restarts(samples: Samples) -> float | None:
        return value(samples, "baton_worker_restarts_total", vm="vm1", cause="failure")

    wait_until(lambda: restarts(scrape(port)) == 1, 30, 0.05, "the restart to be counted")
    host.wait_state("running")

    # The textfile is rewritten as things change, atomically, and parses.
    def shows_restart(s: Samples) -> Samples:
        running = value(s, "baton_vm_state", vm="vm1", state="running") == 1
        return s if running and restarts(s) == 1 else {}

    from_file = wait_until(
        lambda: shows_restart(parse(textfile.read_text())), 15, 0.05, "the textfile"
    )
    assert value(from_file, "baton_upgrades_total", vm="vm1", outcome="committed") == 3
    assert value(from_file, "baton_broker_up") == 1
    assert [p.name for p in textfile.parent.iterdir()] == ["baton.prom"]  # no temporaries left
    assert textfile.stat().st_mode & 0o777 == 0o644

    # Stopping the supervisor closes the port.
    sup.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
