"""This worker's hold on its VM's run lease (``broker/lease.py``).

The worker's vCPUs run only while it holds the lease. It takes it before
the guest first runs (boot, or the commit of an upgrade), loses it when it
hands the guest to a successor, and must take it again before it may resume
after that (a rolled-back upgrade): the broker grants that only if the
successor never took it.

The lease is taken at the last moment before the vCPUs run, not earlier
(pipelining the request with the state's load would save a broker round
trip of the pause): a worker that dies before its request reached the broker
provably never ran the guest, and the old worker may take the guest back.
It has a broker connection of its own, so no other thread's request ever
queues in front of it.
"""

from __future__ import annotations

import logging
import time

from baton import wire
from baton.wire import RemoteError
from broker.client import BrokerClient

log = logging.getLogger("vmm.lease")
BROKER_RESTART_WAIT_S = 5.0  # a broker restarting under us is back within this
CONFIRM_SPIN_US = 3000  # the broker answers a grant in a few hundred microseconds


class LeaseRefused(RuntimeError):
    """The broker would not let this worker run the guest (or could not be asked)."""


class RunLease:
    def __init__(self, client: BrokerClient, vm: str, instance: str) -> None:
        self.client = client
        self.vm = vm
        self.instance = instance
        self.held = False
        self.last_confirm_us = 0.0  # how long the last grant took (at a commit: inside the pause)

    def prepare(self) -> None:
        """Connect now and ask once (``lease.status``), so that inside the pause the
        request goes out on an open connection through code already run."""
        try:
            self.client.lease_status(self.vm)
            # The vCPU-0 thread that asks at the commit has nothing else to do:
            # it waits awake for the broker's answer rather than sleeping on it.
            self.client.conn.spin_us = CONFIRM_SPIN_US
        except (RemoteError, wire.WireError, OSError) as e:
            log.warning("run lease: cannot reach the broker yet: %s", e)

    def _args(self) -> dict[str, str]:
        return {"vm": self.vm, "instance": self.instance}

    def confirm(self) -> None:
        """Hold the lease on return, or raise LeaseRefused. A broker that is
        restarting is waited for (briefly); a refusal is final."""
        if self.held:
            return
        t0 = time.monotonic_ns()
        deadline = time.monotonic() + BROKER_RESTART_WAIT_S
        rid: int | None = None
        while True:
            try:
                if rid is None:
                    rid = self.client.conn.send_request("lease.acquire", self._args())
                self.client.conn.wait_reply(rid, timeout=max(0.1, deadline - time.monotonic()))
                self.held = True
                self.last_confirm_us = (time.monotonic_ns() - t0) / 1000
                return
            except RemoteError as e:
                raise LeaseRefused(f"the broker refused the run lease: {e.message}") from None
            except (wire.WireError, OSError) as e:
                self.client.close()
                rid = None
                if time.monotonic() >= deadline:
                    raise LeaseRefused(f"cannot reach the broker for the run lease: {e}") from None
                time.sleep(0.05)

    def handed_off(self) -> None:
        """The guest's state has left for a successor: from now on, running the guest
        here again needs the lease again."""
        self.held = False

    def release(self) -> None:
        """Let go on a clean exit, so the next worker need not wait for our death."""
        if not self.held:
            return
        self.held = False
        try:
            self.client.lease_release(self.vm, self.instance)
        except (RemoteError, wire.WireError, OSError) as e:
            log.warning("could not release the run lease: %s", e)

    def close(self) -> None:
        self.client.close()
