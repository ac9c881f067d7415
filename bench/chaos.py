"""Chaos soak: live upgrades while a random process is killed or stopped at a random moment.

Each round upgrades one VM (round robin) with ``vmctl upgrade`` and, at a
random moment 0-250 ms into it, does one of: nothing; ``kill -9``; or
SIGSTOP for 50-800 ms then SIGCONT, to one of the old worker, the new worker,
the supervisor or the broker. Daemons that die are restarted as systemd
would (``Restart=always``). Every 100 ms a sampler counts, per VM, the worker
processes that say their guest is running: never more than one may.

At the end every process is woken, and the soak waits until every VM runs
again; then it checks the heartbeats (no seq skipped or repeated within a
boot; a fresh boot after the only copy of the CPU state was lost is allowed
and counted) and that processes, broker fds and live tokens are back to
baseline.

    python -m bench.chaos --rounds 1000 --vms 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from baton import wire
from baton_lab.harness import Host, short_root, vmctl, wait_until
from bench.common import save
from vmm.guest import Heartbeat, continuity_problems, heartbeats

WORKER = [sys.executable, "-m", "vmm.worker"]
VICTIMS = ("none", "old", "new", "supervisor", "broker")


def write_vms(root: Path, n: int) -> list[str]:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    names = [f"vm{i}" for i in range(n)]
    for name in names:
        (d / f"{name}.toml").write_text(
            f"memory_mib = 32\ntick_ms = 50\nworker = {json.dumps(WORKER)}\n"
            'restart = "on-failure"\nrestart_max = 1000\nrestart_backoff_ms = 100\n'
        )
    return names


def workers_of(root: Path, vm: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = p.info["cmdline"] or []
            if p.info["status"] == psutil.STATUS_ZOMBIE or "vmm.worker" not in " ".join(cmd):
                continue
            if str(root) in cmd and vm in cmd:
                out.append(p)
        except psutil.Error:
            continue
    return out


def control_of(p: psutil.Process) -> str | None:
    with contextlib.suppress(psutil.Error, ValueError, IndexError):
        cmd = p.cmdline()
        return cmd[cmd.index("--control") + 1]
    return None


def says_running(p: psutil.Process) -> bool:
    """Does this worker say its guest runs? A stopped one cannot answer: its vCPUs
    are stopped too, so it does not run the guest."""
    try:
        if p.status() == psutil.STATUS_STOPPED:
            return False
    except psutil.Error:
        return False
    path = control_of(p)
    if path is None:
        return False
    try:
        with wire.Connection.connect(path, timeout=0.2) as c:
            return bool(c.call("hello", timeout=0.2).result.get("state") == "running")
    except (wire.WireError, OSError):
        return False


class Sampler(threading.Thread):
    """Every 100 ms: how many workers of each VM say their guest runs."""

    def __init__(self, root: Path, vms: list[str]) -> None:
        super().__init__(daemon=True)
        self.root, self.vms = root, vms
        self.samples = 0
        self.most_processes = 0  # old + new during an upgrade; more while an orphan lives
        self.violations: list[str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.wait(0.1):
            for vm in self.vms:
                procs = workers_of(self.root, vm)
                self.most_processes = max(self.most_processes, len(procs))
                if len(procs) >= 2:
                    running = [p.pid for p in procs if says_running(p)]
                    if len(running) > 1:
                        self.violations.append(f"{vm}: pids {running} all run the guest")
            self.samples += 1


class Keeper(threading.Thread):
    """systemd's Restart=always for the broker and the supervisor."""

    def __init__(self, host: Host) -> None:
        super().__init__(daemon=True)
        self.host = host
        self.restarts: Counter[str] = Counter()
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()

    def ensure(self) -> None:
        with self.lock:
            b = self.host.broker
            if b.running_pid() is None:
                b._reap(1)
                b.start()
                self.restarts["broker"] += 1
            s = self.host.sup
            if s.proc is None or s.proc.poll() is not None:
                self.host.supervisor()
                self.restarts["supervisor"] += 1

    def run(self) -> None:
        while not self.stop_flag.wait(0.1):
            try:
                self.ensure()
            except Exception as e:  # a start that failed is retried at the next tick
                print(f"keeper: {e}", file=sys.stderr)


def boots_and_problems(beats: list[Heartbeat]) -> tuple[int, list[str]]:
    """Split at fresh boots (seq back to 0); the problems within each boot."""
    runs: list[list[Heartbeat]] = [[]]
    for b in beats:
        if b.seq == 0 and runs[-1]:
            runs.append([])
        runs[-1].append(b)
    problems = [p for run in runs for p in continuity_problems(run)]
    return len(runs) - 1, problems


def victim_pid(host: Host, victim: str, vm: str, old: int | None) -> int | None:
    if victim == "supervisor":
        return host.sup.proc.pid if host.sup.proc else None
    if victim == "broker":
        return host.broker.running_pid()
    procs = [p.pid for p in workers_of(host.root, vm)]
    if victim == "old":
        return old if old in procs else None
    others = [p for p in procs if p != old]
    return others[0] if others else None


def status_pid(host: Host, vm: str) -> int | None:
    r = vmctl(host.root, "--json", "status", vm, timeout=30)
    if r.returncode != 0:
        return None
    st = json.loads(r.stdout)
    return st["pid"] if st["state"] == "running" else None


def wait_all_running(host: Host, vms: list[str], keeper: Keeper, timeout: float) -> None:
    def ok() -> bool:
        keeper.ensure()
        r = vmctl(host.root, "--json", "list", timeout=30)
        if r.returncode != 0:
            return False
        states = {v["name"]: v["state"] for v in json.loads(r.stdout)}
        for vm in vms:
            if states.get(vm) == "failed":
                vmctl(host.root, "start", vm, timeout=60)  # a VM whose restarts ran out
        return all(states.get(vm) == "running" for vm in vms)

    wait_until(ok, timeout, 0.5, "every VM to run again")


def soak(rounds: int, n_vms: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    root = short_root()
    vms = write_vms(root, n_vms)
    host = Host.start(root, vm=vms[0])
    keeper, sampler = Keeper(host), Sampler(root, vms)
    outcomes: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    try:
        for vm in vms:
            host.wait_beats(3, vm)
        base_tokens = sum(v["tokens"] for v in host.broker.status()["vms"])
        base_fds = host.broker.fd_count()
        keeper.start()
        sampler.start()
        t0 = time.monotonic()
        for i in range(rounds):
            vm = vms[i % len(vms)]
            old = status_pid(host, vm)
            up = subprocess.Popen(
                [sys.executable, "-m", "supervisor.vmctl", "--root", str(root), "--json",
                 "upgrade", vm],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            time.sleep(rng.uniform(0, 0.25))  # the random moment (the soak's own pacing)
            victim = rng.choice(VICTIMS)
            how = rng.choice(("kill", "stop"))
            pid = None if victim == "none" else victim_pid(host, victim, vm, old)
            if pid is not None:
                actions[f"{how} {victim}"] += 1
                with contextlib.suppress(ProcessLookupError):
                    if how == "kill":
                        os.kill(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGSTOP)
                        time.sleep(rng.uniform(0.05, 0.8))
                        os.kill(pid, signal.SIGCONT)
            else:
                actions["none"] += 1
            try:
                out, _ = up.communicate(timeout=120)
                report = json.loads(out) if out.strip() else {}
                outcomes[report.get("outcome") or f"vmctl exit {up.returncode}"] += 1
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
                outcomes["vmctl hung"] += 1
            except ValueError:
                outcomes[f"vmctl exit {up.returncode}, no report"] += 1
            wait_all_running(host, [vm], keeper, 120)
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{rounds} rounds, {time.monotonic() - t0:.0f} s: {dict(outcomes)}")
        wait_all_running(host, vms, keeper, 120)
        sampler.stop_flag.set()
        keeper.stop_flag.set()
        sampler.join(5)
        keeper.join(5)
        guests = {}
        for vm in vms:
            beats = heartbeats(host.console_text(vm))
            boots, problems = boots_and_problems(beats)
            guests[vm] = {"beats": len(beats), "fresh_boots": boots, "problems": problems[:20]}
        procs = {vm: len(workers_of(root, vm)) for vm in vms}

        def live_tokens() -> int:
            return sum(v["tokens"] for v in host.broker.status()["vms"])

        # Tokens left by a crash mid-start are revoked by the supervisor's sweep
        # (every minute, once two minutes old): wait for it, then report.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: live_tokens() <= base_tokens, 240, 2, "stray tokens revoked")
        tokens = live_tokens()
        with contextlib.suppress(AssertionError):  # reported below either way
            wait_until(lambda: host.broker.fd_count() <= base_fds, 30, 0.5, "broker fds back")
        return {
            "rounds": rounds,
            "vms": n_vms,
            "seed": seed,
            "seconds": round(time.monotonic() - t0, 1),
            "outcomes": dict(outcomes),
            "actions": dict(actions),
            "daemon_restarts": dict(keeper.restarts),
            "samples": sampler.samples,
            "most_worker_processes_per_vm": sampler.most_processes,
            "two_vmm_violations": sampler.violations[:20],
            "guests": guests,
            "workers_at_end": procs,
            "tokens": {"baseline": base_tokens, "end": tokens},
            "broker_fds": {"baseline": base_fds, "end": host.broker.fd_count()},
        }
    finally:
        sampler.stop_flag.set()
        keeper.stop_flag.set()
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if str(root) in " ".join(p.cmdline()) and p.status() == psutil.STATUS_STOPPED:
                    p.send_signal(signal.SIGCONT)
        host.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--vms", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    r = soak(args.rounds, args.vms, args.seed)
    print(json.dumps(r, indent=1))
    print(f"saved {save('chaos', r)}")
    bad = (
        r["two_vmm_violations"]
        or any(g["problems"] for g in r["guests"].values())
        or any(n != 1 for n in r["workers_at_end"].values())
        or r["tokens"]["end"] != r["tokens"]["baseline"]
        or r["broker_fds"]["end"] > r["broker_fds"]["baseline"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
