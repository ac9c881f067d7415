"""Network traffic across live upgrades of a stock QEMU VM: lines lost and the longest gap.

    python -m bench.net_qemu [--upgrades N] [--rates 1000,10000]

Each rate runs in a network namespace of its own (a forked child that
unshared one before it started anything): the broker creates the VM's tap
there, its host side gets 169.254.0.1/16 and the guest 169.254.0.2/16. One
QEMU VM (Linux
under TCG, the test guest of tests/qemu_assets.py) runs a TCP echo service
on its virtio-net NIC; numbered lines are sent to it at a fixed rate over one
connection while the supervisor upgrades the VM ``N`` times (one a second).

Reported per rate: lines sent, echoed, lost (never came back), out of order
or corrupted, connection errors (a reset would show here); the longest gap
between two arrivals while each upgrade's control call ran (median and max
over the upgrades) and the longest outside the upgrades (the TCG guest's own
jitter); each line's round trip (median, p99, max); and the upgrades' own
blackout (QMP's STOP on the old QEMU to RESUME on the new). Frames sent while
no QEMU runs wait in the tap, and TCP retransmits anything dropped, so
"lost" counts lines that never came back at all and the gap shows what the
upgrade cost. (The guest's busybox nc has no UDP, so datagrams are not
measured.)

``run(kind, rate, upgrades)`` gives one rate's figures (``kind`` must be
"qemu").
"""

from __future__ import annotations

import argparse
import functools
import itertools
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from baton import contract
from baton_lab.harness import Host, short_root, wait_until
from baton_lab.netlab import in_new_netns
from bench.common import save, summary
from bench.upgrade import write_vm
from supervisor.vmconfig import default_tap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_assets import ECHO_PORT, counters, ensure_assets

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"
HOST_IP, GUEST_IP = "169.254.0.1", "169.254.0.2"
LINE = 11  # b"%010d\n"
WAIT = 120.0


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
) -> tuple[list[float], float]:
    """Per upgrade window, the longest gap between two arrivals that overlaps it; and
    the longest gap that overlaps none (ms)."""
    during = [0.0] * len(windows)
    outside = 0.0
    times = sorted({t for t, _ in arrivals})
    for a, b in itertools.pairwise(times):
        hit = [i for i, (w0, w1) in enumerate(windows) if a < w1 and b > w0]
        for i in hit:
            during[i] = max(during[i], (b - a) * 1000)
        if not hit:
            outside = max(outside, (b - a) * 1000)
    return during, outside


def run(kind: str, rate: int, upgrades: int, interval: float = 1.0) -> dict[str, Any]:
    """One VM, one connection, ``upgrades`` upgrades ``interval`` s apart under a flow of
    ``rate`` lines a second. Call it inside a network namespace of its own."""
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
            subprocess.run(["ip", "addr", "add", f"{HOST_IP}/16", "dev", tap], check=True)
            sock = wait_until(lambda: socket.create_connection((GUEST_IP, ECHO_PORT), 2), WAIT)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            flow = Flow(sock, rate)
            flow.start()
            time.sleep(2.0)  # a baseline before the first upgrade
            windows, reports = [], []
            for _ in range(upgrades):
                t0 = time.monotonic()
                reports.append(host.call("vm.upgrade", {"vm": "bench"}, timeout=300))
                windows.append((t0, time.monotonic()))
                time.sleep(interval)
            flow.stop.set()
            flow.threads[0].join(10)
            sent = len(flow.sent_at)
            # whatever has not come back within 10 s is lost
            with_deadline = time.monotonic() + 10
            while len(flow.arrivals) < sent and time.monotonic() < with_deadline:
                time.sleep(0.05)
            sock.shutdown(socket.SHUT_WR)
            flow.threads[1].join(10)
            sock.close()
            fds = [f["name"] for f in host.broker.status()["vms"][0]["fds"]]
            assert contract.tap_fd("net0") in fds
            host.call("vm.stop", {"vm": "bench"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bad = [r for r in reports if r["outcome"] != "committed"]
    if bad:
        raise SystemExit(f"{len(bad)} upgrades failed: {bad[:1]}")
    echoed = {seq for _, seq in flow.arrivals if seq >= 0}
    during, outside = gaps(flow.arrivals, windows)
    rtt = [(t - flow.sent_at[s]) * 1000 for t, s in flow.arrivals if 0 <= s < sent]
    return {
        "kind": kind,
        "rate": rate,
        "upgrades": upgrades,
        "sent": sent,
        "echoed": len(echoed),
        "lost": sent - len(echoed & set(range(sent))),
        "out_of_order_or_corrupt": flow.bad,
        "connection_errors": flow.errors,
        "longest_gap_ms_during_upgrades": round(max(during, default=0.0), 3),
        "gap_ms_per_upgrade": summary(during),
        "longest_gap_ms_otherwise": round(outside, 3),
        "rtt_ms": summary(rtt),
        "blackout_ms": summary([r["blackout_ms"] for r in reports]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upgrades", type=int, default=10)
    ap.add_argument("--rates", default="1000,10000")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"qemu": {}}
    for rate in (int(r) for r in args.rates.split(",")):
        # each rate in a network namespace of its own, which its daemons inherit
        r = in_new_netns(functools.partial(run, "qemu", rate, args.upgrades), 1800)
        results["qemu"][str(rate)] = r
        print(
            f"qemu {rate:6d}/s: {r['sent']} sent, {r['lost']} lost, "
            f"{r['out_of_order_or_corrupt']} out of order, errors {r['connection_errors']}; "
            f"longest gap per upgrade median {r['gap_ms_per_upgrade']['median']:.1f} max "
            f"{r['longest_gap_ms_during_upgrades']:.1f} ms "
            f"({r['longest_gap_ms_otherwise']:.1f} otherwise); rtt median "
            f"{r['rtt_ms']['median']:.2f} max {r['rtt_ms']['max']:.1f} ms; blackout median "
            f"{r['blackout_ms']['median']:.2f} ms"
        )
    print(f"saved {save('net_qemu', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
