"""Many small VMs on one host: start, ``vmctl list``, memory, re-adoption after
``kill -9`` of the supervisor, and ``vmctl upgrade --all``.

    python -m bench.scale [--vms 100] [--memory-mib 4] [--tick-ms 60000]
                          [--max-parallel 4] [--standby] [--no-zygote] [--list-runs 5]

Everything runs through the real daemons (``baton_lab.harness.Host``):

- all running: from just before the broker and supervisor start to every VM
  ``running`` in ``vm.list``;
- ``vmctl list``: the real command line's wall time (``--json list``), median
  of ``--list-runs``; with ``--standby``, once every standby is ready (the pool
  builds them one at a time after the VMs run: a list run then competes with
  those builds, ~1.5-3x slower here, and was what set the figures with standbys
  apart), and beside it the same runs while they are built;
- memory per VM: PSS of every worker (and, with ``--standby``, of every
  standby once all are ready) and of the zygotes, summed and divided by the VM
  count; RSS beside;
- re-adoption: ``kill -9`` of the supervisor, then a new one, to every VM
  ``running`` again with the same worker pid; beside it, when the new one's
  hello answered and its own steps (``supervisor.status`` ``start_ms``); with
  ``--standby``, to every VM's standby ready again and how many are the same
  process (adopted) rather than rebuilt;
- ``--all --max-parallel P``: wall time, blackout median and worst, every
  upgrade committed; each phase's spread (prepare, transfer, reap) and the
  pause's segments (to the old worker's send, to the new one reading it, to
  its vCPUs running) over every upgrade;
- the rollout's CPU per upgrade, by process (``cpu_ms_per_upgrade``): the
  supervisor, what it reaped, the zygotes and their forks, the broker, the new
  workers (their whole life), the old workers (from just before to their exit:
  this process is a child subreaper, so after the ``kill -9`` they are its
  children and ``wait4`` gives their last rusage), ``vmctl``; and the whole
  host's busy time beside (other sessions' work included). CPU time is what a
  loaded host leaves intact; the wall time is not.

Saved as ``bench/out/scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from baton_lab.harness import Host, short_root, wait_until
from bench.common import extra_upgrade_settings, save, summary

MiB = 1 << 20


def write_vms(
    root: Path,
    vms: int,
    memory_mib: int,
    tick_ms: int,
    standby: bool,
    zygote: bool = True,
    merge: bool = False,
) -> list[str]:
    etc = root / "etc" / "baton"
    (etc / "vms.d").mkdir(parents=True, exist_ok=True)
    on = {True: "true", False: "false"}
    (etc / "baton.toml").write_text(
        f"[upgrade]\nstandby = {on[standby]}\nzygote = {on[zygote]}\n"
        f"standby_merge = {on[merge]}\n{extra_upgrade_settings()}"
    )
    worker = json.dumps([sys.executable, "-m", "vmm.worker"])
    names = [f"vm{i:03d}" for i in range(vms)]
    for name in names:
        (etc / "vms.d" / f"{name}.toml").write_text(
            f"memory_mib = {memory_mib}\ntick_ms = {tick_ms}\nworker = {worker}\n"
        )
    return names


KSM = Path("/sys/kernel/mm/ksm")


def ksm_read(name: str) -> int:
    return int((KSM / name).read_text())


@contextlib.contextmanager
def ksmd_running(pages_to_scan: int) -> Iterator[int]:
    """The host's ksmd on for the run (a host-wide setting: ``--ksm`` says so), put back
    as it was after. ``run`` goes back to its old value, never to 2 (unmerge all).
    It scans ``pages_to_scan`` a round until memory is measured (``ksm_settled``),
    then the host's own rate, which it yields, so that the rest of the run pays a
    usual ksmd."""
    old = {n: (KSM / n).read_text().strip() for n in ("run", "pages_to_scan")}
    try:
        (KSM / "pages_to_scan").write_text(str(pages_to_scan))
        (KSM / "run").write_text("1")
        yield int(old["pages_to_scan"])
    finally:
        for n in ("pages_to_scan", "run"):
            (KSM / n).write_text(old[n])


def ksm_kib_of(pid: int) -> int:
    """The KSM pages ``pid`` maps (``/proc/PID/smaps_rollup``, ``KSM:``), in KiB."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("KSM:"):
                return int(line.split()[1])
    return 0


def ksm_settled(timeout: float, then_pages_to_scan: int) -> dict[str, Any]:
    """Waits for two more full ksmd scans (a page merges on its second), then until
    pages_sharing moves by under 1% from one scan to the next (it never stands
    still: the workers' own heaps change); what ksmd holds then, and how long."""
    ksmd = next((p for p in psutil.process_iter(["name"]) if p.info["name"] == "ksmd"), None)
    cpu0 = sum(ksmd.cpu_times()[:2]) if ksmd else 0.0
    t0 = time.monotonic()

    def scans_past(n: int) -> bool:
        return ksm_read("full_scans") > n

    start = ksm_read("full_scans")
    wait_until(functools.partial(scans_past, start + 1), timeout, 0.1, "two ksmd scans")
    last = -1
    while abs((now := ksm_read("pages_sharing")) - last) > now / 100:
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"ksmd did not settle in {timeout} s ({last} -> {now} pages)")
        last = now
        past = functools.partial(scans_past, ksm_read("full_scans"))
        wait_until(past, timeout, 0.1, "one more scan")
    out = {
        "settled_s": round(time.monotonic() - t0, 1),
        "pages_shared": ksm_read("pages_shared"),
        "pages_sharing": ksm_read("pages_sharing"),
        "pages_to_scan": ksm_read("pages_to_scan"),
        "ksmd_cpu_s": round(sum(ksmd.cpu_times()[:2]) - cpu0, 2) if ksmd else None,
        "pages_to_scan_after": then_pages_to_scan,
    }
    (KSM / "pages_to_scan").write_text(str(then_pages_to_scan))
    return out


def running_pids(host: Host) -> dict[str, int] | None:
    """Every VM's worker pid if every VM is running, else None."""
    try:
        vms = host.call("vm.list", timeout=30)
    except OSError:
        return None  # the supervisor is not serving (yet)
    if not vms or any(v["state"] != "running" or not v.get("pid") for v in vms):
        return None
    return {v["name"]: v["pid"] for v in vms}


def ready_standbys(host: Host, names: list[str]) -> list[int] | None:
    """Every VM's standby pid, once all are ready."""
    got = [host.call("vm.status", {"vm": n}, timeout=30)["standby"] for n in names]
    return [int(x["pid"]) for x in got] if all(x["ready"] for x in got) else None


def standby_pids(host: Host, names: list[str], timeout: float) -> list[int]:
    """Every VM's standby pid, once each one is ready (polled each 0.5 s)."""
    return wait_until(lambda: ready_standbys(host, names), timeout, 0.5, "every standby ready")


def list_times(host: Host, args: argparse.Namespace) -> list[float]:
    """``--list-runs`` runs of the real ``vmctl --json list``, each one's wall ms."""
    times = []
    for _ in range(args.list_runs):
        t = time.monotonic()
        r = host.vmctl("--json", "list", timeout=120)
        times.append((time.monotonic() - t) * 1000)
        assert r.returncode == 0 and len(json.loads(r.stdout)) == args.vms, r.stderr
    return times


def memory(pids: list[int]) -> dict[str, float]:
    pss = rss = 0
    for pid in pids:
        m = psutil.Process(pid).memory_full_info()
        pss += m.pss
        rss += m.rss
    n = max(1, len(pids))
    return {"pss_mib": round(pss / n / MiB, 2), "rss_mib": round(rss / n / MiB, 2)}


def zygote_pids(supervisor: int) -> list[int]:
    """The supervisor's zygotes (supervisor.zygote): children with ``--zygote``."""
    out = []
    for p in psutil.Process(supervisor).children():
        with contextlib.suppress(psutil.Error):
            if "--zygote" in p.cmdline():
                out.append(p.pid)
    return out


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> tuple[float, float]:
    """(its own user+system CPU, its reaped children's) in seconds; zeros if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK


def host_busy_s() -> float:
    """Every CPU's non-idle time since boot (/proc/stat), in seconds."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK  # all but idle and iowait


def become_subreaper() -> None:
    """Orphans (the old workers, once their supervisor is killed) become ours."""
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_rusage_s(pids: list[int], timeout: float) -> dict[int, float]:
    """The last user+system CPU of each of ``pids`` (our children by now), reaped."""
    out: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid in out:
                continue
            try:
                got, _, ru = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                out[pid] = float("nan")  # not ours: someone else reaped it
                continue
            if got:
                out[pid] = ru.ru_utime + ru.ru_stime
        time.sleep(0.02)
    return out


class RolloutCpu:
    """CPU by process over one rollout: ``before()`` just before it, ``after()``."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def before(self, old: list[int]) -> None:
        h = self.host
        self.old = {pid: sum(cpu_s(pid)) for pid in old}
        self.sup = cpu_s(h.sup.pid)
        self.broker = cpu_s(h.broker.pid)[0]
        self.zygotes = {p: cpu_s(p) for p in zygote_pids(h.sup.pid)}
        self.busy = host_busy_s()
        self.t = time.monotonic()
        self.ru = resource.getrusage(resource.RUSAGE_CHILDREN)

    def after(self, new: list[int], upgrades: int) -> dict[str, Any]:
        h = self.host
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # vmctl (before any wait4 below)
        busy, wall = host_busy_s() - self.busy, time.monotonic() - self.t
        sup = cpu_s(h.sup.pid)
        zyg = 0.0
        for p in zygote_pids(h.sup.pid):
            a, b = cpu_s(p)
            a0, b0 = self.zygotes.get(p, (0.0, 0.0))
            zyg += a - a0 + b - b0
        last = reap_rusage_s(list(self.old), 30)
        old_exited_s = time.monotonic() - self.t - wall  # the last old worker, after the end
        old = [last[p] - c for p, c in self.old.items() if p in last and last[p] == last[p]]
        reaped = sup[1] - self.sup[1]
        theirs = [c for p, c in self.old.items() if last.get(p) != last.get(p)]  # NaN: its
        if theirs:  # the supervisor's own children (no kill -9 before): in its cutime
            old.append(reaped - sum(theirs))
            reaped = 0.0
        parts = {
            "supervisor": sup[0] - self.sup[0],
            "supervisor_reaped": reaped,
            "zygotes": zyg,
            "broker": cpu_s(h.broker.pid)[0] - self.broker,
            "new_workers": sum(cpu_s(p)[0] for p in new),
            "old_workers": sum(old),
            "vmctl": ru.ru_utime + ru.ru_stime - self.ru.ru_utime - self.ru.ru_stime,
        }
        per = {k: round(v * 1000 / upgrades, 2) for k, v in parts.items()}
        per["ours"] = round(sum(parts.values()) * 1000 / upgrades, 2)
        per["host_busy"] = round(busy * 1000 / upgrades, 2)
        return {
            "per_upgrade_ms": per,
            "old_workers_waited": len(self.old) - len(theirs),
            "old_workers_exited_after_s": round(old_exited_s, 3),
            "host_busy_share": round(busy / (wall * (os.cpu_count() or 1)), 3),
        }


#: the pause's segments, from each report's timeline_us: (name, from mark, to mark)
SEGMENTS = (
    ("stop_to_old_sent", None, "old_sent"),
    ("old_sent_to_new_readable", "old_sent", "new_readable"),
    ("new_readable_to_running", "new_readable", "new_vcpus_running"),
)


def rollout_breakdown(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a rollout's upgrades spent their time: each phase's and each pause
    segment's spread over every upgrade (a worst blackout is one segment grown)."""
    phases = {}
    for name in ("prepare", "transfer", "reap"):
        values = [r["phases_ms"][name] for r in reports if name in r.get("phases_ms", {})]
        phases[name] = summary(values) if values else None
    segments = {}
    for name, start, end in SEGMENTS:
        values = [
            (tl[end] - (tl[start] if start else 0.0)) / 1000
            for r in reports
            if (tl := r.get("timeline_us") or {}) and end in tl and (start is None or start in tl)
        ]
        segments[name] = summary(values) if values else None
    return {"phases_ms": phases, "pause_segments_ms": segments}


def run(args: argparse.Namespace, ksm_rate_after: int = 0) -> dict[str, Any]:
    """``ksm_rate_after``: with ``--ksm``, ksmd's pages a round once memory is measured."""
    root = short_root()
    names = write_vms(
        root, args.vms, args.memory_mib, args.tick_ms, args.standby, args.zygote, args.ksm
    )
    out: dict[str, Any] = {
        "vms": args.vms,
        "memory_mib": args.memory_mib,
        "tick_ms": args.tick_ms,
        "standby": args.standby,
        "zygote": args.zygote,
        "standby_merge": args.ksm,
    }
    become_subreaper()
    try:
        t0 = time.monotonic()
        with Host.start(root) as host:
            pids = wait_until(lambda: running_pids(host), args.timeout, 0.2, "every VM running")
            out["all_running_s"] = round(time.monotonic() - t0, 2)
            print(f"{args.vms} VMs running {out['all_running_s']} s after the daemons started")

            if args.standby:  # the pool is still building standbys (nice 10), one at a time
                early = list_times(host, args)
                out["vmctl_list_while_standbys_build_ms"] = summary(early)
                med = statistics.median(early)
                print(f"vmctl list while standbys are built: median {med:.0f} ms")
                standby_pids(host, names, args.timeout)
            times = list_times(host, args)
            out["vmctl_list_ms"] = summary(times)
            print(f"vmctl list: median {statistics.median(times):.0f} ms")

            if args.ksm:
                out["ksm"] = ksm_settled(args.timeout, ksm_rate_after)
                print(f"ksmd settled: {out['ksm']}")
            out["worker_memory"] = memory(list(pids.values()))
            zygotes = zygote_pids(host.sup.pid)  # their PSS is the VMs' too: counted per VM
            zpss = sum(psutil.Process(p).memory_full_info().pss for p in zygotes) / MiB
            out["zygotes"] = {"count": len(zygotes), "pss_mib": round(zpss, 2)}
            if args.standby:
                standbys = standby_pids(host, names, args.timeout)
                out["standby_memory"] = memory(standbys)
                both = memory(list(pids.values()) + standbys)
                per_vm = both["pss_mib"] * 2  # worker + standby
            else:
                per_vm = out["worker_memory"]["pss_mib"]
            out["per_vm_pss_mib"] = round(per_vm + zpss / args.vms, 2)
            print(f"memory per VM: {out['per_vm_pss_mib']} MiB PSS ({out['worker_memory']})")

            host.sup.kill9()
            t = time.monotonic()
            host.supervisor()
            served = time.monotonic() - t
            again = wait_until(lambda: running_pids(host), args.timeout, 0.01, "re-adoption")
            out["readoption_s"] = round(time.monotonic() - t, 3)
            out["readoption_cpu_ms"] = round(cpu_s(host.sup.pid)[0] * 1000)  # its own, so far
            assert again == pids, "a supervisor restart must adopt the very same workers"
            out["readoption_served_s"] = round(served, 3)  # to its hello answering
            out["readoption_start_ms"] = host.call("supervisor.status")["start_ms"]
            print(
                f"re-adoption after kill -9: {out['readoption_s']} s (served after "
                f"{served:.3f} s; steps {out['readoption_start_ms']} ms; its CPU so far "
                f"{out['readoption_cpu_ms']} ms)"
            )
            if args.standby:  # and every VM with a standby again (the same, or rebuilt)
                now = wait_until(
                    lambda: ready_standbys(host, names),
                    args.timeout,
                    0.05,
                    "every standby ready again",
                )
                out["standbys_ready_again_s"] = round(time.monotonic() - t, 3)
                out["standbys_ready_again_cpu_ms"] = round(cpu_s(host.sup.pid)[0] * 1000)
                out["standbys_kept"] = sum(a == b for a, b in zip(standbys, now, strict=True))
                print(
                    f"every standby ready again {out['standbys_ready_again_s']} s after the "
                    f"restart; {out['standbys_kept']} of {len(names)} the same pid; the "
                    f"supervisor's CPU so far {out['standbys_ready_again_cpu_ms']} ms"
                )

            cpu = RolloutCpu(host)
            cpu.before(list(again.values()))
            t = time.monotonic()
            r = host.vmctl(
                "--json", "upgrade", "--all", "--max-parallel", str(args.max_parallel), timeout=3600
            )
            wall = time.monotonic() - t
            out["upgrade_all_window"] = [round(t, 6), round(t + wall, 6)]  # CLOCK_MONOTONIC
            events = [json.loads(line) for line in r.stdout.splitlines()]
            reports = [e for e in events if e.get("vm")]
            summ = events[-1] if events else {}
            bad = [x for x in reports if x.get("outcome") != "committed"]
            if r.returncode != 0 or bad or summ.get("upgraded") != args.vms:
                raise SystemExit(
                    f"--all: exit {r.returncode}, {summ}, {bad[:1]}, {r.stderr[-500:]}"
                )
            out["upgrade_all"] = {
                "max_parallel": args.max_parallel,
                "wall_s": round(wall, 2),
                "total_s": summ["total_s"],
                "blackout_ms": summ["blackout_ms"],
                "worst_blackout_ms": max(x["blackout_ms"] for x in reports),
                "standby_used": sum(1 for x in reports if x.get("standby")),
                **rollout_breakdown(reports),
            }
            new_pids = [x["new_pid"] for x in reports if x.get("new_pid")]
            out["upgrade_all"]["cpu"] = cpu.after(new_pids, len(reports))
            if args.ksm:  # each standby taken unmerged itself before its pause: 0 expected
                ksm_kib = sum(ksm_kib_of(p) for p in new_pids)
                out["upgrade_all"]["ksm_kib_in_new_workers"] = ksm_kib
                print(f"  KSM pages still mapped by the {len(new_pids)} new workers: {ksm_kib} KiB")
            u = out["upgrade_all"]
            print(
                f"--all --max-parallel {args.max_parallel}: {u['total_s']:.1f} s, blackout "
                f"median {u['blackout_ms']['median']:.3f} ms, worst {u['worst_blackout_ms']:.3f} ms"
                f" ({u['standby_used']} took a standby)"
            )
            print(f"  CPU per upgrade, ms: {u['cpu']['per_upgrade_ms']}")
            exited = u["cpu"]["old_workers_exited_after_s"]
            print(f"  the last old worker exited {exited} s after it")
            for name, seg in u["pause_segments_ms"].items():
                if seg is not None:
                    print(f"  {name}: median {seg['median']:.3f} ms, worst {seg['max']:.3f} ms")
            if args.standby:  # what the rollout left to do: every VM's next standby
                t = time.monotonic()
                standby_pids(host, names, args.timeout)
                u["standbys_refilled_s"] = round(time.monotonic() - t, 2)
                print(f"  every standby ready again {u['standbys_refilled_s']} s after it")
            for n in names:
                host.call("vm.stop", {"vm": n})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--memory-mib", type=int, default=4)
    ap.add_argument("--tick-ms", type=int, default=60000)
    ap.add_argument("--max-parallel", type=int, default=4)
    ap.add_argument("--standby", action="store_true", help="[upgrade] standby = true")
    ap.add_argument(
        "--zygote",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="[upgrade] zygote (default on; --no-zygote: every worker exec'd)",
    )
    ap.add_argument("--list-runs", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=600, help="for each wait, in seconds")
    ap.add_argument(
        "--ksm",
        action="store_true",
        help="[upgrade] standby_merge = true, and the HOST's ksmd on for the run "
        "(/sys/kernel/mm/ksm run=1, --ksm-pages-to-scan; both put back after); "
        "memory is measured once it has settled. Needs --standby",
    )
    ap.add_argument("--ksm-pages-to-scan", type=int, default=5000)
    args = ap.parse_args(argv)
    if args.ksm and not args.standby:
        ap.error("--ksm needs --standby (only standbys offer their memory)")
    # a SIGTERM unwinds too: the host's ksmd settings and the VMs are put back
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    ksm = ksmd_running(args.ksm_pages_to_scan) if args.ksm else contextlib.nullcontext(0)
    with ksm as rate_after:
        out = run(args, rate_after)
    print(f"saved {save('scale', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
