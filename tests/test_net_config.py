"""NICs in VM files, and their taps provisioned in the broker.

Config checks need no daemons. Provisioning runs real daemons, always inside
the test's own network namespace (tests/netns.py): the broker creates the
taps there, the supervisor attaches them and sets them up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import NOBODY, run_as
from netns import isolated

from baton import contract
from baton.config import load_settings
from baton.paths import Paths
from baton.wire import Code, RemoteError
from baton_lab.harness import BrokerProcess, Host, wait_until
from supervisor import netdev, provision
from supervisor.vmconfig import default_mac, default_tap, load_vms


def write(root: Path, name: str, text: str) -> Path:
    path = Paths(root).vms_dir / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("memory_mib = 16\nautostart = false\n" + text)
    return path


def nic(name: str = "net0", **keys: str) -> str:
    return "\n[[net]]\n" + f'name = "{name}"\n' + "".join(f'{k} = "{v}"\n' for k, v in keys.items())


def load(root: Path) -> tuple[dict, dict[str, str]]:
    sup = load_settings(Paths(root)).supervisor
    result = load_vms(Paths(root), sup)
    return result.vms, result.errors


# ------------------------------------------------------------------ config


def test_defaults_are_stable_and_legal(root):
    write(root, "alpha", nic() + nic("net1"))
    write(root, "a-very-long-vm-name", nic())
    vms, errors = load(root)
    assert errors == {}
    a = vms["alpha"].nets
    assert [n.tap for n in a] == ["bt-alpha-0", "bt-alpha-1"]
    assert a[0].mac == default_mac("alpha", "net0") != a[1].mac
    long_tap = vms["a-very-long-vm-name"].nets[0].tap
    assert len(long_tap) <= 15 and long_tap == default_tap("a-very-long-vm-name", "net0")
    assert contract.tap_fd("net0") == "tap-net0"


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        (nic(tap="a-tap-name-too-long"), "net[0].tap", ""),
        (nic(tap="bad/name"), "net[0].tap", ""),
        (nic(tap="has space"), "net[0].tap", ""),
        (nic(mac="52:54:00:zz:00:01"), "net[0].mac", ""),
        (nic(mac="52-54-00-00-00-01"), "net[0].mac", ""),
        (nic(mac="01:00:5e:00:00:01"), "net[0].mac", "multicast"),
        (nic(bridge="bridge-name-too-long"), "net[0].bridge", ""),
        (nic(name="eth0"), "net[0].name", ""),
        (nic(tap="t1") + nic("net1", tap="t1"), "net[1].tap", "already net[0]'s"),
        (
            nic(mac="52:54:00:00:00:01") + nic("net1", mac="52:54:00:00:00:01"),
            "net[1].mac",
            "already net[0]'s",
        ),
        (nic() + nic(), "net[1].name", "duplicate"),
        (
            '\n[[disk]]\nname = "disk0"\npath = "/x/a.img"\n'
            '\n[[disk]]\nname = "disk1"\npath = "/x/a.img"\n',
            "disk[1].path",
            "already disk[0]'s",
        ),
    ],
)
def test_bad_nic_is_refused_naming_file_and_key(root, text, key, what):
    path = write(root, "bad", text)
    write(root, "good", nic())
    vms, errors = load(root)
    assert set(vms) == {"good"}
    msg = errors[str(path)]
    assert msg.startswith(f"{path}: {key}:"), msg
    assert what in msg


def test_conflicts_across_files(root):
    """The first file (by name) keeps what it names; a later one naming the same
    tap, MAC or disk image is refused whole, and says whose it is."""
    images = Paths(root).lib / "images"
    a = write(
        root,
        "a",
        nic(tap="shared0", mac="52:54:00:aa:00:01")
        + f'\n[[disk]]\nname = "disk0"\npath = "{images}/one.img"\n',
    )
    b = write(root, "b", nic(tap="shared0"))
    c = write(root, "c", nic("net1", mac="52:54:00:aa:00:01"))
    d = write(root, "d", f'\n[[disk]]\nname = "disk3"\npath = "{images}/./one.img"\n')
    e = write(root, "e", nic(tap="other0"))
    vms, errors = load(root)
    assert set(vms) == {"a", "e"}
    assert errors[str(b)] == f"{b}: net[0].tap: tap 'shared0' is already VM a ({a}) net[0]'s"
    assert errors[str(c)] == (
        f"{c}: net[0].mac: MAC 52:54:00:aa:00:01 is already VM a ({a}) net[0]'s"
    )
    assert errors[str(d)].startswith(f"{d}: disk[0].path: ")
    assert f"already VM a ({a}) disk[0]'s image" in errors[str(d)]
    assert str(e) not in errors


def test_default_taps_of_two_vms_differ(root):
    for name in ("x1", "x2"):
        write(root, name, nic())
    vms, errors = load(root)
    assert errors == {}
    assert vms["x1"].nets[0].tap != vms["x2"].nets[0].tap


def test_allowed_path_never_stricter_than_the_broker():
    allow = ["/var/lib/baton/images/*", "/srv/vm/*.img"]
    assert provision.allowed_path("/var/lib/baton/images/a.img", allow)
    assert provision.allowed_path("/srv/vm/b.img", allow)
    assert not provision.allowed_path("/var/lib/baton/other.img", allow)
    assert not provision.allowed_path("/var/lib/baton/images/", allow)
    assert not provision.allowed_path("/etc/shadow", allow)


# ------------------------------------------------------------ provisioning


def configs(root: Path) -> dict:
    vms, errors = load(root)
    assert errors == {}, errors
    return vms


@isolated()
def test_tap_provisioned_on_its_bridge_and_kept(root):
    """The broker opens the tap (no vnet header), the supervisor's provisioning
    puts it on its bridge and sets it up; provisioning again keeps the very same
    interface; dropping the VM removes it."""
    subprocess.run(["ip", "link", "add", "br-test", "type", "bridge"], check=True)
    write(root, "a", nic(bridge="br-test") + nic("net1", tap="a-plain"))
    cfg = configs(root)["a"]
    broker = BrokerProcess(root).start()
    try:
        with broker.client() as c:
            created = provision.provision_vm(c, Paths(root), cfg)
            assert {"tap-net0", "tap-net1"} <= set(created)
            fds = {f["name"]: f for f in c.list_fds("a")}
            assert fds["tap-net0"]["kind"] == "tun"
            tap = netdev.lookup("bt-a-0")
            br = netdev.lookup("br-test")
            assert tap is not None and br is not None
            assert tap.kind == "tun" and tap.up and tap.master == br.index
            plain = netdev.lookup("a-plain")
            assert plain is not None and plain.up and plain.master == 0
            # no IFF_VNET_HDR: the tun fd's flags say tap, no_pi only
            iff = fds["tap-net0"].get("detail", "")
            assert "bt-a-0" in iff or iff == "", iff
            assert provision.provision_vm(c, Paths(root), cfg) == []
            again = netdev.lookup("bt-a-0")
            assert again is not None and again.index == tap.index
            c.drop_vm("a")
        wait_until(lambda: netdev.lookup("bt-a-0") is None, 10, 0.05, "the tap to go")
        assert netdev.lookup("a-plain") is None
    finally:
        broker.stop()


@isolated()
def test_missing_bridge_and_refused_disk_name_file_and_key(root):
    """Nothing is created for a VM whose bridge does not exist, or whose disk
    lies outside broker.open_allow; the error names the file and the key."""
    a = write(root, "a", nic(bridge="no-such-br"))
    b = write(root, "b", '\n[[disk]]\nname = "disk0"\npath = "/tmp/outside.img"\n')
    vms = configs(root)
    broker = BrokerProcess(root).start()
    try:
        with broker.client() as c:
            with pytest.raises(RemoteError) as e:
                provision.provision_vm(c, Paths(root), vms["a"])
            assert e.value.message.startswith(f"{a}: net[0].bridge: no bridge named 'no-such-br'")
            with pytest.raises(RemoteError) as e:
                provision.provision_vm(c, Paths(root), vms["b"])
            assert e.value.code == Code.DENIED
            assert e.value.message.startswith(f"{b}: disk[0].path: /tmp/outside.img is not under")
            assert not Path("/tmp/outside.img").exists()
            assert "a" not in c.list_vms() and "b" not in c.list_vms()
        assert netdev.lookup("bt-a-0") is None
    finally:
        broker.stop()


@isolated()
def test_a_token_opens_only_its_own_taps(root):
    """A worker's token (held by a non-administrator) cannot open a tap its VM's
    configuration does not name."""
    (root / "etc" / "baton").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "baton" / "baton.toml").write_text('[broker]\nsocket_mode = "0666"\n')
    write(root, "a", nic())
    write(root, "b", nic())
    vms = configs(root)
    broker = BrokerProcess(root).start()
    for d in (broker.root, broker.root / "run", broker.paths.run):
        os.chmod(d, 0o755)
    try:
        with broker.client() as c:
            provision.provision_vm(c, Paths(root), vms["a"])
            provision.provision_vm(c, Paths(root), vms["b"])
            token = c.mint_token("a", "worker")

        def attempt(ifname: str) -> object:
            with broker.client(token) as w:
                return w.open_tun("a", "tap-x", ifname, vnet_hdr=False)

        assert run_as(NOBODY, lambda: attempt("bt-b-0")) == ("error", Code.DENIED)
        assert run_as(NOBODY, lambda: attempt("intruder0")) == ("error", Code.DENIED)
        assert netdev.lookup("intruder0") is None
    finally:
        broker.stop()


@pytest.mark.kvm
@isolated()
def test_vmctl_start_and_stop_own_the_tap(root):
    """``vmctl start`` creates the tap (up, on the bridge), a VM whose bridge is
    missing does not start (and the other VM runs on), ``vmctl stop`` removes it."""
    subprocess.run(["ip", "link", "add", "br0", "type", "bridge"], check=True)
    write(root, "good", nic(bridge="br0"))
    bad = write(root, "bad", nic(bridge="br-missing"))
    with Host.start(root, vm="good") as host:
        r = host.vmctl("start", "good")
        assert r.returncode == 0, r.stderr
        host.wait_state("running")
        tap = netdev.lookup("bt-good-0")
        assert tap is not None and tap.up and tap.master == netdev.lookup("br0").index
        r = host.vmctl("start", "bad")
        assert r.returncode != 0
        assert f"{bad}: net[0].bridge: no bridge named 'br-missing'" in r.stderr + r.stdout
        assert netdev.lookup("bt-bad-0") is None
        assert host.status("good")["state"] == "running"
        r = host.vmctl("stop", "good")
        assert r.returncode == 0, r.stderr
        wait_until(lambda: netdev.lookup("bt-good-0") is None, 10, 0.05, "the tap to go")
