"""The supervisor's control socket (``DIR/run/baton/control.sock``): what vmctl calls.

Only the administrator (``supervisor.admin_uids``, root by default, from
SO_PEERCRED) may use it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from baton import __version__
from baton.contract import CONSOLE_IN_WRITER
from baton.rpc import Request, Result, handles
from baton.schema import Bool, Int, ListOf, Name, Str, optional
from baton.wire import Code, RemoteError
from supervisor.service import Supervisor
from supervisor.suspend import Suspender
from supervisor.upgrade import Upgrader


def admin_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: Control, req: Request, **kw: Any) -> Any:
        if req.peer.uid not in self.sup.settings.supervisor.admin_uids:
            raise RemoteError(Code.DENIED, "only the administrator may control the supervisor")
        return fn(self, req, **kw)

    return wrapper


class Control:
    def __init__(self, sup: Supervisor, upgrader: Upgrader, suspender: Suspender) -> None:
        self.sup = sup
        self.upgrader = upgrader
        self.suspender = suspender

    @handles("hello")
    def hello(self, req: Request) -> dict[str, Any]:
        return {"service": "supervisor", "version": __version__, "pid": os.getpid()}

    @handles("supervisor.status")
    @admin_only
    def overview(self, req: Request) -> dict[str, Any]:
        return self.sup.overview()

    @handles("vm.list")
    @admin_only
    def vm_list(self, req: Request) -> list[dict[str, Any]]:
        return self.sup.list()

    @handles("vm.status", vm=Name)
    @admin_only
    def status(self, req: Request, vm: str) -> dict[str, Any]:
        return self.sup.status(vm)

    @handles("vm.start", vm=Name)
    @admin_only
    def start(self, req: Request, vm: str) -> dict[str, Any]:
        return self.sup.start(vm)

    @handles("vm.stop", vm=Name, force=optional(Bool(), False))
    @admin_only
    def stop(self, req: Request, vm: str, force: bool) -> dict[str, Any]:
        return self.sup.stop(vm, force=force)

    @handles("vm.restart", vm=Name)
    @admin_only
    def restart(self, req: Request, vm: str) -> dict[str, Any]:
        return self.sup.restart(vm)

    @handles("vm.console", vm=Name)
    @admin_only
    def console(self, req: Request, vm: str) -> Result:
        """The console's input pipe (write end) and where its output goes."""
        rt = self.sup.get(vm)
        fd = rt.held.get(CONSOLE_IN_WRITER)
        if fd is None:
            raise RemoteError(Code.INVALID_STATE, f"VM {vm} has no console (is it running?)")
        return Result({"log": str(self.sup.paths.console_log(vm))}, [fd])

    @handles("config.reload")
    @admin_only
    def reload(self, req: Request) -> dict[str, Any]:
        return self.sup.reload()

    @handles(
        "vm.upgrade",
        vm=Name,
        worker=optional(ListOf(Str(4096), 64, 1)),
        handoff_timeout_ms=optional(Int(10, 600_000)),
        retire_aside=optional(Bool()),
    )
    @admin_only
    def upgrade(
        self,
        req: Request,
        vm: str,
        worker: list[str] | None,
        handoff_timeout_ms: int | None,
        retire_aside: bool | None,
    ) -> dict[str, Any]:
        """``retire_aside``: reply once the old worker is parked, not once it exited."""
        return self.upgrader.upgrade(vm, worker, handoff_timeout_ms, bool(retire_aside)).to_dict()

    @handles("vm.upgrade_check", vm=Name, worker=optional(ListOf(Str(4096), 64, 1)))
    @admin_only
    def upgrade_check(self, req: Request, vm: str, worker: list[str] | None) -> dict[str, Any]:
        """What ``vm.upgrade`` would do, without pausing the guest or changing anything."""
        return self.upgrader.check(vm, worker)

    @handles(
        "vm.suspend",
        vm=optional(Name),
        all=optional(Bool(), False),
        dir=optional(Str(4096, pattern=r"/.*")),
    )
    @admin_only
    def suspend(self, req: Request, vm: str | None, all: bool, dir: str | None) -> dict[str, Any]:
        """Save the VM (``all``: every running VM) to disk and stop it (``supervisor.suspend``)."""
        if all == (vm is not None):
            raise RemoteError(Code.BAD_REQUEST, "name one VM or ask for all, not both or neither")
        if vm is None:
            return {"vms": self.suspender.suspend_all(dir)}
        return self.suspender.suspend(vm, dir)

    @handles("vm.resume", vm=optional(Name), all=optional(Bool(), False))
    @admin_only
    def resume(self, req: Request, vm: str | None, all: bool) -> dict[str, Any]:
        """Run a suspended VM (``all``: every suspended VM) again from its image."""
        if all == (vm is not None):
            raise RemoteError(Code.BAD_REQUEST, "name one VM or ask for all, not both or neither")
        if vm is None:
            return {"vms": self.suspender.resume_all()}
        return self.suspender.resume(vm)
