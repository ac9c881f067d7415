"""Guest assets for tests and benchmarks that run stock QEMU: a kernel and a counter initramfs.

The kernel is Debian's cloud kernel, fetched once with ``apt-get download`` (the only network use)
and cached. The initramfs is built here, deterministically, from Debian's static busybox: its
``/init`` prints ``baton-qemu seq=<n> uptime=<s>`` on ttyS0 every ~200 ms, with ``n`` held in a
shell variable, i.e. in guest RAM. A live upgrade that loses or replays guest memory shows up as
a gap or a repeat in ``seq``; one that stalls the guest shows up in ``uptime``.

It also echoes each line it reads from ttyS0 back as ``baton-qemu input=<line>``, so a test can
check that the serial console works in both directions.

Devices, when the VM has them: the initramfs carries the kernel package's own virtio modules
(``virtio_pci``, ``virtio_net``, ``virtio_blk`` and what they need, in dependency order from each
module's ``depends=``). With a NIC, ``eth0`` gets ``baton.ip=`` from the kernel command line (a
link-local address, 169.254.0.2/16 by default) and a TCP echo server (busybox ``nc -ll -e cat``)
listens on ``ECHO_PORT``. With a disk, a background loop writes fixed-size numbered records
(``baton-disk rec=<n>``, ``DISK_RECORD_SIZE`` bytes each, record ``n`` at offset ``n *
DISK_RECORD_SIZE``) to ``/dev/vda`` every ~200 ms, each with fsync. Typing ``halt`` on the
console stops that loop after its current record, syncs, prints ``baton-qemu halted
disk-records=<count>`` and powers off (QEMU then exits 0).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import itertools
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

QEMU_BINARY_NAME = "qemu-system-x86_64"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
PT_INTERP = 3

# console=ttyS0: kernel messages go to the first UART, which also becomes /dev/console.
# quiet: no kernel chatter before the counter (without it ~300 boot lines precede it).
# panic=-1 with QEMU's -no-reboot: if /init ever dies, QEMU exits instead of hanging.
# (Extra options such as mitigations=off or i8042.* made no measurable boot-time difference.)
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"

COUNTER_RE = re.compile(r"baton-qemu seq=(\d+) uptime=(\d+(?:\.\d+)?)")
HALTED_RE = re.compile(r"baton-qemu halted disk-records=(\d+)")

#: the guest's TCP echo service, on eth0
ECHO_PORT = 7
GUEST_IP = "169.254.0.2/16"  # unless the kernel command line says baton.ip=ADDR/LEN
DISK_RECORD = "baton-disk rec=%08d\n"
DISK_RECORD_SIZE = 24
#: the modules the guest loads (with what they depend on): Debian's cloud kernel builds them as =m
GUEST_MODULES = ("virtio_pci", "virtio_net", "virtio_blk")

INIT_SCRIPT = """\
#!/bin/sh
# Baton QEMU test guest: a counter in guest RAM, printed on the serial console.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The virtio drivers, in dependency order.
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko"
done
# No tty echo: typed input must not interleave with the counter lines.
stty -F /dev/ttyS0 -echo
addr=169.254.0.2/16
for w in $(cat /proc/cmdline); do
    case $w in baton.ip=*) addr=${w#baton.ip=} ;; esac
done
if [ -e /sys/class/net/eth0 ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add "$addr" dev eth0
    nc -ll -p 7 -e cat &
fi
if [ -b /dev/vda ]; then
    (
        r=0
        while [ ! -e /tmp/halt ]; do
            printf 'baton-disk rec=%08d\n' "$r" |
                dd of=/dev/vda bs=24 seek="$r" count=1 iflag=fullblock \\
                    conv=notrunc,fsync 2>/dev/null
            r=$((r + 1))
            sleep 0.2
        done
        echo "$r" >/tmp/disk-done
    ) &
fi
while IFS= read -r line; do
    case $line in
    halt)
        : >/tmp/halt
        while [ -b /dev/vda ] && [ ! -e /tmp/disk-done ]; do sleep 0.05; done
        sync
        echo "baton-qemu halted disk-records=$(cat /tmp/disk-done 2>/dev/null || echo 0)"
        poweroff -f
        ;;
    *) echo "baton-qemu input=$line" ;;
    esac
done </dev/ttyS0 >/dev/ttyS0 2>&1 &
n=0
while :; do
    read -r up idle </proc/uptime
    echo "baton-qemu seq=$n uptime=$up" >/dev/ttyS0
    n=$((n + 1))
    sleep 0.2
done
"""

# Applets /init uses, as symlinks so it does not depend on busybox's standalone-shell option.
APPLETS = (
    "sh", "mount", "stty", "sleep", "echo", "cat", "ls", "mkdir", "poweroff", "dmesg",
    "insmod", "ip", "nc", "dd", "printf", "sync",
)  # fmt: skip


@dataclass(frozen=True)
class Assets:
    """Paths of a bootable kernel + initramfs pair, and where the kernel came from."""

    kernel: Path
    initramfs: Path
    kernel_package: str
    cmdline: str = KERNEL_CMDLINE
    modules: tuple[str, ...] = ()  # in the initramfs, in the order /init loads them


def qemu_binary() -> str | None:
    """Full path of qemu-system-x86_64, or None when QEMU is not installed."""
    return shutil.which(QEMU_BINARY_NAME)


def qemu_skip_reason() -> str | None:
    """None if QEMU tests can run here, else why not (for pytest.skip / skipif)."""
    if qemu_binary() is None:
        return f"{QEMU_BINARY_NAME} not installed (apt-get install qemu-system-x86)"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "apt-get/dpkg-deb not available to fetch the Debian cloud kernel"
    return None


def ensure_assets(cache_dir: Path) -> Assets:
    """Kernel and initramfs in ``cache_dir``, downloading/building only what is missing."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".lock"):
        package, kernel, moddir = _ensure_kernel(cache_dir)
        modules = load_modules(moddir)
        initramfs = _ensure_initramfs(cache_dir, modules)
    return Assets(
        kernel=kernel,
        initramfs=initramfs,
        kernel_package=package,
        modules=tuple(name for name, _ in modules),
    )


# --- kernel -------------------------------------------------------------------------------------


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE) -> str:
    """The versioned package (linux-image-<abi>-cloud-amd64) the metapackage currently pulls in.

    Resolved from the local apt lists, so it needs no network but does need ``apt-get update``
    to have run once."""
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", metapackage])
    pattern = re.compile(r"^\s*\|?Depends:\s*(linux-image-\d\S*-cloud-amd64)\s*$")
    for line in out.splitlines():
        m = pattern.match(line)
        if m:
            return m.group(1)
    raise RuntimeError(
        f"cannot resolve {metapackage} to a versioned kernel package from apt-cache "
        f"(run apt-get update?); apt-cache said:\n{out}"
    )


def _ensure_kernel(cache_dir: Path) -> tuple[str, Path, Path]:
    """The kernel image and a directory of the guest's modules (decompressed ``NAME.ko``)
    from the same package."""
    try:
        package = resolve_kernel_package()
    except (RuntimeError, OSError):
        # offline, or apt lists gone: any kernel fetched before (with its modules) will do
        cached = [
            k
            for k in sorted(cache_dir.glob("vmlinuz-linux-image-*"))
            if (cache_dir / f"modules-{k.name.removeprefix('vmlinuz-')}").is_dir()
        ]
        if cached:
            package = cached[-1].name.removeprefix("vmlinuz-")
            return package, cached[-1], cache_dir / f"modules-{package}"
        raise
    dest = cache_dir / f"vmlinuz-{package}"
    moddir = cache_dir / f"modules-{package}"
    if dest.exists() and moddir.is_dir():
        return package, dest, moddir
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="kernel-") as tmp:
        work = Path(tmp)
        cmd = ["apt-get", "download", package]
        if os.geteuid() == 0:
            # Otherwise apt's _apt sandbox user cannot write into a root-owned temp dir.
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        _run(cmd, cwd=work)
        debs = list(work.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} left {debs} in {work}")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        images = sorted((root / "boot").glob("vmlinuz-*"))
        if len(images) != 1:
            raise RuntimeError(f"expected one /boot/vmlinuz-* in {debs[0].name}, got {images}")
        partial = dest.with_suffix(".partial")
        shutil.copyfile(images[0], partial)
        os.replace(partial, dest)
        staged = work / "modules"
        staged.mkdir()
        for name, data in extract_modules(root, GUEST_MODULES).items():
            (staged / f"{name}.ko").write_bytes(data)
        if moddir.exists():
            shutil.rmtree(moddir)
        os.replace(staged, moddir)
    return package, dest, moddir


# --- kernel modules -----------------------------------------------------------------------------


def modinfo(ko: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` ELF section (64-bit little-endian)."""
    if ko[:5] != b"\x7fELF\x02":
        raise ValueError("not a 64-bit ELF module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize
        )
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[stroff + name : ko.index(b"\0", stroff + name)] == b".modinfo":
            out: dict[str, str] = {}
            for entry in ko[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    out.setdefault(key, value)
            return out
    return {}


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def extract_modules(package_root: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """``wanted`` and everything they depend on, decompressed, from an unpacked kernel package."""
    found: dict[str, Path] = {}
    for path in package_root.glob("lib/modules/*/kernel/**/*.ko*"):
        stem = path.name.split(".ko")[0].replace("-", "_")
        found.setdefault(stem, path)
    out: dict[str, bytes] = {}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        if name not in found:
            raise RuntimeError(f"module {name} is not in the kernel package (built in?)")
        out[name] = _decompress(found[name])
        todo += [d for d in modinfo(out[name]).get("depends", "").split(",") if d]
    return out


def load_modules(moddir: Path) -> list[tuple[str, bytes]]:
    """The modules in ``moddir``, each after what it depends on (ties by name: deterministic)."""
    mods = {p.name.removesuffix(".ko"): p.read_bytes() for p in sorted(moddir.glob("*.ko"))}
    deps = {n: [d for d in modinfo(b).get("depends", "").split(",") if d] for n, b in mods.items()}
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise RuntimeError(f"module dependency cycle: {' -> '.join((*path, name))}")
        if name not in mods:
            raise RuntimeError(f"{path[-1]} needs module {name}, which is missing from {moddir}")
        for d in sorted(deps[name]):
            visit(d, (*path, name))
        order.append(name)

    for name in sorted(mods):
        visit(name, ())
    return [(n, mods[n]) for n in order]


# --- initramfs ----------------------------------------------------------------------------------


def ensure_busybox() -> Path:
    """Debian's static busybox, installing busybox-static with apt-get if it is missing."""
    if not _is_static_busybox(BUSYBOX):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "install", "-y", "--no-install-recommends", "busybox-static"], env=env)
    if not _is_static_busybox(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} is not a static busybox even after installing it")
    return BUSYBOX


def _is_static_busybox(path: Path) -> bool:
    """True for a 64-bit ELF without PT_INTERP: a dynamic one would not run in the initramfs."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:5] != b"\x7fELF\x02":
                return False
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    types = (struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum))
    return PT_INTERP not in types


def _ensure_initramfs(cache_dir: Path, modules: list[tuple[str, bytes]]) -> Path:
    busybox = ensure_busybox().read_bytes()
    h = hashlib.sha256(busybox + INIT_SCRIPT.encode() + repr(APPLETS).encode())
    for name, data in modules:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    dest = cache_dir / f"initramfs-{h.hexdigest()[:16]}.cpio.gz"
    if not dest.exists():
        partial = dest.with_suffix(".partial")
        partial.write_bytes(build_initramfs(busybox, modules))
        os.replace(partial, dest)
    return dest


def build_initramfs(busybox: bytes, modules: list[tuple[str, bytes]] | None = None) -> bytes:
    """A gzipped newc cpio archive, byte-for-byte reproducible (fixed mtimes, owners, inodes).

    ``modules`` (name, ``.ko`` bytes) go to /lib/modules, loaded by /init in the given order."""
    modules = modules or []
    w = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "root", "lib", "lib/modules"):
        w.add(d, 0o040755)
    for name, data in modules:
        w.add(f"lib/modules/{name}.ko", 0o100644, data)
    w.add("lib/modules/order", 0o100644, "".join(f"{n}\n" for n, _ in modules).encode())
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    w.add("dev/console", 0o020600, rdev=(5, 1))
    w.add("dev/ttyS0", 0o020600, rdev=(4, 64))
    w.add("dev/null", 0o020666, rdev=(1, 3))
    w.add("bin/busybox", 0o100755, busybox)
    for applet in APPLETS:
        w.add(f"bin/{applet}", 0o120777, b"busybox")
    w.add("init", 0o100755, INIT_SCRIPT.encode())
    raw = w.finish()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(raw)
    return out.getvalue()


class _Cpio:
    """Minimal writer for the kernel's "newc" cpio format (see Documentation/.../buffer-format)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,  # ino
            mode,
            0,  # uid
            0,  # gid
            2 if mode & 0o170000 == 0o040000 else 1,  # nlink
            0,  # mtime
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._ino += 1
        self._buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def finish(self) -> bytes:
        self._ino = 0
        self.add("TRAILER!!!", 0)
        return self._buf.getvalue()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))


# --- helpers ------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, returning stdout; raise with its stderr so failures are self-explaining."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed with exit status {proc.returncode}:\n{proc.stderr.strip()}"
        )
    return proc.stdout


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise concurrent ensure_assets() calls (parallel test workers) on one cache dir."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def counters(text: str) -> list[tuple[int, float]]:
    """(seq, uptime) of every counter line the guest printed."""
    return [(int(s), float(u)) for s, u in COUNTER_RE.findall(text)]


def counter_problems(rows: list[tuple[int, float]]) -> list[str]:
    """Gaps, repeats and uptime going backwards: what a lossy upgrade would cause."""
    out = []
    for (s1, u1), (s2, u2) in itertools.pairwise(rows):
        if s2 != s1 + 1:
            out.append(f"seq {s1} followed by {s2}")
        if u2 < u1:
            out.append(f"uptime went back from {u1} to {u2}")
    if rows and rows[0][0] != 0:
        out.append(f"first seq is {rows[0][0]}")
    return out


def disk_records(image: bytes) -> list[int]:
    """The record numbers the guest wrote at the start of its disk, in slot order, up to the
    first slot that holds no record (never written: zeros)."""
    out = []
    for off in range(0, len(image) - DISK_RECORD_SIZE + 1, DISK_RECORD_SIZE):
        slot = image[off : off + DISK_RECORD_SIZE]
        m = re.fullmatch(rb"baton-disk rec=(\d{8})\n", slot)
        if m is None:
            break
        out.append(int(m.group(1)))
    return out
