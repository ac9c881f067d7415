"""What the jail's seccomp filter costs per syscall, inside against outside the filter.

    python -m bench.seccomp [--calls N] [--rounds R]

A small C loop (built here with gcc) makes N calls of one syscall and prints
the ns per call; it runs with no filter, and exec'd under each filter below
(built by the launcher's own ``build_filter``, from the policies the jail
uses). Every round runs every (filter, syscall) pair once, in a shuffled
order, so drift in the host's load lands on all of them; the figure is the
median over the rounds, and the overhead is that minus the unfiltered median.

The syscalls are the ones a jailed QEMU makes most in an upgrade's pause
window (perf, docs/benchmarks.md): an eventfd write and read, recvmsg on an
empty socket, poll; and getppid, ioctl and futex.

``+uncached``: a three-instruction filter stacked on top that reads the first
argument of every syscall, so the kernel's constant-verdict cache (5.11+) can
never skip the filters and every program runs in full, as on older kernels:
it shows what the tree layout (``SCMP_FLTATR_CTL_OPTIMIZE`` 2) buys there.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from baton.jail_launcher import build_filter
from bench.common import save
from supervisor.jail import seccomp_baton, seccomp_qemu

LOOP_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);  /* the vDSO: no syscall */
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    const char *w = argv[1];
    long n = atol(argv[2]);
    int sv[2], x, fu = 0, efd = eventfd(0, EFD_NONBLOCK);
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv);
    uint64_t one = 1, got;
    char b[16];
    struct iovec iov = {b, sizeof b};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    struct pollfd pf = {sv[0], POLLIN, 0};
    int which = !strcmp(w, "getppid") ? 0 : !strcmp(w, "ioctl") ? 1 : !strcmp(w, "poll") ? 2
              : !strcmp(w, "futex") ? 3 : !strcmp(w, "eventfd_write") ? 4
              : !strcmp(w, "eventfd_read") ? 5 : !strcmp(w, "recvmsg") ? 6 : -1;
    if (which < 0) return 2;
    double t0 = now();
    for (long i = 0; i < n; i++) {
        switch (which) {
        case 0: syscall(SYS_getppid); break;
        case 1: ioctl(sv[0], FIONREAD, &x); break;
        case 2: poll(&pf, 1, 0); break;
        case 3: syscall(SYS_futex, &fu, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0); break;
        case 4: if (write(efd, &one, 8) != 8) return 3; break;
        case 5: if (read(efd, &got, 8) < 0) { /* EAGAIN: empty, as QEMU's often is */ } break;
        case 6: recvmsg(sv[0], &mh, 0); break;
        }
    }
    printf("%.2f\n", (now() - t0) / n);
    return 0;
}
"""

SYSCALLS = ("eventfd_write", "eventfd_read", "recvmsg", "poll", "getppid", "ioctl", "futex")


def policy_spec(policy: Any) -> dict[str, Any]:
    """The spec ``supervisor.jail.prepare`` writes for this policy (seccomp = kill)."""
    return {
        "default": "kill" if policy.ALLOW else "allow",
        "allow": sorted(policy.ALLOW),
        "deny": sorted(policy.DENY),
    }


#: name -> (policies stacked, bottom first; libseccomp optimize level; uncached on top)
CONFIGS: dict[str, tuple[tuple[Any, ...], int, bool]] = {
    "none": ((), 2, False),
    "baton (tree)": ((seccomp_baton,), 2, False),
    "baton (linear)": ((seccomp_baton,), 1, False),
    "qemu (tree)": ((seccomp_qemu,), 2, False),
    # ours and a second one on top: how QEMU runs (its own -sandbox over ours)
    "qemu x2 (tree)": ((seccomp_qemu, seccomp_qemu), 2, False),
    "uncached only": ((), 2, True),
    "baton (tree) +uncached": ((seccomp_baton,), 2, True),
    "baton (linear) +uncached": ((seccomp_baton,), 1, True),
}


def load_uncached() -> None:
    """A raw cBPF filter: ``if args[0] == 0xdeadbeef: EPERM else ALLOW``."""

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    prog = (SockFilter * 4)(
        SockFilter(0x20, 0, 0, 16),  # ld [args[0] low word]
        SockFilter(0x15, 0, 1, 0xDEADBEEF),  # jeq
        SockFilter(0x06, 0, 0, 0x00050001),  # ret ERRNO(EPERM)
        SockFilter(0x06, 0, 0, 0x7FFF0000),  # ret ALLOW
    )
    fprog = SockFprog(4, prog)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0)
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def run_one(binary: Path, config: str, syscall: str, calls: int) -> float:
    """Fork; the child loads the config's filters and execs the loop."""
    policies, optimize, uncached = CONFIGS[config]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.dup2(w, 1)
            import pyseccomp  # type: ignore[import-untyped]

            for policy in policies:
                f = build_filter(policy_spec(policy))
                f.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, optimize)
                f.load()
            if uncached:
                load_uncached()
            os.execv(binary, [str(binary), syscall, str(calls)])
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"{config} / {syscall}: the loop failed ({status:#x}): {text!r}")
    return float(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.seccomp", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, binary = Path(tmp, "loop.c"), Path(tmp, "loop")
        src.write_text(LOOP_C)
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(src)], check=True)
        ns: dict[tuple[str, str], list[float]] = {(c, s): [] for c in CONFIGS for s in SYSCALLS}
        rng = random.Random(7)
        for _ in range(args.rounds):
            pairs = list(ns)
            rng.shuffle(pairs)
            for config, syscall in pairs:
                ns[config, syscall].append(run_one(binary, config, syscall, args.calls))
    med = {k: statistics.median(v) for k, v in ns.items()}
    out: dict[str, Any] = {"calls": args.calls, "rounds": args.rounds, "ns_per_call": {}}
    width = max(map(len, CONFIGS))
    print(f"{'ns per call (overhead)':{width}} " + " ".join(f"{s:>16}" for s in SYSCALLS))
    for config in CONFIGS:
        row = {}
        cells = []
        for s in SYSCALLS:
            base, v = med["none", s], med[config, s]
            row[s] = {"median": round(v, 1), "overhead": round(v - base, 1), "all": ns[config, s]}
            cells.append(f"{v:8.1f} ({v - base:+6.1f})")
        out["ns_per_call"][config] = row
        print(f"{config:{width}} " + " ".join(cells))
    print(f"({save('seccomp', out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
