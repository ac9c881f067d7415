"""What the pausing workers waited for, from ``bench.tail --perf DIR``'s traces.

    python -m bench.tailwhy DIR [--worst 10]

For each rollout (``DIR/roundNN-{on,off}.data`` beside ``bench/out/tail.json``),
each blackout window (the old worker's vCPU stop to the new one's vCPUs running,
from the supervisor's marks) and each thread of its two workers: every stretch
in that window when the thread was runnable but not on a CPU (from its wake-up,
or its preemption, to its switch-in), and who held that CPU meanwhile, by kind:
old workers in their exit (``S.teardown_begin``..``end``), other old or new
workers, the zygotes and their forks, the supervisor, the broker, kernel
threads, nobody (the CPU idle: this nested host waking a halted vCPU), others.
Printed for the ``--worst`` blackouts of each side, summed.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

SWITCH = re.compile(
    r"prev_comm=(.*) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> "
    r"next_comm=(.*) next_pid=(\d+) next_prio=\d+"
)
WAKING = re.compile(r"comm=.* pid=(\d+) prio=\d+ target_cpu=(\d+)")
FORK = re.compile(r"comm=.* pid=(\d+) child_comm=.* child_pid=(\d+)")
HEAD = re.compile(r"^\s*(.*?)\s+(-?\d+)/(-?\d+)\s+\[(\d+)\]\s+(\d+)\.(\d+):\s+(\S+):\s*(.*)$")


def events(data: Path) -> list[tuple[int, int, int, int, str, str]]:
    """(ns, cpu, tgid, tid, event, rest) of every event, in time order."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "--ns", "-F", "comm,pid,tid,cpu,time,event,trace"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    evs = []
    for line in out.splitlines():
        m = HEAD.match(line)
        if not m:
            continue
        _comm, tgid, tid, cpu, sec, frac, ev, rest = m.groups()
        ns = int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
        evs.append((ns, int(cpu), int(tgid), int(tid), ev, rest))
    evs.sort(key=lambda e: e[0])
    return evs


def analyse(data: Path, row: dict[str, Any], worst: int) -> collections.Counter[str]:
    evs = events(data)
    tgid: dict[int, int] = {}  # tid -> its process
    parent: dict[int, int] = {}
    comm: dict[int, str] = {}
    for _ns, _cpu, g, t, ev, rest in evs:
        if g > 0:
            tgid[t] = g
        if ev == "sched:sched_process_fork" and (m := FORK.search(rest)):
            parent[int(m.group(2))] = tgid.get(int(m.group(1)), int(m.group(1)))
    w = row["windows"]
    pids = row["pids"]
    olds = {b[0] for b in w["blackout"]}
    news = {b[1] for b in w["blackout"]}
    new_b0 = {b[1]: b[2] for b in w["blackout"]}
    teardown = {p: (t0, t1) for p, t0, t1 in w["teardown"]}
    zyg = set(pids["zygote"])

    def ancestors(g: int) -> set[int]:
        out: set[int] = set()
        while g in parent and g not in out and len(out) < 20:
            g = parent[g]
            out.add(g)
        return out

    def kind(tid: int, at: int, pair: tuple[int, int]) -> str:
        if tid == 0:
            return "nobody (idle)"
        g = tgid.get(tid, tid)
        if g in pair:
            return "its own pair"
        if g in teardown and teardown[g][0] <= at <= teardown[g][1]:
            return "old worker in its exit"
        if g in olds:
            return "old worker (other)"
        if g in news:
            return "new worker, paused after" if at < new_b0[g] else "new worker, resumed before"
        if g in pids["supervisor"]:
            return "supervisor"
        if g in pids["broker"]:
            return "broker"
        up = ancestors(g)
        if zyg & ({g} | up):
            return "zygote or its fork"
        if set(pids.get("bench", [])) & ({g} | up):
            return "the bench and vmctl"
        if set(pids["supervisor"]) & up:
            return "supervisor's other children"
        c = comm.get(tid, "")
        if c.startswith(("kworker", "ksoftirqd", "rcu", "kdamond", "kvm", "migration", "kthreadd")):
            return "kernel thread"
        return f"other: {c}"

    # per CPU: (start, tid) of who ran, from the switches
    ran: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for ns, cpu, _g, _t, ev, rest in evs:
        if ev == "sched:sched_switch" and (m := SWITCH.search(rest)):
            comm[int(m.group(5))] = m.group(4)
            ran[cpu].append((ns, int(m.group(5))))

    def who(cpu: int, a: int, b: int, pair: tuple[int, int]) -> collections.Counter[str]:
        c: collections.Counter[str] = collections.Counter()
        seq = ran[cpu]
        first = max(0, bisect.bisect_right(seq, (a, 1 << 62)) - 1)
        for i in range(first, len(seq)):
            t0, tid = seq[i]
            t1 = seq[i + 1][0] if i + 1 < len(seq) else b
            lo, hi = max(a, t0), min(b, t1)
            if hi > lo:
                c[kind(tid, lo, pair)] += hi - lo
            if t0 >= b:
                break
        return c

    total: collections.Counter[str] = collections.Counter()
    blackouts = sorted(w["blackout"], key=lambda b: b[3] - b[2], reverse=True)[:worst]
    for old, new, b0, b1 in blackouts:
        pair = (old, new)
        waits: collections.Counter[str] = collections.Counter()
        waiting: dict[int, int] = {}  # tid -> since when runnable
        for ns, cpu, _g, _t, ev, rest in evs:
            if ns < b0 - 50_000_000:
                continue
            if ns > b1:
                break
            if ev == "sched:sched_waking" and (m := WAKING.search(rest)):
                tid = int(m.group(1))
                if tgid.get(tid) in pair:
                    waiting.setdefault(tid, ns)
            elif ev == "sched:sched_switch" and (m := SWITCH.search(rest)):
                prev, state, nxt = int(m.group(2)), m.group(3), int(m.group(5))
                if tgid.get(prev) in pair and state.startswith("R"):
                    waiting[prev] = ns  # preempted: runnable from now
                if nxt in waiting:
                    since = waiting.pop(nxt)
                    lo, hi = max(since, b0), min(ns, b1)
                    if hi > lo:
                        waits += who(cpu, lo, hi, pair)
        ms = (b1 - b0) / 1e6
        top = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in waits.most_common(4))
        print(f"  blackout {ms:7.3f} ms (old {old}, new {new}): waited for: {top or '-'}")
        total += waits
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--worst", type=int, default=10)
    ap.add_argument("--json", default="bench/out/tail.json")
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.json).read_text())["rounds"]
    sums: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in rows:
        side = "on" if row["exclusive_teardown"] else "off"
        data = Path(args.dir) / f"round{row['round']:02d}-{side}.data"
        if not data.exists():
            continue
        print(
            f"round {row['round']} exclusive_teardown={side}: worst {row['blackout_worst_ms']} ms"
        )
        sums[side] += analyse(data, row, args.worst)
    for side, c in sums.items():
        print(f"exclusive_teardown={side}, the {args.worst} worst of each round, ms waited:")
        other = sum(v for k, v in c.items() if k.startswith("other: "))
        for k, v in c.most_common():
            if not k.startswith("other: "):
                print(f"  {k:32s} {v / 1e6:8.2f}")
        tops = [(k[7:], v) for k, v in c.most_common() if k.startswith("other: ")][:6]
        print(
            f"  {'other processes':32s} {other / 1e6:8.2f}",
            ", ".join(f"{k} {v / 1e6:.1f}" for k, v in tops),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
