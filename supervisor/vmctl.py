"""vmctl: the operator's command line for Baton.

Human output is aligned tables; ``--json`` prints stable field names for
machines. Kept quick to import: only the wire client and the broker client.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from baton import wire
from baton.paths import Paths, add_root_argument, paths_from_args
from broker.client import BrokerClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_COMMITTED = 4

EPILOG = """\
exit status:
  0  success
  1  the operation failed (the daemon's error is printed)
  2  bad usage
  3  the supervisor or the broker is not running (or not reachable)
  4  an upgrade did not commit (rolled back or aborted: the old worker runs the guest)
"""


class Unreachable(Exception):
    pass


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Left-aligned columns, numbers right-aligned; one header line."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows) and rows
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


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


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


FD_HEADERS = ["FD", "KIND", "SIZE", "SEALS", "INODE", "STATE", "FETCHES", "DETAIL"]


def broker_client(paths: Paths) -> BrokerClient:
    client = BrokerClient(paths.broker_socket)
    try:
        client.hello()
    except (wire.ConnectionClosed, OSError) as e:
        raise Unreachable(f"broker is not running at {paths.broker_socket}: {e}") from None
    return client


# -- commands


def cmd_broker_status(args: argparse.Namespace, paths: Paths) -> int:
    with broker_client(paths) as client:
        st = client.status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return EXIT_OK
    print(
        f"broker pid {st['pid']}  version {st['version']}  generation {st['generation']}  "
        f"uptime {st['uptime_s']:.0f}s  open fds {st['open_fds']}  connections {st['connections']}"
    )
    if not st["vms"]:
        print("no VMs")
    for vm in st["vms"]:
        print(f"\nVM {vm['name']}  ({vm['tokens']} tokens)")
        if vm["fds"]:
            print(table(fd_rows(vm["fds"]), FD_HEADERS))
    return EXIT_OK


def cmd_broker_upgrade(args: argparse.Namespace, paths: Paths) -> int:
    with broker_client(paths) as client:
        before = client.hello()
        res = client.upgrade(args.command or None)
        after = client.hello()
    out = {"old_pid": before["pid"], "new_pid": res["pid"], "generation": after["generation"]}
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"broker upgraded: pid {out['old_pid']} -> {out['new_pid']}, "
            f"generation {out['generation']}"
        )
    return EXIT_OK


# -- parser


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

    broker = sub.add_parser("broker", help="the fd broker")
    bsub = broker.add_subparsers(dest="broker_command", metavar="SUBCOMMAND", required=True)
    p = bsub.add_parser("status", help="VMs, fds and open-fd count held by the broker")
    p.set_defaults(func=cmd_broker_status)
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
