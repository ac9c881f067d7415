"""Network traffic across live upgrades of a stock QEMU VM: lines lost and the longest gap.

    python -m bench.net --kinds qemu [--upgrades N] [--rates 1000,10000]
    python -m bench.net_qemu [--upgrades N] [--rates 1000,10000]   # saved apart

Each rate runs in a network namespace of its own (a forked child that
unshared one before it started anything): the broker creates the VM's tap
there, its host side gets 169.254.0.1/16 and the guest 169.254.0.2/16. One
QEMU VM (Linux under TCG, the test guest of tests/qemu_assets.py) runs a TCP
echo service on its virtio-net NIC; numbered lines are sent to it at a fixed
rate over one connection while the supervisor upgrades the VM ``N`` times
(about one a second).

``run(kind, rate, upgrades)`` gives bench/net.py's figures for one rate:
lines sent, echoed, lost (never came back), duplicated, reordered, problems
(connection errors: a reset would show here; lines out of order or corrupt);
per upgrade the longest gap between two arrivals while its control call ran,
and the gaps outside the upgrades (the TCG guest's own jitter); each line's
round trip; the upgrades' own blackout (QMP's STOP on the old QEMU to RESUME
on the new). Frames sent while no QEMU runs wait in the tap, and TCP
retransmits anything dropped, so "lost" counts lines that never came back at
all and the gap shows what the upgrade cost. (The guest's busybox nc has no
UDP, so datagrams are not measured.)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from baton_lab.harness import Host, short_root, wait_until
from baton_lab.netlab import in_new_netns
from bench.common import save, summary
from bench.upgrade import write_vm
from supervisor import netdev
from supervisor.vmconfig import default_tap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_assets import ECHO_PORT, counters, ensure_assets

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"
HOST_IP, GUEST_IP = "169.254.0.1", "169.254.0.2"
LINE = 11  # b"%010d\n"
WAIT = 120.0


def add_address(ifname: str, address: str, prefixlen: int) -> None:
    """An address on ``ifname`` in this network namespace (netlink: no ``ip`` needed)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.addr(
            "add", index=ipr.link_lookup(ifname=ifname)[0], address=address, prefixlen=prefixlen
        )


class Flow:
    """Numbered lines to the echo service at ``rate`` a second, paced by the clock;
    arrival times of what comes back."""

    def __init__(self, sock: socket.socket, rate: int) -> None:
        self.sock, self.rate = sock, rate
        self.sent_at: list[float] = []
        self.arrivals: list[tuple[float, int]] = []  # (time, seq) per line echoed
        self.bad = 0  # out of order or corrupted
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._recv)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            n = len(self.sent_at)
            if due > n:
                batch = b"".join(b"%010d\n" % i for i in range(n, due))
                now = time.monotonic()
                self.sent_at += [now] * (due - n)
                try:
                    self.sock.sendall(batch)
                except OSError as e:
                    self.errors.append(f"send: {e!r}")
                    return
            time.sleep(0.001)

    def _recv(self) -> None:
        buf = b""
        expect = 0
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError as e:
                self.errors.append(f"recv: {e!r}")
                return
            now = time.monotonic()
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                seq = int(line) if len(line) == LINE - 1 and line.isdigit() else -1
                if seq != expect:
                    self.bad += 1
                expect = seq + 1
                self.arrivals.append((now, seq))


def gaps(
    arrivals: list[tuple[float, int]], windows: list[tuple[float, float]]
) -> tuple[list[float], list[float]]:
    """Per upgrade window, the longest gap between two arrivals that overlaps it; and
    every gap that overlaps none, 5 ms either side (ms)."""
    during = [0.0] * len(windows)
    quiet = []
    times = sorted({t for t, _ in arrivals})
    for a, b in itertools.pairwise(times):
        hit = [i for i, (w0, w1) in enumerate(windows) if a < w1 and b > w0]
        for i in hit:
            during[i] = max(during[i], (b - a) * 1000)
        if not any(w0 - 0.005 <= b and a <= w1 + 0.005 for w0, w1 in windows):
            quiet.append((b - a) * 1000)
    return during, quiet


def run(kind: str, rate: int, upgrades: int, interval: float = 1.0) -> dict[str, Any]:
    """One VM, one connection, ``upgrades`` upgrades about ``interval`` s apart under a
    flow of ``rate`` lines a second; the figures in bench/net.py's shape. Call it
    inside a network namespace of its own."""
    if kind != "qemu":
        raise ValueError(f"bench.net_qemu measures QEMU VMs, not {kind!r}")
    assets = ensure_assets(CACHE)
    root = short_root()
    tap = default_tap("bench", "net0")
    write_vm(
        root,
        "bench",
        'vmm = "qemu"\nmemory_mib = 256\n[qemu]\naccel = "tcg"\n'
        f'kernel = "{assets.kernel}"\ninitrd = "{assets.initramfs}"\n'
        f'append = "{assets.cmdline} baton.ip={GUEST_IP}/16"\n[[net]]\nname = "net0"\n',
    )
    try:
        with Host.start(root, vm="bench") as host:
            wait_until(lambda: len(counters(host.console_text())) >= 3, WAIT, 0.05)
            link = netdev.lookup(tap)
            assert link is not None, f"no tap {tap}"
            add_address(tap, HOST_IP, 16)
            sock = wait_until(lambda: socket.create_connection((GUEST_IP, ECHO_PORT), 2), WAIT)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            flow = Flow(sock, rate)
            flow.start()
            windows: list[tuple[float, float]] = []
            blackouts, outcomes = [], []
            for _ in range(upgrades):
                time.sleep(interval)
                t0 = time.monotonic()
                _, report = host.upgrade()
                windows.append((t0, time.monotonic()))
                outcomes.append(report.get("outcome"))
                if report.get("blackout_ms") is not None:
                    blackouts.append(report["blackout_ms"])
            time.sleep(interval)
            flow.stop.set()
            flow.threads[0].join(10)
            sent = len(flow.sent_at)
            deadline = time.monotonic() + 20  # what has not come back by then is lost
            while len(flow.arrivals) < sent and time.monotonic() < deadline:
                time.sleep(0.05)
            sock.shutdown(socket.SHUT_WR)
            flow.threads[1].join(10)
            sock.close()
            after = netdev.lookup(tap)
            host.vmctl("stop", "bench")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seqs = [seq for _, seq in flow.arrivals]
    missing = set(range(sent)) - set(seqs)
    near = [(lo - 0.2, hi + 0.2) for lo, hi in windows]
    lost_near = sum(1 for s in missing if any(lo <= flow.sent_at[s] <= hi for lo, hi in near))
    during, quiet = gaps(flow.arrivals, windows)
    times = sorted(t for t, _ in flow.arrivals)
    rtt = [(t - flow.sent_at[s]) * 1e6 for t, s in flow.arrivals if 0 <= s < sent]
    return {
        "kind": kind,
        "transport": "tcp lines (the guest's nc -e cat)",
        "rate": rate,
        "upgrades": upgrades,
        "outcomes": outcomes,
        "sent": sent,
        "echoed": len(set(seqs) & set(range(sent))),
        "lost": len(missing),
        "lost_within_200ms_of_an_upgrade": lost_near,
        "lost_elsewhere": len(missing) - lost_near,
        "tap": after.stats if after is not None else None,
        "duplicated": len(seqs) - len(set(seqs)),
        "reordered": sum(1 for a, b in itertools.pairwise(seqs) if b < a),
        "problems": [
            *flow.errors,
            *([f"{flow.bad} lines out of order or corrupt"] * bool(flow.bad)),
        ],
        "tap_unchanged": after is not None and after.index == link.index,
        "gap_during_upgrade_ms": summary(during) if during else None,
        "gap_outside_upgrades_ms": summary(quiet) if quiet else None,
        "longest_gap_ms": max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1000,
        "blackout_ms": summary(blackouts) if blackouts else None,
        "round_trip_us": summary(rtt) if rtt else None,
    }


def main(argv: list[str] | None = None) -> int:
    """QEMU only, saved apart (bench/out/net_qemu.json); ``python -m bench.net --kinds
    baton,qemu`` runs both kinds into one file."""
    from bench.net import _line

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upgrades", type=int, default=10)
    ap.add_argument("--rates", default="1000,10000")
    args = ap.parse_args(argv)
    results = []
    for rate in (int(r) for r in args.rates.split(",")):
        # each rate in a network namespace of its own, which its daemons inherit
        r = in_new_netns(functools.partial(run, "qemu", rate, args.upgrades), 1800)
        results.append(r)
        print(_line(r), flush=True)
    print(f"saved {save('net_qemu', {'upgrades': args.upgrades, 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
