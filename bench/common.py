"""Statistics, machine facts and the test host shared by every benchmark."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from baton_lab.harness import BrokerProcess, short_root, wait_until
from supervisor.provision import provision
from vmm.guest import continuity_problems, heartbeats

OUT = Path(__file__).resolve().parent / "out"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure was observed)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p99": percentile(values, 99),
        "max": max(values),
        "min": min(values),
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
    }


def _commit() -> str:
    """The tree measured (``-dirty`` if it has uncommitted changes), or '' outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def save(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path


@contextlib.contextmanager
def provisioned_broker(vm: str, memory_bytes: int) -> Iterator[BrokerProcess]:
    """A broker under a fresh temporary root, holding VM ``vm``'s fds (no
    supervisor: the benchmark starts its workers itself); stopped and removed after."""
    root = short_root()
    try:
        broker = BrokerProcess(root).start()
        try:
            with broker.client() as c:
                provision(c, broker.paths, vm, memory_bytes, [])
            yield broker
        finally:
            broker.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def wait_heartbeats(log: Path, n: int, timeout: float) -> None:
    """Until the built-in guest's console log holds ``n`` heartbeats."""
    wait_until(lambda: len(heartbeats(log.read_text())) >= n, timeout, what=f"{n} heartbeats")


def continuity_after(log: Path, more: int, timeout: float) -> list[str]:
    """Once ``more`` heartbeats beyond those in ``log`` now have come: what is
    wrong with the whole sequence (gaps, repeats, RAM changes)."""
    wait_heartbeats(log, len(heartbeats(log.read_text())) + more, timeout)
    return continuity_problems(heartbeats(log.read_text()))


def extra_upgrade_settings() -> str:
    """More ``[upgrade]`` lines for the benches' baton.toml, from ``BENCH_UPGRADE``
    (``"key = value; key = value"``): how to A/B a setting with an unchanged bench
    command, say ``BENCH_UPGRADE="realtime_pause = false"``."""
    raw = os.environ.get("BENCH_UPGRADE", "")
    return "".join(f"{item.strip()}\n" for item in raw.split(";") if item.strip())
