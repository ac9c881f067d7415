"""Suspend-to-disk benchmark: suspend and resume time against the RAM the guest touched.

    python -m bench.suspend [--configs 1024:0,1024:64,1024:512] [--runs N] [--qemu]

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
a file of the same size. ``--qemu``: stock QEMU's own migration of the same
RAM to a file (``qemu_to_file``), for guests up to 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from baton_lab.harness import Host, short_root, wait_until
from bench.common import continuity_after, save, summary
from supervisor import ramimage
from supervisor.kinds.qmp import QmpClient

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


QEMU_MAX_GUEST_MIB = 4096  # QEMU reads every page, and reading a memfd's hole fills it


def qemu_to_file(guest_mib: int, touched_mib: int, data: bytes, directory: Path) -> dict[str, Any]:
    """Stock QEMU's own migration of the same RAM to a file: a QEMU that never ran
    (``-S``) on a memfd touched as ``touch`` does, ``migrate fd:`` to a file with no
    bandwidth limit and no ``x-ignore-shared`` (QEMU sends every page, untouched ones
    as zero-page markers), then fsync. Its time against Baton's suspend write."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return {"skipped": "qemu-system-x86_64 is not installed"}
    if guest_mib > QEMU_MAX_GUEST_MIB:
        return {"skipped": f"guests over {QEMU_MAX_GUEST_MIB} MiB (QEMU would fill the memfd)"}
    size = guest_mib * MiB
    ram = os.memfd_create("bench-qemu-ram")
    qmp_path = directory / "qmp.sock"
    out_path = directory / "qemu-migration.bin"
    proc = None
    try:
        os.ftruncate(ram, size)
        touch(ram, size, touched_mib * MiB, data)
        os.set_inheritable(ram, True)
        proc = subprocess.Popen(
            [
                qemu, "-S", "-nodefaults", "-display", "none", "-no-user-config",
                "-machine", "pc,accel=tcg,memory-backend=ram0", "-m", f"{guest_mib}M",
                "-object",
                f"memory-backend-file,id=ram0,size={size},mem-path=/proc/self/fd/{ram},share=on",
                "-qmp", f"unix:{qmp_path},server=on,wait=off",
            ],
            pass_fds=[ram],
        )  # fmt: skip
        client = wait_until(lambda: qmp_path.exists() and QmpClient.connect(qmp_path), 60)
        client.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}
        ]})  # fmt: skip
        client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.monotonic()
            client.execute("getfd", {"fdname": "out"}, fds=[out])
            client.execute("migrate", {"uri": "fd:out"})
            ev = client.wait_event(
                "MIGRATION", 3600, match=lambda e: e.data.get("status") in ("completed", "failed")
            )
            os.fsync(out)
            t1 = time.monotonic()
        finally:
            os.close(out)
        if ev.data["status"] != "completed":
            raise SystemExit(
                f"QEMU's migration to a file failed: {client.execute('query-migrate')}"
            )
        file_mib = out_path.stat().st_size / MiB
        client.execute("quit")
        client.close()
        return {"ms": (t1 - t0) * 1000, "file_mib": file_mib, "qemu": client.version}
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        os.close(ram)
        out_path.unlink(missing_ok=True)


def one_config(
    guest_mib: int, touched_mib: int, runs: int, data: bytes, with_qemu: bool
) -> dict[str, Any]:
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
        qemu = qemu_to_file(guest_mib, touched_mib, data, root) if with_qemu else None
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
        "qemu_to_file": qemu,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="1024:0,1024:64,1024:512")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--qemu", action="store_true", help="also QEMU's own migration to a file")
    args = p.parse_args(argv)
    data = pattern()
    results = []
    for cfg in args.configs.split(","):
        guest, touched = (int(x) for x in cfg.split(":"))
        r = one_config(guest, touched, args.runs, data, args.qemu)
        results.append(r)
        print(
            f"guest {guest} MiB, touched {touched} MiB (+ the guest's own), populated "
            f"{r['populated_mib']:.0f} MiB: suspend {r['suspend_total_ms']['median']:.0f} ms "
            f"(write {r['suspend_write_mib_s']['median']:.0f} MiB/s), resume "
            f"{r['resume_total_ms']['median']:.0f} ms (fill "
            f"{r['resume_fill_mib_s']['median']:.0f} MiB/s); disk: write "
            f"{r['disk_write_mib_s']['median']:.0f}, read {r['disk_read_mib_s']['median']:.0f} "
            "MiB/s" + (f"; QEMU to a file {r['qemu_to_file']}" if r["qemu_to_file"] else ""),
            flush=True,
        )
    print(save("suspend", {"runs": args.runs, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
