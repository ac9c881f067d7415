"""Stock QEMU's seccomp policy in the jail."""

from supervisor.jail.seccomp_deny import DENY

ALLOW: frozenset[str] = frozenset()

__all__ = ["ALLOW", "DENY"]
