"""Host network interfaces over netlink (pyroute2): look up a tap or a bridge,
attach a tap to its bridge and set it up, read its counters.

Netlink, not ``/sys/class/net``: sysfs shows the network namespace it was
mounted in, not the caller's, so inside a test's own namespace (and in any
container that did not remount /sys) it would describe the wrong host. The
supervisor must run in the broker's network namespace: the broker creates
the taps, the supervisor configures them.

pyroute2 is imported on first use, so a host whose VMs have no NICs never
loads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from baton.contract import tap_fd


class NetdevError(RuntimeError):
    """A netlink request that failed; the message names the interface."""


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    kind: str  # "tun", "bridge", "veth", ... ("" for a plain device such as lo)
    master: int  # the bridge's ifindex, 0 if none
    up: bool
    queue: int  # txqueuelen: frames the kernel queues toward the tap's reader
    stats: dict[str, int]  # rx_packets, tx_packets, rx_bytes, tx_bytes, rx_dropped, ...


STAT_KEYS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped")


def _iproute() -> Any:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    return IPRoute()


def _link(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
    raw = msg.get_attr("IFLA_STATS64") or msg.get_attr("IFLA_STATS") or {}
    return Link(
        name=msg.get_attr("IFLA_IFNAME"),
        index=msg["index"],
        kind=kind,
        master=msg.get_attr("IFLA_MASTER") or 0,
        up=bool(msg["flags"] & 1),  # IFF_UP
        queue=int(msg.get_attr("IFLA_TXQLEN") or 0),
        stats={k: int(raw.get(k, 0)) for k in STAT_KEYS},
    )


def lookup(name: str) -> Link | None:
    """The interface called ``name`` in this network namespace, or None."""
    try:
        with _iproute() as ip:
            index = ip.link_lookup(ifname=name)
            if not index:
                return None
            return _link(ip.get_links(index[0])[0])
    except NetdevError:
        raise
    except Exception as e:  # pyroute2's NetlinkError is not an OSError
        raise NetdevError(f"interface {name!r}: netlink: {e}") from None


def check_bridge(name: str) -> str | None:
    """Why ``name`` cannot be used as a bridge (None if it can)."""
    link = lookup(name)
    if link is None:
        return f"no bridge named {name!r} on this host (ip link add {name} type bridge)"
    if link.kind != "bridge":
        return f"{name!r} is a {link.kind or 'plain'} interface, not a bridge"
    return None


#: Frames a tap queues toward its reader (the VMM) before the kernel drops
#: them (the tap's tx_dropped). The default, 1,000, holds 100 ms at 10,000
#: frames/s. On a loaded two-CPU host an upgrade slows the echo for longer
#: than its pause: the new worker's start (0.3-1.2 s here) competes with the
#: guest, and 4,096 still overflowed in some upgrades (bench.net). 8,192 holds
#: about 0.8 s at 10,000/s (8 s at 1,000/s); it costs memory only while frames
#: wait (at most about 19 MiB of full-size frames per tap) and, under
#: sustained overload, that much latency instead of loss.
TAP_QUEUE = 8192


def attach(tap: str, bridge: str) -> Link:
    """Make ``tap`` a port of ``bridge`` (if given), give it a queue of
    ``TAP_QUEUE`` frames and set it up. Idempotent."""
    try:
        with _iproute() as ip:
            index = ip.link_lookup(ifname=tap)
            if not index:
                raise NetdevError(f"tap {tap!r} does not exist")
            args: dict[str, Any] = {"index": index[0], "state": "up", "txqlen": TAP_QUEUE}
            if bridge:
                br = ip.link_lookup(ifname=bridge)
                if not br:
                    raise NetdevError(f"bridge {bridge!r} does not exist")
                args["master"] = br[0]
            ip.link("set", **args)
            return _link(ip.get_links(index[0])[0])
    except NetdevError:
        raise
    except Exception as e:
        raise NetdevError(f"tap {tap!r}: netlink: {e}") from None


def nic_status(nets: Sequence[Any], worker: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """What ``vmctl status`` shows of each NIC (``vmconfig.NetConfig``): its
    configuration, the tap as the host sees it (``host``: ifindex, up, bridge
    port, the tap's counters: its tx is toward the guest) and the VMM's device
    counters (``device``: a baton-vmm worker's ``status``)."""
    devices = {d.get("name"): d for d in (worker or {}).get("nets", []) if isinstance(d, dict)}
    out = []
    for n in nets:
        item: dict[str, Any] = {
            "name": n.name,
            "tap": n.tap,
            "mac": n.mac,
            "bridge": n.bridge,
            "fd": tap_fd(n.name),
        }
        try:
            link = lookup(n.tap)
        except NetdevError as e:
            item["host"] = {"error": str(e)}
            link = None
        if link is not None:
            item["host"] = {
                "ifindex": link.index,
                "up": link.up,
                "master": link.master,
                "txqueuelen": link.queue,
            }
            item["host"].update(link.stats)
        elif "host" not in item:
            item["host"] = None  # no such interface (the VM is stopped)
        dev = devices.get(n.name)
        if dev is not None:
            item["device"] = {
                k: dev[k]
                for k in ("rx_frames", "tx_frames", "rx_dropped", "tx_dropped", "tx_errors")
                if k in dev
            }
        out.append(item)
    return out
