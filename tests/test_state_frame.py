"""The state frame (``vmm.state``, format 2) between real workers: used only where
both hellos offer it (``contract.STATE_FRAME``), format 1 with any older worker,
and the guest whole across every mix, in both commit modes."""

from __future__ import annotations

import itertools

import pytest
from helpers import wait_until

from baton import contract
from baton_lab.harness import BrokerProcess, WorkerProcess, hand_off
from supervisor.provision import provision
from vmm.guest import continuity_problems, heartbeats

pytestmark = pytest.mark.kvm
MiB = 1 << 20
OLDER = {"BATON_VMM_FRAME": "0"}  # a worker as from before the frame


@pytest.fixture
def vm(broker: BrokerProcess) -> dict:
    with broker.client() as c:
        provision(c, broker.paths, "vm1", 64 * MiB, [])
    return {"broker": broker, "log": broker.paths.console_log("vm1")}


def worker(vm: dict, **kw) -> WorkerProcess:
    return WorkerProcess(vm["broker"].root, "vm1", tick_ms=20.0, vcpus=2, **kw)


def beats(vm: dict) -> list:
    return heartbeats(vm["log"].read_text())


def more_beats(vm: dict, n: int) -> None:
    seen = len(beats(vm))
    wait_until(lambda: len(beats(vm)) >= seen + n, 20, 0.01, f"{n} more heartbeats")


def test_frame_only_between_workers_that_both_offer_it(vm):
    """2 vCPUs along new -> older -> new -> new -> older (asleep too) -> new: the
    frame travels only between two new workers, each handoff commits (worker-commit
    mode and, every other one, the explicit resume), and no heartbeat is lost."""
    chain = [
        worker(vm),
        worker(vm, incoming=True, env=OLDER),
        worker(vm, incoming=True),
        worker(vm, incoming=True),
        worker(vm, incoming=True, env={**OLDER, "BATON_VMM_AWAKE": "0"}),
        worker(vm, incoming=True),
    ]
    try:
        chain[0].start()
        more_beats(vm, 3)
        offers = [contract.STATE_FRAME in contract.Hello.parse(chain[0].call("hello")).features]
        for w in chain[1:]:
            offers.append(
                contract.STATE_FRAME in contract.Hello.parse(w.start().call("hello")).features
            )
        assert offers == [True, False, True, True, False, True]
        used = []
        for i, (old, new) in enumerate(itertools.pairwise(chain)):
            r = hand_off(old, new, commit_by_ns=2**62 if i % 2 == 0 else None, timeout=30)
            assert new.call("status")["state"] == "running"
            used.append(r["sent"]["state_format"])
            # the frame arrives in its two sections, as raw datagrams
            assert ("vcpus_readable_at_ns" in r["loaded"]) == (used[-1] == "frame")
            assert old.quit() == 0
            more_beats(vm, 2)
        assert used == ["v1", "v1", "frame", "v1", "v1"]
        assert continuity_problems(beats(vm)) == []
    finally:
        for w in chain:
            w.kill()
