"""Typed client of baton-brokerd, used by the supervisor, the workers and vmctl.

``BrokerClient`` also remembers the fds its owner holds (``remember``), so
that after a broker restart it can hand them all back (``reregister``): a
broker crash never dooms a running VM.
"""

from __future__ import annotations

import select
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from baton import wire
from baton.wire import Connection

SPIN_US = 150  # the broker answers in tens of microseconds: wait that long awake


class BrokerClient:
    def __init__(
        self, path: Path | str, *, token: str | None = None, timeout: float = 10.0
    ) -> None:
        self.path = Path(path)
        self.token = token
        self.timeout = timeout
        self._conn: Connection | None = None
        # fds this process holds for the broker's sake: vm -> name -> fd
        self._held: dict[str, dict[str, int]] = {}
        # what this (administrator) client let each VM open: re-sent by reregister
        self._allowed: dict[str, dict[str, Any]] = {}

    # -- connection
    @property
    def conn(self) -> Connection:
        if self._conn is None:
            try:
                self._conn = Connection.connect(self.path, token=self.token, timeout=self.timeout)
                self._conn.spin_us = SPIN_US
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise wire.ConnectionClosed(
                    f"broker not running (cannot connect to {self.path}: {e.strerror})"
                ) from None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, op: str, args: dict[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> wire.Reply:
        try:
            return self.conn.call(op, args, fds=fds)
        except wire.ConnectionClosed:
            self.close()
            raise

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def broker_gone(self, timeout: float = 0.0) -> bool:
        """True once the broker end of our connection has hung up.

        Only a hang-up or an error counts: a reply that another thread has not
        read yet also makes the socket readable, and must not look like a dead
        broker (that mistake closed connections under calls in flight)."""
        conn = self._conn
        if conn is None:
            return False
        p = select.poll()
        p.register(conn.fileno(), select.POLLRDHUP)
        events = p.poll(timeout * 1000)
        return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in events)

    # -- operations
    def hello(self) -> dict[str, Any]:
        return self.call("hello").result

    def create_vm(self, vm: str, *, exist_ok: bool = False) -> bool:
        return self.call("vm.create", {"vm": vm, "exist_ok": exist_ok}).result["created"]

    def drop_vm(self, vm: str) -> int:
        self._held.pop(vm, None)
        self._allowed.pop(vm, None)
        return self.call("vm.drop", {"vm": vm}).result["closed"]

    def list_vms(self) -> list[str]:
        return self.call("vm.list").result

    def allow(
        self,
        vm: str,
        *,
        files: Sequence[Mapping[str, Any]] | None = None,
        taps: Sequence[str] | None = None,
        uid: int | None = None,
    ) -> dict[str, Any]:
        """Set exactly which files (``{"path", "mode", "create"}``) and taps VM
        ``vm``'s tokens may open, and the uid they work from (``uid``, -1: any);
        what is left as None keeps the broker's. Remembered, and set again by
        ``reregister`` after a broker restart."""
        args: dict[str, Any] = {"vm": vm}
        if files is not None:
            args["files"] = [dict(f) for f in files]
        if taps is not None:
            args["taps"] = list(taps)
        if uid is not None:
            args["uid"] = uid
        result: dict[str, Any] = self.call("vm.allow", args).result
        self._allowed[vm] = {
            "files": result["files"],
            "taps": result["taps"],
            "uid": -1 if result.get("uid") is None else result["uid"],
        }
        return result

    def mint_token(self, vm: str, label: str = "") -> str:
        return self.call("token.mint", {"vm": vm, "label": label}).result["token"]

    def list_tokens(self, vm: str) -> list[dict[str, Any]]:
        return self.call("token.list", {"vm": vm}).result

    def revoke_token(self, vm: str, token: str) -> None:
        self.call("token.revoke", {"vm": vm, "token": token})

    def put(
        self,
        vm: str,
        fds: Mapping[str, int],
        *,
        labels: Mapping[str, str] | None = None,
        replace: bool = False,
    ) -> dict[str, list[str]]:
        names = list(fds)
        args = {"vm": vm, "names": names, "replace": replace}
        if labels:
            args["labels"] = [[k, v] for k, v in labels.items()]
        return self.call("fd.put", args, [fds[n] for n in names]).result

    def get(self, vm: str, names: Sequence[str]) -> dict[str, int]:
        """Fetch fds by name; the caller owns (and must close) what it gets."""
        return _named(self.call("fd.get", {"vm": vm, "names": list(names)}), list(names))

    def get_held(self, vm: str) -> dict[str, int]:
        """Every fd the broker holds for ``vm`` now, by name (the caller owns them)."""
        reply = self.call("fd.get", {"vm": vm})
        return _named(reply, list(reply.result["names"]))

    def list_fds(self, vm: str) -> list[dict[str, Any]]:
        return self.call("fd.list", {"vm": vm}).result

    def drop_fd(self, vm: str, name: str) -> None:
        self.call("fd.drop", {"vm": vm, "name": name})

    def create_memfd(
        self,
        vm: str,
        name: str,
        size: int,
        *,
        hugetlb: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"vm": vm, "name": name, "size": size, "hugetlb": hugetlb}
        if labels:
            args["labels"] = [[k, v] for k, v in labels.items()]
        return self.call("memfd.create", args).result

    def open_file(
        self, vm: str, name: str, path: str | Path, *, mode: str = "rw", create: bool = False
    ) -> dict[str, Any]:
        return self.call(
            "fd.open", {"vm": vm, "name": name, "path": str(path), "mode": mode, "create": create}
        ).result

    def open_tun(self, vm: str, name: str, ifname: str, *, vnet_hdr: bool = True) -> dict[str, Any]:
        return self.call(
            "tun.open", {"vm": vm, "name": name, "ifname": ifname, "vnet_hdr": vnet_hdr}
        ).result

    def status(self, *, fds: bool = True) -> dict[str, Any]:
        """The whole status: every page of ``broker.status`` merged (each page
        is bounded; the merged result is as large as the broker's table)."""
        page: dict[str, Any] = self.call("broker.status", {"fds": fds}).result
        vms = list(page["vms"])
        while page.get("next"):
            page = self.call("broker.status", {"fds": fds, "after": page["next"]}).result
            vms += page["vms"]
        return {**page, "vms": vms, "next": None}

    # -- the run lease (broker/lease.py)
    def lease_acquire(
        self, vm: str, instance: str, *, pid: int | None = None, start_time: float | None = None
    ) -> dict[str, Any]:
        """Take VM ``vm``'s run lease for this process (or, as the administrator,
        for process ``pid`` that started at ``start_time``)."""
        args: dict[str, Any] = {"vm": vm, "instance": instance}
        if pid is not None:
            args.update(pid=pid, start_time=start_time)
        return self.call("lease.acquire", args).result

    def lease_offer(
        self,
        vm: str,
        frm: str,
        to: str | None,
        *,
        pid: int | None = None,
        start_time: float | None = None,
    ) -> dict[str, Any]:
        """Let instance ``to`` (process ``pid``, started at ``start_time``) take the
        lease from ``frm``; ``to`` None withdraws the offer."""
        args: dict[str, Any] = {"vm": vm, "frm": frm}
        if to is not None:
            args["to"] = to
        if pid is not None:
            args.update(pid=pid, start_time=start_time)
        return self.call("lease.offer", args).result

    def lease_flag(self, vm: str) -> int:
        """An fd of VM ``vm``'s run flag (``baton.runflag``); the caller owns it."""
        reply = self.call("lease.flag", {"vm": vm})
        if len(reply.fds) != 1:
            reply.close_fds()
            raise wire.WireError(f"lease.flag: expected 1 fd, got {len(reply.fds)}")
        return reply.fds[0]

    def lease_release(self, vm: str, instance: str) -> dict[str, Any]:
        return self.call("lease.release", {"vm": vm, "instance": instance}).result

    def lease_status(self, vm: str) -> dict[str, Any]:
        return self.call("lease.status", {"vm": vm}).result

    def upgrade(self, command: list[str] | None = None) -> dict[str, Any]:
        args = {"command": command} if command else {}
        return self.conn.call("broker.upgrade", args, timeout=60).result

    # -- re-registration after a broker restart
    def remember(self, vm: str, fds: Mapping[str, int]) -> None:
        """Record fds this process holds for VM ``vm`` (it keeps ownership)."""
        self._held.setdefault(vm, {}).update(fds)

    def forget(self, vm: str, names: Sequence[str] | None = None) -> None:
        if names is None:
            self._held.pop(vm, None)
        else:
            for n in names:
                self._held.get(vm, {}).pop(n, None)

    def reregister(self, *, create_vms: bool = False) -> dict[str, dict[str, list[str]]]:
        """Hand every remembered fd back to the (new) broker.

        Idempotent: fds the broker still holds come back as ``unchanged``."""
        out: dict[str, dict[str, list[str]]] = {}
        for vm, fds in self._held.items():
            if not fds:
                continue
            if create_vms:
                self.create_vm(vm, exist_ok=True)
                allowed = self._allowed.get(vm)
                if allowed is not None:  # a broker that lost its table lost these too
                    self.allow(
                        vm, files=allowed["files"], taps=allowed["taps"], uid=allowed.get("uid")
                    )
            out[vm] = self.put(vm, fds)
        return out

    def reconnect(self, deadline: float) -> None:
        """Reconnect (with backoff until ``deadline``) and re-register what we hold."""
        old = self._conn
        if old is not None:
            with old._lock:  # let a call in flight finish (it fails fast: the peer is gone)
                self.close()
        self.wait_up(deadline)
        self.reregister(create_vms=self.token is None)

    def wait_up(self, deadline: float) -> dict[str, Any]:
        """Until a broker answers hello (backing off), or raise at ``deadline``."""
        delay = 0.01
        while True:
            try:
                return self.hello()
            except (wire.ConnectionClosed, OSError):
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)


def _named(reply: wire.Reply, names: list[str]) -> dict[str, int]:
    """An ``fd.get`` reply's fds by name; WireError (and none kept) if they do not match."""
    if len(reply.fds) != len(names):
        reply.close_fds()
        raise wire.WireError(f"asked for {len(names)} fds, got {len(reply.fds)}")
    return dict(zip(names, reply.fds, strict=True))
