"""baton-vmm, stock QEMU under Baton and the classic copy of RAM, side by side, in
one run and one plot.

    python -m bench.side_by_side [--upgrades N] [--sizes 256,1024,4096,16384]
                                 [--copy-runs 3,2,1,1] [--skip qemu,copy]
    python -m bench.side_by_side --plot-only [bench/out/side_by_side.json]

One command takes every measurement and writes both the JSON
(``bench/out/side_by_side.json``, with the machine and the commit) and the
plot drawn from it (``docs/side_by_side.png``); ``--plot-only`` redraws the
plot from a recorded JSON. For each RAM size: baton-vmm upgraded through the
real supervisor (``bench.upgrade.supervised_run``), the same for stock QEMU
(``bench.qemu``'s VM: a Linux guest under TCG), and the classic way
(``bench.upgrade.copy_run``: pause, copy all of RAM into a fresh memfd,
resume). Each figure is the blackout: vCPU stop to vCPU run (QEMU: QMP's
STOP to RESUME). The plot is log-scale: the three differ by up to five
orders of magnitude. Needs the ``bench`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import OUT, save
from bench.upgrade import baton_progress, baton_vm, copy_run, supervised_run

DOCS = Path(__file__).resolve().parent.parent / "docs"
SERIES = (  # key in the JSON, label, colour
    ("baton", "baton-vmm under Baton", "tab:blue"),
    ("qemu", "stock QEMU under Baton", "tab:orange"),
    ("copy", "classic: copy all of RAM", "tab:red"),
)


def qemu_vm(size: int) -> tuple[str, Any]:
    """bench.qemu's VM at ``size`` MiB, and its progress reader."""
    from bench import qemu  # fetches or builds its kernel and initramfs on first use

    assets = qemu.ensure_assets(qemu.CACHE)
    text = (
        f'vmm = "qemu"\nmemory_mib = {size}\n[qemu]\naccel = "tcg"\n'
        f'kernel = "{assets.kernel}"\ninitrd = "{assets.initramfs}"\n'
    )
    return text, qemu.qemu_progress


def measure(
    sizes: list[int], upgrades: int, copy_runs: list[int], skip: set[str]
) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes_mib": sizes, "upgrades": upgrades}
    for key, _, _ in SERIES:
        results[key] = {}
    for size, runs in zip(sizes, copy_runs, strict=True):
        if "baton" not in skip:
            r = supervised_run(baton_vm(size), upgrades, baton_progress)
            results["baton"][str(size)] = r
            print(f"baton {size:6d} MiB: blackout median {r['blackout_ms']['median']:.3f} ms")
        if "qemu" not in skip:
            text, progress = qemu_vm(size)
            r = supervised_run(text, upgrades, progress)
            results["qemu"][str(size)] = r
            print(f"qemu  {size:6d} MiB: pause median {r['blackout_ms']['median']:.3f} ms")
        if "copy" not in skip and runs:
            r = copy_run(size, runs)
            results["copy"][str(size)] = r
            print(f"copy  {size:6d} MiB: blackout median {r['blackout_ms']['median']:.1f} ms")
    return results


def _label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(s) for s in results["sizes_mib"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(SERIES)
    for n, (key, label, colour) in enumerate(SERIES):
        xs, med, lo, hi = [], [], [], []
        for i, s in enumerate(sizes):
            r = results.get(key, {}).get(str(s))
            if not r:
                continue
            b = r["blackout_ms"]
            xs.append(i + (n - 1) * width)
            med.append(b["median"])
            lo.append(b["median"] - b.get("min", b["median"]))
            hi.append(b.get("p99", b.get("max", b["median"])) - b["median"])
        if not xs:
            continue
        ax.bar(xs, med, width, color=colour, label=label, yerr=[lo, hi], capsize=3)
        for x, m in zip(xs, med, strict=True):
            ax.annotate(
                f"{m:.2f}" if m < 10 else f"{m:.0f}",
                (x, m),
                textcoords="offset points",
                xytext=(0, 2),
                ha="center",
                fontsize=7,
            )
    ax.set_yscale("log")
    ax.set_xticks(range(len(sizes)), [_label(s) for s in sizes])
    ax.set_xlabel("guest RAM")
    ax.set_ylabel("blackout (ms, log scale): median, bars min to p99")
    machine = results.get("machine", {})
    ax.set_title(
        "Live upgrade blackout, one run"
        + (f" (commit {machine.get('commit', '?')[:7]})" if machine else "")
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--upgrades", type=int, default=20, help="upgrades per size and kind")
    ap.add_argument("--sizes", default="256,1024,4096,16384", help="guest RAM sizes in MiB")
    ap.add_argument("--copy-runs", default="3,2,1,1", help="classic copy runs per size")
    ap.add_argument("--skip", default="", help="comma-separated: baton, qemu, copy")
    ap.add_argument("--out", type=Path, default=DOCS / "side_by_side.png", help="the plot")
    ap.add_argument(
        "--plot-only",
        nargs="?",
        const=OUT / "side_by_side.json",
        type=Path,
        metavar="JSON",
        help="redraw the plot from a recorded JSON; measure nothing",
    )
    args = ap.parse_args(argv)
    if args.plot_only is not None:
        results = json.loads(args.plot_only.read_text())
    else:
        sizes = [int(s) for s in args.sizes.split(",")]
        copy_runs = [int(s) for s in args.copy_runs.split(",")]
        if len(copy_runs) != len(sizes):
            ap.error(f"--copy-runs has {len(copy_runs)} entries, --sizes has {len(sizes)}")
        skip = {s for s in args.skip.split(",") if s}
        unknown = skip - {k for k, _, _ in SERIES}
        if unknown:
            ap.error(f"--skip: unknown {sorted(unknown)} (baton, qemu, copy)")
        results = measure(sizes, args.upgrades, copy_runs, skip)
        print(f"saved {save('side_by_side', results)}")
        results = json.loads((OUT / "side_by_side.json").read_text())
    print(f"plot {plot(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
