"""The rollout's worst blackout with and without an ``[upgrade]`` setting (``--ab``:
``exclusive_teardown`` or ``realtime_pause``), interleaved on one host.

    python -m bench.tail [--vms 32] [--memory-mib 64] [--rounds 6] [--max-parallel 4]
                         [--standby] [--perf DIR]

One host (``baton_lab.harness.Host``), its VMs started once; then ``--rounds``
rollouts (``vmctl --json upgrade --all``), the setting (``--ab``) flipped between them by
``config.reload`` in the order on, off, off, on, on, off, ... so that neither side
always runs first on a machine whose load drifts. Per rollout: wall time, blackout
median, p99 and worst, the old workers' reap; and, from the supervisor's trace marks
(``BATON_TRACE``), how many blackouts overlapped some old worker's exit (from its
``quit`` to the kernel confirming it: ``S.teardown_begin`` / ``S.teardown_end``).
With ``--perf DIR`` every rollout runs under ``perf sched record -k mono`` (one
file per round, for ``bench/tailwhy.py``). Saved as ``bench/out/tail.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from baton_lab.harness import Host, short_root, wait_until
from bench.common import save
from bench.scale import running_pids
from bench.upgrade import baton_vm, standby_ready, write_vm


def settings(root: Path, standby: bool, knob: str, value: bool) -> None:
    on = {True: "true", False: "false"}
    (root / "etc" / "baton" / "baton.toml").write_text(
        f"[upgrade]\nstandby = {on[standby]}\n{knob} = {on[value]}\n"
    )


def marks(path: Path, since_ns: int) -> dict[str, list[tuple[int, ...]]]:
    """The trace's blackout windows and teardown windows after ``since_ns``."""
    out: dict[str, list[tuple[int, ...]]] = {"blackout": [], "teardown": []}
    begun: dict[int, int] = {}
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) < 4 or f[0] != "TRACE" or int(f[1]) < since_ns:
            continue
        at, name = int(f[1]), f[3]
        if name == "S.blackout":
            out["blackout"].append((int(f[4]), int(f[5]), int(f[6]), int(f[7])))
        elif name == "S.teardown_begin":
            begun[int(f[4])] = at
        elif name == "S.teardown_end" and int(f[4]) in begun:
            out["teardown"].append((int(f[4]), begun.pop(int(f[4])), at))
    return out


def overlaps(m: dict[str, list[tuple[int, ...]]]) -> int:
    """Blackouts that some teardown window intersects."""
    n = 0
    for _old, _new, b0, b1 in m["blackout"]:
        if any(t0 < b1 and b0 < t1 for _pid, t0, t1 in m["teardown"]):
            n += 1
    return n


def known_pids(host: Host) -> dict[str, list[int]]:
    """Our daemons and zygotes, for telling who ran in a perf trace."""
    zyg = [
        c.pid
        for c in psutil.Process(host.sup.pid).children()
        if "--zygote" in " ".join(c.cmdline())
    ]
    return {
        "supervisor": [host.sup.pid],
        "broker": [host.broker.pid],
        "zygote": zyg,
        "bench": [os.getpid()],
    }


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def rollout(host: Host, parallel: int, perf: Path | None) -> tuple[float, list[dict[str, Any]]]:
    rec = None
    if perf is not None:
        rec = subprocess.Popen(
            ["perf", "sched", "record", "-k", "mono", "-o", str(perf), "--", "sleep", "600"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # perf's own start, outside the rollout
    try:
        t = time.monotonic()
        r = host.vmctl("--json", "upgrade", "--all", "--max-parallel", str(parallel), timeout=3600)
        wall = time.monotonic() - t
    finally:
        if rec is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGINT)
            rec.wait(60)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    reports = [e for e in events if e.get("vm")]
    bad = [x for x in reports if x.get("outcome") != "committed"]
    if r.returncode != 0 or bad:
        raise SystemExit(f"--all: exit {r.returncode}, {bad[:1]}, {r.stderr[-500:]}")
    return wall, reports


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = short_root()
    trace = root / "trace.txt"
    trace.touch()
    names = [f"vm{i:03d}" for i in range(args.vms)]
    for n in names:
        write_vm(root, n, baton_vm(args.memory_mib, args.tick_ms))
    settings(root, args.standby, args.ab, True)
    order = [i % 4 in (0, 3) for i in range(args.rounds)]  # on, off, off, on, ...
    rounds: list[dict[str, Any]] = []
    try:
        with Host.start(
            root,
            supervisor_env={"BATON_TRACE": str(trace), **dict(e.split("=", 1) for e in args.env)},
        ) as host:
            wait_until(
                lambda: (p := running_pids(host)) and len(p) == args.vms,
                600,
                0.5,
                "every VM running",
            )
            for i, exclusive in enumerate(order):
                settings(root, args.standby, args.ab, exclusive)
                host.call("config.reload")
                if args.standby:
                    wait_until(lambda: all(standby_ready(host, n) for n in names), 600, 0.5)
                time.sleep(args.settle_s)
                since = time.monotonic_ns()
                perf = None
                if args.perf:
                    perf = Path(args.perf) / f"round{i:02d}-{'on' if exclusive else 'off'}.data"
                wall, reports = rollout(host, args.max_parallel, perf)
                m = marks(trace, since)
                bl = [x["blackout_ms"] for x in reports]
                reap = [x["reap_ms"] for x in reports if x.get("reap_ms") is not None]
                row = {
                    "round": i,
                    "knob": args.ab,
                    "exclusive_teardown": exclusive,  # the knob's value (named for tailwhy)
                    "wall_s": round(wall, 2),
                    "blackout_median_ms": round(statistics.median(bl), 3),
                    "blackout_p99_ms": round(p99(bl), 3),
                    "blackout_worst_ms": round(max(bl), 3),
                    "reap_median_ms": round(statistics.median(reap), 1) if reap else None,
                    "overlapping": overlaps(m),
                    "blackouts_marked": len(m["blackout"]),
                    "load1": round(os.getloadavg()[0], 1),
                    "blackouts_ms": bl,
                    "windows": m,  # for bench/tailwhy.py
                    "pids": known_pids(host),
                }
                rounds.append(row)
                print(
                    f"round {i} {args.ab}={'on ' if exclusive else 'off'}: {wall:.2f} s, "
                    f"blackout median {row['blackout_median_ms']:.3f} p99 "
                    f"{row['blackout_p99_ms']:.3f} worst {row['blackout_worst_ms']:.3f} ms, "
                    f"reap median {row['reap_median_ms']} ms, overlapping "
                    f"{row['overlapping']}/{row['blackouts_marked']}, load {row['load1']}",
                    flush=True,
                )
            for n in names:
                host.call("vm.stop", {"vm": n})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"args": vars(args), "rounds": rounds}
    for side in (True, False):
        rs = [r for r in rounds if r["exclusive_teardown"] is side]
        if rs:
            key = "on" if side else "off"
            out[key] = {
                k: round(statistics.median(r[k] for r in rs), 3)
                for k in ("wall_s", "blackout_median_ms", "blackout_p99_ms", "blackout_worst_ms")
            }
            print(f"{args.ab} {key}: medians of rounds {out[key]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vms", type=int, default=32)
    ap.add_argument("--memory-mib", type=int, default=64)
    ap.add_argument("--tick-ms", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-parallel", type=int, default=4)
    ap.add_argument("--standby", action="store_true")
    ap.add_argument(
        "--ab", default="exclusive_teardown", help="the [upgrade] setting flipped between rounds"
    )
    ap.add_argument("--settle-s", type=float, default=1.0, help="idle before each rollout")
    ap.add_argument("--env", action="append", default=[], help="VAR=VALUE for the supervisor")
    ap.add_argument("--perf", help="a directory: perf sched record each rollout there")
    args = ap.parse_args(argv)
    if args.perf:
        Path(args.perf).mkdir(parents=True, exist_ok=True)
    save("tail", run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
