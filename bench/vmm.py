"""VMM handoff benchmark: pause, save, load and resume, separately, with 1 and 2 vCPUs.

    python -m bench.vmm [--handoffs N] [--vcpus 1,2,8] [--no-resume-asked]
                        [--awake on|off|ab] [--deadline S]

A chain of real worker processes on one broker-held memfd: each step starts
an incoming worker (built before the pause), then the old worker pauses,
saves and sends its state over a socket pair, the new one loads and
resumes. Times come from each worker's own CLOCK_MONOTONIC stamps; "stop to
run" is from the old worker's pause request to the new worker's vCPUs
re-entering KVM_RUN, driven by this process (no supervisor, no journal).

``--awake``: the workers wait awake inside the pause (``vmm/awake.py``: the
pre-wake and bounded spins; ``on``, the default), or asleep as before it
(``off``: ``BATON_VMM_AWAKE=0`` in their environment), or ``ab``: workers in
the pattern on, on, off, off, ... so that handoffs alternate awake, mixed,
asleep, mixed (each reported on its own; mixed ones are an older and a newer
worker in either order, which must interoperate). ``--b-env VAR=VALUE``
(repeatable) gives the B workers of ``ab`` that environment instead, to A/B
any other switch (groups A, B, mixed).

A handoff that fails or takes longer than ``--deadline`` seconds for any
reply ends the run with the error, and every worker it started is killed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

from baton.wire import RemoteError, WireError
from baton_lab.harness import WorkerProcess, hand_off
from bench.common import continuity_after, provisioned_broker, save, summary, wait_heartbeats

MiB = 1 << 20
ASLEEP = {"BATON_VMM_AWAKE": "0"}


def handoff(
    old: WorkerProcess, new: WorkerProcess, worker_commits: bool, deadline: float
) -> dict[str, float]:
    """One handoff. ``worker_commits``: the new worker resumes by itself after the
    load (as the supervisor's default upgrade does); else it waits for our resume."""
    commit_by = time.monotonic_ns() + 10_000_000_000 if worker_commits else None
    r = hand_off(old, new, commit_by_ns=commit_by, timeout=deadline)
    sent, loaded, resumed = r["sent"], r["loaded"], r["resumed"]
    stop = sent["stopped_at_ns"]

    def at(ns: int) -> float:  # a stamp, in us from the vCPU stop (one clock: both workers)
        return (ns - stop) / 1000

    out = {
        "pause_us": sent["pause_us"],
        "collect_us": sent["collect_us"],
        "save_us": sent["save_us"],
        "send_us": sent["send_us"],
        "validate_us": loaded["validate_us"],
        "apply_us": loaded["apply_us"],
        "load_us": loaded["validate_us"] + loaded["apply_us"],
        "resume_us": resumed["resume_us"],
        "at_parked_us": at(sent["parked_at_ns"]),
        "at_sent_us": at(sent["sent_at_ns"]),
        "at_readable_us": at(loaded["readable_at_ns"]),
        "at_received_us": at(loaded["received_at_ns"]),
        "at_loaded_us": at(loaded["loaded_at_ns"]),
        "at_resume_started_us": at(resumed["resume_started_ns"]),
        "stop_to_run_us": at(resumed["resumed_at_ns"]),
        "state_size": sent["state_size"],
        # sections that came through the new worker's memfd (vmm.state_shm), not datagrams
        "shm_sections": loaded.get("shm_sections", 0),
    }
    if "lease_us" in loaded:  # the commit's run flag write, inside the pause
        out["lease_us"] = loaded["lease_us"]
    for side, r_ in (("old", sent), ("new", loaded)):
        for k, ns in r_.get("stamps", {}).items():
            out[f"at_{side}_{k}_us"] = at(ns)
    if "ready_at_ns" in loaded:  # the pre-wake: the new worker said it waits awake
        out["at_ready_us"] = at(loaded["ready_at_ns"])  # negative: before the stop
    return out


def awake_pattern(mode: str) -> Iterator[bool]:
    """Whether each worker of the chain, in order, waits awake."""
    while True:
        if mode == "ab":
            yield from (True, True, False, False)
        else:
            yield mode == "on"


def label(old_a: bool, new_a: bool, names: tuple[str, str]) -> str:
    if old_a and new_a:
        return names[0]
    return names[1] if not (old_a or new_a) else "mixed"


def run(
    vcpus: int,
    handoffs: int,
    worker_commits: bool,
    mode: str,
    deadline: float,
    b_env: dict[str, str] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``b_env``: what the "off" workers get instead of ``BATON_VMM_AWAKE=0``
    (groups then named A and B)."""
    names = ("awake", "asleep") if b_env is None else ("A", "B")
    samples: dict[str, dict[str, list[float]]] = {}
    pattern = awake_pattern(mode)
    with provisioned_broker("bench", 256 * MiB) as broker:

        def worker(incoming: bool) -> tuple[WorkerProcess, bool]:
            on = next(pattern)
            w = WorkerProcess(
                broker.root,
                "bench",
                vcpus=vcpus,
                incoming=incoming,
                env=None if on else (b_env or ASLEEP),
            )
            return w.start(), on

        current, current_on = worker(False)
        nxt: WorkerProcess | None = None
        try:
            log = broker.paths.console_log("bench")
            wait_heartbeats(log, 3, 30)
            for i in range(handoffs):
                try:
                    nxt, nxt_on = worker(True)
                    one = handoff(current, nxt, worker_commits, deadline)
                except (RemoteError, WireError, OSError, RuntimeError) as e:
                    raise SystemExit(
                        f"bench.vmm: handoff {i + 1} of {handoffs} ({vcpus} vCPUs) failed "
                        f"(each reply has {deadline:g} s): {type(e).__name__}: {e}"
                    ) from None
                group = samples.setdefault(label(current_on, nxt_on, names), {})
                for k, v in one.items():
                    group.setdefault(k, []).append(v)
                current.quit()
                current, current_on, nxt = nxt, nxt_on, None
            problems = continuity_after(log, 1, 30)
            current.quit()
        finally:
            for w in (current, nxt):
                if w is not None:
                    w.kill()
    if problems:
        raise SystemExit(f"guest continuity broken: {problems[:5]}")
    return {g: {k: summary(v) for k, v in s.items()} for g, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--handoffs", type=int, default=100)
    ap.add_argument("--vcpus", default="1,2", help="vCPU counts (new worker commits)")
    ap.add_argument("--no-resume-asked", action="store_true", help="skip the resume-asked run")
    ap.add_argument(
        "--awake", choices=("on", "off", "ab"), default="on", help="wait awake in the pause"
    )
    ap.add_argument("--deadline", type=float, default=30.0, help="seconds for each reply")
    ap.add_argument(
        "--b-env",
        action="append",
        metavar="VAR=VALUE",
        help="with --awake ab: the B workers' environment instead of BATON_VMM_AWAKE=0",
    )
    args = ap.parse_args(argv)
    b_env = dict(kv.split("=", 1) for kv in args.b_env) if args.b_env else None
    results = {}
    runs = [(int(v), True) for v in args.vcpus.split(",")]
    if not args.no_resume_asked:
        runs.append((1, False))
    for vcpus, commit in runs:
        res = run(vcpus, args.handoffs, commit, args.awake, args.deadline, b_env)
        mode = "new worker commits" if commit else "explicit resume request"
        for group, stats in res.items():
            results[f"{vcpus}vcpu-{'worker' if commit else 'resume'}-{group}"] = stats
            print(f"-- {vcpus} vCPU(s), {args.handoffs} handoffs, 256 MiB, {mode}: {group}")
            for k, s in stats.items():
                unit = {"state_size": "bytes", "shm_sections": ""}.get(k, "us")
                med, p99, top, n = s["median"], s["p99"], s["max"], s["n"]
                print(
                    f"   {k:20s} median {med:9.1f}  p99 {p99:9.1f}  max {top:9.1f} {unit}"
                    f"  (n={n:.0f})"
                )
    print(f"saved {save('vmm', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
