"""A rollout over many VMs (``vmctl upgrade --all``) that halts on its own.

The policy, apart from how one VM is upgraded and how progress is shown:

* ``canary``: the first N VMs (in name order) go first, at most ``parallel``
  at a time; the rest go only if every one of them committed. A canary that
  does not commit halts the rollout (``halted = "canary"``).
* ``max_failures``: the rollout halts once more than F upgrades did not
  commit (``"failures"``); 0 halts at the first, None never (``--keep-going``).
* ``max_blackout_ms``: the pause budget: the rollout halts as soon as one
  committed upgrade paused its guest longer than B (``"blackout-budget"``).
* a supervisor that stops answering halts it too (``"unreachable"``).

Halting lets the upgrades already in flight finish; the VMs not yet started
are skipped. The first reason to halt is the one reported. Standard library
only: vmctl imports this.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HALT_CANARY = "canary"
HALT_FAILURES = "failures"
HALT_BUDGET = "blackout-budget"
HALT_UNREACHABLE = "unreachable"


class Unreachable(Exception):
    """The supervisor cannot be asked any more: nothing further can be upgraded."""


@dataclass(frozen=True)
class Policy:
    parallel: int = 1
    canary: int = 0
    max_failures: int | None = 0  # None: no limit
    max_blackout_ms: float | None = None


def blackout_stats(values: list[float]) -> dict[str, float | None]:
    b = sorted(values)
    if not b:
        return {"median": None, "p99": None, "max": None}
    return {
        "median": statistics.median(b),
        "p99": b[min(len(b) - 1, int(0.99 * len(b)))],
        "max": b[-1],
    }


class Rollout:
    """Upgrade ``names`` with ``upgrade_one`` (a report dict per VM, as vm.upgrade
    returns; Unreachable if the supervisor is gone) under ``policy``.

    ``on_start(name)`` and ``on_report(report)`` are called from the rollout's
    threads, one call at a time."""

    def __init__(
        self,
        names: list[str],
        policy: Policy,
        upgrade_one: Callable[[str], dict[str, Any]],
        on_start: Callable[[str], None] = lambda name: None,
        on_report: Callable[[dict[str, Any]], None] = lambda report: None,
    ) -> None:
        self.names = list(names)
        self.policy = policy
        self.upgrade_one = upgrade_one
        self.on_start = on_start
        self.on_report = on_report
        self.lock = threading.Lock()
        self.results: list[dict[str, Any]] = []
        self.in_flight: list[str] = []
        self.halted: str | None = None
        self.failures = 0
        self.over_budget: list[str] = []
        self.canaries = self.names[: max(0, policy.canary)]

    # -- judging one report (under the lock)
    def _halt(self, why: str) -> None:
        if self.halted is None:
            self.halted = why

    def _judge(self, r: dict[str, Any], canary: bool) -> None:
        p = self.policy
        if r.get("outcome") == "committed":
            b = r.get("blackout_ms")
            if p.max_blackout_ms is not None and b is not None and b > p.max_blackout_ms:
                self.over_budget.append(r["vm"])
                self._halt(HALT_BUDGET)
            return
        self.failures += 1
        if canary:
            self._halt(HALT_CANARY)
        elif p.max_failures is not None and self.failures > p.max_failures:
            self._halt(HALT_FAILURES)

    # -- running
    def _phase(self, names: list[str], canary: bool) -> None:
        queue = list(names)

        def loop() -> None:
            while True:
                with self.lock:
                    if self.halted is not None or not queue:
                        return
                    name = queue.pop(0)
                    self.in_flight.append(name)
                    self.on_start(name)
                try:
                    r = self.upgrade_one(name)
                except Unreachable as e:
                    r = {"vm": name, "outcome": "error", "reason": str(e)}
                    with self.lock:
                        self._halt(HALT_UNREACHABLE)
                with self.lock:
                    self.in_flight.remove(name)
                    self.results.append(r)
                    self._judge(r, canary)
                    self.on_report(r)

        threads = [
            threading.Thread(target=loop, name=f"rollout-{i}", daemon=True)
            for i in range(max(1, min(self.policy.parallel, len(names))))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        rest = self.names[len(self.canaries) :]
        if self.canaries:
            self._phase(self.canaries, canary=True)
        if self.halted is None and rest:
            self._phase(rest, canary=False)
        return self.summary(time.monotonic() - t0)

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        done = {r["vm"] for r in self.results}
        committed = [r for r in self.results if r.get("outcome") == "committed"]
        failed = [r["vm"] for r in self.results if r.get("outcome") != "committed"]
        return {
            "event": "summary",
            "vms": len(self.names),
            "upgraded": len(committed),
            "not_committed": len(failed),
            "skipped": len(self.names) - len(done),
            "halted": self.halted,
            "not_committed_vms": failed,
            "skipped_vms": [n for n in self.names if n not in done],
            "over_budget_vms": list(self.over_budget),
            "canary_vms": list(self.canaries),
            "max_blackout_ms": self.policy.max_blackout_ms,
            "max_failures": self.policy.max_failures,
            "total_s": round(elapsed_s, 3),
            "blackout_ms": blackout_stats(
                [r["blackout_ms"] for r in committed if r.get("blackout_ms") is not None]
            ),
        }
