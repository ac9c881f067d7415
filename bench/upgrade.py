"""Live-upgrade benchmark: blackout and total time against guest RAM size.

    python -m bench.upgrade [--upgrades N] [--sizes 256,4096,16384] [--copy-runs K]
                            [--all-vms 32]

Baton: N upgrades through the real supervisor (vmctl's own control op), RAM
held by the broker and never copied. Classic: the same VM moved by copying
its RAM into a fresh memfd over a unix socket while the guest is paused
(fewer runs: it takes seconds). Fleet: ``vmctl upgrade --all`` over many VMs
with a slow tick. Memfds are sparse; the guest touches only a few MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from baton_lab.harness import Host, WorkerProcess, offer_lease, short_root, wait_until
from bench.common import (
    OUT,
    continuity_after,
    extra_upgrade_settings,
    provisioned_broker,
    save,
    summary,
    wait_heartbeats,
)
from vmm.guest import continuity_problems, heartbeats

MiB = 1 << 20
CHUNK = 4 * MiB


def baton_vm(memory_mib: int, tick_ms: int = 50, vcpus: int = 1) -> str:
    worker = json.dumps([sys.executable, "-m", "vmm.worker"])
    return f"memory_mib = {memory_mib}\ntick_ms = {tick_ms}\nvcpus = {vcpus}\nworker = {worker}\n"


def write_settings(root: Path, standby: bool, zygote: bool = True) -> None:
    d = root / "etc" / "baton"
    d.mkdir(parents=True, exist_ok=True)
    on = {True: "true", False: "false"}
    (d / "baton.toml").write_text(
        f"[upgrade]\nstandby = {on[standby]}\nzygote = {on[zygote]}\n{extra_upgrade_settings()}"
    )


def standby_ready(host: Host, vm: str) -> dict[str, Any] | None:
    sb: dict[str, Any] = host.call("vm.status", {"vm": vm})["standby"]
    return sb if sb["ready"] else None


def memory_of(pid: int) -> dict[str, float]:
    """RSS, PSS and USS of one process, in MiB (psutil memory_full_info)."""
    m = psutil.Process(pid).memory_full_info()
    return {k: round(getattr(m, k) / MiB, 2) for k in ("rss", "pss", "uss")}


def write_vm(root: Path, name: str, text: str) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(text)


def baton_progress(log: Path) -> list[Any]:
    """The built-in guest's heartbeats, and what is wrong with them."""
    beats = heartbeats(log.read_text())
    return [beats, continuity_problems(beats)]


def supervised_run(
    vm_text: str,
    upgrades: int,
    progress: Callable[[Path], list[Any]] = baton_progress,
    standby: bool = False,
    zygote: bool = True,
) -> dict[str, Any]:
    """Boot one VM under a real broker and supervisor, upgrade it ``upgrades`` times
    through the supervisor's own control op, check the guest's continuity. With
    ``standby`` each upgrade waits until the VM's standby is ready (upgrades are
    rare next to a prepare: this measures the fast path, not a queue)."""
    root = short_root()
    write_vm(root, "bench", vm_text)
    write_settings(root, standby, zygote)
    memory: list[dict[str, float]] = []
    try:
        with Host.start(root, vm="bench") as host:
            log = host.console_log()
            wait_until(lambda: log.exists() and len(progress(log)[0]) >= 3, 120)
            reports = []
            for i in range(upgrades):
                if standby:
                    sb = wait_until(lambda: standby_ready(host, "bench"), 120)
                    assert sb is not None
                    if i % 10 == 0:
                        st = host.call("vm.status", {"vm": "bench"})
                        memory.append(
                            {
                                **{f"standby_{k}": v for k, v in memory_of(sb["pid"]).items()},
                                **{f"worker_{k}": v for k, v in memory_of(st["pid"]).items()},
                            }
                        )
                reports.append(host.call("vm.upgrade", {"vm": "bench"}, timeout=300))
            n = len(progress(log)[0])
            wait_until(lambda: len(progress(log)[0]) > n + 2, 120)
            problems = progress(log)[1]
            host.call("vm.stop", {"vm": "bench"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bad = [r for r in reports if r["outcome"] != "committed"]
    if bad or problems:
        raise SystemExit(f"{len(bad)} upgrades failed ({bad[:1]}), continuity {problems[:3]}")
    out = {
        "blackout_ms": summary([r["blackout_ms"] for r in reports]),
        "total_ms": summary([r["total_ms"] for r in reports]),
        "prepare_ms": summary([r["phases_ms"]["prepare"] for r in reports]),
        "reap_ms": summary([r.get("reap_ms") or r["phases_ms"]["reap"] for r in reports]),
        "standby_used": sum(1 for r in reports if r.get("standby")),
        "samples_blackout_ms": [r["blackout_ms"] for r in reports],
    }
    marks = [r.get("timeline_us") or {} for r in reports]
    keys = sorted({k for m in marks for k in m}, key=lambda k: marks[0].get(k, 0) if marks else 0)
    out["timeline_us_median"] = {
        k: summary([m[k] for m in marks if k in m])["median"] for k in keys
    }
    lease = [
        m["new_resume_started"] - m["new_loaded"]
        for m in marks
        if "new_resume_started" in m and "new_loaded" in m
    ]
    if lease:  # the deadline check and the run lease's broker round trip
        out["loaded_to_resume_us"] = summary(lease)
    if memory:
        out["memory_mib"] = {k: summary([m[k] for m in memory]) for k in memory[0]}
    return out


def baton_run(
    memory_mib: int, upgrades: int, standby: bool = False, vcpus: int = 1, zygote: bool = True
) -> dict[str, Any]:
    return supervised_run(
        baton_vm(memory_mib, vcpus=vcpus), upgrades, standby=standby, zygote=zygote
    )


def _copy_over_socket(src_fd: int, dst_fd: int, size: int) -> None:
    """Stream every byte of ``src_fd`` into ``dst_fd`` through a unix socket
    between two processes, as a classic local migration stream would."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        off = 0
        while off < size:  # sendfile: no copy through user space on this side
            off += os.sendfile(b.fileno(), src_fd, off, min(CHUNK, size - off))
        b.close()
        os._exit(0)
    b.close()
    off = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while off < size:
        n = a.recv_into(view, min(CHUNK, size - off))
        if not n:
            raise RuntimeError("copy stream ended early")
        os.pwrite(dst_fd, view[:n], off)
        off += n
    a.close()
    os.waitpid(pid, 0)


def copy_run(memory_mib: int, runs: int) -> dict[str, Any]:
    """The classic way: pause, copy all of RAM into a fresh memfd, resume there."""
    size = memory_mib * MiB
    with provisioned_broker("copy", size) as broker:
        root = broker.root
        current = WorkerProcess(root, "copy").start()
        log = broker.paths.console_log("copy")
        wait_heartbeats(log, 3, 60)
        blackouts, copies = [], []
        for _ in range(runs):
            with broker.client() as c:
                old_ram = c.get("copy", ["ram"])["ram"]
                fresh = os.memfd_create("copy-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fresh, size)
                c.put("copy", {"ram": fresh}, replace=True)
            nxt = WorkerProcess(root, "copy", incoming=True).start()
            offer_lease(current, nxt)  # as the supervisor does: nxt may take the guest
            paused = current.call("pause")
            blob = current.call("save")["state"]
            t0 = time.monotonic_ns()
            _copy_over_socket(old_ram, fresh, size)
            copies.append((time.monotonic_ns() - t0) / 1e6)
            nxt.call("load", {"state": blob})
            resumed = nxt.call("resume")
            blackouts.append((resumed["resumed_at_ns"] - paused["paused_at_ns"]) / 1e6)
            current.quit()
            os.close(old_ram)
            os.close(fresh)
            current = nxt
        problems = continuity_after(log, 3, 60)
        current.quit()
    if problems:
        raise SystemExit(f"copy {memory_mib} MiB: continuity broken {problems[:3]}")
    return {"blackout_ms": summary(blackouts), "copy_ms": summary(copies)}


def fleet_run(vms: int, parallel: int, standby: bool = False) -> dict[str, Any]:
    root = short_root()
    for i in range(vms):
        write_vm(root, f"vm{i:02d}", baton_vm(64, 1000))
    write_settings(root, standby)
    try:
        with Host.start(root) as host:
            logs = [host.console_log(f"vm{i:02d}") for i in range(vms)]
            wait_until(
                lambda: (
                    all(len(heartbeats(p.read_text())) >= 2 for p in logs if p.exists())
                    and all(p.exists() for p in logs)
                ),
                300,
            )
            if standby:
                wait_until(lambda: all(standby_ready(host, f"vm{i:02d}") for i in range(vms)), 600)
            t0 = time.monotonic()
            out = host.vmctl(
                "--json", "upgrade", "--all", "--max-parallel", str(parallel), timeout=1800
            )
            wall = time.monotonic() - t0
            events = [json.loads(line) for line in out.stdout.splitlines()]
            reports = [e for e in events if e.get("vm")]
            summ = events[-1]
            problems = [x for p in logs for x in continuity_after(p, 1, 60)]
            for i in range(vms):
                host.call("vm.stop", {"vm": f"vm{i:02d}"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if problems or summ["upgraded"] != vms:
        raise SystemExit(f"fleet: {summ}, continuity {problems[:3]}")
    return {
        "vms": vms,
        "max_parallel": parallel,
        "wall_s": round(wall, 2),
        "total_s": summ["total_s"],
        "blackout_ms": summ["blackout_ms"],
        "worst_blackout_ms": max(r["blackout_ms"] for r in reports),
        "standby_used": sum(1 for r in reports if r.get("standby")),
    }


def plot(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[bench]'): no plot")
        return None
    if not results.get("baton"):
        return None
    sizes = sorted(int(k) for k in results["baton"])
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [results["baton"][str(s)]["samples_blackout_ms"] for s in sizes]
    ax.boxplot(
        data,
        tick_labels=[f"{s // 1024} GiB" if s >= 1024 else f"{s} MiB" for s in sizes],
        whis=(1, 99),
        showfliers=True,
    )
    ax.set_ylabel("blackout (ms), vCPU stop to vCPU run")
    ax.set_xlabel("guest RAM")
    ax.set_title("Baton live upgrade: blackout vs RAM size (whiskers p1-p99)")
    for i, s in enumerate(sizes, start=1):
        copy = results.get("copy", {}).get(str(s))
        if copy:
            ax.annotate(
                f"copying RAM: {copy['blackout_ms']['median']:.0f} ms",
                (i, max(data[i - 1])),
                textcoords="offset points",
                xytext=(0, 10),
                ha="center",
                fontsize=8,
            )
    ax.set_ylim(0, max(max(d) for d in data) * 1.3)  # room for the labels
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upgrades", type=int, default=100)
    ap.add_argument("--sizes", default="256,4096,16384", help="guest RAM sizes in MiB")
    ap.add_argument("--copy-runs", default="5,3,1", help="copy runs per size")
    ap.add_argument("--all-vms", type=int, default=32)
    ap.add_argument("--all-parallel", type=int, default=4)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument(
        "--standby",
        choices=("off", "on", "both"),
        default="off",
        help="[upgrade] standby for the supervised runs (both: off, then on, side by side)",
    )
    ap.add_argument(
        "--zygote",
        choices=("off", "on", "both"),
        default="on",
        help="[upgrade] zygote for the supervised runs (both: exec'd workers, then forked)",
    )
    args = ap.parse_args(argv)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.standby]
    zygotes = {"off": [False], "on": [True], "both": [False, True]}[args.zygote]
    sizes = [int(s) for s in args.sizes.split(",")]
    copy_runs = [int(s) for s in args.copy_runs.split(",")]
    results: dict[str, Any] = {"baton": {}, "copy": {}}
    for size in sizes:
        for sb, zg in ((sb, zg) for sb in modes for zg in zygotes):
            r = baton_run(size, args.upgrades, sb, args.vcpus, zg)
            key = "baton" + ("_standby" if sb else "") + ("" if zg else "_exec")
            results.setdefault(key, {})[str(size)] = r
            b, t, p = r["blackout_ms"], r["total_ms"], r["prepare_ms"]
            print(
                f"baton {size:6d} MiB {args.vcpus} vCPU standby={'on' if sb else 'off'} "
                f"zygote={'on' if zg else 'off'}: "
                f"blackout median {b['median']:.3f} p99 {b['p99']:.3f} max {b['max']:.3f} ms; "
                f"total median {t['median']:.1f} p99 {t['p99']:.1f} ms; "
                f"prepare median {p['median']:.1f} ms; reap median {r['reap_ms']['median']:.1f}"
                + (f"; memory {r['memory_mib']}" if "memory_mib" in r else "")
            )
    for size, runs in zip(sizes, copy_runs, strict=False):
        if runs:
            r = copy_run(size, runs)
            results["copy"][str(size)] = r
            print(
                f"copy  {size:6d} MiB: blackout median {r['blackout_ms']['median']:.1f} ms "
                f"(copy {r['copy_ms']['median']:.1f} ms) over {runs} runs"
            )
    if args.all_vms:
        r = fleet_run(args.all_vms, args.all_parallel, modes[-1])
        results["fleet"] = r
        print(
            f"--all over {r['vms']} VMs, {r['max_parallel']} at a time: {r['total_s']:.1f} s, "
            f"blackout median {r['blackout_ms']['median']:.3f} ms, "
            f"worst {r['worst_blackout_ms']:.3f} ms"
        )
    print(f"saved {save('upgrade', results)}")
    png = plot(results, Path(__file__).resolve().parent.parent / "docs" / "blackout.png")
    if png:
        print(f"plot {png}")
    OUT.mkdir(exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
