"""This worker's hold on its VM's run lease (``broker/lease.py``).

The worker's vCPUs run only while it holds the lease. It takes it before
the guest first runs (boot, or the commit of an upgrade), loses it when it
hands the guest to a successor, and must take it again before it may resume
after that (a rolled-back upgrade): the broker grants that only if the
successor never took it.

At boot and on a resume the worker asks the broker (``confirm``: a round
trip, outside any pause). At the commit of an upgrade it writes the run flag
instead (``commit``: one ``pwrite`` of a record encoded in ``prepare``), at
the last moment before its vCPUs run, and the broker settles the lease from
the flag later (``broker/lease.py``): a worker that dies before the write
provably never ran the guest, and the old worker may take the guest back.
Once its vCPUs run it asks the broker all the same (``confirm``), outside the
pause, and stops the guest if the broker disagrees. It has a broker
connection of its own, so no other thread's request ever queues in front of
it.
"""

from __future__ import annotations

import logging
import os
import time

from baton import runflag, wire
from baton.wire import RemoteError
from broker.client import BrokerClient
from vmm import faults

log = logging.getLogger("vmm.lease")
BROKER_RESTART_WAIT_S = 5.0  # a broker restarting under us is back within this


class LeaseRefused(RuntimeError):
    """The broker would not let this worker run the guest (or could not be asked)."""


class RunLease:
    def __init__(self, client: BrokerClient, vm: str, instance: str) -> None:
        self.client = client
        self.vm = vm
        self.instance = instance
        self.held = False
        self.confirmed = False  # the broker itself said we hold it (not only our flag)
        self.flag: int | None = None  # the VM's run flag (baton.runflag), from ``prepare``
        self._record = runflag.encode(instance)
        self.last_commit_us = 0.0  # the last commit, inside the pause

    def prepare(self) -> None:
        """Before any pause: fetch the VM's run flag (so the commit is one ``pwrite``)
        and connect (so ``confirm`` pays no connect)."""
        try:
            self.flag = self.client.lease_flag(self.vm)
        except (RemoteError, wire.WireError, OSError) as e:
            log.warning("run lease: no run flag yet (the commit will ask the broker): %s", e)

    def expect_offer(self) -> None:
        """Before a commit may come (outside the pause, or overlapping the old worker's
        part of it): has the supervisor offered us the lease? A flag written with no
        offer would let this worker run the guest unbeknown to the broker; without
        one, the commit is refused here, before anything ran."""
        try:
            lease = self.client.lease_status(self.vm)
        except (RemoteError, wire.WireError, OSError) as e:
            raise LeaseRefused(f"cannot ask the broker about the run lease: {e}") from None
        offer = lease.get("offer") or []
        if len(offer) != 2 or offer[1] != self.instance:
            holder = (lease.get("holder") or {}).get("instance")
            raise LeaseRefused(
                f"the run lease (held by {holder or 'nobody'}) is not offered to this worker"
            )

    def commit(self) -> None:
        """The commit of an upgrade, inside the pause: write the run flag, no round
        trip; ``confirm`` afterwards checks that the broker agrees. Without a flag
        (the broker could not give one) it asks the broker instead. Raises
        LeaseRefused only if the lease could not be taken at all."""
        if self.held:
            return
        t0 = time.monotonic_ns()
        if self.flag is None:
            self.confirm()
        else:
            try:
                runflag.write(self.flag, self._record)
            except OSError as e:
                raise LeaseRefused(f"cannot write the run flag: {e}") from None
            self.held = True
            self.confirmed = False
            faults.crash("committed")  # tests: dead after the commit, before the guest ran
        self.last_commit_us = (time.monotonic_ns() - t0) / 1000

    def _args(self) -> dict[str, str]:
        return {"vm": self.vm, "instance": self.instance}

    def confirm(self) -> None:
        """Hold the lease on return, as the broker says, or raise LeaseRefused. A
        broker that is restarting is waited for (briefly); a refusal is final.
        After a ``commit`` this asks whether the broker settled the flag our way."""
        if self.held and self.confirmed:
            return
        deadline = time.monotonic() + BROKER_RESTART_WAIT_S
        rid: int | None = None
        while True:
            try:
                if rid is None:
                    rid = self.client.conn.send_request("lease.acquire", self._args())
                self.client.conn.wait_reply(rid, timeout=max(0.1, deadline - time.monotonic()))
                self.held = self.confirmed = True
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
        self.held = self.confirmed = False

    def release(self) -> None:
        """Let go on a clean exit, so the next worker need not wait for our death."""
        if not self.held:
            return
        self.held = self.confirmed = False
        try:
            self.client.lease_release(self.vm, self.instance)
        except (RemoteError, wire.WireError, OSError) as e:
            log.warning("could not release the run lease: %s", e)

    def close(self) -> None:
        self.client.close()
        if self.flag is not None:
            os.close(self.flag)
            self.flag = None
