"""The CPU work inside baton-vmm's pause, in one process: save, validate, apply.

    python -m bench.pause_work [--rounds N] [--vcpus 1,2,8]

Two ``Machine``s on one memfd, built as the worker builds them (no broker, so
no run lease): the running one hands off to a fresh incoming one through
``handoff_out``/``handoff_in`` on each side's vCPU-0 thread, exactly the code a
live upgrade runs, minus the processes, the socket and the wake-up between
them; then the new one runs the guest and the next fresh one takes it. Each
round reports the machine's own stamps: the old side's collect and encode
(save), the new side's decode and cross-check (validate) and apply; the first
two rounds are dropped. For the whole handoff between processes see
``bench.vmm``.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import save, summary
from vmm.machine import Machine, MachineSpec
from vmm.vcpu import install_kick_handler

MiB = 1 << 20
FIELDS = ("collect_us", "save_us", "validate_us", "apply_us", "state_size")


def run(vcpus: int, rounds: int) -> dict[str, dict[str, float]]:
    fd = os.memfd_create("bench-ram")
    os.ftruncate(fd, 256 * MiB)
    spec = MachineSpec("bench", vcpus=vcpus, tick_ns=10_000_000)
    samples: dict[str, list[float]] = {k: [] for k in FIELDS}
    src = Machine(spec, {"ram": fd})
    try:
        src.boot()
        time.sleep(0.5)  # the guest is up and ticking
        for i in range(rounds + 2):
            dst = Machine(spec, {"ram": fd})
            dst.mark_incoming()
            box: list[bytes] = []
            out = src.handoff_out(box.append, None)
            got = dst.handoff_in(box.pop, time.monotonic_ns() + 5_000_000_000)
            src.close()
            src = dst
            if i >= 2:
                for k in FIELDS:
                    samples[k].append(float({**out, **got}[k]))
            time.sleep(0.05)  # the guest runs a little between handoffs
    finally:
        src.close()
        os.close(fd)
    return {k: summary(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--vcpus", default="1,2,8")
    args = ap.parse_args(argv)
    install_kick_handler()
    results = {}
    for n in (int(v) for v in args.vcpus.split(",")):
        res = results[f"{n}vcpu"] = run(n, args.rounds)
        print(f"-- {n} vCPU(s), {args.rounds} rounds, in one process")
        for k, s in res.items():
            unit = "bytes" if k == "state_size" else "us"
            print(f"   {k:12s} median {s['median']:9.1f}  p99 {s['p99']:9.1f} {unit}")
    print(f"saved {save('pause_work', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
