"""Tokens nobody holds are revoked: a crash between minting a worker's token and
recording it (supervisor or broker killed mid-start) must not leave it live."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import BrokerProcess

from baton.config import load_settings
from baton.paths import Paths
from supervisor.daemon import build_kinds
from supervisor.service import Supervisor

pytestmark = pytest.mark.kvm


def test_tokens_no_live_worker_holds_are_revoked(root, broker: BrokerProcess) -> None:
    d = root / "etc" / "baton" / "vms.d"
    d.mkdir(parents=True)
    worker = json.dumps([sys.executable, "-m", "vmm.worker"])
    (d / "vm1.toml").write_text(f"memory_mib = 16\nautostart = false\nworker = {worker}\n")
    paths = Paths(root)
    client = broker.client()
    sup = Supervisor(paths, load_settings(paths), client, build_kinds(paths, client))
    sup.load_config()
    sup.watcher.thread.start()
    try:
        sup.start("vm1")
        ours = sup.vms["vm1"].worker
        assert ours is not None
        with broker.client() as admin:
            stray = admin.mint_token("vm1", "worker (left by a crashed supervisor)")
            assert len(admin.list_tokens("vm1")) == 2
            assert sup.sweep_tokens() == 0, "a young token may be on its way to a worker"
            assert sup.sweep_tokens(grace_s=0) == 1
            left = admin.list_tokens("vm1")
            assert [t["sha256"] for t in left] == [ours.token_sha256]
            assert admin.call("hello", {}).result["admin"]
        # the stray token no longer opens anything; the worker's still does
        with broker.client(token=stray) as c:
            assert c.hello()["vm"] is None
        assert ours.call("status")["state"] == "running"
    finally:
        sup.stop("vm1", force=True)
        sup.watcher.close()
        client.close()
