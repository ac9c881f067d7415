"""vmctl: the operator's command line for Baton.

Human output is aligned tables; ``--json`` prints stable field names for
machines. Kept quick to start (``vmctl list`` is mostly interpreter start and
imports): at module level only the wire client and ``baton.paths``; ``list``
and ``status`` are parsed by hand (``quick_args``: no argparse), print their
JSON without json's pure-Python encoder (``to_json``) and exit without the
interpreter's teardown (``run``). argparse, json, threading, the broker client,
the rollout and ``rich`` (the rollout's live display on a terminal) are
imported by the commands that use them; ``tests/test_vmctl_args.py`` checks
what ``list`` imports.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace as Namespace

from baton import wire
from baton.paths import Paths, resolve_root

# Not ``typing.TYPE_CHECKING``: importing typing is a few ms of every start (mypy
# and ruff read any name TYPE_CHECKING the same way).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import threading
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from typing import Any

    from broker.client import BrokerClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_COMMITTED = 4
EXIT_HALTED = 5

DETACH = b"\x1d"  # Ctrl-]

EPILOG = """\
exit status:
  0  success
  1  the operation failed (the daemon's error is printed)
  2  bad usage
  3  the supervisor or the broker is not running (or not reachable)
  4  an upgrade did not commit (rolled back or aborted: the old worker runs the guest);
     for --all: a rollout that halted at --max-failures or at a failed --canary;
     for --check: an upgrade would not go through (the report says why)
  5  a rollout halted by its pause budget (--max-blackout-ms): an upgrade committed
     but paused its guest longer than the budget; the VMs not yet started were skipped

console: Ctrl-] detaches; the guest keeps running.
suspend/resume: exit 1 if any VM was refused (--all goes on with the others).
"""


class Unreachable(Exception):
    pass


# --------------------------------------------------------------------- output


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Columns aligned; numbers right-aligned; one header line."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        bool(rows)
        and all(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows)
        for i in range(len(headers))
    ]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if numeric[i] else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


FD_HEADERS = ["FD", "KIND", "SIZE", "SEALS", "INODE", "STATE", "FETCHES", "DETAIL"]


def fd_rows(fds: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            f["name"],
            f["kind"],
            human_size(f["size"]) if f["kind"] in ("memfd", "file") else "-",
            ",".join(f["seal_names"]) or "-",
            f["ino"],
            f["state"],
            f["fetch_count"],
            f["detail"] or "-",
        ]
        for f in fds
    ]


def emit(args: Namespace, data: Any, human: Callable[[], str]) -> None:
    print(to_json(data) if args.json else human())


_FINITE = (float("-inf"), float("inf"))


def to_json(data: Any) -> str:
    """``json.dumps(data, indent=2, sort_keys=True)``, character for character.

    With an indent json falls back to its pure-Python encoder, several ms for
    ``vm.list`` of 100 VMs, the largest part of ``vmctl --json list`` after the
    start-up. A list of flat maps of strings, numbers, booleans and nulls (that
    listing) is written here, each value by json's own C string encoder or the
    repr json uses; any other shape, or a float json spells differently (NaN,
    Infinity), goes to json.dumps."""
    import json  # here: the human output needs none of it (~5 M instructions)

    text = _flat_rows_json(data)
    return json.dumps(data, indent=2, sort_keys=True) if text is None else text


def _flat_rows_json(rows: Any) -> str | None:
    if type(rows) is not list or not rows:
        return None
    from json.encoder import encode_basestring_ascii as quote  # what ensure_ascii uses

    low, high = _FINITE
    items = []
    for row in rows:
        if type(row) is not dict or not row or any(type(key) is not str for key in row):
            return None
        lines = []
        for key in sorted(row):
            value = row[key]
            kind = type(value)
            if kind is str:
                text = quote(value)
            elif value is None:
                text = "null"
            elif value is True:
                text = "true"
            elif value is False:
                text = "false"
            elif kind is int:
                text = int.__repr__(value)
            elif kind is float and low < value < high:
                text = float.__repr__(value)
            else:
                return None
            lines.append(f"    {quote(key)}: {text}")
        items.append("  {\n" + ",\n".join(lines) + "\n  }")
    return "[\n" + ",\n".join(items) + "\n]"


# ------------------------------------------------------------------ clients


def broker_client(paths: Paths) -> BrokerClient:
    from broker.client import BrokerClient

    client = BrokerClient(paths.broker_socket)
    try:
        client.hello()
    except (wire.ConnectionClosed, OSError) as e:
        raise Unreachable(f"the broker is not running ({paths.broker_socket}: {e})") from None
    return client


def supervisor(paths: Paths, timeout: float | None = 120.0) -> wire.Connection:
    try:
        return wire.Connection.connect(paths.control_socket, timeout=timeout)
    except OSError as e:
        raise Unreachable(
            f"the supervisor is not running ({paths.control_socket}: {e.strerror})"
        ) from None


def call(paths: Paths, op: str, args: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    with supervisor(paths, timeout) as conn:
        return conn.call(op, args).result


# ------------------------------------------------------------------ commands


def cmd_list(args: Namespace, paths: Paths) -> int:
    vms = call(paths, "vm.list")
    rows = [
        [
            v["name"],
            v["state"],
            v["pid"],
            v["worker_version"],
            human_duration(v["uptime_s"]),
            v["vcpus"],
            f"{v['memory_mib']} MiB",
            v["kind"],
            v["reason"] or "",
        ]
        for v in vms
    ]
    headers = ["NAME", "STATE", "PID", "VERSION", "UPTIME", "VCPUS", "MEMORY", "KIND", "REASON"]
    emit(args, vms, lambda: table(rows, headers) if rows else "no VMs")
    return EXIT_OK


def cmd_status(args: Namespace, paths: Paths) -> int:
    st = call(paths, "vm.status", {"vm": args.name})

    def human() -> str:
        w = st.get("worker", {})
        u = st.get("usage", {})
        lines = [
            f"{st['name']}: {st['state']}" + (f" ({st['reason']})" if st["reason"] else ""),
            f"  kind       {st['kind']}, {st['vcpus']} vCPU, {st['memory_mib']} MiB",
            f"  worker     pid {st['pid'] or '-'}, version {st['worker_version'] or '-'}, "
            f"up {human_duration(st['uptime_s'])}",
        ]
        if u:
            lines.append(
                f"  usage      RSS {human_size(u['rss_bytes'])}, CPU {u['cpu_user_s']}s user "
                f"{u['cpu_system_s']}s sys, {u['threads']} threads, {u['open_fds']} fds"
            )
        if w and "error" not in w:
            detail = w.get("detail")  # the worker kind's own one-line summary
            lines.append(f"  guest      {w.get('state')}" + (f", {detail}" if detail else ""))
        lines += jail_lines(st.get("jail") or {})
        lines.append(f"  restart    {st['restart']}, config {st['config']}")
        if st.get("last_exit"):
            lines.append(f"  last exit  {st['last_exit']}")
        if st.get("last_upgrade"):
            lines.append(f"  upgrade    {summarize(st['last_upgrade'])}")
        if st.get("image"):
            lines.append(f"  image      {st['image']} (vmctl resume runs it on)")
        lines.append(f"  console    {st['console_log']}")
        lines += disk_lines(st.get("disks", []), w.get("disks", []) if w else [])
        lines += nic_lines(st.get("nets", []))
        return "\n".join(lines)

    emit(args, st, human)
    return EXIT_OK


def jail_lines(j: dict[str, Any]) -> list[str]:
    """The worker's confinement, as /proc shows it (supervisor.jail.status)."""
    out = []
    if j.get("warning"):
        out.append(f"  WARNING    {j['warning']}")
    if "uid" in j:
        ns = ",".join(j.get("namespaces", [])) or "none (the host's)"
        out.append(
            f"  jail       uid {j['uid']}, namespaces {ns}, seccomp {j.get('seccomp', '?')}, "
            f"no_new_privs {'yes' if j.get('no_new_privs') else 'no'}, "
            f"cgroup {' '.join(j.get('cgroup', [])) or '-'}"
        )
    elif j.get("enabled"):
        out.append("  jail       on (no worker running)")
    return out


def disk_lines(disks: list[dict[str, Any]], device: list[dict[str, Any]]) -> list[str]:
    counters = {d.get("name"): d for d in device}
    out = []
    for d in disks:
        c = counters.get(d["name"], {})
        line = f"  {d['name']:<10} {d['path']}, {d['size_mib']} MiB"
        if c:
            line += (
                f", {c.get('reads', 0)} reads, {c.get('writes', 0)} writes, "
                f"{c.get('flushes', 0)} flushes, {c.get('errors', 0)} errors"
            )
        out.append(line)
    return out


def nic_lines(nets: list[dict[str, Any]]) -> list[str]:
    """Per NIC: tap, MAC, bridge; the tap as the host sees it; the device's counters."""
    out = []
    for n in nets:
        out.append(
            f"  {n['name']:<10} tap {n['tap']}, mac {n['mac']}, "
            + (f"bridge {n['bridge']}" if n["bridge"] else "no bridge")
        )
        h = n.get("host")
        if h is None:
            out.append("             host: no such interface")
        elif "error" in h:
            out.append(f"             host: {h['error']}")
        else:
            out.append(
                f"             host: ifindex {h['ifindex']}, {'up' if h['up'] else 'down'}, "
                f"to guest {h['tx_packets']} packets ({h['tx_dropped']} dropped, "
                f"queue {h.get('txqueuelen', '?')}), "
                f"from guest {h['rx_packets']} ({h['rx_dropped']} dropped)"
            )
        d = n.get("device")
        if d:
            out.append(
                f"             device: rx {d.get('rx_frames', 0)} "
                f"({d.get('rx_dropped', 0)} dropped), tx {d.get('tx_frames', 0)} "
                f"({d.get('tx_dropped', 0)} dropped, {d.get('tx_errors', 0)} errors)"
            )
    return out


def cmd_simple(op: str, verb: str) -> Callable[[Namespace, Paths], int]:
    def run(args: Namespace, paths: Paths) -> int:
        params: dict[str, Any] = {"vm": args.name}
        if getattr(args, "force", False):
            params["force"] = True
        res = call(paths, op, params)
        emit(
            args,
            res,
            lambda: f"{args.name}: {verb}" + (f" (pid {res['pid']})" if res.get("pid") else ""),
        )
        return EXIT_OK

    return run


def suspend_text(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['name']}: {r['error']}"
    if "pid" in r:  # a resume
        return (
            f"{r['name']}: resumed (pid {r['pid']}) after {human_duration(r['suspended_s'])}: "
            f"{human_size(r['populated_bytes'])} of RAM read in {r['fill_ms']} ms"
        )
    return (
        f"{r['name']}: suspended to {r['image']}: {human_size(r['populated_bytes'])} of "
        f"{human_size(r['ram_size'])} RAM populated, written in {r['write_ms']} ms"
    )


def cmd_suspend_or_resume(op: str) -> Callable[[Namespace, Paths], int]:
    """``vmctl suspend`` / ``resume``: NAME or --all; exit 1 if any VM failed."""

    def run(args: Namespace, paths: Paths) -> int:
        if (args.name is None) == (not args.all):
            return usage(f"{args.command_name}: name one VM or give --all")
        params: dict[str, Any] = {"vm": args.name} if args.name else {"all": True}
        if getattr(args, "dir", None):
            params["dir"] = os.path.abspath(args.dir)
        res = call(paths, op, params, timeout=3600)
        results = res["vms"] if args.all else [res]
        emit(args, res, lambda: "\n".join(suspend_text(r) for r in results) or "no VMs to do")
        return EXIT_FAILED if any("error" in r for r in results) else EXIT_OK

    return run


def cmd_fds(args: Namespace, paths: Paths) -> int:
    with broker_client(paths) as client:
        fds = client.list_fds(args.name)
    emit(args, fds, lambda: table(fd_rows(fds), FD_HEADERS) if fds else f"{args.name}: no fds")
    return EXIT_OK


def follow(path: Path, start: int, out: Any, stop: threading.Event, interval: float = 0.05) -> None:
    """Copy what is appended to ``path`` from offset ``start`` until ``stop``, a chunk
    at a time. A log that shrinks was rotated (copy-truncate): start again at 0."""
    pos = start
    while not stop.is_set():
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            size = 0
        if size < pos:  # truncated (log rotation with copytruncate): start over
            pos = 0
        if size > pos:
            pos = copy_range(path, pos, size, out)
            continue
        stop.wait(interval)


LOG_CHUNK = 1 << 16


def copy_range(path: Path, start: int, end: int, out: Any) -> int:
    """Write ``path``'s bytes [start, end) to ``out`` in chunks; returns where it stopped."""
    pos = start
    with open(path, "rb") as f:
        f.seek(pos)
        while pos < end and (data := f.read(min(LOG_CHUNK, end - pos))):
            out.write(data)
            pos += len(data)
    out.flush()
    return pos


def tail_start(path: Path, size: int, lines: int) -> int:
    """Where the last ``lines`` lines of the first ``size`` bytes begin, read backwards
    a chunk at a time (as ``split(b"\\n")[-lines - 1:]`` would cut it)."""
    want = lines + 1
    with open(path, "rb") as f:
        end = size
        while end > 0:
            begin = max(0, end - LOG_CHUNK)
            f.seek(begin)
            chunk = f.read(end - begin)
            i = len(chunk)
            while (i := chunk.rfind(b"\n", 0, i)) >= 0:
                want -= 1
                if want == 0:
                    return begin + i + 1
            end = begin
    return 0


def cmd_logs(args: Namespace, paths: Paths) -> int:
    path = paths.worker_log(args.name) if args.worker else paths.console_log(args.name)
    if not path.exists():
        print(f"vmctl: no log for VM {args.name} ({path})", file=sys.stderr)
        return EXIT_FAILED
    # Streamed: a log is never read into memory whole.
    size = path.stat().st_size
    start = tail_start(path, size, args.lines) if args.lines else 0
    end = copy_range(path, start, size, sys.stdout.buffer)
    if args.follow:
        import threading

        stop = threading.Event()
        try:
            follow(path, end, sys.stdout.buffer, stop)
        except KeyboardInterrupt:
            stop.set()
    return EXIT_OK


def cmd_console(args: Namespace, paths: Paths) -> int:
    """Attach: output follows the console log; keystrokes go to the guest's UART."""
    import select
    import threading
    from pathlib import Path

    with supervisor(paths) as conn:
        reply = conn.call("vm.console", {"vm": args.name})
    (fd,) = reply.fds
    log_path = Path(reply.result["log"])
    stop = threading.Event()
    start = log_path.stat().st_size if log_path.exists() else 0
    out = threading.Thread(
        target=follow, args=(log_path, start, sys.stdout.buffer, stop), daemon=True
    )
    out.start()
    tty = sys.stdin.isatty()
    saved = None
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setraw(sys.stdin.fileno())
        sys.stderr.write(f"attached to {args.name}; Ctrl-] detaches\r\n")
    try:
        stdin = sys.stdin.buffer.fileno()
        while True:
            ready, _, _ = select.select([stdin], [], [], 0.5)
            if not ready:
                continue
            data = os.read(stdin, 1024)
            if not data:
                break
            if DETACH in data:
                data = data[: data.index(DETACH)]
                if data:
                    os.write(fd, data)
                break
            os.write(fd, data.replace(b"\r", b"\n") if tty else data)
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        stop.set()
        out.join(1)
        os.close(fd)
    if tty:
        sys.stderr.write("\ndetached\n")
    return EXIT_OK


def cmd_reload(args: Namespace, paths: Paths) -> int:
    res = call(paths, "config.reload")
    import json

    emit(args, res, lambda: json.dumps(res, indent=2))
    return EXIT_OK if "error" not in res else EXIT_FAILED


def cmd_config_check(args: Namespace, paths: Paths) -> int:
    """Like nginx -t: parse everything, print problems, touch nothing."""
    from baton.config import ConfigError, load_settings
    from supervisor.vmconfig import load_vms

    try:
        settings = load_settings(paths)
    except ConfigError as e:
        print(f"vmctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    result = load_vms(paths, settings.supervisor)
    data = {"vms": sorted(result.vms), "errors": result.errors}

    def human() -> str:
        lines = [f"{paths.config_file}: ok", f"VMs: {', '.join(sorted(result.vms)) or 'none'}"]
        lines += [f"error: {msg}" for msg in result.errors.values()]
        return "\n".join(lines)

    emit(args, data, human)
    return EXIT_FAILED if result.errors else EXIT_OK


# ------------------------------------------------------------------- upgrade


def summarize(r: dict[str, Any]) -> str:
    text = f"{r['outcome']}"
    if r.get("blackout_ms") is not None:
        text += f", blackout {r['blackout_ms']:.3f} ms"
    if r.get("total_ms") is not None:
        text += f", total {r['total_ms']:.1f} ms"
    if r.get("reason"):
        text += f" ({r['reason']})"
    return text


def report_text(r: dict[str, Any]) -> str:
    phases = ", ".join(f"{k} {v:.1f} ms" for k, v in r.get("phases_ms", {}).items())
    lines = [
        f"{r['vm']}: {summarize(r)}",
        f"  old worker  pid {r['old_pid']}, version {r['old_version']}",
        f"  new worker  pid {r['new_pid'] or '-'}, version {r['new_version'] or '-'}",
    ]
    if phases:
        lines.append(f"  phases      {phases}")
    if r.get("state_bytes"):
        versions = ", ".join(f"{k} v{v}" for k, v in sorted(r.get("state_versions", {}).items()))
        lines.append(f"  state       {r['state_bytes']:,} bytes ({versions})")
    return "\n".join(lines)


def check_text(r: dict[str, Any]) -> str:
    """The human form of a ``vm.upgrade_check`` report."""
    versions = r.get("versions")
    head = (
        f"{r['vm']}: would upgrade ({r['old_version']} -> {r['new_version']})"
        if r["ok"]
        else f"{r['vm']}: would NOT upgrade: {r['reason']}"
    )
    lines = [head]
    if versions:
        shown = ", ".join(f"{k} v{v}" for k, v in sorted(versions.items()))
        size = f"{r['state_bytes']:,} bytes" if r.get("state_bytes") else "state"
        lines.append(f"  state       {size} at {shown}")
    back = r.get("rollback") or {}
    if versions is not None and back:
        if back.get("ok"):
            shown = ", ".join(f"{k} v{v}" for k, v in sorted((back["versions"] or {}).items()))
            lines.append(f"  way back    an upgrade back would write {shown or 'what QEMU sends'}")
        else:
            lines.append(f"  way back    none: {back.get('reason')}")
    timings = [
        f"{label} {r[key]:.1f} ms"
        for label, key in (("prepare", "prepare_ms"), ("preview", "preview_ms"),
                           ("validate", "validate_ms"), ("total", "total_ms"))
        if r.get(key) is not None
    ]  # fmt: skip
    if timings:
        lines.append(f"  timings     {', '.join(timings)}")
    lines += [f"  note        {n}" for n in r.get("notes", [])]
    return "\n".join(lines)


def _upgrade_one(
    paths: Paths, name: str, worker: list[str] | None, retire_aside: bool = False
) -> dict[str, Any]:
    params: dict[str, Any] = {"vm": name}
    if worker:
        params["worker"] = worker
    if retire_aside:  # a rollout's: the next VM need not wait for this one's old exit
        params["retire_aside"] = True
    return call(paths, "vm.upgrade", params, timeout=600)


def _check_one(paths: Paths, name: str, worker: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {"vm": name}
    if worker:
        params["worker"] = worker
    return call(paths, "vm.upgrade_check", params, timeout=600)


ROLLOUT_ONLY = ("canary", "max_blackout_ms", "max_failures")


def cmd_upgrade(args: Namespace, paths: Paths) -> int:
    import shlex

    worker = shlex.split(args.worker) if args.worker else None
    used = [f"--{o.replace('_', '-')}" for o in ROLLOUT_ONLY if getattr(args, o) is not None]
    if args.keep_going:
        used.append("--keep-going")
    if args.all and args.name:
        return usage("upgrade: a VM name or --all, not both")
    if used and (not args.all or args.check):
        return usage(f"upgrade: {', '.join(used)}: only with --all, and not with --check")
    if args.keep_going and args.max_failures is not None:
        return usage("upgrade: --keep-going means no failure limit; not with --max-failures")
    for opt in ("canary", "max_failures", "max_parallel"):
        if (getattr(args, opt) or 0) < 0:
            return usage(f"upgrade: --{opt.replace('_', '-')} must not be negative")
    if args.all:
        return check_all(args, paths, worker) if args.check else upgrade_all(args, paths, worker)
    if not args.name:
        return usage("upgrade needs a VM name or --all")
    if args.check:
        r = _check_one(paths, args.name, worker)
        emit(args, r, lambda: check_text(r))
        return EXIT_OK if r["ok"] else EXIT_NOT_COMMITTED
    r = _upgrade_one(paths, args.name, worker)
    emit(args, r, lambda: report_text(r))
    return EXIT_OK if r["outcome"] == "committed" else EXIT_NOT_COMMITTED


def usage(message: str) -> int:
    print(f"vmctl: {message}", file=sys.stderr)
    return EXIT_USAGE


def _running(paths: Paths) -> list[str]:
    return sorted(v["name"] for v in call(paths, "vm.list") if v["state"] == "running")


def _parallel(args: Namespace, paths: Paths) -> int:
    if args.max_parallel is not None:
        return max(1, args.max_parallel)
    from baton.config import load_settings

    return max(1, load_settings(paths).upgrade.max_parallel)


class LiveDisplay:
    """The rollout on a terminal: a progress bar with the VMs in flight, and a line
    per finished VM above it (``rich``: it redraws, wraps and degrades properly,
    which hand-written escape codes did not)."""

    def __init__(self, total: int, verb: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn(verb),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[active]}", markup=False),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task(verb, total=total, active="")

    def __enter__(self) -> LiveDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def active(self, names: list[str]) -> None:
        self.progress.update(self.task, active=", ".join(names))

    def finished(self, text: str, ok: bool, names: list[str]) -> None:
        from rich.text import Text

        self.progress.console.print(Text(text, style="green" if ok else "bold red"))
        self.progress.update(self.task, advance=1, active=", ".join(names))

    def line(self, text: str, ok: bool) -> None:
        from rich.text import Text

        self.console.print(Text(text, style="bold" if ok else "bold red"))


def _json_line(data: dict[str, Any]) -> None:
    import json

    print(json.dumps(data, sort_keys=True), flush=True)


def upgrade_all(args: Namespace, paths: Paths, worker: list[str] | None) -> int:
    """Every running VM, by name, under the rollout's policy (``supervisor.rollout``)."""
    from supervisor import rollout

    names = _running(paths)
    policy = rollout.Policy(
        parallel=_parallel(args, paths),
        canary=args.canary or 0,
        max_failures=None if args.keep_going else (args.max_failures or 0),
        max_blackout_ms=args.max_blackout_ms,
    )
    live = sys.stdout.isatty() and not args.json

    def upgrade_one(name: str) -> dict[str, Any]:
        try:
            return _upgrade_one(paths, name, worker, retire_aside=True)
        except wire.RemoteError as e:
            return {"vm": name, "outcome": "error", "reason": f"{e.message} ({e.code})"}
        except (Unreachable, wire.WireError, OSError) as e:
            raise rollout.Unreachable(f"the supervisor stopped answering: {e}") from None

    display = LiveDisplay(len(names), "upgrading") if live and names else None
    run = rollout.Rollout(names, policy, upgrade_one)
    if display is not None:
        run.on_start = lambda name: display.active(run.in_flight)
        run.on_report = lambda r: display.finished(
            f"{r['vm']}: {summarize(r)}", r["outcome"] == "committed", run.in_flight
        )
        with display:
            summary = run.run()
    else:
        run.on_report = _json_line
        summary = run.run()
    code = rollout_exit(summary)
    if display is None:
        _json_line(summary)
    else:
        display.line(rollout_text(summary), code == EXIT_OK)
    return code


def rollout_exit(summary: dict[str, Any]) -> int:
    from supervisor import rollout

    if summary["halted"] == rollout.HALT_BUDGET:
        return EXIT_HALTED
    if summary["halted"] == rollout.HALT_UNREACHABLE:
        return EXIT_UNREACHABLE
    if summary["not_committed"] or summary["skipped"]:
        return EXIT_NOT_COMMITTED
    return EXIT_OK


def halt_text() -> dict[str, str]:
    from supervisor import rollout

    return {
        rollout.HALT_BUDGET: "halted: {over} paused longer than the {budget} ms budget",
        rollout.HALT_CANARY: "halted: a canary did not commit",
        rollout.HALT_FAILURES: "halted: more than {limit} upgrades did not commit",
        rollout.HALT_UNREACHABLE: "halted: the supervisor stopped answering",
    }


def rollout_text(s: dict[str, Any]) -> str:
    text = f"{s['upgraded']}/{s['vms']} upgraded in {s['total_s']:.1f}s"
    if s["halted"]:
        why = (
            halt_text()
            .get(s["halted"], "halted: {halted}")
            .format(
                over=", ".join(s["over_budget_vms"]),
                budget=s["max_blackout_ms"],
                limit=s["max_failures"],
                halted=s["halted"],
            )
        )
        text += f"; {why}"
        if s["skipped_vms"]:
            text += f"; skipped {', '.join(s['skipped_vms'])}"
    if s["not_committed_vms"]:
        text += f"; not committed: {', '.join(s['not_committed_vms'])}"
    b = s["blackout_ms"]
    if b["max"] is not None:
        text += (
            f"; blackout median {b['median']:.3f} ms, p99 {b['p99']:.3f} ms, max {b['max']:.3f} ms"
        )
    return text


def check_all(args: Namespace, paths: Paths, worker: list[str] | None) -> int:
    """The preflight on every running VM, at most --max-parallel at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    names = _running(paths)
    live = sys.stdout.isatty() and not args.json
    lock = threading.Lock()
    reports: list[dict[str, Any]] = []

    def check_one(name: str) -> None:
        try:
            r = _check_one(paths, name, worker)
        except wire.RemoteError as e:
            r = {"vm": name, "check": True, "ok": False, "reason": f"{e.message} ({e.code})"}
        with lock:
            reports.append(r)
            if live:
                print(check_text(r), flush=True)
            else:
                _json_line(r)

    with ThreadPoolExecutor(_parallel(args, paths)) as pool:
        for f in [pool.submit(check_one, n) for n in names]:
            f.result()
    refused = sorted(r["vm"] for r in reports if not r["ok"])
    summary = {
        "event": "summary",
        "check": True,
        "vms": len(names),
        "ok": len(names) - len(refused),
        "refused_vms": refused,
    }
    if live:
        print(f"{summary['ok']}/{len(names)} would upgrade" + (
            f"; would not: {', '.join(refused)}" if refused else ""
        ))  # fmt: skip
    else:
        _json_line(summary)
    return EXIT_NOT_COMMITTED if refused else EXIT_OK


# ------------------------------------------------------------------- broker


def cmd_broker_status(args: Namespace, paths: Paths) -> int:
    with broker_client(paths) as client:
        st = client.status()

    def human() -> str:
        lines = [
            f"broker pid {st['pid']}  version {st['version']}  generation {st['generation']}  "
            f"uptime {human_duration(st['uptime_s'])}  open fds {st['open_fds']}  "
            f"connections {st['connections']}"
        ]
        if not st["vms"]:
            lines.append("no VMs")
        for vm in st["vms"]:
            lines.append(f"\nVM {vm['name']}  ({vm['tokens']} tokens)")
            if vm["fds"]:
                lines.append(table(fd_rows(vm["fds"]), FD_HEADERS))
        return "\n".join(lines)

    emit(args, st, human)
    return EXIT_OK


def cmd_broker_upgrade(args: Namespace, paths: Paths) -> int:
    with broker_client(paths) as client:
        before = client.hello()
        res = client.upgrade(args.command or None)
        after = client.hello()
    out = {"old_pid": before["pid"], "new_pid": res["pid"], "generation": after["generation"]}
    emit(
        args,
        out,
        lambda: (
            f"broker upgraded: pid {out['old_pid']} -> {out['new_pid']}, "
            f"generation {out['generation']}"
        ),
    )
    return EXIT_OK


# ------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from baton.paths import add_root_argument

    parser = argparse.ArgumentParser(
        prog="vmctl",
        description="Control Baton VMs: start, stop, inspect and upgrade them live.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_root_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    def vm_cmd(name: str, func: Callable[..., int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=func)
        return p

    sub.add_parser("list", help="every VM and its state").set_defaults(func=cmd_list)
    vm_cmd("status", cmd_status, "one VM in detail")
    vm_cmd("start", cmd_simple("vm.start", "started"), "start a VM")
    p = vm_cmd("stop", cmd_simple("vm.stop", "stopped"), "stop a VM and release its fds")
    p.add_argument("--force", action="store_true", help="kill the worker instead of asking")
    vm_cmd("restart", cmd_simple("vm.restart", "restarted"), "stop, then start")
    vm_cmd("console", cmd_console, "attach to the serial console (Ctrl-] detaches)")
    p = vm_cmd("logs", cmd_logs, "the console log (--worker: the worker's own log)")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines")
    p.add_argument("--worker", action="store_true", help="the worker process's log")
    vm_cmd("fds", cmd_fds, "the fds the broker holds for a VM")

    p = sub.add_parser(
        "upgrade",
        help="replace a VM's worker live (or every VM with --all)",
        description="Replace a VM's worker live, or every running VM with --all (in name "
        "order). --all halts by itself: at a failure (--max-failures), at a failed canary "
        "(--canary), or at a pause over budget (--max-blackout-ms); upgrades in flight "
        "finish, the rest are skipped. --check changes nothing: it prepares the new worker, "
        "negotiates state versions both ways, has the new worker check the old one's state "
        "without pausing the guest, reports, and ends it.",
    )
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--worker", metavar="CMD", help="the new worker command (default: configured)")
    p.add_argument("--all", action="store_true", help="every running VM")
    p.add_argument(
        "--check",
        action="store_true",
        help="preflight only: what the upgrade would do, and why not (exit 4 if it would not)",
    )
    p.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        metavar="N",
        help="upgrades at a time (default: [upgrade] max_parallel in baton.toml)",
    )
    p.add_argument(
        "--canary",
        type=int,
        default=None,
        metavar="N",
        help="upgrade the first N VMs first; go on only if all N committed (exit 4 if not)",
    )
    p.add_argument(
        "--max-blackout-ms",
        type=float,
        default=None,
        metavar="B",
        help="halt as soon as a committed upgrade paused its guest longer than B ms (exit 5)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=None,
        metavar="F",
        help="halt once more than F upgrades did not commit (default 0: at the first)",
    )
    p.add_argument(
        "--keep-going", action="store_true", help="no failure limit: do not halt at failures"
    )
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser(
        "suspend",
        help="save a VM (or every running VM) to disk and stop it; vmctl resume runs it on",
    )
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--all", action="store_true", help="every running VM (a shutdown hook)")
    p.add_argument(
        "--dir", metavar="DIR", help="where images go (DIR/NAME/; default var/lib/baton/suspend)"
    )
    p.set_defaults(func=cmd_suspend_or_resume("vm.suspend"))
    p = sub.add_parser("resume", help="run a suspended VM (or every one) again from its image")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--all", action="store_true", help="every suspended VM")
    p.set_defaults(func=cmd_suspend_or_resume("vm.resume"))

    sub.add_parser("reload", help="re-read the configuration (as SIGHUP)").set_defaults(
        func=cmd_reload
    )
    config = sub.add_parser("config", help="the configuration")
    csub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    csub.add_parser("check", help="validate every file, change nothing").set_defaults(
        func=cmd_config_check
    )

    broker = sub.add_parser("broker", help="the fd broker")
    bsub = broker.add_subparsers(dest="broker_command", metavar="SUBCOMMAND", required=True)
    bsub.add_parser("status", help="VMs, fds and open-fd count").set_defaults(
        func=cmd_broker_status
    )
    p = bsub.add_parser("upgrade", help="replace the broker process without losing an fd")
    p.add_argument("command", nargs="*", help="successor command (default: the installed broker)")
    p.set_defaults(func=cmd_broker_upgrade)
    return parser


def quick_args(argv: Sequence[str]) -> Namespace | None:
    """``[--root DIR] [--json] list`` and ``... status NAME``, parsed by hand: the
    commands run most often (by people and by scripts polling) need neither
    argparse nor the parser's construction, a tenth of vmctl's start. Anything
    else (``-h``, abbreviations, an argument that looks like an option, a
    mistake) returns None and goes to argparse, so that every other command line
    is parsed, and refused, exactly as before; ``test_vmctl_args`` holds the two
    parsers to the same answers."""
    root: str | None = None
    as_json = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--json":
            as_json = True
        elif arg.startswith("--root="):
            root = arg[len("--root=") :]
        elif arg == "--root" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            i += 1
            root = argv[i]
        else:
            break
        i += 1
    rest = argv[i:]
    if len(rest) == 1 and rest[0] == "list":
        return Namespace(root=root, json=as_json, command_name="list", func=cmd_list)
    if len(rest) == 2 and rest[0] == "status" and not rest[1].startswith("-"):
        return Namespace(
            root=root, json=as_json, command_name="status", name=rest[1], func=cmd_status
        )
    return None


def parse_args(argv: Sequence[str] | None = None) -> Namespace:
    """The command line as argparse reads it, by hand where that is the same."""
    args = quick_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        args = build_parser().parse_args(argv, namespace=Namespace())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = Paths(resolve_root(args.root))
    func: Callable[[Namespace, Paths], int] = args.func
    try:
        return func(args, paths)
    except Unreachable as e:
        print(f"vmctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except wire.RemoteError as e:
        print(f"vmctl: {e.message} ({e.code})", file=sys.stderr)
        return EXIT_FAILED
    except wire.ConnectionClosed as e:
        print(f"vmctl: lost the connection: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """The ``vmctl`` console script and ``python -m supervisor.vmctl``: ``main``,
    and for the hand-parsed commands an exit without the interpreter's teardown,
    which frees every module and object one by one (~15 M instructions, ~6 ms
    here) for a process that is done: they start no thread and register no
    atexit hook, and their output is flushed first. Should that flush fail (a
    closed pipe), the normal exit reports it exactly as before."""
    argv = sys.argv[1:]
    code = main(argv)
    if quick_args(argv) is not None:
        try:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:  # None: started with that fd closed
                    stream.flush()
        except OSError:
            sys.exit(code)
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
