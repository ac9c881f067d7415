"""Suspend-to-disk benchmark: suspend and resume time against the RAM the guest touched.

    python -m bench.suspend [--configs 1024:0,1024:64,1024:512] [--runs N]

Each config is GUEST_MIB:TOUCHED_MIB. The built-in guest touches about 4 MiB
of its RAM; the rest of TOUCHED_MIB is simulated: once the guest runs, the
benchmark writes incompressible data into the VM's RAM memfd (taken from the
broker) above the guest's own pages, which the built-in guest never reads or
writes. Suspend and resume go through the real supervisor (``vm.suspend``,
``vm.resume``) to an image under the benchmark's root (the same disk as
``/tmp``). Before each resume the image's pages are dropped from the page
cache (``POSIX_FADV_DONTNEED``), so the resume reads the disk.

Beside each figure: the disk's own sequential write (fsync'd) and read
(cache dropped) speed, measured in the same run on the same directory with
a file of the same size.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from baton_lab.harness import Host, short_root, wait_until
from bench.common import continuity_after, save, summary
from supervisor import ramimage

MiB = 1 << 20
BLOCK = 64 * MiB
GUEST_OWN = 16 * MiB  # the built-in guest's pages lie below this
PAGE = 4096


def pattern() -> bytes:
    """A block of random bytes: written as is, it neither compresses nor dedupes."""
    return os.urandom(BLOCK)


def touch(memfd: int, size: int, nbytes: int, data: bytes) -> None:
    """Populate ``nbytes`` of the memfd from GUEST_OWN up, each page stamped with
    its own offset so no two pages are equal."""
    with mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        off = GUEST_OWN
        end = min(size, GUEST_OWN + nbytes)
        while off < end:
            n = min(BLOCK, end - off)
            mm[off : off + n] = data[:n]
            for p in range(off, off + n, PAGE):
                mm[p : p + 8] = p.to_bytes(8, "little")
            off += n


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_speed(directory: Path, nbytes: int, data: bytes) -> dict[str, float]:
    """Sequential write (then fsync) and read (cache dropped) of ``nbytes``, in MiB/s."""
    nbytes = max(nbytes, BLOCK)
    path = directory / "disk-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.monotonic()
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, data[: min(BLOCK, nbytes - done)])
        os.fsync(fd)
    finally:
        os.close(fd)
    t1 = time.monotonic()
    drop_cache(path)
    fd = os.open(path, os.O_RDONLY)
    t2 = time.monotonic()
    try:
        while os.read(fd, BLOCK):
            pass
    finally:
        os.close(fd)
    t3 = time.monotonic()
    path.unlink()
    return {"write_mib_s": nbytes / MiB / (t1 - t0), "read_mib_s": nbytes / MiB / (t3 - t2)}


def one_config(guest_mib: int, touched_mib: int, runs: int, data: bytes) -> dict[str, Any]:
    root = short_root()
    vm = "bench"
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True)
    worker = json.dumps([sys.executable, "-m", "vmm.worker"])
    (d / f"{vm}.toml").write_text(
        f"memory_mib = {guest_mib}\ntick_ms = 50\nautostart = true\novercommit = true\n"
        f"worker = {worker}\n"
    )
    suspends: list[dict[str, Any]] = []
    resumes: list[dict[str, Any]] = []
    disks: list[dict[str, float]] = []
    try:
        with Host.start(root, vm=vm) as host:
            log = host.console_log()
            wait_until(lambda: len(host.beats()) >= 3, 120)
            for _ in range(runs):
                with host.broker.client() as c:
                    ram = c.get(vm, ["ram"])["ram"]
                try:
                    touch(ram, guest_mib * MiB, touched_mib * MiB, data)
                finally:
                    os.close(ram)
                suspends.append(host.call("vm.suspend", {"vm": vm}, timeout=3600))
                drop_cache(host.paths.suspend_dir / vm / ramimage.RAM_FILE)
                resumes.append(host.call("vm.resume", {"vm": vm}, timeout=3600))
                problems = continuity_after(log, 3, 120)
                if problems:
                    raise SystemExit(f"continuity after a resume: {problems[:3]}")
                disks.append(disk_speed(root, suspends[-1]["populated_bytes"], data))
            host.call("vm.stop", {"vm": vm})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "guest_mib": guest_mib,
        "touched_mib": touched_mib,
        "populated_mib": suspends[-1]["populated_bytes"] / MiB,
        "suspend_total_ms": summary([s["total_ms"] for s in suspends]),
        "suspend_write_mib_s": summary([s["write_mib_s"] or 0.0 for s in suspends]),
        "resume_total_ms": summary([r["total_ms"] for r in resumes]),
        "resume_fill_mib_s": summary([r["fill_mib_s"] or 0.0 for r in resumes]),
        "disk_write_mib_s": summary([x["write_mib_s"] for x in disks]),
        "disk_read_mib_s": summary([x["read_mib_s"] for x in disks]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="1024:0,1024:64,1024:512")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    data = pattern()
    results = []
    for cfg in args.configs.split(","):
        guest, touched = (int(x) for x in cfg.split(":"))
        r = one_config(guest, touched, args.runs, data)
        results.append(r)
        print(
            f"guest {guest} MiB, touched {touched} MiB (+ the guest's own), populated "
            f"{r['populated_mib']:.0f} MiB: suspend {r['suspend_total_ms']['median']:.0f} ms "
            f"(write {r['suspend_write_mib_s']['median']:.0f} MiB/s), resume "
            f"{r['resume_total_ms']['median']:.0f} ms (fill "
            f"{r['resume_fill_mib_s']['median']:.0f} MiB/s); disk: write "
            f"{r['disk_write_mib_s']['median']:.0f}, read {r['disk_read_mib_s']['median']:.0f} "
            "MiB/s",
            flush=True,
        )
    print(save("suspend", {"runs": args.runs, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
