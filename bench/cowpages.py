"""Where a fleet's worker and standby memory goes: per mapping, and how much of it
is the zygote's pages copied.

    python -m bench.cowpages [--vms 30] [--memory-mib 4] [--no-standby]

Starts ``--vms`` VMs through the real daemons (as ``bench.scale``: zygote on, a
standby per VM unless ``--no-standby``), waits until every standby is ready and
then reads, for the zygote, every worker and every standby:

- ``/proc/PID/smaps``: Rss, Pss, Private_Dirty and Swap per mapping (anonymous
  ones grouped by size: pymalloc's 1 MiB arenas, thread stacks and glibc's
  per-thread arenas, the rest), averaged per process;
- ``/proc/PID/pagemap`` and ``/proc/kpagecount`` (root only): each private page
  (mapped once) of a worker or standby, compared word by word with the zygote's
  page at the same address: ``identical`` (written and put back: a reference
  count up and down), a few words changed (a reference count, a pointer) or
  many (a page the process filled itself);
- the same private pages hashed across every worker and standby: how many
  distinct contents there are, i.e. what the processes would hold if identical
  pages were merged (what KSM, ``/sys/kernel/mm/ksm``, would do; this tool only
  counts them and changes no kernel setting).

Saved as ``bench/out/cowpages.json``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import shutil
import struct
import sys
import time
from typing import Any

from baton_lab.harness import Host, short_root, wait_until
from bench.common import save
from bench.scale import running_pids, standby_pids, write_vms, zygote_pids

PAGE = 4096
KiB = 1024
FIELDS = ("Rss", "Pss", "Private_Dirty", "Swap")


def mappings(pid: int) -> list[dict[str, Any]]:
    """``/proc/PID/smaps``: each mapping's range, permissions, name and kB fields."""
    out: list[dict[str, Any]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5] if len(parts) > 5 else ""
                out.append({"lo": lo, "hi": hi, "perm": parts[1], "name": name})
            elif parts[0][:-1] in FIELDS:
                out[-1][parts[0][:-1]] = int(parts[1])
    return out


def label(m: dict[str, Any]) -> str:
    """A mapping's group: its file's name, or an anonymous mapping by size."""
    name = m["name"]
    if name.startswith("/memfd:baton:") and name.endswith(":ram"):
        return "guest RAM (memfd)"
    if name and not name.startswith("["):
        return name.rsplit("/", 1)[-1]
    if name:
        return name
    size = m["hi"] - m["lo"]
    if size >= 8 << 20:
        return "[anon >= 8 MiB: thread stacks, glibc arenas]"
    if size >= 1 << 20:
        return "[anon 1-8 MiB: pymalloc arenas]"
    return "[anon < 1 MiB]"


def per_mapping(pids: list[int]) -> dict[str, dict[str, float]]:
    """Each group's fields, in kB, averaged over ``pids``; largest Private_Dirty first."""
    tot: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pid in pids:
        for m in mappings(pid):
            tot[label(m)].update({k: m.get(k, 0) for k in FIELDS})
    n = max(1, len(pids))
    rows = {k: {f: round(c[f] / n) for f in FIELDS} for k, c in tot.items()}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["Private_Dirty"]))


def private_pages(pid: int) -> list[int]:
    """Addresses of the process's private (mapped once) pages in writable private maps."""
    out = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open("/proc/kpagecount", "rb") as kc:
        for m in mappings(pid):
            if "w" not in m["perm"] or m["perm"][3] != "p" or m["name"].startswith("anon_inode"):
                continue
            pm.seek(m["lo"] // PAGE * 8)
            raw = pm.read((m["hi"] - m["lo"]) // PAGE * 8)
            for i, entry in enumerate(struct.unpack(f"{len(raw) // 8}Q", raw)):
                if not entry >> 63:  # not present
                    continue
                kc.seek((entry & ((1 << 55) - 1)) * 8)
                if struct.unpack("Q", kc.read(8))[0] == 1:
                    out.append(m["lo"] + i * PAGE)
    return out


def read_page(f: Any, addr: int) -> bytes | None:
    try:
        f.seek(addr)
        data: bytes = f.read(PAGE)
        return data if len(data) == PAGE else None
    except (OSError, ValueError):
        return None


def copies(zygote: int, pids: list[int]) -> dict[str, Any]:
    """Private pages against the zygote's page at the same address, and duplicates."""
    kinds: collections.Counter[str] = collections.Counter()
    contents: collections.Counter[bytes] = collections.Counter()
    with open(f"/proc/{zygote}/mem", "rb") as zm:
        for pid in pids:
            with open(f"/proc/{pid}/mem", "rb") as mem:
                for addr in private_pages(pid):
                    page = read_page(mem, addr)
                    if page is None:
                        continue
                    contents[hashlib.blake2b(page, digest_size=16).digest()] += 1
                    theirs = read_page(zm, addr)
                    if theirs is None:
                        kinds["not in the zygote"] += 1
                        continue
                    a, b = struct.unpack("512Q", page), struct.unpack("512Q", theirs)
                    changed = sum(x != y for x, y in zip(a, b, strict=True))
                    kinds[
                        "identical"
                        if not changed
                        else "1-3 words changed"
                        if changed < 4
                        else "4-63 words"
                        if changed < 64
                        else "64+ words"
                    ] += 1
    n = max(1, len(pids))
    total = sum(contents.values())
    return {
        "private_kib_per_process": round(total * PAGE / KiB / n),
        "vs_zygote_kib_per_process": {k: round(v * PAGE / KiB / n) for k, v in kinds.items()},
        "distinct_kib_per_process": round(len(contents) * PAGE / KiB / n),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = short_root()
    names = write_vms(root, args.vms, args.memory_mib, 60000, args.standby)
    out: dict[str, Any] = {"vms": args.vms, "memory_mib": args.memory_mib}
    try:
        with Host.start(root) as host:
            pids = wait_until(lambda: running_pids(host), args.timeout, 0.2, "every VM running")
            standbys = standby_pids(host, names, args.timeout) if args.standby else []
            time.sleep(2)  # the last standby's first seconds
            zygotes = zygote_pids(host.sup.pid)
            workers = list(pids.values())
            out["per_mapping_kib"] = {
                "zygote": per_mapping(zygotes),
                "worker": per_mapping(workers),
                **({"standby": per_mapping(standbys)} if standbys else {}),
            }
            if zygotes:
                out["copies"] = {"worker": copies(zygotes[0], workers)}
                if standbys:
                    out["copies"]["standby"] = copies(zygotes[0], standbys)
                    out["copies"]["both"] = copies(zygotes[0], workers + standbys)
            for n in names:
                host.call("vm.stop", {"vm": n})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vms", type=int, default=30)
    ap.add_argument("--memory-mib", type=int, default=4)
    ap.add_argument("--standby", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    out = run(args)
    for who, rows in out["per_mapping_kib"].items():
        print(f"{who}, kB per process (Rss / Pss / Private_Dirty):")
        for name, r in list(rows.items())[:8]:
            print(f"  {name[:50]:50s} {r['Rss']:6d} {r['Pss']:6d} {r['Private_Dirty']:6d}")
    for who, c in out.get("copies", {}).items():
        print(f"{who}: {c}")
    print(f"saved {save('cowpages', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
