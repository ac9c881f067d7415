"""VMM handoff benchmark: pause, save, load and resume, separately, with 1 and 2 vCPUs.

    python -m bench.vmm [--handoffs N] [--vcpus 1,2,8] [--no-resume-asked]

A chain of real worker processes on one broker-held memfd: each step starts
an incoming worker (built before the pause), then the old worker pauses,
saves and sends its state over a socket pair, the new one loads and
resumes. Times come from each worker's own CLOCK_MONOTONIC stamps; "stop to
run" is from the old worker's pause request to the new worker's vCPUs
re-entering KVM_RUN, driven by this process (no supervisor, no journal).
"""

from __future__ import annotations

import argparse
import time

from baton_lab.harness import WorkerProcess, hand_off
from bench.common import continuity_after, provisioned_broker, save, summary, wait_heartbeats

MiB = 1 << 20


def handoff(old: WorkerProcess, new: WorkerProcess, worker_commits: bool) -> dict[str, float]:
    """One handoff. ``worker_commits``: the new worker resumes by itself after the
    load (as the supervisor's default upgrade does); else it waits for our resume."""
    commit_by = time.monotonic_ns() + 10_000_000_000 if worker_commits else None
    r = hand_off(old, new, commit_by_ns=commit_by)
    sent, loaded, resumed = r["sent"], r["loaded"], r["resumed"]
    stop = sent["stopped_at_ns"]

    def at(ns: int) -> float:  # a stamp, in us from the vCPU stop (one clock: both workers)
        return (ns - stop) / 1000

    return {
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
    }


def run(vcpus: int, handoffs: int, worker_commits: bool) -> dict[str, dict[str, float]]:
    with provisioned_broker("bench", 256 * MiB) as broker:
        current = WorkerProcess(broker.root, "bench", vcpus=vcpus).start()
        log = broker.paths.console_log("bench")
        wait_heartbeats(log, 3, 30)
        samples: dict[str, list[float]] = {}
        for _ in range(handoffs):
            nxt = WorkerProcess(broker.root, "bench", vcpus=vcpus, incoming=True).start()
            for k, v in handoff(current, nxt, worker_commits).items():
                samples.setdefault(k, []).append(v)
            current.quit()
            current = nxt
        problems = continuity_after(log, 1, 30)
        current.quit()
    if problems:
        raise SystemExit(f"guest continuity broken: {problems[:5]}")
    return {k: summary(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--handoffs", type=int, default=100)
    ap.add_argument("--vcpus", default="1,2", help="vCPU counts (new worker commits)")
    ap.add_argument("--no-resume-asked", action="store_true", help="skip the resume-asked run")
    args = ap.parse_args(argv)
    results = {}
    runs = [(int(v), True) for v in args.vcpus.split(",")]
    if not args.no_resume_asked:
        runs.append((1, False))
    for vcpus, commit in runs:
        res = run(vcpus, args.handoffs, commit)
        mode = "new worker commits" if commit else "explicit resume request"
        results[f"{vcpus}vcpu-{'worker' if commit else 'resume'}"] = res
        print(f"-- {vcpus} vCPU(s), {args.handoffs} handoffs, 256 MiB, {mode}")
        for k, s in res.items():
            unit = "bytes" if k == "state_size" else "us"
            med, p99, top = s["median"], s["p99"], s["max"]
            print(f"   {k:15s} median {med:9.1f}  p99 {p99:9.1f}  max {top:9.1f} {unit}")
    print(f"saved {save('vmm', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
