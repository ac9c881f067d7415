"""Test-only helpers; the daemon harness itself lives in baton_lab.harness."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baton import wire
from baton_lab.harness import (  # noqa: F401 - re-exported for the tests
    BrokerProcess,
    fd_count,
    hand_off,
    live_processes_matching,
    short_root,
    wait_until,
)


def raw_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(path))
    return s


def reply_of(sock: socket.socket, timeout: float = 5.0) -> tuple[dict[str, Any], list[int]]:
    sock.settimeout(timeout)
    return wire.recv_message(sock)


NOBODY = 65534


def run_as(uid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child with ``uid`` (a real non-admin peer).

    Returns what ``fn`` returned, or ``("error", code)`` for a RemoteError."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out: Any = fn()
            except wire.RemoteError as e:
                out = ("error", str(e.code))
            except Exception as e:
                out = ("exception", repr(e))
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while data := os.read(r, 65536):
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(b"".join(chunks))


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


WORKER = f"{sys.executable} -m vmm.worker"


def patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer contains {old!r}"
    path.write_text(text.replace(old, new, 1))


REPO = Path(__file__).resolve().parent.parent


def copy_packages(dest: Path, version: str) -> None:
    """The installed packages (the built cffi module and guest too), as ``version``,
    readable by a jailed worker's uid (pytest's temporary directories are 0700)."""
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    for pkg in ("baton", "broker", "vmm", "supervisor"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    patch(dest / "baton" / "__init__.py", '__version__ = "0.1.0"', f'__version__ = "{version}"')


def version_at(dest: Path, version: str, commit: str, files: list[str]) -> str | None:
    """A copy of the installed package with ``files`` as they were at ``commit``
    (git history) and the built-in guest rebuilt from them: a real older worker.
    None if this checkout lacks that commit (a shallow clone). Returns the worker
    command that runs it."""
    olds = {}
    for f in files:
        r = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{f}"], capture_output=True)
        if r.returncode != 0:
            return None
        olds[f] = r.stdout
    copy_packages(dest, version)
    for f, text in olds.items():
        (dest / f).write_bytes(text)
    subprocess.run(["make", "-s", "-C", str(dest / "vmm" / "guest")], check=True)
    return f"env PYTHONPATH={dest} {WORKER}"


def make_vcpu_v1(dest: Path, version: str) -> str:
    """A copy of the installed package that reads and writes the ``vcpu``
    component at version 1 only (a map of fields per vCPU), as workers did before
    the fixed-layout record (version 2). Returns the worker command."""
    copy_packages(dest, version)
    patch(dest / "vmm" / "vcpu_state.py", '"vcpu",\n    version=2,', '"vcpu",\n    version=1,')
    return f"env PYTHONPATH={dest} {WORKER}"


def make_version(dest: Path, version: str, serial_min: int) -> str:
    """A copy of the installed package whose serial device state gains a field
    (version 2); ``serial_min`` is the oldest serial version it reads and writes.
    The device saves and restores its attributes from its one field list, so the
    new field needs only its schema entry and the attribute's initial value.
    Returns the worker command that runs that copy."""
    copy_packages(dest, version)
    dev = dest / "vmm" / "devices" / "serial.py"
    patch(
        dev,
        '"serial",\n    version=1,\n    min_version=1,',
        f'"serial",\n    version=2,\n    min_version={serial_min},',
    )
    patch(
        dev,
        '"rx_bytes": F(U64),\n',
        '"rx_bytes": F(U64),\n        "fifo_trigger": F(U8, since=2, default=1),\n',
    )
    patch(
        dev,
        "        self.rx_bytes = 0\n",
        "        self.rx_bytes = 0\n        self.fifo_trigger = 1\n",
    )
    return f"env PYTHONPATH={dest} {WORKER}"


def beats(vm: dict[str, Any]) -> list[Any]:
    """The built-in guest's heartbeats in ``vm["log"]`` (its console log) so far."""
    from vmm.guest import heartbeats

    return heartbeats(vm["log"].read_text())


def more_beats(vm: dict[str, Any], n: int) -> None:
    """Until the guest has logged ``n`` heartbeats more than now."""
    seen = len(beats(vm))
    wait_until(lambda: len(beats(vm)) >= seen + n, 20, 0.01, f"{n} more heartbeats")


def paused_frame(old: Any) -> tuple[bytes, bytes]:
    """Pause the running worker ``old`` and return its state as a frame's two
    sections (head, vCPUs), as a handoff would send them: for tests that send
    the sections, good or spoilt, themselves."""
    from vmm import state

    old.call("pause")
    frame = state.encode_frame(state.decode(old.call("save")["state"]))
    assert frame is not None
    end = state.head_length(frame)
    return frame[:end], frame[end:]
