"""Jailed against unjailed workers: blackout and prepare time, in one run.

    python -m bench.jail [--vmm baton|qemu] [--upgrades N] [--memory-mib M]
                         [--seccomp kill|log|off]

Two identical VMs (baton-vmm with the built-in guest, or stock QEMU with a
Linux guest under TCG) on one host: ``plain`` with ``jail = false`` in its
file, ``jailed`` under the host's ``[jail]`` (``--seccomp`` picks its filter).
Both run the whole time and are upgraded in turn through the real supervisor,
N upgrades each, the order flipping every round (A,B then B,A), so drift in
the host's load lands on both sides alike. Reports each side's blackout and
prepare phase (``phases_ms.prepare``: the jail is built there, so the pause
should not grow), the ratio of the blackout medians with a bootstrap 95%
interval (resampling rounds), and the median and quartiles of the per-round
ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from baton_lab.harness import Host, short_root, wait_until
from bench.common import percentile, save, summary
from vmm.guest import continuity_problems

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_assets import counter_problems, counters, ensure_assets

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"
SIDES = ("plain", "jailed")


def vm_file(vmm: str, memory_mib: int) -> str:
    if vmm == "qemu":
        assets = ensure_assets(CACHE)
        return (
            f'vmm = "qemu"\nmemory_mib = {memory_mib}\n[qemu]\naccel = "tcg"\n'
            f'kernel = "{assets.kernel}"\ninitrd = "{assets.initramfs}"\n'
        )
    worker = json.dumps([sys.executable, "-m", "vmm.worker"])
    return f"memory_mib = {memory_mib}\ntick_ms = 20\nworker = {worker}\n"


def make_root(vm: str, seccomp: str) -> Path:
    root = short_root()
    etc = root / "etc" / "baton"
    (etc / "vms.d").mkdir(parents=True)
    (etc / "baton.toml").write_text(f'[jail]\nenabled = true\nseccomp = "{seccomp}"\n')
    # top-level keys before the first table: `jail` must precede [qemu]
    (etc / "vms.d" / "plain.toml").write_text("jail = false\n" + vm)
    (etc / "vms.d" / "jailed.toml").write_text(vm)
    return root


def problems(vmm: str, h: Host, vm: str) -> list[Any]:
    """Continuity after the run: the heartbeats (baton-vmm) or the guest's counter (QEMU)."""
    if vmm == "qemu":
        log = h.console_log(vm)
        n = len(counters(log.read_text()))
        wait_until(lambda: len(counters(log.read_text())) >= n + 3, 60, 0.05, "the counter")
        return list(counter_problems(counters(log.read_text())))
    return list(continuity_problems(h.more_beats(3, vm)))


def wait_running(vmm: str, h: Host, vm: str) -> None:
    h.wait_state("running", vm, timeout=120)
    if vmm == "qemu":
        log = h.console_log(vm)
        wait_until(lambda: len(counters(log.read_text())) >= 3, 120, 0.05, "the counter")
    else:
        h.wait_beats(3, vm)


def ratio_spread(plain: list[float], jailed: list[float], draws: int = 2000) -> dict[str, Any]:
    """The median ratio's bootstrap 95% interval (rounds resampled as pairs, so a
    round's shared noise stays paired) and the per-round ratio's quartiles."""
    rng = random.Random(12)
    n = len(plain)
    boot = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        boot.append(
            statistics.median(jailed[i] for i in idx) / statistics.median(plain[i] for i in idx)
        )
    per_round = [j / p for p, j in zip(plain, jailed, strict=True)]
    return {
        "median_ratio_ci95": [round(percentile(boot, 2.5), 3), round(percentile(boot, 97.5), 3)],
        "per_round_ratio": {
            "median": round(statistics.median(per_round), 3),
            "q1": round(percentile(per_round, 25), 3),
            "q3": round(percentile(per_round, 75), 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.jail", description=__doc__.splitlines()[0])
    p.add_argument("--vmm", default="baton", choices=("baton", "qemu"))
    p.add_argument("--upgrades", type=int, default=30)
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--seccomp", default="kill", choices=("kill", "log", "off"))
    args = p.parse_args(argv)
    root = make_root(vm_file(args.vmm, args.memory_mib), args.seccomp)
    out: dict[str, Any] = {
        "vmm": args.vmm,
        "upgrades": args.upgrades,
        "memory_mib": args.memory_mib,
        "seccomp": args.seccomp,
    }
    # the blackout and every phase of the upgrade report (prepare among them)
    data: dict[str, dict[str, list[float]]] = {m: {"blackout": []} for m in SIDES}
    h = Host.start(root, vm="plain")
    try:
        for side in SIDES:
            wait_running(args.vmm, h, side)
        for i in range(args.upgrades):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                rc, rep = h.upgrade(side)
                if rc != 0 or rep.get("outcome") != "committed":
                    raise SystemExit(f"{side}: upgrade failed: {rep}")
                data[side]["blackout"].append(rep["blackout_ms"])
                for phase, ms in rep["phases_ms"].items():
                    data[side].setdefault(phase, []).append(ms)
        for side in SIDES:
            found = problems(args.vmm, h, side)
            if found:
                raise SystemExit(f"{side}: continuity broken: {found}")
            out[side] = {k: summary(v) for k, v in data[side].items()}
            out[side]["jail"] = h.status(side)["jail"]
    finally:
        h.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    plain, jailed = data["plain"]["blackout"], data["jailed"]["blackout"]
    ratio = statistics.median(jailed) / statistics.median(plain)
    out["blackout_median_ratio"] = round(ratio, 3)
    out.update(ratio_spread(plain, jailed))
    path = save("jail" if args.vmm == "baton" else "jail_qemu", out)
    for side in SIDES:
        b, pr = out[side]["blackout"], out[side]["prepare"]
        print(
            f"{side:7} blackout median {b['median']:.3f} ms p99 {b['p99']:.3f} ms "
            f"min {b['min']:.3f} ms; prepare median {pr['median']:.1f} ms"
        )
    lo, hi = out["median_ratio_ci95"]
    pr_ = out["per_round_ratio"]
    print(
        f"blackout median jailed/plain: {ratio:.3f} (95% CI {lo:.3f}-{hi:.3f}); "
        f"per-round ratio median {pr_['median']:.3f} (IQR {pr_['q1']:.3f}-{pr_['q3']:.3f})  "
        f"({path})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
