"""Thin, typed wrappers over the KVM ioctls (through the cffi API-mode binding).

Each wrapper raises ``OSError`` with the errno KVM returned. KVM state
crosses process boundaries only as bytes (``raw``/``from_raw``): KVM ties
a VM to the mm of the process that created it, so a VM or vCPU fd sent to
another process fails every ioctl with EIO.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import Any

from vmm._kvm import ffi, lib

API_VERSION = 12


class KvmUnavailable(RuntimeError):
    """/dev/kvm is missing or unusable; the worker exits with a clear message."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def ioctl_ptr(fd: int, request: int, arg: Any, what: str) -> int:
    return _check(lib.baton_ioctl_ptr(fd, request, arg), what)


def ioctl_val(fd: int, request: int, arg: int, what: str) -> int:
    return _check(lib.baton_ioctl_val(fd, request, arg), what)


MASK64 = (1 << 64) - 1


class Batch:
    """Ioctls on one fd, run in order by one C call (``baton_ioctl_batch``).

    Inside the guest's pause each vCPU ioctl costs 8 us or more in the kernel
    (this nested host); a Python wrapper around each one costs as much again
    while the pause's code is cold. ``add`` takes the request, its argument
    (a cdata pointer, kept alive here), what to call it in an error, and for
    the MSR ioctls the count they must return (``short``: the message when
    they stop early). A batch can be run again: refill its buffers first."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._ops: list[tuple[int, Any, str, int, Callable[[int], str] | None]] = []
        self._c: tuple[Any, Any, Any, Any] | None = None

    def add(
        self,
        request: int,
        arg: Any,
        what: str,
        expect: int = -1,
        short: Callable[[int], str] | None = None,
    ) -> int:
        """Append one ioctl; returns its place (its result's index in ``run``'s list)."""
        self._ops.append((request, arg, what, expect, short))
        self._c = None
        return len(self._ops) - 1

    def __len__(self) -> int:
        return len(self._ops)

    def arrays(self) -> tuple[Any, Any, Any, Any]:
        """The C arrays ``baton_ioctl_batch`` takes: requests, args, expect, rets."""
        if self._c is None:
            ops = self._ops
            self._c = (
                ffi.new("unsigned long[]", [op[0] for op in ops]),
                ffi.new("void *[]", [ffi.cast("void *", op[1]) for op in ops]),
                ffi.new("int[]", [op[3] for op in ops]),
                ffi.new("int[]", max(len(ops), 1)),
            )
        return self._c

    def error(self, done: int, ret: int) -> OSError:
        """What ``run`` raises when op ``done`` returned ``ret`` (failed or stopped short)."""
        _request, _arg, what, _expect, short = self._ops[done]
        if ret < 0:
            return OSError(-ret, f"{what}: {os.strerror(-ret)}")
        return OSError(errno.EINVAL, short(ret) if short else f"{what} returned {ret}")

    def run(self, mask: int = -1) -> Any:
        """Run every ioctl (with ``mask``: those of the first 64 whose bit is set);
        returns their results (a cdata int array), raising ``OSError`` that names
        the first that failed or stopped short."""
        requests, args, expect, rets = self.arrays()
        n = len(self._ops)
        done = lib.baton_ioctl_batch(self.fd, n, requests, args, expect, rets, mask & MASK64)
        if done != n:
            raise self.error(done, rets[done])
        return rets


def raw(cdata: Any) -> bytes:
    """A struct's bytes (copied)."""
    return bytes(ffi.buffer(cdata))


def from_raw(ctype: str, data: bytes) -> Any:
    """A freshly allocated struct holding ``data`` (length already validated)."""
    obj = ffi.new(f"{ctype} *")
    ffi.memmove(obj, data, len(data))
    return obj


_inherited_fd: int | None = None


def use_fd(fd: int) -> None:
    """Take /dev/kvm as this open fd (``--kvm-fd``: a jailed worker has no node)."""
    global _inherited_fd
    try:
        os.set_inheritable(fd, False)
    except OSError as e:
        raise KvmUnavailable(f"--kvm-fd {fd}: {e.strerror}") from None
    _inherited_fd = fd


class System:
    """The /dev/kvm fd: capability checks and host-wide queries."""

    def __init__(self) -> None:
        # BATON_KVM_DEVICE: for hosts with KVM elsewhere (and to test its absence).
        path = os.environ.get("BATON_KVM_DEVICE", "/dev/kvm")
        try:
            if _inherited_fd is not None:  # each System its own dup: close() is its own
                path = f"--kvm-fd {_inherited_fd}"
                self.fd = os.dup(_inherited_fd)
            else:
                self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        version = ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM API version {version}, expected {API_VERSION}")
        self.vcpu_mmap_size = ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "MMAP_SIZE")

    def close(self) -> None:
        os.close(self.fd)

    def check(self, cap: int) -> int:
        return int(lib.baton_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    def supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """(function, index, flags, eax, ebx, ecx, edx) for every supported leaf."""
        n = 256
        while True:
            buf = ffi.new(
                "char[]",
                ffi.sizeof("struct kvm_cpuid2") + n * ffi.sizeof("struct kvm_cpuid_entry2"),
            )
            cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
            cpuid.nent = n
            ret = lib.baton_ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid)
            if ret == -7:  # E2BIG: more leaves than we offered room for
                n *= 2
                continue
            _check(ret, "KVM_GET_SUPPORTED_CPUID")
            return [
                (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(cpuid.nent))
            ]

    def msr_index_list(self) -> list[int]:
        n = 512
        while True:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + n * 4)
            lst = ffi.cast("struct kvm_msr_list *", buf)
            lst.nmsrs = n
            ret = lib.baton_ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, lst)
            if ret == -7:
                n *= 2
                continue
            _check(ret, "KVM_GET_MSR_INDEX_LIST")
            return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self) -> int:
        return ioctl_val(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")


MSR_ENTRY = ffi.sizeof("struct kvm_msr_entry")
CPUID_ENTRY = ffi.sizeof("struct kvm_cpuid_entry2")


def _array_struct(ctype: str, entry_size: int, entries: bytes) -> tuple[Any, Any, int]:
    """A kvm_msrs/kvm_cpuid2 header followed by ``entries`` (raw kernel structs)."""
    n = len(entries) // entry_size
    buf = ffi.new("char[]", ffi.sizeof(ctype) + len(entries))
    obj = ffi.cast(f"{ctype} *", buf)
    ffi.memmove(buf + ffi.sizeof(ctype), entries, len(entries))
    return buf, obj, n


def cpuid_struct(entries: bytes) -> tuple[Any, Any]:
    buf, cpuid, n = _array_struct("struct kvm_cpuid2", CPUID_ENTRY, entries)
    cpuid.nent = n
    return buf, cpuid


def msrs_struct(entries: bytes) -> tuple[Any, Any]:
    buf, msrs, n = _array_struct("struct kvm_msrs", MSR_ENTRY, entries)
    msrs.nmsrs = n
    return buf, msrs


def pack_cpuid(rows: Sequence[tuple[int, ...]]) -> bytes:
    """Raw kvm_cpuid_entry2 array from (function, index, flags, eax, ebx, ecx, edx)."""
    out = ffi.new("struct kvm_cpuid_entry2[]", len(rows))
    for e, (fn, idx, flags, a, b, c, d) in zip(out, rows, strict=True):
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = fn, idx, flags, a, b, c, d
    return bytes(ffi.buffer(out))


def pack_msrs(pairs: list[tuple[int, int]]) -> bytes:
    out = ffi.new("struct kvm_msr_entry[]", len(pairs))
    for e, (index, value) in zip(out, pairs, strict=True):
        e.index, e.data = index, value
    return bytes(ffi.buffer(out))


def msr_indices(raw_entries: bytes) -> list[int]:
    """Indices of a raw kvm_msr_entry array (the index is the entry's first u32)."""
    return [
        int.from_bytes(raw_entries[i : i + 4], "little")
        for i in range(0, len(raw_entries), MSR_ENTRY)
    ]
