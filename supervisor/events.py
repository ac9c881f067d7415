"""What the supervisor tells an observer (``supervisor.metrics``) as things happen.

The supervisor and the upgrader call these hooks; they never import the
observer. The default observer does nothing. An observer must not raise
and must not block: it runs on the thread that did the work, with the
VM's lock held.
"""

from __future__ import annotations

from supervisor.transaction import Report

#: why a worker is restarted (``Events.worker_restarting``)
RESTART_CAUSES = ("failure", "reset", "lost", "upgrade")


class Events:
    """The hooks, each a no-op here."""

    def upgrade_finished(self, report: Report) -> None:
        """An upgrade ended (``report.outcome`` says how), on the live path."""

    def worker_restarting(self, vm: str, cause: str) -> None:
        """The restart policy is starting a new worker for ``vm``; ``cause`` says why
        the old one is gone: ``failure`` (it exited unexpectedly), ``reset`` (the
        guest reset itself), ``lost`` (gone while the supervisor was down),
        ``upgrade`` (a rolled-back upgrade left no worker)."""
