"""One launch of a jailed worker: the launcher's argv, its spec fd, its report pipe.

``workers.launch`` and ``workers.spawn`` call this, and only this, when a
LaunchSpec carries a jail. The launcher (``baton.jail_launcher``) forks the
worker as PID 1 of its new PID namespace and exits once the worker has
exec'd; the supervisor is a child subreaper, so the worker becomes the
supervisor's own child and ``WorkerHandle`` watches, signals and reaps it by
pidfd exactly as an unjailed one. The launcher's Popen object is turned into
the worker's (its pid), so the rest of the supervisor never sees the
launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Sequence

from baton.wire import Code, RemoteError
from supervisor.jail import JailPlan

__all__ = ["JailLaunch", "JailPlan"]

PR_SET_CHILD_SUBREAPER = 36
_subreaper = False


def become_subreaper() -> None:
    """Orphans below us (a jailed worker once its launcher exits) become our children."""
    global _subreaper
    if not _subreaper:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        _subreaper = True


class JailLaunch:
    def __init__(self, plan: JailPlan) -> None:
        become_subreaper()
        self.plan = plan
        self.spec_fd = os.memfd_create("baton-jail-spec", os.MFD_CLOEXEC)
        self.report_r, self.report_w = os.pipe2(os.O_CLOEXEC)

    @property
    def pass_fds(self) -> list[int]:
        """What Popen must pass: the launcher's own fds and the jail's (kvm)."""
        return [self.spec_fd, self.report_w, *self.plan.pass_fds]

    def argv(self, worker: Sequence[str], keep_fds: Sequence[int]) -> list[str]:
        worker = list(worker)
        found = shutil.which(worker[0])
        if found is None:
            raise RemoteError(Code.NOT_FOUND, f"cannot run worker command {worker[0]!r}: not found")
        worker[0] = os.path.abspath(found)
        spec = {**self.plan.spec, "keep_fds": sorted(set(keep_fds)), "report_fd": self.report_w}
        os.ftruncate(self.spec_fd, 0)
        os.pwrite(self.spec_fd, json.dumps(spec).encode(), 0)
        return [*self.plan.launcher(), str(self.spec_fd), "--", *worker]

    def settle(
        self, proc: subprocess.Popen[bytes], timeout: float = 30.0
    ) -> subprocess.Popen[bytes]:
        """Wait for the launcher's word; the worker's Popen (the launcher's, re-aimed)."""
        os.close(self.report_w)
        self.report_w = -1
        deadline = time.monotonic() + timeout
        chunks = []
        while time.monotonic() < deadline:
            if not select.select([self.report_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            data = os.read(self.report_r, 4096)
            if not data:
                break
            chunks.append(data)
        text = b"".join(chunks).decode(errors="replace").strip()
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RemoteError(Code.TIMEOUT, "the jail launcher did not finish") from None
        if not text.startswith("pid "):
            raise RemoteError(
                Code.UNAVAILABLE,
                text.removeprefix("error: ") or f"the jail launcher exited {proc.returncode}",
            )
        proc.pid = int(text.split()[1])  # our child now (we are its subreaper)
        proc.returncode = None
        return proc

    def close(self) -> None:
        for fd in (self.spec_fd, self.report_r, self.report_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.spec_fd = self.report_r = self.report_w = -1
