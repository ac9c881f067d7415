"""The CPU work inside baton-vmm's pause, in one process: save, validate, apply.

    python -m bench.pause_work [--rounds N] [--vcpus 1,2,8] [--frame on|off|ab]

Two ``Machine``s on one memfd, built as the worker builds them (no broker, so
no run lease): the running one hands off to a fresh incoming one through
``handoff_out``/``handoff_in`` on each side's vCPU-0 thread, exactly the code a
live upgrade runs, minus the processes, the socket and the wake-up between
them; then the new one runs the guest and the next fresh one takes it. Each
round reports the machine's own stamps: the old side's collect and encode
(save), the new side's decode and cross-check (validate) and apply; the first
two rounds are dropped. ``--frame``: the state as the frame (``on``, what two
current workers use), as format 1 (``off``), or alternating rounds of both
(``ab``, reported apart). For the whole handoff between processes see
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


def run(vcpus: int, rounds: int, mode: str = "on") -> dict[str, dict[str, dict[str, float]]]:
    fd = os.memfd_create("bench-ram")
    os.ftruncate(fd, 256 * MiB)
    spec = MachineSpec("bench", vcpus=vcpus, tick_ns=10_000_000)
    samples: dict[str, dict[str, list[float]]] = {}
    src = Machine(spec, {"ram": fd})
    try:
        src.boot()
        time.sleep(0.5)  # the guest is up and ticking
        for i in range(rounds + 2):
            dst = Machine(spec, {"ram": fd})
            dst.mark_incoming()
            box: list[bytes] = []
            frame = mode == "on" or (mode == "ab" and i % 2 == 0)
            out = src.handoff_out(lambda p, b=box: b.append(b"".join(p)), None, frame=frame)
            got = dst.handoff_in(lambda b=box: b.pop(0), time.monotonic_ns() + 5_000_000_000)
            src.close()
            src = dst
            if i >= 2:
                group = samples.setdefault("frame" if frame else "v1", {k: [] for k in FIELDS})
                for k in FIELDS:
                    group[k].append(float({**out, **got}[k]))
            time.sleep(0.05)  # the guest runs a little between handoffs
    finally:
        src.close()
        os.close(fd)
    return {g: {k: summary(v) for k, v in s.items()} for g, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--vcpus", default="1,2,8")
    ap.add_argument("--frame", choices=("on", "off", "ab"), default="on")
    args = ap.parse_args(argv)
    install_kick_handler()
    results = {}
    for n in (int(v) for v in args.vcpus.split(",")):
        for group, res in run(n, args.rounds, args.frame).items():
            results[f"{n}vcpu-{group}"] = res
            print(f"-- {n} vCPU(s), {args.rounds} rounds, in one process: {group}")
            for k, s in res.items():
                unit = "bytes" if k == "state_size" else "us"
                print(f"   {k:12s} median {s['median']:9.1f}  p99 {s['p99']:9.1f} {unit}")
    print(f"saved {save('pause_work', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
