"""The generic machinery of a worker's saved state: versioned components, their
fields, and the envelope that carries them. Each schema is defined by its owner,
beside the code that saves and restores it (``machine.MACHINE_STATE``,
``vm.VM_STATE``, ``vcpu_state.VCPU_STATE``, ``devices.serial.SERIAL_STATE``,
``devices.i8042.I8042_STATE``, ``devices.block.BLOCK_STATE``,
``devices.net.NET_STATE``);
``components()`` assembles them.

The model is QEMU's VMState: each component carries a version and the
oldest version it can read (``min_version``); each field records the
version that added it (``since``) and the default an older writer implies.
A reader accepts a component at any version in [min_version, version],
filling added fields with their defaults; a writer can emit any version in
that same range by leaving newer fields out, which is how a newer worker
hands state back to an older one, as long as each field it leaves out holds
the default the older reader will assume (otherwise ``write`` refuses: a
state an older worker would misread is not written; a running worker's
hello says so in advance, ``versions(parts)``). Devices follow Firecracker's persist
pattern: a device's fields are read from and written back to its attributes
of the same names (``Component.save_from``, ``Component.restore_into``), so
each field is defined once, in its component.

Kernel structs travel as their raw bytes: their size is part of the ioctl
number, so the layout cannot change under us, and the exact length is
checked. The whole body carries a CRC-32, so a flipped bit or a truncation is
refused rather than loaded into KVM (it guards against corruption; the
channel itself is a socket pair the supervisor made, not an open door).

``decode`` validates everything (magic, format, checksum, every component,
every field, every length) before anything touches KVM.

Two envelopes carry the same components. Format 1 (``encode``): a msgpack map
whose body is a msgpack map of every component; readable by every worker
version, and what ``save`` writes (suspend images, the preflight, plain
``load``). The frame (format 2): the live handoff's form where both
workers' hellos list ``contract.STATE_FRAME`` (older workers never see one),
built and read with little Python inside the guest's pause, in two
sections::

    head:  "BATNVMS2" | u32 head_len | u32 0 | u32 0 | msgpack (writer, every
           component but vcpu, each at its version)            (encode_head)
    vCPUs: "BATNVCPU" | u32 n | u32 0 | u32 0 | u32 size[n] | n vCPU records
           (``vcpu_record``, version 2), back to back          (encode_vcpus)

so the vCPU records, nine tenths of the state, are neither packed, copied
into a msgpack body nor unpacked from one: each is a slice of its section,
checked by ``vcpu_record.parse`` as in format 1. With two vCPUs or more the
old worker sends the head as soon as it is read and the new one checks it
(``decode_head``) while the vCPUs are read (with one, the whole frame goes
at once); each section travels as one raw datagram on the
handoff's socket pair (no message around it, no sealed memfd past 64 KiB:
``FRAME_RAW_MAX``). The frame has no checksum: it never leaves that socket
pair, which the kernel does not corrupt, and a CRC proves nothing against a
peer that means harm; what protects KVM is the validation, the same as
format 1's (every length exact, every field checked), all of it done before
anything is applied. ``decode`` reads a whole frame (head, then vCPUs) or
format 1, by its first bytes.
"""

from __future__ import annotations

import keyword
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgpack

from baton import __version__, wire
from baton.schema import Bool, Bytes, Int, SchemaError, Spec
from vmm._kvm import ffi

MAGIC = "baton-vm-state"
FORMAT = 1
MAX_STATE = 8 << 20
FRAME_MAGIC = b"BATNVMS2"
FRAME = struct.Struct("<8s3I")  # magic, head length, 0, 0
VCPUS_MAGIC = b"BATNVCPU"
VCPUS = struct.Struct("<8s3I")  # magic, vCPUs, 0, 0; then a u32 size per record
FRAME_VCPU = 2  # the vcpu component's version that a frame carries (records)
#: The largest frame sent as one raw datagram (the receiver's buffer is one byte
#: more); a larger one goes in a wire message (a sealed memfd), which
#: ``decode`` reads the same way.
FRAME_RAW_MAX = 512 << 10
#: ``BATON_VMM_FRAME=0``: the hello does not offer the frame (``contract.STATE_FRAME``),
#: so this worker sends and is sent format 1, as a worker from before it: the A/B switch.
FRAME_ENABLED = os.environ.get("BATON_VMM_FRAME", "1") != "0"


class StateError(ValueError):
    """State that this worker will not load; the message says exactly why."""


class IncompatibleState(StateError):
    """A well-formed state at a version this worker cannot read."""


@dataclass(frozen=True)
class F:
    """A field: its spec, the component version that added it, its implied default.

    For a component saved from an object's attributes (``Component.save_from``):
    ``to_state`` and ``from_state`` convert the attribute's value to what is
    saved and back; a field with ``restored=False`` describes the device (it is
    saved and can be checked, but restoring leaves the attribute alone). None
    of these three change what travels."""

    spec: Spec
    since: int = 1
    default: Any = None
    to_state: Callable[[Any], Any] | None = None
    from_state: Callable[[Any], Any] | None = None
    restored: bool = True


@dataclass(frozen=True)
class Record:
    """A ``many`` component's fixed-layout form from version ``since`` on: each
    instance travels as one byte string (``vcpu_record`` is the one there is).
    In memory an instance is whatever ``parse`` returns, a ``Mapping`` of the
    component's field names, so older versions are read into it
    (``from_fields``) and written from it like any map of fields. ``parse``
    and ``from_fields`` raise ``ValueError`` saying what is wrong."""

    since: int
    parse: Callable[[Any], Any]
    from_fields: Callable[[Any], Any]


@dataclass(frozen=True)
class Component:
    name: str
    version: int
    min_version: int
    fields: dict[str, F]
    many: bool = False  # a list of instances (vCPUs, disks)
    max_items: int = 1
    record: Record | None = None  # from record.since: one fixed-layout byte string each

    # -- a device's state: its attributes of the same names as the fields
    @cached_property
    def save_from(self) -> Callable[[object], dict[str, Any]]:
        """``save_from(obj)``: every field, at this code's version, from ``obj``'s
        attribute of the same name (converted by ``to_state``)."""
        return _accessors(self.fields)[0]

    @cached_property
    def restore_into(self) -> Callable[[object, dict[str, Any]], None]:
        """``restore_into(obj, data)``: ``obj``'s attributes set back from ``data``
        (as ``read`` returned it; converted by ``from_state``), except those of
        fields with ``restored=False``."""
        return _accessors(self.fields)[1]

    @property
    def versions(self) -> tuple[int, int]:
        return (self.min_version, self.version)

    # -- the wire
    def _check_one(self, version: int, data: Any, path: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise SchemaError(f"expected a map, found {type(data).__name__}", path)
        for key in data:
            f = self.fields.get(key)
            if f is None or f.since > version:
                raise SchemaError(f"unexpected key {key!r} at version {version}", path)
        out: dict[str, Any] = {}
        for key, f in self.fields.items():
            if f.since <= version:
                if key not in data:
                    raise SchemaError("required but missing", key).at(path)
                try:
                    out[key] = f.spec.check(data[key], "")
                except SchemaError as e:
                    raise e.at(key).at(path) from None
            else:
                out[key] = f.default
        return out

    @cached_property
    def _fast_readers(self) -> dict[int, Callable[[Any], dict[str, Any] | None]]:
        return {v: _fast_reader(self.fields, v) for v in range(self.min_version, self.version + 1)}

    def read(self, version: Any, data: Any) -> Any:
        """Validate data written at ``version``; returns it at this code's version.

        Each instance goes through the straight-line checker built for that
        version (``_fast_reader``); whatever it does not accept outright goes
        through ``_check_one``, which accepts or names exactly what is wrong."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise StateError(f"{self.name}: version must be an integer, found {version!r:.40}")
        if not self.min_version <= version <= self.version:
            raise IncompatibleState(
                f"{self.name}: state is version {version}, "
                f"this worker reads {self.min_version}..{self.version}"
            )
        rec = self.record
        if rec is not None and version >= rec.since:
            return self._read_records(rec.parse, data)
        fast = self._fast_readers[version]
        try:
            if not self.many:
                return fast(data) or self._check_one(version, data, self.name)
            if not isinstance(data, list) or len(data) > self.max_items:
                raise SchemaError(f"expected a list of at most {self.max_items}", self.name)
            out = []
            for i, d in enumerate(data):
                got = fast(d)
                if got is None:
                    try:
                        got = self._check_one(version, d, "")
                    except SchemaError as e:
                        raise e.at(f"{self.name}[{i}]") from None
                out.append(got)
        except SchemaError as e:
            raise StateError(str(e)) from None
        return out if rec is None else self._read_records(rec.from_fields, out)

    def _read_records(self, make: Callable[[Any], Any], data: Any) -> list[Any]:
        if not isinstance(data, list) or len(data) > self.max_items:
            raise StateError(f"{self.name}: expected a list of at most {self.max_items}")
        out = []
        for i, d in enumerate(data):
            try:
                out.append(make(d))
            except ValueError as e:
                raise StateError(f"{self.name}[{i}]: {e}") from None
        return out

    def _oldest(self, d: dict[str, Any]) -> tuple[int, str]:
        """The oldest version that carries ``d`` whole, and why: a field newer than
        the version written is left out, so it must hold the default an older
        reader assumes."""
        oldest, why = self.min_version, ""
        for k, v in d.items():
            f = self.fields[k]
            if f.since > oldest and v != f.default:
                oldest, why = f.since, f"{k} = {v!r} needs version {f.since}"
        return oldest, why

    def oldest_for(self, data: Any) -> int:
        """The oldest version this component can be written at holding ``data``."""
        return max(
            (self._oldest(d)[0] for d in (data if self.many else [data])), default=self.min_version
        )

    def write(self, data: Any, version: int) -> dict[str, Any]:
        """Emit ``data`` (at this code's version) as ``version``."""
        lo, hi = self.versions
        if not lo <= version <= hi:
            raise IncompatibleState(
                f"{self.name}: cannot write version {version} (writes {lo}..{hi})"
            )

        if self.record is not None and version >= self.record.since:
            return {"version": version, "data": [bytes(d) for d in data]}
        if version == hi and self.record is None:  # every field travels as it is
            return {"version": version, "data": data}

        def strip(d: dict[str, Any]) -> dict[str, Any]:
            oldest, why = self._oldest(d)
            if version < oldest:  # the older reader would take the default: refuse to lie
                raise IncompatibleState(f"{self.name}: {why}; version {version} cannot say it")
            return {k: v for k, v in d.items() if self.fields[k].since <= version}  # a Mapping

        return {"version": version, "data": [strip(d) for d in data] if self.many else strip(data)}


def _accessors(
    fields: dict[str, F],
) -> tuple[Callable[[object], dict[str, Any]], Callable[[object, dict[str, Any]], None]]:
    """(save_from, restore_into) for ``fields``, built once per component.

    Generated as straight-line code, the way ``dataclasses`` writes ``__init__``:
    a dict display and plain assignments, as fast as writing each field out by
    hand (a loop over the fields is twice as slow, and this runs inside the
    guest's pause), from the one field list."""
    env: dict[str, Any] = {}
    items, assigns = [], []
    for name, f in fields.items():
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"field {name!r} is not an attribute name")
        value = f"obj.{name}"
        if f.to_state is not None:
            env[f"_to_{name}"] = f.to_state
            value = f"_to_{name}({value})"
        items.append(f"{name!r}: {value}")
        if f.restored:
            value = f"data[{name!r}]"
            if f.from_state is not None:
                env[f"_from_{name}"] = f.from_state
                value = f"_from_{name}({value})"
            assigns.append(f"obj.{name} = {value}")
    source = (
        f"def save_from(obj):\n    return {{{', '.join(items)}}}\n"
        f"def restore_into(obj, data):\n    {'; '.join(assigns) or 'pass'}\n"
    )
    exec(source, env)
    return env["save_from"], env["restore_into"]


def _fast_reader(fields: dict[str, F], version: int) -> Callable[[Any], dict[str, Any] | None]:
    """A checker for one component version, generated as straight-line code (as
    ``_accessors`` is): the instance when every field is present and passes its
    spec, else None (then ``Component._check_one`` says what is wrong). Integer,
    boolean and byte fields are checked inline (type, range or length, whole
    entries for a ``RawArray``), other fields by their spec; fields newer than ``version``
    get their defaults. Validation runs inside the guest's pause, and this is
    a third of the generic walk's cost."""
    env: dict[str, Any] = {"SchemaError": SchemaError}
    present = [name for name, f in fields.items() if f.since <= version]
    lines = [
        "def fast(data):",
        f"    if type(data) is not dict or len(data) != {len(present)}:",
        "        return None",
        "    try:",
    ]
    var = {name: f"v{i}" for i, name in enumerate(fields)}  # field names need not be identifiers
    lines += [f"        {var[name]} = data[{name!r}]" for name in present]
    lines += ["    except KeyError:", "        return None"]
    checks = []
    for name in present:
        spec = fields[name].spec
        v = var[name]
        if type(spec) is Int and isinstance(spec, Int):
            cond = f"type({v}) is int and {spec.min} <= {v} <= {spec.max}"
            lines += [f"    if not ({cond}):", "        return None"]
        elif type(spec) is Bool:
            lines += [f"    if type({v}) is not bool:", "        return None"]
        elif type(spec) in (Bytes, RawArray) and isinstance(spec, Bytes):
            cond = f"type({v}) is bytes and {spec.min_len} <= len({v}) <= {spec.max_len}"
            if isinstance(spec, RawArray):
                cond += f" and not len({v}) % {spec.entry}"
            lines += [f"    if not ({cond}):", "        return None"]
        else:
            env[f"spec_{var[name]}"] = spec
            checks.append(f"        {var[name]} = spec_{var[name]}.check({var[name]}, '')")
    if checks:
        lines += ["    try:", *checks, "    except SchemaError:", "        return None"]
    items = []
    for name, f in fields.items():  # in the fields' order, as _check_one builds it
        if f.since <= version:
            items.append(f"{name!r}: {var[name]}")
        else:
            env[f"default_{var[name]}"] = f.default
            items.append(f"{name!r}: default_{var[name]}")
    lines.append(f"    return {{{', '.join(items)}}}")
    exec("\n".join(lines) + "\n", env)
    fast: Callable[[Any], dict[str, Any] | None] = env["fast"]
    return fast


def exact(ctype: str) -> Bytes:
    """A kernel struct's raw bytes, of exactly its size."""
    n = ffi.sizeof(ctype)
    return Bytes(n, n)


@dataclass(frozen=True)
class RawArray(Bytes):
    """A raw array of kernel structs: a whole number of ``entry``-sized items."""

    entry: int = 1

    def check(self, value: Any, path: str) -> bytes:
        data = super().check(value, path)
        if len(data) % self.entry:
            raise SchemaError(
                f"{len(data)} bytes is not a whole number of {self.entry}-byte entries", path
            )
        return data


_components: dict[str, Component] = {}


def components() -> dict[str, Component]:
    """Every component this worker reads and writes, by name, in the state's order.

    Assembled on first use from the modules that own them (each of which imports
    this one for ``F`` and ``Component``), then fixed for the process's life."""
    global _components
    if not _components:
        from vmm import machine, vcpu_state, vm
        from vmm.devices import block, i8042, net, serial

        owned = (
            machine.MACHINE_STATE,
            vm.VM_STATE,
            vcpu_state.VCPU_STATE,
            serial.SERIAL_STATE,
            i8042.I8042_STATE,
            block.BLOCK_STATE,
            net.NET_STATE,
        )
        _components = {c.name: c for c in owned}
    return _components


def versions(parts: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """What hello advertises: per component, the versions this worker reads and writes.
    With ``parts`` (components of its state as it is now), the oldest it writes of
    each is the oldest that carries it whole (``Component.oldest_for``), so an
    upgrade that could not is refused before the pause, not inside it."""
    out = {name: list(c.versions) for name, c in components().items()}
    for name, data in (parts or {}).items():
        out[name][0] = components()[name].oldest_for(data)
    return out


def encode(parts: dict[str, Any], target: dict[str, int] | None = None) -> bytes:
    """The state blob: every component at ``target`` (default: this code's version)."""
    comps = components()
    target = target or {}
    body = wire.pack(
        {
            "components": {
                name: comps[name].write(data, target.get(name, comps[name].version))
                for name, data in parts.items()
            }
        }
    )
    return wire.pack(
        {
            "magic": MAGIC,
            "format": FORMAT,
            "writer": __version__,
            "crc32": zlib.crc32(body),
            "body": body,
        }
    )


def encode_head(parts: dict[str, Any], target: dict[str, int] | None = None) -> bytes | None:
    """A frame's head section: every component of ``parts`` but ``vcpu`` at
    ``target``; None where a frame cannot carry the state (``vcpu`` below
    version 2): then ``encode`` does. Sent before the vCPUs are read, so that
    the reader checks it while they are. One writer of the head's layout: a
    fresh ``HeadEncoder`` (a handoff keeps one, to pack again only what changed)."""
    return HeadEncoder().encode(parts, target)


def _map_header(n: int) -> bytes:
    """msgpack's header of a map of ``n`` entries (fixmap, map 16, map 32)."""
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + struct.pack(">H", n) if n < 1 << 16 else b"\xdf" + struct.pack(">I", n)


class HeadEncoder:
    """The head's writer (``encode_head``). Kept by one worker for its handoffs,
    a component whose data and version are those it packed last time is not
    written and packed again (msgpack is a concatenation: the head's map is its header,
    then each key and value packed on its own). The handoff packs the live head
    once just before the pause, so inside it only what changed since then (the
    VM-wide state, the machine's pause stamp, a device the guest touched) is
    packed. The parts must be fresh maps of immutable values, as the savers
    return them, not changed after they were handed here."""

    def __init__(self) -> None:
        self._packed: dict[str, tuple[int, Any, bytes]] = {}
        # wire.pack's options; one packer kept (packb makes one, and its 1 MiB buffer, per call)
        self._pack = msgpack.Packer(use_bin_type=True).pack
        # the head's map up to the components' map header: writer and its value, the key
        self._prefix = wire.pack({"writer": __version__, "components": {}})[:-1]

    def encode(self, parts: dict[str, Any], target: dict[str, int] | None = None) -> bytes | None:
        comps = components()
        target = target or {}
        if not frame_carries(target):
            return None
        names = [name for name in parts if name != "vcpu"]
        out = [self._prefix, _map_header(len(names))]
        packed = self._packed
        for name in names:
            data = parts[name]
            version = target.get(name, comps[name].version)
            got = packed.get(name)
            if got is None or got[0] != version or got[1] != data:
                enc = self._pack({name: comps[name].write(data, version)})[1:]  # key and value
                got = packed[name] = (version, data, enc)
            out.append(got[2])
        head = b"".join(out)
        return b"".join([FRAME.pack(FRAME_MAGIC, len(head), 0, 0), head])


def frame_carries(target: dict[str, int] | None) -> bool:
    """Whether a frame can carry the state at ``target`` (its ``vcpu`` at version 2)."""
    return (target or {}).get("vcpu", components()["vcpu"].version) == FRAME_VCPU


def vcpus_section(records: list[Any]) -> list[Any]:
    """A frame's vCPU section as its pieces, to be sent as one datagram without
    joining them: the header and the records' sizes, then each record (each a
    bytes-like object: a byte string or a buffer the record was read into)."""
    sizes = struct.pack(f"<{len(records)}I", *(len(r) for r in records))
    return [VCPUS.pack(VCPUS_MAGIC, len(records), 0, 0) + sizes, *records]


def encode_vcpus(records: list[Any]) -> bytes:
    """A frame's vCPU section: the records' sizes, then the records."""
    return b"".join(vcpus_section([bytes(r) for r in records]))


def encode_frame(parts: dict[str, Any], target: dict[str, int] | None = None) -> bytes | None:
    """The whole state as one frame (head, then vCPUs); None as ``encode_head``."""
    head = encode_head(parts, target)
    return None if head is None else head + encode_vcpus(parts["vcpu"])


def head_length(blob: bytes) -> int:
    """How long the head section that ``blob`` starts with says it is (0: not a frame)."""
    if len(blob) < FRAME.size or not blob.startswith(FRAME_MAGIC):
        return 0
    return FRAME.size + int(FRAME.unpack_from(blob)[1])


def decode_head(blob: bytes) -> dict[str, Any]:
    """A frame's head section, exactly (``encode_head``): every component but
    ``vcpu``, each validated as ``decode`` validates it."""
    if len(blob) < FRAME.size:
        raise StateError(f"state frame of {len(blob)} bytes is shorter than its header")
    _magic, head_len, zero, zero2 = FRAME.unpack_from(blob)
    if zero or zero2:
        raise StateError("state frame header is malformed")
    if FRAME.size + head_len != len(blob):
        raise StateError(
            f"state frame's head of {len(blob) - FRAME.size} bytes, its header says {head_len}"
        )
    try:
        head = wire.unpack(memoryview(blob)[FRAME.size :])
    except Exception as e:
        raise StateError(f"state frame's head is not decodable: {e}") from None
    if type(head) is not dict or head.keys() != {"writer", "components"}:
        raise StateError("state frame's head is not a map of writer and components")
    comps = head["components"]
    if type(comps) is not dict or "vcpu" in comps:
        raise StateError("state frame's components are malformed")
    return _read_components(comps, without="vcpu")


def decode_vcpus(blob: bytes) -> list[Any]:
    """A frame's vCPU section, exactly (``encode_vcpus``): every record validated
    (``vcpu_record.parse``: header, every size, the exact length)."""
    if len(blob) < VCPUS.size or not blob.startswith(VCPUS_MAGIC):
        raise StateError("state frame lacks its vCPU section (bad magic or truncated)")
    _magic, n, zero, zero2 = VCPUS.unpack_from(blob)
    vcpu = components()["vcpu"]
    if zero or zero2 or n > vcpu.max_items:
        raise StateError(f"state frame's vCPU section header is malformed ({n} vCPUs)")
    at = VCPUS.size + 4 * n
    if len(blob) < at:
        raise StateError("state frame's vCPU section is truncated")
    sizes = struct.unpack_from(f"<{n}I", blob, VCPUS.size)
    if at + sum(sizes) != len(blob):
        raise StateError(
            f"state frame's vCPU section of {len(blob)} bytes, its sizes say "
            f"{at + sum(sizes)} (truncated or surplus records)"
        )
    recs = []
    for size in sizes:
        recs.append(blob[at : at + size])
        at += size
    data: list[Any] = vcpu.read(FRAME_VCPU, recs)
    return data


def _decode_frame(blob: bytes) -> dict[str, Any]:
    """A whole frame's components, validated as completely as ``decode`` does format 1's."""
    end = head_length(blob)
    if end > len(blob):
        raise StateError(f"state frame's head of {end} bytes runs past its end")
    parts = decode_head(blob[:end])
    parts["vcpu"] = decode_vcpus(blob[end:])
    return parts


def decode(blob: Any) -> dict[str, Any]:
    """Validate a state blob (either format) completely; returns each component at
    this code's version."""
    if not isinstance(blob, bytes):
        raise StateError(f"state must be binary data, found {type(blob).__name__}")
    if len(blob) > MAX_STATE:
        raise StateError(f"state of {len(blob)} bytes exceeds {MAX_STATE}")
    if blob.startswith(FRAME_MAGIC):
        return _decode_frame(blob)
    try:
        env = wire.unpack(blob)
    except Exception as e:
        raise StateError(f"state is not a msgpack document (truncated or corrupt): {e}") from None
    if not isinstance(env, dict) or env.get("magic") != MAGIC:
        raise StateError("not a Baton VM state (bad magic)")
    if env.get("format") != FORMAT:
        raise IncompatibleState(f"state format {env.get('format')!r}, this worker reads {FORMAT}")
    body = env.get("body")
    crc = env.get("crc32")
    if not isinstance(body, bytes) or not isinstance(crc, int):
        raise StateError("state envelope lacks its body or checksum")
    if zlib.crc32(body) != crc:
        raise StateError("state checksum mismatch: the state was altered or truncated")
    try:
        doc = wire.unpack(body)
    except Exception as e:
        raise StateError(f"state body is not decodable: {e}") from None
    comps = doc.get("components") if isinstance(doc, dict) else None
    if not isinstance(comps, dict):
        raise StateError("state body has no components map")
    return _read_components(comps)


def _read_components(comps: dict[Any, Any], without: str = "") -> dict[str, Any]:
    """Every component of a state's map (but ``without``), each read at its version."""
    known = components()
    if comps.keys() - known.keys():  # one set operation inside the pause; the message after
        unknown = sorted(set(comps) - set(known), key=repr)
        raise IncompatibleState(f"state has components this worker does not know: {unknown}")
    out: dict[str, Any] = {}
    for name, comp in known.items():
        if name == without:
            continue
        entry = comps.get(name)
        if type(entry) is not dict or len(entry) != 2 or "version" not in entry:
            raise StateError(f"state lacks component {name!r} (or it is malformed)")
        data = entry.get("data", _MISSING)
        if data is _MISSING:
            raise StateError(f"state lacks component {name!r} (or it is malformed)")
        out[name] = comp.read(entry["version"], data)
    return out


_MISSING = object()
