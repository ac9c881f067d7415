"""Stock QEMU upgraded by Baton, beside baton-vmm, at the same RAM sizes.

    python -m bench.qemu [--upgrades N] [--sizes 256,1024,4096]

Both kinds run under a real broker and supervisor and are upgraded through
the supervisor. For QEMU the pause is QMP's STOP on the old QEMU to RESUME
on the new one (QEMU's own event stamps); for baton-vmm it is the old vCPU
leaving KVM_RUN to the new vCPU entering it. The QEMU guest is a Linux
kernel under TCG (this machine's KVM cannot boot Linux in useful time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.common import save
from bench.upgrade import baton_progress, baton_vm, supervised_run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_assets import counter_problems, counters, ensure_assets

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"


def qemu_progress(log: Path) -> list[Any]:
    rows = counters(log.read_text())
    return [rows, counter_problems(rows)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upgrades", type=int, default=20)
    ap.add_argument("--sizes", default="256,1024,4096")
    ap.add_argument(
        "--standby", action="store_true", help="also baton-vmm with [upgrade] standby = true"
    )
    args = ap.parse_args(argv)
    assets = ensure_assets(CACHE)
    results: dict[str, Any] = {"qemu": {}, "baton": {}, "baton_standby": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        qemu_vm = (
            f'vmm = "qemu"\nmemory_mib = {size}\n[qemu]\naccel = "tcg"\n'
            f'kernel = "{assets.kernel}"\ninitrd = "{assets.initramfs}"\n'
        )
        runs: list[tuple[str, str, Any, bool]] = [
            ("qemu", qemu_vm, qemu_progress, False),
            ("baton", baton_vm(size), baton_progress, False),
        ]
        if args.standby:
            runs.append(("baton_standby", baton_vm(size), baton_progress, True))
        for kind, text, progress, standby in runs:
            r = supervised_run(text, args.upgrades, progress, standby=standby)
            results[kind][str(size)] = r
            b, t, p = r["blackout_ms"], r["total_ms"], r["prepare_ms"]
            print(
                f"{kind:13s} {size:5d} MiB: pause median {b['median']:.3f} p99 {b['p99']:.3f} ms; "
                f"total median {t['median']:.1f} p99 {t['p99']:.1f} ms; "
                f"prepare median {p['median']:.1f} ms"
            )
    print(f"saved {save('qemu', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
