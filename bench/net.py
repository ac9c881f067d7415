"""Frames through a VM's NIC during live upgrades: how many are lost, and the
longest gap between two echoes (which should be about the upgrade's blackout).

    python -m bench.net [--upgrades N] [--rates 1000,10000] [--kinds baton,qemu] [--standby]

Each (kind, rate) runs in a network namespace of its own (a forked child
that unshared one before starting anything: ``baton_lab.netlab``), so the
broker creates the tap there and nothing leaves it.

baton: one baton-vmm VM with one NIC; the host sends numbered Ethernet
frames into its tap at ``rate`` a second through an AF_PACKET socket bound
to the tap, the built-in guest echoes each one (MACs swapped), and the
supervisor upgrades the VM ``upgrades`` times (``vmctl upgrade``, about one
a second). Reported: frames sent, echoed, lost, duplicated or reordered;
per upgrade the longest gap between two consecutive echoes around it, where
it began relative to the pause, the gap across the pause itself and the
upgrade's own blackout; the gap outside upgrades; each frame's round trip.

``run(kind, rate, upgrades) -> dict`` is one kind at one rate. "qemu" is
bench/net_qemu.py's ``run`` (a TCP echo in a Linux guest on virtio-net),
so both columns come from one command.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import importlib
import itertools
import sys
import time
from typing import Any

from baton_lab.harness import Host, short_root, wait_until
from baton_lab.netlab import Traffic, in_new_netns
from bench.common import save, summary
from bench.upgrade import standby_ready, write_settings, write_vm
from supervisor import netdev

VM = "netb"
TAP = "bt-netb-0"
MAC = "52:54:00:00:be:01"


def _gap_between(times: list[float], lo: float, hi: float) -> float:
    """The longest gap between consecutive arrivals that overlaps [lo, hi]."""
    i = max(0, bisect.bisect_left(times, lo) - 1)
    j = min(len(times), bisect.bisect_right(times, hi) + 1)
    return max((b - a for a, b in itertools.pairwise(times[i:j])), default=0.0)


def _where(
    times: list[float], window: tuple[float, float], pause: tuple[float, float]
) -> tuple[float, float]:
    """(the gap across ``pause``, when the longest gap in ``window`` began, relative to
    the pause), in ms."""
    stopped, resumed = pause
    i = bisect.bisect_left(times, stopped)
    across = (times[bisect.bisect_left(times, resumed)] - times[i - 1]) * 1000 if i else 0.0
    lo, hi = window
    a = max(0, bisect.bisect_left(times, lo) - 1)
    b = min(len(times), bisect.bisect_right(times, hi) + 1)
    seg = times[a:b]
    start = max(itertools.pairwise(seg), key=lambda ab: ab[1] - ab[0], default=(stopped, 0))[0]
    return round(across, 2), round((start - stopped) * 1000, 1)


def run_baton(
    rate: int, upgrades: int, interval: float = 1.0, standby: bool = False
) -> dict[str, Any]:
    root = short_root()
    write_settings(root, standby)
    nic = f'[[net]]\nname = "net0"\nmac = "{MAC}"\n'
    write_vm(root, VM, f"memory_mib = 16\ntick_ms = 50\nautostart = false\n\n{nic}")
    with Host.start(root, vm=VM) as host:
        r = host.vmctl("start", VM)
        if r.returncode != 0:
            raise RuntimeError(f"vmctl start: {r.stderr}")
        host.wait_beats(2)
        link = netdev.lookup(TAP)
        assert link is not None
        t = Traffic(TAP, MAC, rate=rate).start()
        wait_until(lambda: len(t.echoes) > rate // 10, 30, 0.01, "echoes")
        windows, blackouts, outcomes, pauses = [], [], [], []
        time.sleep(interval)
        for _ in range(upgrades):
            if standby:  # prepared beforehand, at nice 10: not inside the upgrade's window
                wait_until(lambda: standby_ready(host, VM), 120, 0.05, "the standby")
                time.sleep(interval)
            t0 = time.monotonic()
            _, report = host.upgrade()
            windows.append((t0, time.monotonic()))
            outcomes.append(report.get("outcome"))
            time.sleep(interval)  # asked after: a status call costs the guest CPU too
            if report.get("blackout_ms") is not None:
                blackouts.append(report["blackout_ms"])
                resumed = host.status(VM)["worker"]["last_resume"]["resumed_at_ns"] / 1e9
                pauses.append((resumed - report["blackout_ms"] / 1000, resumed))
        stopped = time.monotonic()
        t.stop()
        t.drain(timeout=20)
        after = netdev.lookup(TAP)
        device = host.status(VM)["nets"][0].get("device", {})
        host.vmctl("stop", VM)
    times = [e.at for e in t.echoes]
    gaps_up = [_gap_between(times, lo, hi) * 1000 for lo, hi in windows]
    inside = [(lo, hi) for lo, hi in windows]
    quiet = [
        (b - a) * 1000
        for a, b in itertools.pairwise(times)
        if not any(lo - 0.005 <= b and a <= hi + 0.005 for lo, hi in inside)
    ]
    seqs = [e.seq for e in t.echoes]
    missing = set(range(t.sent)) - set(seqs)
    near = [(lo - 0.2, hi + 0.2) for lo, hi in windows]
    lost_near = sum(1 for s in missing if any(lo <= t.sent_at[s] <= hi for lo, hi in near))
    rtt = [x * 1e6 for x in t.latencies()]
    where = [_where(times, w, p) for w, p in zip(windows, pauses, strict=False)]
    return {
        "kind": "baton",
        "standby": standby,
        "rate": rate,
        "upgrades": upgrades,
        "outcomes": outcomes,
        "sent": t.sent,
        "echoed": len(seqs),
        # echoes a second while sending: with --upgrades 0 and a rate above it, what
        # the guest and the VMM can echo
        "echoed_per_s": round(
            sum(1 for x in times if x <= stopped) / max(stopped - times[0], 1e-9) if times else 0
        ),
        "lost": len(missing),
        "lost_within_200ms_of_an_upgrade": lost_near,
        "lost_elsewhere": len(missing) - lost_near,
        # the tap's own counters: its tx is toward the VMM; tx_dropped is its queue
        # overflowing (txqueuelen) while the guest does not keep up
        "tap": after.stats if after is not None else None,
        "device": device,
        "duplicated": len(seqs) - len(set(seqs)),
        "reordered": sum(1 for a, b in itertools.pairwise(seqs) if b < a),
        "problems": t.problems(),
        "tap_unchanged": after is not None and after.index == link.index,
        "gap_during_upgrade_ms": summary(gaps_up) if gaps_up else None,
        "gap_outside_upgrades_ms": summary(quiet) if quiet else None,
        # the echo gap across the pause itself (last echo before the guest stopped to
        # the first after it ran again), and where each upgrade's longest gap began,
        # in ms from the moment the guest stopped (negative: during the prepare)
        "gap_across_pause_ms": summary([w[0] for w in where]) if where else None,
        "longest_gap_starts_ms": [w[1] for w in where],
        "longest_gap_ms": t.longest_gap() * 1000,
        "blackout_ms": summary(blackouts) if blackouts else None,
        "round_trip_us": summary(rtt) if rtt else None,
    }


def run(kind: str, rate: int, upgrades: int, standby: bool = False) -> dict[str, Any]:
    """One kind at one rate (call it inside a network namespace of its own);
    ``standby``: baton-vmm upgrades consume a pre-warmed worker."""
    if kind == "baton":
        return run_baton(rate, upgrades, standby=standby)
    if kind == "qemu":
        mod = importlib.import_module("bench.net_qemu")
        result: dict[str, Any] = mod.run("qemu", rate, upgrades)
        return result
    raise ValueError(f"unknown kind {kind!r} (baton or qemu)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.net", description=__doc__.splitlines()[0])
    p.add_argument("--upgrades", type=int, default=10)
    p.add_argument("--rates", default="1000,10000")
    p.add_argument("--kinds", default="baton")
    p.add_argument("--standby", action="store_true", help="baton-vmm: [upgrade] standby = true")
    args = p.parse_args(argv)
    results = []
    for kind in args.kinds.split(","):
        for rate in (int(x) for x in args.rates.split(",")):
            r = in_new_netns(functools.partial(run, kind, rate, args.upgrades, args.standby), 1800)
            results.append(r)
            print(_line(r), flush=True)
    path = save("net", {"upgrades": args.upgrades, "standby": args.standby, "results": results})
    print(f"saved {path}")
    return 0


def _line(r: dict[str, Any]) -> str:
    def fmt(s: dict[str, float] | None, key: str) -> str:
        return "-" if not s else f"{s[key]:.2f}"

    g, b = r.get("gap_during_upgrade_ms"), r.get("blackout_ms")
    return (
        f"{r.get('kind')} {r.get('rate')}/s: sent {r.get('sent')} lost {r.get('lost')} "
        f"(near upgrades {r.get('lost_within_200ms_of_an_upgrade', '-')}) "
        f"dup {r.get('duplicated', '-')} reordered {r.get('reordered', '-')}; gap during "
        f"upgrade median {fmt(g, 'median')} p99 {fmt(g, 'p99')} max {fmt(g, 'max')} ms; "
        f"blackout median {fmt(b, 'median')} max {fmt(b, 'max')} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
