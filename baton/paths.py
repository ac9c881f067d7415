"""Where every Baton process finds its config, sockets, state and logs.

All default paths hang off one root (``--root DIR`` or ``BATON_ROOT``, default
``/``), so tests and the demo run a complete host under a temporary
directory and never touch the real ``/etc`` or ``/run``.
"""

from __future__ import annotations

import os
from pathlib import Path

# vmctl's commonest commands import this module but neither argparse nor typing
# (a few ms of each start); mypy and ruff read any name TYPE_CHECKING as typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import NamedTuple

    class _Root(NamedTuple):
        root: Path

else:  # what typing.NamedTuple would build, without importing typing
    from collections import namedtuple

    _Root = namedtuple("_Root", ["root"])

ROOT_ENV = "BATON_ROOT"


class Paths(_Root):
    """The directory layout under one root (a named tuple: immutable, and cheaper
    to import than a frozen dataclass, which matters to vmctl's start-up)."""

    __slots__ = ()

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "baton"

    @property
    def run(self) -> Path:
        return self.root / "run" / "baton"

    @property
    def lib(self) -> Path:
        return self.root / "var" / "lib" / "baton"

    @property
    def log(self) -> Path:
        return self.root / "var" / "log" / "baton"

    @property
    def broker_socket(self) -> Path:
        return self.run / "broker.sock"

    @property
    def broker_pidfile(self) -> Path:
        return self.run / "broker.pid"

    @property
    def broker_state(self) -> Path:
        return self.lib / "broker" / "table.json"

    @property
    def broker_leases(self) -> Path:
        return self.lib / "broker" / "leases.json"

    @property
    def control_socket(self) -> Path:
        return self.run / "control.sock"

    @property
    def supervisor_pidfile(self) -> Path:
        return self.run / "supervisor.pid"

    @property
    def config_file(self) -> Path:
        return self.etc / "baton.toml"

    @property
    def vms_dir(self) -> Path:
        return self.etc / "vms.d"

    @property
    def suspend_dir(self) -> Path:
        """Where ``vmctl suspend`` puts each VM's image (``NAME/`` under it) by default."""
        return self.lib / "suspend"

    def vm_run_dir(self, vm: str) -> Path:
        return self.run / "vm" / vm

    def console_log(self, vm: str) -> Path:
        return self.log / f"{vm}.console.log"

    def worker_log(self, vm: str) -> Path:
        return self.log / f"{vm}.worker.log"

    def ensure(self) -> None:
        """Create the run, state and log directories (owner-only)."""
        for d in (self.run, self.lib, self.log, self.lib / "broker"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)


def resolve_root(cli_root: str | None) -> Path:
    """The root from ``--root``, else ``BATON_ROOT``, else ``/``."""
    raw = cli_root if cli_root is not None else os.environ.get(ROOT_ENV, "/")
    return Path(raw).resolve()


def add_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        metavar="DIR",
        default=None,
        help=f"prefix for every default path (default: ${ROOT_ENV} or /)",
    )


def paths_from_args(args: argparse.Namespace) -> Paths:
    return Paths(resolve_root(args.root))
