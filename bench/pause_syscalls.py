"""Which syscalls the workers make around an upgrade's pause, counted by perf.

    python -m bench.pause_syscalls [--vmm qemu|baton] [--upgrades N] [--jail on|off]

One VM on a fresh root; ``perf record -e raw_syscalls:sys_enter -a`` (CLOCK_MONOTONIC,
perf's own syscalls filtered out) runs across N live upgrades. Each upgrade's window
is from its journal's ``transfer`` record to its ``resumed`` record (it holds the
pause, and a little before and after it); the syscalls of the old and the new worker
(every thread) inside it are counted by name and by thread. Every syscall a jailed
worker makes pays the seccomp entry cost (``bench.seccomp``), so this says what a
filter can cost a pause. Needs perf and root.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyseccomp  # type: ignore[import-untyped]

from baton_lab.harness import Host
from bench.common import save
from bench.jail import make_root, vm_file, wait_running

LINE = re.compile(r"\s*(\S.*?)\s+(\d+)/(\d+)\s+([\d.]+):\s+NR (\d+) ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.pause_syscalls", description=__doc__.splitlines()[0])
    p.add_argument("--vmm", default="qemu", choices=("baton", "qemu"))
    p.add_argument("--upgrades", type=int, default=5)
    p.add_argument("--jail", default="on", choices=("on", "off"))
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed")
    side = "jailed" if args.jail == "on" else "plain"
    root = make_root(vm_file(args.vmm, 256), "kill")
    (
        root / "etc" / "baton" / "vms.d" / f"{'plain' if side == 'jailed' else 'jailed'}.toml"
    ).unlink()
    windows: list[tuple[float, float, dict[int, str]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "perf.data")
        h = Host.start(root, vm=side)
        try:
            wait_running(args.vmm, h, side)
            perf = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    'exec perf record -q -e raw_syscalls:sys_enter --filter "common_pid != $$" '
                    f"-a -k CLOCK_MONOTONIC -o {data}",
                ]
            )
            offset = time.time() - time.monotonic()  # journal stamps are wall-clock
            time.sleep(1)  # perf is recording (no handshake to wait on)
            journal = h.paths.lib / "upgrade" / f"{side}.last"
            for _ in range(args.upgrades):
                old = h.status(side)["pid"]
                rc, rep = h.upgrade(side)
                if rc != 0:
                    raise SystemExit(f"upgrade failed: {rep}")
                steps = {
                    r["step"]: r["t"] - offset
                    for r in map(json.loads, journal.read_text().splitlines())
                }
                windows.append(
                    (steps["transfer"], steps["resumed"], {old: "old", rep["new_pid"]: "new"})
                )
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        finally:
            h.cleanup()
            shutil.rmtree(root, ignore_errors=True)
        text = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "pid,tid,comm,time,trace"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    arch = pyseccomp.system_arch()
    by_name: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        pid, t, nr = int(m.group(2)), float(m.group(4)), int(m.group(5))
        for start, end, roles in windows:
            if start <= t <= end and pid in roles:
                by_name[pyseccomp.resolve_syscall(arch, nr).decode()] += 1
                by_thread[f"{roles[pid]} {m.group(1)}"] += 1
    n = len(windows)
    out: dict[str, Any] = {
        "vmm": args.vmm,
        "jail": args.jail,
        "upgrades": n,
        "window_ms": [round((b - a) * 1e3, 1) for a, b, _ in windows],
        "syscalls_per_window": round(sum(by_name.values()) / n, 1),
        "by_syscall": {k: round(v / n, 1) for k, v in by_name.most_common()},
        "by_thread": {k: round(v / n, 1) for k, v in by_thread.most_common()},
    }
    print(f"windows (ms): {out['window_ms']}; syscalls per window: {out['syscalls_per_window']}")
    for k, v in list(out["by_syscall"].items())[:12]:
        print(f"  {k:18} {v}")
    for k, v in list(out["by_thread"].items())[:8]:
        print(f"  {k:28} {v}")
    print(f"({save('pause_syscalls', out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
