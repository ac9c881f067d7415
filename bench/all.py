"""Run every benchmark in turn (``make bench``)."""

from __future__ import annotations

import importlib
import sys

BENCHES = ["bench.broker", "bench.vmm", "bench.upgrade", "bench.qemu", "bench.suspend"]


def main() -> int:
    for name in BENCHES:
        print(f"== {name}", flush=True)
        rc = importlib.import_module(name).main([])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
