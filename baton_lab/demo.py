"""The built-in default, end to end, under a temporary root (``make demo``, or
``baton-demo`` once installed).

A broker and a supervisor start under /tmp/baton-demo-*; the built-in
``demo`` VM boots and heartbeats; it is upgraded live a few times while its
heartbeats go on; every upgrade report is printed, then the heartbeat
sequence is checked for gaps, repeats and RAM changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from baton.daemonize import read_pidfile
from baton.paths import Paths
from baton_lab.harness import terminate, wait_until
from vmm.guest import continuity_problems, heartbeats


def sh(bindir: Path, root: Path, *args: str, show: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(bindir / args[0]), "--root", str(root), *args[1:]]
    if show:
        print(f"\n$ {args[0]} {' '.join(args[1:])}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if show:
        sys.stdout.write(out.stdout)
        sys.stdout.flush()
    if out.returncode not in (0, 4):
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{args[0]} failed with status {out.returncode}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Baton demo under a temporary root")
    parser.add_argument("--upgrades", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="leave the daemons and root in place")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="baton-demo-", dir="/tmp"))
    paths = Paths(root)
    bindir = Path(sys.executable).parent
    print(f"Baton demo under the temporary root {root}")
    log = paths.console_log("demo")
    try:
        sh(bindir, root, "baton-brokerd")
        sh(bindir, root, "baton-supervisord")
        sh(bindir, root, "vmctl", "list")
        sh(bindir, root, "vmctl", "start", "demo")
        wait_until(lambda: len(heartbeats(log.read_text())) >= 5, 30, what="heartbeats")
        print("\n$ vmctl logs demo --lines 3")
        print("\n".join(log.read_text().splitlines()[-3:]))
        blackouts = []
        for i in range(args.upgrades):
            out = sh(bindir, root, "vmctl", "--json", "upgrade", "demo", show=False)
            report = json.loads(out.stdout)
            if i == 0:
                print("\n$ vmctl --json upgrade demo")
                print(json.dumps(report, indent=2))
            else:
                print(
                    f"\n$ vmctl upgrade demo   # {i + 1}: {report['outcome']}, "
                    f"blackout {report['blackout_ms']:.3f} ms, total {report['total_ms']:.1f} ms, "
                    f"pid {report['old_pid']} -> {report['new_pid']}"
                )
            blackouts.append(report["blackout_ms"])
        n = len(heartbeats(log.read_text()))
        wait_until(lambda: len(heartbeats(log.read_text())) >= n + 5, 30, what="more heartbeats")
        sh(bindir, root, "vmctl", "status", "demo")
        sh(bindir, root, "vmctl", "fds", "demo")
        beats = heartbeats(log.read_text())
        problems = continuity_problems(beats)
        listed = ", ".join(f"{b:.3f}" for b in blackouts)
        print(
            f"\n{len(beats)} heartbeats, seq {beats[0].seq}..{beats[-1].seq}, ram={beats[-1].ram}, "
            f"{args.upgrades} live upgrades, blackouts {listed} ms"
        )
        print(
            "continuity: "
            + ("no gap, no repeat, RAM unchanged" if not problems else f"BROKEN {problems}")
        )
        return 1 if problems else 0
    finally:
        if not args.keep:
            subprocess.run(
                [str(bindir / "vmctl"), "--root", str(root), "stop", "demo"], capture_output=True
            )
            _stop(paths.supervisor_pidfile)
            _stop(paths.broker_pidfile)
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"\nleft running under {root} (vmctl --root {root} ...)")


def _stop(pidfile: Path) -> None:
    pid = read_pidfile(pidfile)
    if pid is not None:
        terminate(pid, pidfile.stem)


if __name__ == "__main__":
    sys.exit(main())
