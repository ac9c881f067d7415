"""A hostile worker, for tests/test_jail.py only: run as VM a's worker command
(``python tests/jail_hostile.py INFO_JSON``, the supervisor appends baton-vmm's
arguments), inside a's jail. It tries, one by one, everything a compromised
worker would, prints each result as a ``HOSTILE {json}`` line on its stdout
(the worker log), then execs the real baton-vmm so that the VM still boots.
With ``"mode": "die"`` it instead makes a syscall outside the allowlist.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)
results: dict[str, str] = {}


def attempt(name: str, fn: Callable[[], Any]) -> None:
    """``ALLOWED: ...`` if it worked, else the error it met."""
    try:
        out = fn()
        results[name] = f"ALLOWED: {out!r}"[:300]
    except Exception as e:
        results[name] = f"{type(e).__name__}: {e}"[:300]


def sys_call(nr: int, *args: int) -> int:
    ret = libc.syscall(nr, *(ctypes.c_long(a) for a in args))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(ret)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(64)


def write(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"x")


def connect(path: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(3)
    s.connect(path)
    return "connected"


def fork_bomb(limit: int = 10_000) -> str:
    pids = []
    try:
        for _ in range(limit):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            pids.append(pid)
    except OSError as e:
        return_error = f"{type(e).__name__} after {len(pids)} forks: {e}"
    else:
        return_error = ""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if return_error:
        raise OSError(errno.EAGAIN, return_error)
    return f"{len(pids)} forks"


def hog(mib: int = 4096) -> str:
    pid = os.fork()
    if pid == 0:
        chunks = []
        for _ in range(mib // 64):
            chunks.append(bytearray(64 << 20))  # zeroed, so touched
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        raise MemoryError(f"the allocating child was killed by {sig}")
    return f"allocated {mib} MiB (exit {os.WEXITSTATUS(status)})"


def main() -> None:
    info = json.loads(sys.argv[1])
    rest = sys.argv[2:]
    token_fd = int(rest[rest.index("--token-fd") + 1])
    token = os.read(token_fd, 4096).decode()
    # Hand the token on to the real worker under the same fd number.
    r, w = os.pipe()
    os.write(w, token.encode())
    os.close(w)
    os.dup2(r, token_fd)
    os.close(r)
    if info.get("mode") == "die":  # run the real worker here, and break the filter soon
        import threading

        from vmm import worker

        def die() -> None:
            time.sleep(info.get("after_s", 2))
            print("HOSTILE about to call getitimer", flush=True)
            sys_call(36, 0, 0)  # getitimer: in neither list, so the filter kills us
            print("HOSTILE still alive", flush=True)

        threading.Thread(target=die, daemon=True).start()
        sys.exit(worker.main(rest))

    from broker.client import BrokerClient

    root = info["root"]
    broker_sock = f"{root}/run/baton/broker.sock"
    b = info["b"]

    def broker_get(vm: str, names: list[str]) -> Any:
        with BrokerClient(broker_sock, token=token) as c:
            fds = c.get(vm, names)
            return sorted(fds)

    attempt("own_ram_with_own_token", lambda: broker_get("a", ["ram"]))  # must work
    attempt("b_ram_with_a_token", lambda: broker_get("b", ["ram"]))
    attempt("b_disk_with_a_token", lambda: broker_get("b", ["disk0"]))
    attempt("b_console_with_a_token", lambda: broker_get("b", ["console-log"]))
    attempt("b_proc_mem", lambda: read(f"/proc/{b['pid']}/mem"))
    attempt("b_proc_status", lambda: read(f"/proc/{b['pid']}/status"))
    attempt("ptrace_b", lambda: sys_call(101, 16, b["pid"], 0, 0))  # PTRACE_ATTACH
    attempt("signal_b", lambda: os.kill(b["pid"], signal.SIGKILL))
    attempt("pidfd_b", lambda: os.pidfd_open(b["pid"]))
    attempt("b_control_socket", lambda: connect(b["control"]))
    attempt("supervisor_control_socket", lambda: connect(f"{root}/run/baton/control.sock"))

    def broker_admin() -> Any:
        with BrokerClient(broker_sock) as c:
            return c.list_vms()

    attempt("broker_as_admin", broker_admin)
    attempt("read_etc_shadow", lambda: read("/etc/shadow"))
    attempt("read_b_disk_image", lambda: read(b["disk"]))
    attempt("read_journals", lambda: os.listdir(f"{root}/var/lib/baton/upgrade"))
    attempt("read_broker_table", lambda: read(f"{root}/var/lib/baton/broker/table.json"))
    attempt("write_usr", lambda: write("/usr/bin/baton-hostile"))
    attempt("write_etc", lambda: write("/etc/baton-hostile"))
    attempt("write_b_disk_image", lambda: write(b["disk"]))
    attempt("write_journals", lambda: write(f"{root}/var/lib/baton/upgrade/b.journal"))
    attempt("write_install_tree", lambda: write(f"{info['repo']}/hostile-was-here"))
    attempt("write_run_dir", lambda: write(f"{root}/run/baton/hostile"))
    attempt("open_dev_mem", lambda: read("/dev/mem"))
    attempt("open_block_device", lambda: read(info["block_device"]))
    attempt("mknod_block_device", lambda: os.mknod("/tmp/sda", 0o600 | 0o060000, os.makedev(8, 0)))
    attempt("create_tap", lambda: os.open("/dev/net/tun", os.O_RDWR))
    attempt("mount", lambda: sys_call(165, 0, 0, 0, 0, 0))
    attempt("unshare", lambda: sys_call(272, 0x00020000))  # CLONE_NEWNS
    attempt("setns", lambda: sys_call(308, 0, 0))

    def clone(flags: int) -> int:
        pid = sys_call(56, flags | signal.SIGCHLD, 0, 0, 0, 0)
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return pid

    attempt("clone_newuser", lambda: clone(0x10000000))  # a user namespace: root in it
    attempt("clone_newnet", lambda: clone(0x40000000))
    args = (ctypes.c_uint64 * 11)(0x10000000, 0, 0, 0, signal.SIGCHLD)  # clone_args

    def clone3() -> int:
        pid = sys_call(435, ctypes.addressof(args), 88)
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return pid

    attempt("clone3_newuser", clone3)
    attempt("load_module", lambda: sys_call(313, 0, 0, 0))  # finit_module
    attempt("bpf", lambda: sys_call(321, 0, 0, 0))
    attempt("setuid_root", lambda: os.setuid(0))
    attempt("fork_past_pids_limit", fork_bomb)
    attempt("allocate_past_memory_limit", hog)

    def setuid_binary() -> str:
        """fork + exec, by hand: its output is what it says."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.execv(info["setuid_binary"], [info["setuid_binary"], "-t", "tmpfs", "none", "/tmp"])
        os.close(w)
        out = os.read(r, 4096).decode(errors="replace").strip()
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise PermissionError(f"exit status {status >> 8}: {out}")
        return out

    attempt("exec_setuid_binary", setuid_binary)
    print("HOSTILE " + json.dumps(results), flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "vmm.worker", *rest])


if __name__ == "__main__":
    main()
