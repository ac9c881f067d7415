"""A cold upgrade's prepare, step by step, across every process it crosses.

    python -m bench.coldstart [--upgrades 20] [--memory-mib 256]

One VM under a real broker and supervisor (standby off, zygote on, jailed when
run as root), upgraded N times with ``BATON_TRACE`` set (``baton.trace``): the
supervisor, the zygote, the zygote's fork and the worker each mark their steps on
CLOCK_MONOTONIC, one clock for all of them. Prints, for each mark, the median
time since the upgrade started and the median time since the mark before it
(per upgrade, so the steps' medians are not differences of medians); the first
upgrade (the zygote's first fork) is left out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from typing import Any

from baton.trace import ENV
from baton_lab.harness import Host, short_root, wait_until
from bench.common import save
from bench.upgrade import baton_progress, baton_vm, write_settings, write_vm


def marks_of(text: str) -> list[tuple[int, str]]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "TRACE" and parts[1].isdigit():
            out.append((int(parts[1]), parts[3]))
    return out


def per_upgrade(marks: list[tuple[int, str]]) -> list[list[tuple[float, str]]]:
    """Each upgrade's marks, in ms since its start, up to the old worker's confirmed
    park (``S.settled``: where the report's total ends), else the end of its prepare."""
    marks.sort()
    starts = [ns for ns, name in marks if name == "S.upgrade_start"]
    out = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else 1 << 63
        seq = [((ns - start) / 1e6, name) for ns, name in marks if start <= ns < end]
        ends = [t for t, name in seq if name in ("S.settled", "S.prepare_end")]
        done = max(ends) if ends else None
        if done is not None:
            out.append([(t, name) for t, name in seq if t <= done])
    return out


def breakdown(upgrades: list[list[tuple[float, str]]]) -> list[dict[str, Any]]:
    order = [name for _, name in upgrades[-1]]
    rows, prev = [], None
    for name in order:
        at = [dict((n, t) for t, n in u) for u in upgrades]
        since = [a[name] for a in at if name in a]
        step = [a[name] - a[prev] for a in at if name in a and prev in a] if prev else [0.0]
        rows.append(
            {
                "mark": name,
                "since_start_ms": statistics.median(since),
                "step_ms": statistics.median(step),
            }
        )
        prev = name
    return rows


def run(upgrades: int, memory_mib: int) -> dict[str, Any]:
    root = short_root()
    trace = root / "trace.log"
    write_vm(root, "bench", baton_vm(memory_mib))
    write_settings(root, standby=False, zygote=True)
    trace.touch(mode=0o600)
    reports = []
    try:
        with Host.start(root, vm="bench", supervisor_env={ENV: str(trace)}) as host:
            log = host.console_log()
            wait_until(lambda: log.exists() and len(baton_progress(log)[0]) >= 3, 120)
            for _ in range(upgrades + 1):
                reports.append(host.call("vm.upgrade", {"vm": "bench"}, timeout=300))
            worker_log = host.paths.worker_log("bench").read_text(errors="replace")
            host.call("vm.stop", {"vm": "bench"})
        marks = marks_of(trace.read_text()) + marks_of(worker_log)  # a jailed worker: its log
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bad = [r for r in reports if r["outcome"] != "committed"]
    if bad:
        raise SystemExit(f"{len(bad)} upgrades failed: {bad[:1]}")
    steps = per_upgrade(marks)[1:]
    kept = reports[1:]
    return {
        "upgrades": len(kept),
        "jailed": os.geteuid() == 0,
        "total_ms_median": statistics.median(r["total_ms"] for r in kept),
        "prepare_ms_median": statistics.median(r["phases_ms"]["prepare"] for r in kept),
        "steps": breakdown(steps),
        # the transfer, from the old worker's first stopped vCPU (negative: before it)
        "timeline_us": {
            k: statistics.median(r["timeline_us"][k] for r in kept)
            for k in kept[-1].get("timeline_us") or {}
            if all(k in (r.get("timeline_us") or {}) for r in kept)
        },
        "transfer_ms_median": statistics.median(r["phases_ms"]["transfer"] for r in kept),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upgrades", type=int, default=20)
    ap.add_argument("--memory-mib", type=int, default=256)
    args = ap.parse_args(argv)
    r = run(args.upgrades, args.memory_mib)
    print(f"{'mark':18s} {'since start':>12s} {'step':>8s}  (ms, medians of {r['upgrades']})")
    for row in r["steps"]:
        print(f"{row['mark']:18s} {row['since_start_ms']:12.2f} {row['step_ms']:8.2f}")
    print(f"transfer phase median {r['transfer_ms_median']:.2f} ms; its timeline (us, medians):")
    for k, v in r["timeline_us"].items():
        print(f"  {k:24s} {v:9.1f}")
    total, prepare = r["total_ms_median"], r["prepare_ms_median"]
    print(f"total median {total:.1f} ms, prepare median {prepare:.1f} ms")
    print(f"saved {save('coldstart', r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
