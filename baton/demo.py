"""The built-in default, end to end, under a temporary root (``make demo``)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baton.daemonize import read_pidfile
from baton.paths import Paths
from broker.client import BrokerClient

MiB = 1 << 20


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Baton demo under a temporary root")
    parser.add_argument("--keep", action="store_true", help="keep the root and daemons running")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="baton-demo-", dir="/tmp"))
    paths = Paths(root)
    bindir = Path(sys.executable).parent
    print(f"Baton demo under root {root}")
    try:
        run([str(bindir / "baton-brokerd"), "--root", str(root)])
        with BrokerClient(paths.broker_socket) as broker:
            broker.create_vm("demo")
            broker.create_memfd("demo", "ram", 256 * MiB)
            fd = broker.get("demo", ["ram"])["ram"]
            os.pwrite(fd, b"guest RAM lives in the broker\n", 0)
            os.close(fd)
        run([str(bindir / "vmctl"), "--root", str(root), "broker", "status"])
        print("\nThe broker holds demo's 256 MiB of RAM, sealed against resizing, in a memfd.")
    finally:
        if not args.keep:
            pid = read_pidfile(paths.broker_pidfile)
            if pid:
                os.kill(pid, 15)
                deadline = time.monotonic() + 10
                while read_pidfile(paths.broker_pidfile) and time.monotonic() < deadline:
                    time.sleep(0.05)
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
