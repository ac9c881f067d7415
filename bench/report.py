"""Render the tables of docs/benchmarks.md from bench/out/*.json (what the runs saved).

python -m bench.report > /tmp/tables.md
"""

from __future__ import annotations

import json
from typing import Any

from bench.common import OUT


def load(name: str) -> dict[str, Any] | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def size_label(mib: str) -> str:
    n = int(mib)
    return f"{n // 1024} GiB" if n >= 1024 else f"{n} MiB"


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*names: str) -> list[str]:
    return [row(*names), "|" + "---|" * len(names)]


def broker(d: dict[str, Any]) -> list[str]:
    out = header("fds per request", "median (µs)", "p99 (µs)", "bare median", "bare p99")
    for n in ("1", "8", "64"):
        lat, bare = d["latency_us"][n], d["bare_scm_rights_us"][n]
        out.append(
            row(n, *(f"{x:.0f}" for x in (lat["median"], lat["p99"], bare["median"], bare["p99"])))
        )
    t = d["fd_passes_per_s"]
    out += [
        "",
        *header("clients", "1 fd, nice 0", "1 fd, nice -10", "8 fd, nice 0", "8 fd, nice -10"),
    ]
    for c in ("1", "2", "4", "8", "16", "32"):
        rates = (t["nice0"]["1"][c], t["nice-10"]["1"][c], t["nice0"]["8"][c], t["nice-10"]["8"][c])
        out.append(row(c, *(f"{r:,.0f}" for r in rates)))
    fds = (d["broker_fds_before"], d["broker_fds_after"])
    return [*out, "", f"Broker open fds before and after: {fds[0]} and {fds[1]}."]


def vmm(d: dict[str, Any]) -> list[str]:
    cols = [
        ("1vcpu-worker", "1 vCPU"),
        ("2vcpu-worker", "2 vCPUs"),
        ("1vcpu-resume", "1 vCPU, resume asked"),
    ]
    cols = [(k, n) for k, n in cols if k in d]
    out = header("µs (median / p99)", *(n for _, n in cols))
    for metric, label in (
        ("pause_us", "pause (request to all vCPUs parked)"),
        ("save_us", "save (collect + encode)"),
        ("send_us", "send"),
        ("load_us", "load (validate + apply)"),
        ("resume_us", "resume (to vCPUs in KVM_RUN)"),
        ("stop_to_run_us", "**vCPU stop to vCPU run**"),
    ):
        out.append(
            row(
                label,
                *(f"{d[k][metric]['median']:.0f} / {d[k][metric]['p99']:.0f}" for k, _ in cols),
            )
        )
    return [
        *out,
        row("state size (bytes)", *(f"{d[k]['state_size']['median']:,.0f}" for k, _ in cols)),
    ]


def upgrade(d: dict[str, Any]) -> list[str]:
    out = header(
        "guest RAM",
        "upgrades",
        "blackout median (ms)",
        "p99",
        "max",
        "total median (ms)",
        "total p99",
        "prepare median",
    )
    for size, r in sorted(d["baton"].items(), key=lambda kv: int(kv[0])):
        b, t, p = r["blackout_ms"], r["total_ms"], r["prepare_ms"]
        out.append(
            row(
                size_label(size),
                b["n"],
                f"{b['median']:.3f}",
                f"{b['p99']:.3f}",
                f"{b['max']:.3f}",
                f"{t['median']:.1f}",
                f"{t['p99']:.1f}",
                f"{p['median']:.1f}",
            )
        )
    if d.get("copy"):
        out += [
            "",
            *header(
                "guest RAM",
                "runs",
                "blackout median (ms), copying RAM",
                "of which the copy",
                "ratio to Baton",
            ),
        ]
        for size, r in sorted(d["copy"].items(), key=lambda kv: int(kv[0])):
            ratio = r["blackout_ms"]["median"] / d["baton"][size]["blackout_ms"]["median"]
            out.append(
                row(
                    size_label(size),
                    r["blackout_ms"]["n"],
                    f"{r['blackout_ms']['median']:,.1f}",
                    f"{r['copy_ms']['median']:,.1f}",
                    f"{ratio:,.0f}x",
                )
            )
    if d.get("fleet"):
        f = d["fleet"]
        b = f["blackout_ms"]
        out += [
            "",
            f"`vmctl upgrade --all --max-parallel {f['max_parallel']}` over {f['vms']} VMs "
            f"(64 MiB each, 1 s tick): {f['total_s']:.1f} s in all; blackout median "
            f"{b['median']:.3f} ms, p99 {b['p99']:.3f} ms, worst {f['worst_blackout_ms']:.3f} ms.",
        ]
    return out


def qemu(d: dict[str, Any]) -> list[str]:
    out = header(
        "guest RAM",
        "kind",
        "upgrades",
        "pause median (ms)",
        "p99",
        "total median (ms)",
        "total p99",
    )
    for size in sorted(d["qemu"], key=int):
        for kind in ("qemu", "baton"):
            b, t = d[kind][size]["blackout_ms"], d[kind][size]["total_ms"]
            out.append(
                row(
                    size_label(size),
                    kind,
                    b["n"],
                    f"{b['median']:.3f}",
                    f"{b['p99']:.3f}",
                    f"{t['median']:.1f}",
                    f"{t['p99']:.1f}",
                )
            )
    return out


SUSPEND_FIGURES = (
    "suspend_total_ms",
    "suspend_write_mib_s",
    "resume_total_ms",
    "resume_fill_mib_s",
    "disk_write_mib_s",
    "disk_read_mib_s",
)


def suspend(d: dict[str, Any]) -> list[str]:
    out = header(
        "guest", "touched", "populated", "suspend total (ms)", "RAM write (MiB/s)",
        "resume total (ms)", "RAM fill (MiB/s)", "disk write (MiB/s)", "disk read (MiB/s)",
    )  # fmt: skip
    for r in d["results"]:
        touched = size_label(r["touched_mib"]) if r["touched_mib"] else "0"
        figures = (f"{r[k]['median']:,.0f}" for k in SUSPEND_FIGURES)
        out.append(
            row(size_label(r["guest_mib"]), touched, f"{r['populated_mib']:,.0f} MiB", *figures)
        )
    return out


def main() -> int:
    renders = (("broker", broker), ("vmm", vmm), ("upgrade", upgrade), ("qemu", qemu))
    for name, render in (*renders, ("suspend", suspend)):
        d = load(name)
        if d is None:
            continue
        m = d["machine"]
        print(f"### {name} ({m['date']}, {m['cpu']}, {m['cores']} cores, kernel {m['kernel']})\n")
        print("\n".join(render(d)))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
