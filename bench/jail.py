"""Jailed against unjailed workers: blackout and prepare time, in one run.

    python -m bench.jail [--vmm baton|qemu] [--upgrades N] [--memory-mib M]
                         [--seccomp kill|log|off]

The same VM (baton-vmm with the built-in guest, or stock QEMU with a Linux
guest under TCG) on two hosts under fresh roots,
one with ``[jail] enabled = false``, one with it on; N live upgrades each
through the real supervisor, interleaved in rounds (one upgrade on each host
per round) so that host noise lands on both alike. Reports each side's
blackout and prepare phase (``phases_ms.prepare``: the jail is built there,
so the pause should not grow), and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from baton_lab.harness import Host, short_root, wait_until
from bench.common import save, summary
from vmm.guest import continuity_problems

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_assets import counter_problems, counters, ensure_assets

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"


def vm_file(vmm: str, memory_mib: int) -> str:
    if vmm == "qemu":
        assets = ensure_assets(CACHE)
        return (
            f'vmm = "qemu"\nmemory_mib = {memory_mib}\n[qemu]\naccel = "tcg"\n'
            f'kernel = "{assets.kernel}"\ninitrd = "{assets.initramfs}"\n'
        )
    worker = json.dumps([sys.executable, "-m", "vmm.worker"])
    return f"memory_mib = {memory_mib}\ntick_ms = 20\nworker = {worker}\n"


def make_root(jailed: bool, vm: str, seccomp: str) -> Path:
    root = short_root()
    etc = root / "etc" / "baton"
    (etc / "vms.d").mkdir(parents=True)
    (etc / "baton.toml").write_text(
        f'[jail]\nenabled = {"true" if jailed else "false"}\nseccomp = "{seccomp}"\n'
    )
    (etc / "vms.d" / "a.toml").write_text(vm)
    return root


def problems(vmm: str, h: Host) -> list[Any]:
    """Continuity after the run: the heartbeats (baton-vmm) or the guest's counter (QEMU)."""
    if vmm == "qemu":
        log = h.console_log()
        n = len(counters(log.read_text()))
        wait_until(lambda: len(counters(log.read_text())) >= n + 3, 60, 0.05, "the counter")
        return list(counter_problems(counters(log.read_text())))
    return list(continuity_problems(h.more_beats(3)))


def wait_running(vmm: str, h: Host) -> None:
    h.wait_state("running", timeout=120)
    if vmm == "qemu":
        log = h.console_log()
        wait_until(lambda: len(counters(log.read_text())) >= 3, 120, 0.05, "the counter")
    else:
        h.wait_beats(3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.jail", description=__doc__.splitlines()[0])
    p.add_argument("--vmm", default="baton", choices=("baton", "qemu"))
    p.add_argument("--upgrades", type=int, default=30)
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--seccomp", default="kill", choices=("kill", "log", "off"))
    args = p.parse_args(argv)
    vm = vm_file(args.vmm, args.memory_mib)
    roots = {m: make_root(m == "jailed", vm, args.seccomp) for m in ("plain", "jailed")}
    hosts: dict[str, Host] = {}
    out: dict[str, Any] = {
        "vmm": args.vmm,
        "upgrades": args.upgrades,
        "memory_mib": args.memory_mib,
    }
    # the blackout and every phase of the upgrade report (prepare among them)
    data: dict[str, dict[str, list[float]]] = {m: {"blackout": []} for m in roots}
    try:
        for mode, root in roots.items():
            hosts[mode] = Host.start(root, vm="a")
            wait_running(args.vmm, hosts[mode])
        for _ in range(args.upgrades):
            for mode, h in hosts.items():
                rc, rep = h.upgrade()
                if rc != 0 or rep.get("outcome") != "committed":
                    raise SystemExit(f"{mode}: upgrade failed: {rep}")
                data[mode]["blackout"].append(rep["blackout_ms"])
                for phase, ms in rep["phases_ms"].items():
                    data[mode].setdefault(phase, []).append(ms)
        for mode, h in hosts.items():
            found = problems(args.vmm, h)
            if found:
                raise SystemExit(f"{mode}: continuity broken: {found}")
            out[mode] = {k: summary(v) for k, v in data[mode].items()}
            out[mode]["jail"] = h.status()["jail"]
    finally:
        for h in hosts.values():
            h.cleanup()
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    ratio = statistics.median(data["jailed"]["blackout"]) / statistics.median(
        data["plain"]["blackout"]
    )
    out["blackout_median_ratio"] = round(ratio, 3)
    path = save("jail" if args.vmm == "baton" else "jail_qemu", out)
    for mode in ("plain", "jailed"):
        b, pr = out[mode]["blackout"], out[mode]["prepare"]
        print(
            f"{mode:7} blackout median {b['median']:.3f} ms p99 {b['p99']:.3f} ms; "
            f"prepare median {pr['median']:.1f} ms"
        )
    print(f"blackout median jailed/plain: {ratio:.3f}  ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
