"""vmctl: the operator's command line for Baton.

Human output is aligned tables; ``--json`` prints stable field names for
machines. Kept quick to import: the wire client, the broker client, and the
standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from baton import wire
from baton.paths import Paths, add_root_argument, paths_from_args
from broker.client import BrokerClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_COMMITTED = 4

DETACH = b"\x1d"  # Ctrl-]

EPILOG = """\
exit status:
  0  success
  1  the operation failed (the daemon's error is printed)
  2  bad usage
  3  the supervisor or the broker is not running (or not reachable)
  4  an upgrade did not commit (rolled back or aborted: the old worker runs the guest)

console: Ctrl-] detaches; the guest keeps running.
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


def emit(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else human())


# ------------------------------------------------------------------ clients


def broker_client(paths: Paths) -> BrokerClient:
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


def cmd_list(args: argparse.Namespace, paths: Paths) -> int:
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


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
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
        lines.append(f"  restart    {st['restart']}, config {st['config']}")
        if st.get("last_exit"):
            lines.append(f"  last exit  {st['last_exit']}")
        if st.get("last_upgrade"):
            lines.append(f"  upgrade    {summarize(st['last_upgrade'])}")
        lines.append(f"  console    {st['console_log']}")
        return "\n".join(lines)

    emit(args, st, human)
    return EXIT_OK


def cmd_simple(op: str, verb: str) -> Callable[[argparse.Namespace, Paths], int]:
    def run(args: argparse.Namespace, paths: Paths) -> int:
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


def cmd_fds(args: argparse.Namespace, paths: Paths) -> int:
    with broker_client(paths) as client:
        fds = client.list_fds(args.name)
    emit(args, fds, lambda: table(fd_rows(fds), FD_HEADERS) if fds else f"{args.name}: no fds")
    return EXIT_OK


def follow(path: Path, start: int, out: Any, stop: threading.Event, interval: float = 0.05) -> None:
    """Copy what is appended to ``path`` from offset ``start`` until ``stop``."""
    pos = start
    while not stop.is_set():
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            size = 0
        if size < pos:  # truncated (log rotation with copytruncate): start over
            pos = 0
        if size > pos:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read(size - pos)
            pos += len(data)
            out.write(data)
            out.flush()
            continue
        stop.wait(interval)


def cmd_logs(args: argparse.Namespace, paths: Paths) -> int:
    path = paths.worker_log(args.name) if args.worker else paths.console_log(args.name)
    if not path.exists():
        print(f"vmctl: no log for VM {args.name} ({path})", file=sys.stderr)
        return EXIT_FAILED
    whole = path.read_bytes()
    shown = b"\n".join(whole.split(b"\n")[-args.lines - 1 :]) if args.lines else whole
    sys.stdout.buffer.write(shown)
    sys.stdout.flush()
    if args.follow:
        stop = threading.Event()
        try:
            follow(path, len(whole), sys.stdout.buffer, stop)
        except KeyboardInterrupt:
            stop.set()
    return EXIT_OK


def cmd_console(args: argparse.Namespace, paths: Paths) -> int:
    """Attach: output follows the console log; keystrokes go to the guest's UART."""
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


def cmd_reload(args: argparse.Namespace, paths: Paths) -> int:
    res = call(paths, "config.reload")
    emit(args, res, lambda: json.dumps(res, indent=2))
    return EXIT_OK if "error" not in res else EXIT_FAILED


def cmd_config_check(args: argparse.Namespace, paths: Paths) -> int:
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


def _upgrade_one(paths: Paths, name: str, worker: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {"vm": name}
    if worker:
        params["worker"] = worker
    return call(paths, "vm.upgrade", params, timeout=600)


def cmd_upgrade(args: argparse.Namespace, paths: Paths) -> int:
    worker = shlex.split(args.worker) if args.worker else None
    if args.all:
        return upgrade_all(args, paths, worker)
    if not args.name:
        print("vmctl: upgrade needs a VM name or --all", file=sys.stderr)
        return EXIT_USAGE
    r = _upgrade_one(paths, args.name, worker)
    emit(args, r, lambda: report_text(r))
    return EXIT_OK if r["outcome"] == "committed" else EXIT_NOT_COMMITTED


def upgrade_all(args: argparse.Namespace, paths: Paths, worker: list[str] | None) -> int:
    """Every running VM, at most N at a time; halt at the first failure unless --keep-going."""
    names = [v["name"] for v in call(paths, "vm.list") if v["state"] == "running"]
    live = sys.stdout.isatty() and not args.json
    lock = threading.Lock()
    results: list[dict[str, Any]] = []
    queue = list(names)
    halted = threading.Event()
    t0 = time.monotonic()

    def progress(line: str | dict[str, Any]) -> None:
        with lock:
            if args.json:
                print(json.dumps(line if isinstance(line, dict) else {"event": line}), flush=True)
            elif live:
                done = len(results)
                sys.stdout.write(f"\r\033[K{line}\n[{done}/{len(names)}] upgrading...")
                sys.stdout.flush()
            else:
                print(line, flush=True)

    def worker_loop() -> None:
        while not halted.is_set():
            with lock:
                if not queue:
                    return
                name = queue.pop(0)
            try:
                r = _upgrade_one(paths, name, worker)
            except wire.RemoteError as e:
                r = {"vm": name, "outcome": "error", "reason": f"{e.message} ({e.code})"}
            with lock:
                results.append(r)
            progress(r if args.json else f"{name}: {summarize(r)}")
            if r["outcome"] != "committed" and not args.keep_going:
                halted.set()

    parallel = args.max_parallel
    if parallel is None:
        from baton.config import load_settings

        parallel = load_settings(paths).upgrade.max_parallel
    threads = [threading.Thread(target=worker_loop) for _ in range(max(1, parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if live:
        sys.stdout.write("\r\033[K")
    blackouts = sorted(r["blackout_ms"] for r in results if r.get("blackout_ms") is not None)
    committed = sum(r["outcome"] == "committed" for r in results)
    summary = {
        "event": "summary",
        "vms": len(names),
        "upgraded": committed,
        "not_committed": len(results) - committed,
        "skipped": len(names) - len(results),
        "halted": halted.is_set(),
        "total_s": round(time.monotonic() - t0, 3),
        "blackout_ms": {
            "median": statistics.median(blackouts) if blackouts else None,
            "p99": blackouts[min(len(blackouts) - 1, int(0.99 * len(blackouts)))]
            if blackouts
            else None,
            "max": blackouts[-1] if blackouts else None,
        },
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        b = summary["blackout_ms"]
        print(
            f"{committed}/{len(names)} upgraded in {summary['total_s']:.1f}s"
            + (
                f", {summary['skipped']} skipped (halted at the first failure)"
                if summary["halted"]
                else ""
            )
            + (
                f"; blackout median {b['median']:.3f} ms, p99 {b['p99']:.3f} ms, "
                f"max {b['max']:.3f} ms"
                if blackouts
                else ""
            )
        )
    return EXIT_OK if committed == len(names) else EXIT_NOT_COMMITTED


# ------------------------------------------------------------------- broker


def cmd_broker_status(args: argparse.Namespace, paths: Paths) -> int:
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


def cmd_broker_upgrade(args: argparse.Namespace, paths: Paths) -> int:
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

    p = sub.add_parser("upgrade", help="replace a VM's worker live (or every VM with --all)")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--worker", metavar="CMD", help="the new worker command (default: configured)")
    p.add_argument("--all", action="store_true", help="every running VM")
    p.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        metavar="N",
        help="upgrades at a time (default: [upgrade] max_parallel in baton.toml)",
    )
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    p.set_defaults(func=cmd_upgrade)

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = paths_from_args(args)
    func: Callable[[argparse.Namespace, Paths], int] = args.func
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


if __name__ == "__main__":
    sys.exit(main())
