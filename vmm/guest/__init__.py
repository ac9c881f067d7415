"""The built-in guest (guest.S, built by the Makefile here) and how to read its console."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

#: The rx/tx counts came with the NIC; lines without them (older guests) still parse.
HEARTBEAT = re.compile(
    r"^baton-guest seq=(\d+) ticks=(\d+) ram=([0-9a-f]{8})(?: rx=(\d+) tx=(\d+))?$", re.MULTILINE
)
PATTERN_PAGES = 256


@dataclass(frozen=True)
class Heartbeat:
    seq: int
    ticks: int
    ram: str
    rx: int = 0  # frames the NIC received (0 where the line does not say)
    tx: int = 0  # frames it sent back


def heartbeats(text: str) -> list[Heartbeat]:
    """The complete lines' heartbeats: the line being written ("... rx=3195 tx=3")
    is not one yet."""
    text = text[: text.rfind("\n") + 1]
    return [
        Heartbeat(int(m[1]), int(m[2]), m[3], int(m[4] or 0), int(m[5] or 0))
        for m in HEARTBEAT.finditer(text)
    ]


def expected_ram() -> str:
    """The checksum the guest prints: rotl5-xor over its patterned dwords (see guest.S)."""
    h = 0
    for i in range(PATTERN_PAGES):
        h = ((h << 5) | (h >> 27)) & 0xFFFFFFFF
        h ^= ((i * 0x9E3779B1) & 0xFFFFFFFF) ^ 0xBA7C0DE5
    return f"{h:08x}"


def continuity_problems(beats: list[Heartbeat]) -> list[str]:
    """Everything wrong with a heartbeat sequence: gaps, repeats, RAM changes, ticks going back."""
    problems = []
    want = expected_ram()
    for prev, cur in itertools.pairwise(beats):
        if cur.seq != prev.seq + 1:
            problems.append(f"seq {prev.seq} followed by {cur.seq}")
        if cur.ticks <= prev.ticks:
            problems.append(f"ticks went from {prev.ticks} to {cur.ticks} at seq {cur.seq}")
    problems += [f"ram={b.ram} at seq {b.seq}, expected {want}" for b in beats if b.ram != want]
    if beats and beats[0].seq != 0:
        problems.append(f"first heartbeat has seq {beats[0].seq}, expected 0")
    return problems
