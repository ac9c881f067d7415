"""Stock QEMU's seccomp policy in the jail: the shared denylist (EPERM) and no
allowlist of ours. QEMU's own ``-sandbox`` (``kinds/qemu.py`` ``SANDBOX``) is
the filter that knows QEMU; this one keeps what no worker may do out of reach
even of a QEMU whose ``-sandbox`` is off or broken."""

from supervisor.jail.seccomp_deny import DENY

ALLOW: frozenset[str] = frozenset()

__all__ = ["ALLOW", "DENY"]
